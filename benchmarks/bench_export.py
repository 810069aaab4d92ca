"""Benchmark exporting a disk-offloaded model: offload_export.save_clean against the usual alternatives.

    python benchmarks/bench_export.py [--sizes 100M,400M,1.5G] [--repeats 3] [--out benchmarks/results]
    python benchmarks/bench_export.py --quick          # one ~50 MB model, one repeat (CI smoke run)

For each size a bf16 Llama-shaped checkpoint is built and saved once. Every (method, repeat) then runs in a
fresh child interpreter that reloads the checkpoint with every module offloaded to disk and times ONLY the
export call. Memory is sampled every ~5 ms from /proc/<child>/status by a thread in this (parent)
process: a sampler thread inside the child would starve whenever the export holds the GIL. See README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CHUNK = 64 * 2**20  # read/write chunk of the I/O floor and of page-cache warming
SAMPLE_PERIOD_S = 0.005
METHODS = ("save_clean", "save_pretrained", "accelerate_hub", "naive", "io_floor")
DESCRIPTIONS = {
    "save_clean": "offload_export.save_clean(model, out)",
    "save_pretrained": "transformers model.save_pretrained(out)",
    "accelerate_hub": "accelerate get_state_dict_offloaded_model + huggingface_hub save_torch_state_dict",
    "naive": "every weight from the hooks' weights_map into CPU RAM + safetensors save_file",
    "io_floor": "read the source safetensors in 64 MB chunks into one buffer, write as many bytes, fsync",
}
FSYNCS = {"save_clean": True, "save_pretrained": False, "accelerate_hub": False, "naive": False, "io_floor": True}
MAX_SHARD = "5GB"  # the same for every method that shards (save_torch_state_dict's default)
CHILD_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
             "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- sizes and the source checkpoint

def parse_size(text: str) -> int:
    """``"100M"`` / ``"1.5G"`` / ``"50MB"`` -> bytes (decimal units)."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    t = text.strip().upper().removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(float(t))


def llama_config(target_bytes: int):
    """A bf16 LlamaConfig (untied embeddings) whose weights total about ``target_bytes``."""
    from transformers import LlamaConfig

    hidden = 512 if target_bytes < 80e6 else 768 if target_bytes < 250e6 else 1024 if target_bytes < 800e6 else 2048
    vocab = 8000 if target_bytes < 80e6 else 16000 if target_bytes < 250e6 else 32000
    inter = round(2.75 * hidden / 256) * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_bytes / 2 - 2 * vocab * hidden - hidden) / per_layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       tie_word_embeddings=False, dtype="bfloat16")


def build_checkpoint(target_bytes: int, src: Path, seed: int = 0) -> dict:
    """Build a random bf16 Llama on the meta device, fill it in place, ``save_pretrained`` it into ``src``."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = llama_config(target_bytes)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")  # uninitialised memory: no slow init, filled below
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # non-persistent buffers, recomputed
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(src, max_shard_size="200MB")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "weight_bytes": nbytes, "largest_tensor_bytes": largest}


# ---------------------------------------------------------------- child side: one method, one export call

def stream_read(paths: list[str], buf: bytearray, sink=None) -> int:
    """Read ``paths`` sequentially through ``buf`` (64 MB), passing each chunk to ``sink``; return bytes read."""
    view, total = memoryview(buf), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                if sink is not None:
                    sink(view[:n])
                total += n
    return total


def io_floor(paths: list[str], out: Path) -> None:
    """Plain sequential copy of the source bytes into one file, fsync at the end (as save_clean does)."""
    out.mkdir(parents=True)
    buf = bytearray(CHUNK)
    with open(out / "floor.bin", "wb", buffering=0) as f:
        stream_read(paths, buf, f.write)
        os.fsync(f.fileno())


def naive_state_dict(model) -> dict:
    """Every state-dict entry copied into CPU RAM, offloaded ones taken from their hook's ``weights_map``."""
    import torch

    state = {}
    for name, module in model.named_modules():
        hooks = getattr(module, "_hf_hook", None)
        hooks = getattr(hooks, "hooks", [hooks])  # SequentialHook holds several
        maps = [h.weights_map for h in hooks if getattr(h, "weights_map", None) is not None]
        prefix = f"{name}." if name else ""
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or attr in getattr(module, "_non_persistent_buffers_set", ()):
                continue
            if t.device.type == "meta":
                t = _lookup(maps, attr, prefix + attr)
            # a copy: safetensors' get_tensor returns a view of its mmap, which is not "in RAM" yet
            state[prefix + attr] = t.detach().to("cpu", copy=True).contiguous()
    assert all(v.device != torch.device("meta") for v in state.values())
    return state


