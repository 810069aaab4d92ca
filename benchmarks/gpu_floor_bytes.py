"""Whether the write floor depends on the bytes written: the floor's synthetic bytes against the export's own.

``gpu_big.floor_rates`` times writing 4 GiB made of one random MiB repeated; the standard floor is a copy of *the
same bytes* the export writes. A virtual disk that compresses or deduplicates would write the repeated MiB faster
than packed weights, and the export would be held to a floor it cannot reach. Here, on the tables' model (``--shape``,
``--table``): one export (``format="modelopt"``), its files read into memory, then interleaved rounds of writing +
fsync-ing the same number of bytes in the floor's way (64 MiB ``pwrite``, each step's writeback started at once):
``repeated`` (the floor's bytes), ``random`` (fresh random bytes), ``export`` (the export's own), plus
``copy_file_range`` of the export's files (their pages cached) and ``page_cache`` (the export's bytes written
without fsync or writeback: the one-thread copy into the page cache, the ceiling of a buffered writer), and the
export itself again each round. GB/s per method and round, and the export's ratio to each, to ``$OUT/floor_bytes.json``.

Usage (GPU machine, modelopt installed): python benchmarks/gpu_floor_bytes.py [--shape 4b] [--table NVFP4_DEFAULT_CFG] [--rounds 3]
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from gpu_big import table_model, timed, write_rate

import offload_export as oe

_STEP = 64 << 20


def _copy_files(files: list[Path], work: Path) -> float:
    """GB/s copying ``files`` with ``copy_file_range`` (64 MiB calls) + fsync each."""
    os.sync()
    total, t = 0, time.perf_counter()
    for f in files:
        src = os.open(f, os.O_RDONLY)
        dst = os.open(work / ("cfr_" + f.name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            size = os.fstat(src).st_size
            done = 0
            while done < size:
                n = os.copy_file_range(src, dst, min(_STEP, size - done), done, done)
                if n <= 0:
                    raise OSError("copy_file_range wrote nothing")
                done += n
            os.fsync(dst)
            total += size
        finally:
            os.close(src)
            os.close(dst)
    seconds = time.perf_counter() - t
    for f in files:
        (work / ("cfr_" + f.name)).unlink()
    return total / 1e9 / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="4b")
    parser.add_argument("--table", default="NVFP4_DEFAULT_CFG")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    model, rates, _, summary = table_model(work, args.shape, args.table)
    out_dir = work / "o"
    oe.save_clean(model, out_dir, format="modelopt")
    files = sorted(out_dir.glob("*.safetensors"))
    export_chunks = []
    for f in files:
        data = f.read_bytes()  # also leaves the file's pages cached for copy_file_range
        export_chunks += [data[i:i + _STEP] for i in range(0, len(data), _STEP)]
    nbytes = sum(len(c) for c in export_chunks)
    repeated = os.urandom(1 << 20) * 64
    synthetic = [repeated[:len(c)] for c in export_chunks]
    fresh = [os.urandom(len(c)) for c in export_chunks]
    result = {"shape": args.shape, "table": args.table, "layout": summary, "floor_rates": rates,
              "export_GB": round(nbytes / 1e9, 3), "rounds": []}
    print("export GB", result["export_GB"], "setup floor", rates, flush=True)
    for rnd in range(args.rounds):
        row = {"repeated": write_rate(work / "f", synthetic), "random": write_rate(work / "f", fresh),
               "export": write_rate(work / "f", export_chunks), "copy_file_range": _copy_files(files, work),
               "page_cache": write_rate(work / "f", export_chunks, sync=False)}
        row = {k: round(v, 3) for k, v in row.items()}
        shutil.rmtree(work / "o2", ignore_errors=True)
        row["ours"] = timed(lambda: oe.save_clean(model, work / "o2", format="modelopt"), work / "o2")
        del row["ours"]["disk"]
        seconds = row["ours"]["s"]
        row["ours_x"] = {k: round(seconds / (nbytes / 1e9 / row[k]), 2)
                         for k in ("repeated", "random", "export", "copy_file_range")}
        result["rounds"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ours"}), "ours", seconds, row["ours"]["ttfb_s"],
              flush=True)
        (Path(os.environ.get("OUT", ".")) / "floor_bytes.json").write_text(json.dumps(result, indent=1))
    for k in ("repeated", "random", "export", "copy_file_range", "page_cache"):
        print(f"{k:16s} GB/s median {statistics.median(r[k] for r in result['rounds']):.3f}", flush=True)


if __name__ == "__main__":
    main()
