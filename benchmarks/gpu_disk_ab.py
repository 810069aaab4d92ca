"""The 14B disk-held packed export (``gpu_big.py --part big``'s last row), interleaved variants in one process.

``now`` (as shipped), ``switch_5ms`` (the interpreter's default 5 ms switch interval while streaming),
``no_digest`` (resume's in-memory digest never computed), ``cold`` (the checkpoint's pages dropped from the page
cache first, ``POSIX_FADV_DONTNEED``): two rounds. Seconds, TTFB, x floor to ``$OUT/disk_ab_h200.json``.

Usage (GPU machine, modelopt installed): python benchmarks/gpu_disk_ab.py
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from gpu_big import disk_held_model, floor_s, timed

import offload_export as oe
from offload_export import _process as P
from offload_export import resume as R

work = Path(tempfile.mkdtemp())
model, rates, read, summary = disk_held_model(work)
real_digest = R.memory_digest
out = {"floor_rates": rates, "layout": summary}


def drop_cache() -> None:
    for f in (work / "src").glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


for rep in range(2):
    for variant in ("now", "switch_5ms", "no_digest", "cold"):
        P._SWITCH_INTERVAL = 0.005 if variant == "switch_5ms" else 5e-4
        R.memory_digest = (lambda *a, **k: None) if variant == "no_digest" else real_digest
        if variant == "cold":
            drop_cache()
        row = timed(lambda: oe.save_clean(model, work / "o", format="modelopt"), work / "o")
        row["x_floor"] = round(row["s"] / floor_s(rates, read, row["written_GB"]), 2)
        shutil.rmtree(work / "o")
        out.setdefault(variant, []).append(row)
        print(variant, row, flush=True)
print(json.dumps(out))
(Path(os.environ.get("OUT", ".")) / "disk_ab_h200.json").write_text(json.dumps(out, indent=1))