def _lookup(maps: list, attr: str, name: str):
    for weights_map in maps:
        try:
            return weights_map[attr]
        except KeyError:
            continue
    raise KeyError(f"{name} is on the meta device and no hook's weights_map has it")


def export(method: str, model, out: Path, paths: list[str]) -> None:
    """The one call that is timed."""
    if method == "save_clean":
        import offload_export

        offload_export.save_clean(model, out, max_shard_size=MAX_SHARD)
    elif method == "save_pretrained":
        model.save_pretrained(out, max_shard_size=MAX_SHARD)
    elif method == "accelerate_hub":
        from accelerate.utils.modeling import get_state_dict_offloaded_model
        from huggingface_hub import save_torch_state_dict

        out.mkdir(parents=True)  # save_torch_state_dict lists the directory before writing
        save_torch_state_dict(get_state_dict_offloaded_model(model), out, max_shard_size=MAX_SHARD)
    elif method == "naive":
        from safetensors.torch import save_file

        out.mkdir(parents=True)
        save_file(naive_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    elif method == "io_floor":
        io_floor(paths, out)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def load_offloaded(src: Path, offload_dir: Path, scheme: str):
    """Reload ``src`` with every module on disk (weights stay in the source safetensors files)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, device_map={"": "disk"}, offload_folder=str(offload_dir),
                                                 dtype=torch.bfloat16)
    if scheme != "none":
        from offload_export.adapters.builtin import quantize_weights

        quantize_weights(model, scheme=scheme)
    return model


def source_files(model) -> list[str]:
    """The files the offloaded model's weights are read from, in name order."""
    import offload_export

    stores = (i.ref.store for i in offload_export.layout(model).values() if i.ref is not None)
    return sorted({s.path for s in stores if s.path is not None})


def prepare_page_cache(paths: list[str], cold: bool) -> None:
    """Flush dirty pages, then either read the sources once (warm) or drop them from the page cache (cold)."""
    os.sync()
    if cold:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    else:
        stream_read(paths, bytearray(CHUNK))


def manifest(out: Path) -> dict[str, list]:
    """``{tensor name: [dtype, shape, sha1 of its bytes]}`` over every safetensors file in ``out``."""
    result, buf = {}, bytearray(CHUNK)
    for path in sorted(out.glob("*.safetensors")):
        if path.name == "quantizer_state.safetensors":
            continue
        with open(path, "rb", buffering=0) as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                start, end = entry["data_offsets"]
                f.seek(8 + length + start)
                digest, left = hashlib.sha1(), end - start
                while left:
                    n = f.readinto(memoryview(buf)[:min(left, CHUNK)])
                    digest.update(memoryview(buf)[:n])
                    left -= n
                result[name] = [entry["dtype"], entry["shape"], digest.hexdigest()]
    return result


def _say(line: str) -> None:
    sys.stdout.write(f"@@{line}\n")
    sys.stdout.flush()


def _proc_status(pid: int | str) -> dict[str, int]:
    """RssAnon, VmRSS and VmHWM of ``pid`` in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap back to the OS.

    Loading and quantizing free a lot of memory that glibc keeps mapped; without this, an export that
    reuses those pages would show less extra RSS than one that runs in a fresh process.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def child_main(args: argparse.Namespace) -> None:
    """Load, prepare the page cache, wait for the parent's "go", run the export, report."""
    src, out = Path(args.src), Path(args.dest)
    model = load_offloaded(src, out.parent / f"offload-{os.getpid()}", args.scheme)
    paths = source_files(model)
    _release_free_memory()
    prepare_page_cache(paths, args.cold)
    _say("ready")
    sys.stdin.readline()
    hwm_reset = _reset_hwm()
    t0 = time.perf_counter()
    export(args.child, model, out, paths)
    seconds = time.perf_counter() - t0
    _say("done")
    sys.stdin.readline()  # the parent has stopped sampling
    hwm = _proc_status("self")["VmHWM"] if hwm_reset else None
    t0 = time.perf_counter()
    os.sync()
    flush = time.perf_counter() - t0
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "quantizer_state.safetensors"]
    out_bytes = sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin"))
    result = {"seconds": seconds, "sync_after_s": flush, "out_bytes": out_bytes, "hwm": hwm,
              "source_files": len(paths), "source_bytes": sum(os.path.getsize(p) for p in paths),
              "manifest": manifest(out) if args.child != "io_floor" else None}
    _say("result " + json.dumps(result))


