"""Benchmark resume: time to finish a 90 %-done export against a fresh one, and what the journal costs.

    python benchmarks/bench_resume.py                    # ~350 MB bf16 Llama, 20 MB shards, 2 repeats
    python benchmarks/bench_resume.py --layers 24 --shard-mb 50 --repeats 3

A bf16 Llama (hidden 1024, MLP 2816, untied embeddings) is saved once as a safetensors checkpoint. Each
measurement is a child process that loads it with ``device_map={"": "disk"}`` (weights read from that
checkpoint), fake-quantizes every Linear with the built-in int8 scheme and times ``save_clean`` alone:

* ``fresh``: a plain export (journal and digests included: what every export does);
* ``no-journal``: the same with the journal's shard CRC-32s (computed beside the writes) and the in-memory
  digest switched off, so that ``fresh - no-journal`` is the journal's cost;
* ``resume-90``: first a child is SIGKILL-ed once 90 % of the shards are complete and recorded; then a
  child times ``save_clean(..., resume=True)``, which verifies the kept shards (their CRC-32 again) and writes
  the rest. The result is checked byte for byte against the fresh export.

Methods are interleaved by repeat. Results: a table on stdout and JSON in
``benchmarks/results/resume.json``. The files sit in the page cache (a warm disk), as in the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = {"TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)


def _make_checkpoint(path: Path, layers: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(layers), dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _child(args: dict) -> None:
    """Load, quantize, (arm) and time one export; print a JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    import offload_export as oe
    from offload_export import resume as resume_mod
    from offload_export import writer as writer_mod

    work = Path(args["work"])
    model = AutoModelForCausalLM.from_pretrained(work / "ckpt", device_map={"": "disk"}, dtype=torch.bfloat16,
                                                 offload_folder=str(work / "offload"))
    oe.quantize_weights(model, "int8")
    if args["method"] == "no-journal":
        resume_mod.ResumeSession.shard_done = lambda self, path, crc32: None
        resume_mod.memory_digest = lambda *a, **k: None
        writer_mod.ShardWriter._checksum = lambda self, nbytes, fn, *a: None
    if args["method"] == "kill":  # once the k-th shard is complete and its record is in the journal: SIGKILL
        append, shard_done, records, shards = resume_mod._append, resume_mod.ResumeSession.shard_done, [0], [0]

        def append_(fd, data):
            append(fd, data)
            records[0] += b'"file"' in data

        def shard_done_(self, path, crc32):
            shard_done(self, path, crc32)
            shards[0] += 1
            if shards[0] == args["kill_after"]:
                deadline = time.monotonic() + 120
                while records[0] < shards[0] and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        resume_mod._append, resume_mod.ResumeSession.shard_done = append_, shard_done_
    start = time.perf_counter()
    report = oe.save_clean(model, work / args["out"], max_shard_size=args["shard"], resume=args["method"] != "fresh"
                           and args["method"] != "no-journal")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "shards": report.shards, "reused": report.reused_shards,
                      "reused_bytes": report.reused_bytes, "written": report.written_shards,
                      "written_bytes": report.written_bytes, "notes": report.notes}))


def _run(args: dict) -> tuple[int, dict | None]:
    env = dict(os.environ, **ENV, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         env=env, timeout=1800)
    lines = run.stdout.strip().splitlines()
    if run.returncode == 0:
        return 0, json.loads(lines[-1])
    if run.returncode != -signal.SIGKILL:
        raise RuntimeError(run.stderr[-3000:])
    return run.returncode, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shard-mb", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--done", type=float, default=0.9, help="fraction of shards completed before the kill")
    ap.add_argument("--work", default=str(HERE / "out" / "resume"))
    ap.add_argument("--out", default=str(HERE / "results" / "resume.json"))
    ap.add_argument("--child")
    opts = ap.parse_args()
    if opts.child:
        _child(json.loads(opts.child))
        return
    work = Path(opts.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_bytes = _make_checkpoint(work / "ckpt", opts.layers)
    shard = opts.shard_mb * 10**6
    rows: dict[str, list[dict]] = {"fresh": [], "no-journal": [], "resume-90": []}
    reference = None
    for rep in range(opts.repeats):
        for method in rows:
            out = f"{method}-{rep}"
            load = os.getloadavg()[0]
            if method == "resume-90":
                shards = rows["fresh"][0]["shards"]
                killed, _ = _run({"work": str(work), "out": out, "shard": shard, "method": "kill",
                                  "kill_after": math.ceil(opts.done * shards)})
                assert killed == -signal.SIGKILL, "the export finished before the kill point"
            _, row = _run({"work": str(work), "out": out, "shard": shard,
                           "method": "resume" if method == "resume-90" else method})
            row["load"] = load
            if reference is None:
                reference = _files(work / out)
            row["identical"] = _files(work / out) == reference
            shutil.rmtree(work / out)
            rows[method].append(row)
            print(f"{method:>10} #{rep}: {row['seconds']:.2f} s  reused {row['reused']}/{row['shards']} "
                  f"identical={row['identical']} load={load:.1f}", file=sys.stderr)
    best = {m: min(r["seconds"] for r in rs) for m, rs in rows.items()}
    median = {m: statistics.median(r["seconds"] for r in rs) for m, rs in rows.items()}
    loads = [r["load"] for rs in rows.values() for r in rs]
    print(f"model: {model_bytes / 1e6:.0f} MB bf16, {rows['fresh'][0]['shards']} shards of <= {opts.shard_mb} MB, "
          f"int8 folded; {opts.repeats} repeats; load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'method':>12} {'best s':>8} {'median s':>9} {'all s':>30} {'best/fresh':>10} {'med/fresh':>9} "
          f"{'kept':>5} {'written MB':>11}")
    for m, rs in rows.items():
        times = " ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"{m:>12} {best[m]:8.2f} {median[m]:9.2f} {times:>30} {best[m] / best['fresh']:10.0%} "
              f"{median[m] / median['fresh']:9.0%} {rs[0]['reused']:5d} {rs[0]['written_bytes'] / 1e6:11.1f}")
    for name, of in (("best", best), ("median", median)):
        print(f"journal cost ({name}, fresh - no-journal): {of['fresh'] - of['no-journal']:+.2f} s "
              f"({(of['fresh'] - of['no-journal']) / of['no-journal']:+.1%})")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model_bytes": model_bytes,
              "shard_mb": opts.shard_mb, "done": opts.done, "rows": rows, "best": best, "median": median}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