def _reset_hwm() -> bool:
    """Reset VmHWM (the kernel's exact peak VmRSS) so it covers only the export call; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- parent side: sampling, repeats, report

class Sampler(threading.Thread):
    """Sample RssAnon and VmRSS of ``pid`` every ~5 ms until stopped; keep the peaks."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, {"RssAnon": 0, "VmRSS": 0}, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                status = _proc_status(self.pid)
            except (OSError, ValueError):
                break
            if not all(key in status for key in self.peak):  # a zombie has no memory lines
                break
            for key in self.peak:
                self.peak[key] = max(self.peak[key], status[key])
            self.samples += 1
            self._stop_event.wait(SAMPLE_PERIOD_S)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        return self.peak


def _expect(proc: subprocess.Popen, word: str) -> str:
    for line in proc.stdout:
        if line.startswith("@@" + word):
            return line[2 + len(word):].strip()
    raise RuntimeError(f"child exited before sending {word!r}")


def run_child(method: str, src: Path, dest: Path, scheme: str, cold: bool, log: Path) -> dict:
    """One fresh interpreter, one export call; returns timings, sampled peaks and the output manifest."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--src", str(src), "--dest", str(dest),
           "--scheme", scheme] + (["--cold"] if cold else [])
    with open(log, "a") as err:
        err.write(f"\n=== {method} {src}\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, **CHILD_ENV})
        try:
            _expect(proc, "ready")
            before = _proc_status(proc.pid)
            sampler = Sampler(proc.pid)
            sampler.start()
            time.sleep(2 * SAMPLE_PERIOD_S)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _expect(proc, "done")
            peak = sampler.stop()
            proc.stdin.write("ack\n")
            proc.stdin.flush()
            result = json.loads(_expect(proc, "result"))
        except (RuntimeError, OSError, ValueError) as e:
            proc.kill()
            proc.wait()
            return {"error": f"{type(e).__name__}: {e} (see {log})"}
        proc.wait()
    result["peak_extra_anon"] = peak["RssAnon"] - before["RssAnon"]
    result["peak_extra_rss"] = peak["VmRSS"] - before["VmRSS"]
    hwm = result.pop("hwm")
    result["peak_extra_hwm"] = None if hwm is None else hwm - before["VmRSS"]
    result["samples"] = sampler.samples
    return result


def compare(got: dict | None, reference: dict | None) -> str:
    """"ok", or how ``got``'s tensors (names, dtype, shape, bytes) differ from save_clean's."""
    if reference is None:
        return "no reference"
    if got is None:
        return "-"
    differ = sum(1 for k in got.keys() & reference.keys() if got[k] != reference[k])
    missing, extra = len(reference.keys() - got.keys()), len(got.keys() - reference.keys())
    parts = [f"{n} {what}" for n, what in ((differ, "differ"), (missing, "missing"), (extra, "extra")) if n]
    return "ok" if not parts else "MISMATCH: " + ", ".join(parts)


def summarize(runs: list[dict]) -> dict:
    """Median/min/max seconds and the worst peaks over the successful repeats."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"] if runs else "not run"}
    secs = [r["seconds"] for r in good]
    worst = lambda key: max((r[key] for r in good if r.get(key) is not None), default=None)  # noqa: E731
    checks = sorted({r["check"] for r in good})
    return {"seconds_median": statistics.median(secs), "seconds_min": min(secs), "seconds_max": max(secs),
            "out_bytes": good[0]["out_bytes"], "gb_per_s": good[0]["out_bytes"] / 1e9 / statistics.median(secs),
            "peak_extra_anon": worst("peak_extra_anon"), "peak_extra_rss": worst("peak_extra_rss"),
            "peak_extra_hwm": worst("peak_extra_hwm"), "sync_after_s_median":
            statistics.median(r["sync_after_s"] for r in good), "check": "; ".join(checks),
            "failed_repeats": len(runs) - len(good)}


def bench_size(label: str, args: argparse.Namespace, log: Path) -> dict:
    """Build one checkpoint, run every method ``args.repeats`` times (rotating the order), clean up."""
    work = Path(args.work) / label
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    model_info = build_checkpoint(parse_size(label), work / "src")
    print(f"[{label}] built {model_info['weight_bytes'] / 1e6:.0f} MB of weights "
          f"({model_info['num_hidden_layers']} layers, hidden {model_info['hidden_size']}) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for rep in range(args.repeats):
        k = rep % len(args.methods)
        for method in args.methods[k:] + args.methods[:k]:
            dest = work / f"export-{method}"
            result = run_child(method, work / "src", dest, args.scheme, args.cold, log)
            shutil.rmtree(dest, ignore_errors=True)
            for stale in work.glob("offload-*"):
                shutil.rmtree(stale, ignore_errors=True)
            runs[method].append(result)
            print(f"[{label}] repeat {rep + 1}/{args.repeats} {method:16s} "
                  + (result["error"] if "error" in result else
                     f"{result['seconds']:.2f} s, +anon {result['peak_extra_anon'] / 2**20:.0f} MiB, "
                     f"+rss {result['peak_extra_rss'] / 2**20:.0f} MiB"), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    reference = next((r["manifest"] for r in runs.get("save_clean", []) if "error" not in r), None)
    for method, results in runs.items():
        for r in results:
            if "error" not in r:
                r["check"] = "n/a (raw bytes)" if method == "io_floor" else compare(r["manifest"], reference)
                r["tensors"] = None if r["manifest"] is None else len(r.pop("manifest"))
    return {"label": label, "model": model_info, "runs": runs,
            "summary": {m: summarize(rs) for m, rs in runs.items()}}


def targets(size: dict) -> dict:
    """The issue's targets for save_clean at one size: memory bound, and time ratios."""
    s = size["summary"]
    clean, pretrained, floor = s.get("save_clean", {}), s.get("save_pretrained", {}), s.get("io_floor", {})
    if "seconds_median" not in clean:
        return {"error": "save_clean did not run"}
    bound = 2 * size["model"]["largest_tensor_bytes"] + 64 * 2**20
    ratio = lambda other: clean["seconds_median"] / other["seconds_median"] if "seconds_median" in other else None  # noqa: E731
    out = {"memory_bound_bytes": bound,
           "anon_ok": clean["peak_extra_anon"] <= bound, "rss_ok": clean["peak_extra_rss"] <= bound,
           "vs_save_pretrained": ratio(pretrained), "vs_floor": ratio(floor)}
    out["time_vs_save_pretrained_ok"] = out["vs_save_pretrained"] is not None and out["vs_save_pretrained"] <= 1.0
    out["time_vs_floor_ok"] = out["vs_floor"] is not None and out["vs_floor"] <= 1.5
    return out


def table(sizes: list[dict]) -> str:
    """A markdown table of every size and method."""
    head = ("size", "method", "s median", "s min", "s max", "GB/s", "+RssAnon MiB", "+VmRSS MiB",
            "x save_pretrained", "x floor", "sync after s", "tensors check")
    rows = [head, tuple("---" for _ in head)]
    mb = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    for size in sizes:
        s = size["summary"]
        base = {m: s.get(m, {}).get("seconds_median") for m in ("save_pretrained", "io_floor")}
        for method, v in s.items():
            if "error" in v:
                rows.append((size["label"], method, "FAILED: " + v["error"][:60]) + ("",) * (len(head) - 3))
                continue
            rel = lambda b: "-" if not b else f"{v['seconds_median'] / b:.2f}"  # noqa: E731
            rows.append((size["label"], method, f"{v['seconds_median']:.2f}", f"{v['seconds_min']:.2f}",
                         f"{v['seconds_max']:.2f}", f"{v['gb_per_s']:.2f}", mb(v["peak_extra_anon"]),
                         mb(v["peak_extra_rss"]), rel(base["save_pretrained"]), rel(base["io_floor"]),
                         f"{v['sync_after_s_median']:.2f}", v["check"]))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def targets_text(sizes: list[dict]) -> str:
    lines = []
    for size in sizes:
        t = size["targets"]
        if "error" in t:
            lines.append(f"{size['label']}: {t['error']}")
            continue
        s = size["summary"]["save_clean"]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"{size['label']}: save_clean +RssAnon {s['peak_extra_anon'] / 2**20:.1f} MiB, "
                     f"+VmRSS {s['peak_extra_rss'] / 2**20:.1f} MiB vs bound 2 x largest + 64 MiB = "
                     f"{t['memory_bound_bytes'] / 2**20:.1f} MiB ({'ok' if t['anon_ok'] and t['rss_ok'] else 'MISSED'}); "
                     f"time {fmt(t['vs_save_pretrained'])} x save_pretrained "
                     f"({'ok' if t['time_vs_save_pretrained_ok'] else 'MISSED'}, target <= 1.0), "
                     f"{fmt(t['vs_floor'])} x floor ({'ok' if t['time_vs_floor_ok'] else 'MISSED'}, target <= 1.5)")
    return "\n".join(lines)


def plot(sizes: list[dict], path: Path) -> bool:
    """Peak extra RssAnon and VmRSS against model size, one line per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = [s["model"]["weight_bytes"] / 2**20 for s in sizes]
    bound = [(2 * s["model"]["largest_tensor_bytes"] + 64 * 2**20) / 2**20 for s in sizes]
    for ax, key, title in zip(axes, ("peak_extra_anon", "peak_extra_rss"), ("RssAnon", "VmRSS")):
        for method in sizes[0]["summary"]:
            ys = [s["summary"].get(method, {}).get(key) for s in sizes]
            pts = [(x, max(y / 2**20, 0.1)) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.plot(xs, bound, "k--", label="target: 2 x largest tensor + 64 MiB")
        ax.set(xscale="log", yscale="log", xlabel="model weights (MiB)", ylabel=f"peak extra {title} (MiB)",
               title=f"peak extra {title} during the export call")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "safetensors", "huggingface_hub", "offload_export"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine(work: Path) -> dict:
    """CPU, RAM, the disk under ``work``, library versions, date, the package's git commit."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    work = work.resolve()
    mounts = [line.split()[:3] for line in open("/proc/mounts")]
    dev, mnt, fstype = max((m for m in mounts if str(work).startswith(m[1])), key=lambda m: len(m[1]))
    rotational = Path(f"/sys/block/{Path(dev).name}/queue/rotational")
    git = lambda *a: subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True).stdout  # noqa: E731
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "ram_bytes": mem, "platform": platform.platform(),
            "disk": {"device": dev, "mount": mnt, "fstype": fstype,
                     "rotational": rotational.read_text().strip() if rotational.exists() else None},
            "versions": _versions(), "git_commit": git("rev-parse", "HEAD").strip() or None,
            "package_uncommitted_changes": bool(git("status", "--porcelain", "--", "offload_export").strip()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="comma-separated target weight sizes (default 100M,400M,1.5G; --quick: 50M)")
    p.add_argument("--repeats", type=int, help="runs of each method per size (default 3; --quick: 1)")
    p.add_argument("--out", default="benchmarks/results", help="where results.json and results.png go")
    p.add_argument("--work", default="benchmarks/out", help="scratch space for checkpoints and exports")
    p.add_argument("--quick", action="store_true", help="one ~50 MB model, one repeat: a smoke run for CI")
    p.add_argument("--scheme", default="auto",
                   help="fake quantization before export: none | int8 | fp8 | int4-g128 | nvfp4 | auto "
                        "(int8 when offload_export.adapters.builtin exists, else none)")
    p.add_argument("--cold", action="store_true", help="drop the sources from the page cache before each run")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.sizes = (args.sizes or ("50M" if args.quick else "100M,400M,1.5G")).split(",")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.scheme == "auto":
        args.scheme = "int8" if importlib.util.find_spec("offload_export.adapters.builtin") else "none"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    log.write_text("")
    info = {"machine": machine(work), "scheme": args.scheme, "repeats": args.repeats, "cold": args.cold,
            "page_cache": "cold: sources dropped (POSIX_FADV_DONTNEED) before each run" if args.cold else
            "warm: sources read once right before each run", "max_shard_size": MAX_SHARD,
            "methods": {m: DESCRIPTIONS[m] for m in args.methods}, "fsync": {m: FSYNCS[m] for m in args.methods}}
    print(f"scheme={args.scheme} repeats={args.repeats} sizes={args.sizes} page cache="
          f"{'cold' if args.cold else 'warm'}", flush=True)
    sizes = []
    for label in args.sizes:
        size = bench_size(label, args, log)
        size["targets"] = targets(size)
        sizes.append(size)
    info["sizes"] = sizes
    (out / "results.json").write_text(json.dumps(info, indent=2) + "\n")
    print("\n" + table(sizes) + "\n\n" + targets_text(sizes))
    if plot(sizes, out / "results.png"):
        print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")
    else:
        print(f"\nwrote {out / 'results.json'} (pip install matplotlib for the plot)")


if __name__ == "__main__":
    main()
