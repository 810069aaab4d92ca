"""Benchmark exporting a disk-offloaded model: offload_export.save_clean against the usual alternatives.

    python benchmarks/bench_export.py [--sizes 100M,400M,1.5G] [--repeats 3] [--out benchmarks/results]
    python benchmarks/bench_export.py --quick          # one ~50 MB model, one repeat (CI smoke run)
    python benchmarks/bench_export.py --issue15        # the issue-15 suite: Qwen3-0.6B shape (1.19 GB bf16),
                                                       # floors, save_clean per scheme, save_pretrained + fsync, verify

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
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 64 * 2**20  # read chunk of page-cache warming and hashing
FLOOR_CHUNK = 4 * 2**20  # pread/pwrite chunk of the floor_pread method
SAMPLE_PERIOD_S = 0.005
FLOORS = ("floor_copy_file_range", "floor_sendfile", "floor_pread", "floor_copy_file_range_wb", "floor_direct")
METHODS = ("save_clean", "save_pretrained", "save_pretrained_fsync", "accelerate_hub", "naive", *FLOORS)
DEFAULT_METHODS = ("save_clean", "save_pretrained", "accelerate_hub", "naive", *FLOORS)
ISSUE15_METHODS = (*FLOORS, "save_clean@none", "save_clean@int8", "save_clean@int4-g128", "save_clean@fp8",
                   "save_clean@nvfp4", "save_pretrained_fsync@none", "save_pretrained_fsync@int8")
DESCRIPTIONS = {
    "save_clean": "offload_export.save_clean(model, out) (then offload_export.verify(model, out), timed apart)",
    "save_pretrained": "transformers model.save_pretrained(out)",
    "save_pretrained_fsync": "transformers model.save_pretrained(out), then fsync of every file and the directory",
    "accelerate_hub": "accelerate get_state_dict_offloaded_model + huggingface_hub save_torch_state_dict",
    "naive": "every weight from the hooks' weights_map into CPU RAM + safetensors save_file",
    "floor_copy_file_range": "copy the source safetensors files into out/ with os.copy_file_range, fsync each",
    "floor_sendfile": "copy the source safetensors files into out/ with shutil.copyfile (sendfile), fsync each",
    "floor_pread": "copy the source safetensors files into out/ by 4 MiB pread/pwrite through one buffer, fsync each",
    "floor_copy_file_range_wb": "as floor_copy_file_range in 64 MiB steps, each step's writeback started at once "
                                "(posix_fadvise DONTNEED, as save_clean's writer does), fsync each",
    "floor_direct": "copy the source safetensors files into out/ by 4 MiB preadv into one aligned buffer and pwrite "
                    "with O_DIRECT (past the page cache), fsync each",
}
FSYNCS = {"save_clean": True, "save_pretrained": False, "save_pretrained_fsync": True, "accelerate_hub": False,
          "naive": False, **{f: True for f in FLOORS}}
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


def qwen3_config():
    """The shape of Qwen3-0.6B (28 layers, hidden 1024, vocab 151936, tied embeddings): 1.19 GB of bf16."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960, dtype="bfloat16")


def embed_config(target_bytes: int):
    """A bf16 Llama whose (tied) embedding is about ``target_bytes`` and dominates: two small layers."""
    from transformers import LlamaConfig

    hidden = 1024
    return LlamaConfig(vocab_size=int(target_bytes / 2 / hidden), hidden_size=hidden, intermediate_size=2816,
                       num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                       tie_word_embeddings=True, dtype="bfloat16")


def model_config(label: str):
    """``qwen3-0.6b``, ``embed-<size>`` (a dominant embedding) or a size for :func:`llama_config`."""
    if label == "qwen3-0.6b":
        return qwen3_config()
    if label.startswith("embed-"):
        return embed_config(parse_size(label.removeprefix("embed-")))
    return llama_config(parse_size(label))


def build_checkpoint(label: str, src: Path, seed: int = 0) -> dict:
    """Build a random bf16 model on the meta device, fill it in place, ``save_pretrained`` it into ``src``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = model_config(label)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.to_empty(device="cpu")  # uninitialised memory: no slow init, filled below
    model.tie_weights()  # to_empty gives tied parameters their own memory
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # non-persistent buffers, recomputed
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(src, max_shard_size="200MB")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    return {"architecture": config.model_type, "tie_word_embeddings": config.tie_word_embeddings,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_pread(src: str, dst: Path) -> None:
    buf = memoryview(bytearray(FLOOR_CHUNK))
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while n := os.preadv(fi, [buf], offset):
            done = 0
            while done < n:
                done += os.pwrite(fo, buf[done:n], offset + done)
            offset += n
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


def _copy_direct(src: str, dst: Path) -> None:
    """The last partial block is written whole (O_DIRECT takes whole blocks), then the file cut to its size."""
    size = os.path.getsize(src)
    buf = memoryview(mmap.mmap(-1, FLOOR_CHUNK))  # page-aligned
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        os.ftruncate(fo, size)
        offset = 0
        while n := os.preadv(fi, [buf], offset):
            whole = -(-n // 4096) * 4096
            done = 0
            while done < whole:
                done += os.pwrite(fo, buf[done:whole], offset + done)
            offset += n
        os.ftruncate(fo, size)
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


def _copy_file_range(src: str, dst: Path) -> None:
    size = os.path.getsize(src)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            n = os.copy_file_range(fi, fo, min(size - offset, 1 << 30), offset, offset)
            if n == 0:
                raise OSError(f"{src}: short copy")
            offset += n
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


def _copy_file_range_wb(src: str, dst: Path) -> None:
    size, step = os.path.getsize(src), 64 * 2**20
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            end = min(size, offset + step)
            start = offset
            while offset < end:
                n = os.copy_file_range(fi, fo, end - offset, offset, offset)
                if n == 0:
                    raise OSError(f"{src}: short copy")
                offset += n
            os.posix_fadvise(fo, start, end - start, os.POSIX_FADV_DONTNEED)
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


def _copy_sendfile(src: str, dst: Path) -> None:
    shutil.copyfile(src, dst)  # sendfile on Linux
    _fsync_path(dst)


def io_floor(method: str, paths: list[str], out: Path, streams: int = 1) -> None:
    """The same bytes as the export reads (the source safetensors files) copied into ``out``, each fsync-ed,
    then the directory fsync-ed: what any exporter that syncs must at least do. ``streams`` threads copy
    files at once (the floor of that many exporting processes)."""
    copy = {"floor_copy_file_range": _copy_file_range, "floor_sendfile": _copy_sendfile, "floor_pread": _copy_pread,
            "floor_copy_file_range_wb": _copy_file_range_wb, "floor_direct": _copy_direct}[method]
    out.mkdir(parents=True)
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda path: copy(path, out / os.path.basename(path)), paths))
    _fsync_path(out)


def fsync_tree(out: Path) -> None:
    """fsync every file under ``out`` and the directory (what save_clean does before its rename)."""
    for path in sorted(out.rglob("*")):
        if path.is_file():
            _fsync_path(path)
    _fsync_path(out)


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
    elif method == "save_pretrained_fsync":
        model.save_pretrained(out, max_shard_size=MAX_SHARD)
        fsync_tree(out)
    elif method == "accelerate_hub":
        from accelerate.utils.modeling import get_state_dict_offloaded_model
        from huggingface_hub import save_torch_state_dict

        out.mkdir(parents=True)  # save_torch_state_dict lists the directory before writing
        save_torch_state_dict(get_state_dict_offloaded_model(model), out, max_shard_size=MAX_SHARD)
    elif method == "naive":
        from safetensors.torch import save_file

        out.mkdir(parents=True)
        save_file(naive_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    elif method in FLOORS:
        io_floor(method, paths, out)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def load_offloaded(src: Path, offload_dir: Path, scheme: str):
    """Reload ``src`` with every module on disk (weights stay in the source safetensors files)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, device_map={"": "disk"}, offload_folder=str(offload_dir),
                                                 dtype=torch.bfloat16)
    if scheme != "none":
        import offload_export

        offload_export.quantize_weights(model, scheme=scheme)
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
    fsync_clock = _time_fsyncs()
    _say("ready")
    sys.stdin.readline()
    hwm_reset = _reset_hwm()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    export(args.child, model, out, paths)
    seconds = time.perf_counter() - t0
    _say("done")
    sys.stdin.readline()  # the parent has stopped sampling
    hwm = _proc_status("self")["VmHWM"] if hwm_reset else None
    fsync_s, fadvise_s = fsync_clock
    t0 = time.perf_counter()
    os.sync()
    flush = time.perf_counter() - t0
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "quantizer_state.safetensors"]
    out_bytes = sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin"))
    result = {"seconds": seconds, "fsync_s": fsync_s, "fadvise_s": fadvise_s, "sync_after_s": flush, "out_bytes": out_bytes, "hwm": hwm,
              "load_before": load, "source_files": len(paths),
              "source_bytes": sum(os.path.getsize(p) for p in paths)}
    if args.child == "save_clean":
        result.update(time_verify(model, out))
    result["manifest"] = manifest(out) if args.child not in FLOORS else None
    _say("result " + json.dumps(result))


def _time_fsyncs() -> list[float]:
    """Wrap ``os.fsync`` and ``os.posix_fadvise`` (which starts writeback) so that the seconds spent in them
    (any thread) add up in the returned cells: ``[fsync, fadvise]``."""
    clock = [0.0, 0.0]

    def wrap(real, cell):
        def timed(*args):
            t0 = time.perf_counter()
            try:
                return real(*args)
            finally:
                clock[cell] += time.perf_counter() - t0
        return timed

    os.fsync = wrap(os.fsync, 0)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise = wrap(os.posix_fadvise, 1)
    return clock


def time_verify(model, out: Path) -> dict:
    """``offload_export.verify(model, out)`` right after the export (sources still warm): seconds and peak."""
    import offload_export

    _release_free_memory()
    base = _proc_status("self")["VmRSS"]
    hwm_reset = _reset_hwm()
    t0 = time.perf_counter()
    report = offload_export.verify(model, out)
    seconds = time.perf_counter() - t0
    hwm = _proc_status("self")["VmHWM"] if hwm_reset else None
    return {"verify_s": seconds, "verify_ok": report.ok, "verify_peak_extra_hwm": None if hwm is None else hwm - base}


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


def run_child(method: str, src: Path, dest: Path, scheme: str, cold: bool, log: Path, code: str | None = None) -> dict:
    """One fresh interpreter, one export call (``code``: the checkout it imports the package from); returns
    timings, sampled peaks and the output manifest."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--src", str(src), "--dest", str(dest),
           "--scheme", scheme] + (["--cold"] if cold else [])
    with open(log, "a") as err:
        err.write(f"\n=== {method} {src}\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, **CHILD_ENV, **({"PYTHONPATH": code} if code else {})})
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


def split_method(method: str, default_scheme: str) -> tuple[str, str]:
    """``"save_clean@int8#base"`` -> ``("save_clean", "int8")`` (``#label``: the ``--code`` checkout it runs);
    no ``@``: the run's ``--scheme``."""
    base, _, scheme = method.partition("#")[0].partition("@")
    return base, scheme or default_scheme


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
    median = lambda key: (statistics.median(v) if (v := [r[key] for r in good if r.get(key) is not None])  # noqa: E731
                          else None)
    checks = sorted({r["check"] for r in good})
    return {"seconds_median": statistics.median(secs), "seconds_min": min(secs), "seconds_max": max(secs),
            "out_bytes": good[0]["out_bytes"], "gb_per_s": good[0]["out_bytes"] / 1e9 / statistics.median(secs),
            "peak_extra_anon": worst("peak_extra_anon"), "peak_extra_rss": worst("peak_extra_rss"),
            "peak_extra_hwm": worst("peak_extra_hwm"), "sync_after_s_median": median("sync_after_s"),
            "fsync_s_median": median("fsync_s"), "fadvise_s_median": median("fadvise_s"),
            "verify_s_median": median("verify_s"),
            "verify_ok": all(r.get("verify_ok", True) for r in good),
            "verify_peak_extra_hwm": worst("verify_peak_extra_hwm"), "load_max": worst("load_before"),
            "check": "; ".join(checks), "failed_repeats": len(runs) - len(good)}


def bench_size(label: str, args: argparse.Namespace, log: Path) -> dict:
    """Build one checkpoint, run every method ``args.repeats`` times (rotating the order), clean up."""
    work = Path(args.work) / label
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    model_info = build_checkpoint(label, work / "src")
    print(f"[{label}] built {model_info['weight_bytes'] / 1e6:.0f} MB of weights "
          f"({model_info['num_hidden_layers']} layers, hidden {model_info['hidden_size']}) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for rep in range(args.repeats):
        k = rep % len(args.methods)
        for method in args.methods[k:] + args.methods[:k]:
            base, scheme = split_method(method, args.scheme)
            dest = work / f"export-{base}-{scheme}"
            result = run_child(base, work / "src", dest, scheme, args.cold, log, args.code.get(method.partition("#")[2]))
            shutil.rmtree(dest, ignore_errors=True)
            for stale in work.glob("offload-*"):
                shutil.rmtree(stale, ignore_errors=True)
            runs[method].append(result)
            print(f"[{label}] repeat {rep + 1}/{args.repeats} {method:28s} "
                  + (result["error"] if "error" in result else
                     f"{result['seconds']:.2f} s (fsync {result['fsync_s']:.2f} s)"
                     + (f", verify {result['verify_s']:.2f} s" if "verify_s" in result else "")
                     + f", +anon {result['peak_extra_anon'] / 2**20:.0f} MiB, "
                     f"+rss {result['peak_extra_rss'] / 2**20:.0f} MiB, load {result['load_before']:.1f}"), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    references = {}
    for method, results in runs.items():
        base, scheme = split_method(method, args.scheme)
        if base == "save_clean":
            references[scheme] = next((r["manifest"] for r in results if "error" not in r), None)
    for method, results in runs.items():
        base, scheme = split_method(method, args.scheme)
        for r in results:
            if "error" not in r:
                r["check"] = "n/a (raw bytes)" if base in FLOORS else compare(r["manifest"], references.get(scheme))
                r["tensors"] = None if r["manifest"] is None else len(r.pop("manifest"))
    return {"label": label, "model": model_info, "runs": runs,
            "summary": {m: summarize(rs) for m, rs in runs.items()}}


def best_floor(summary: dict, methods: tuple[str, ...] = FLOORS) -> tuple[str | None, float | None]:
    """The fastest floor method of ``methods`` (lowest median) and its median seconds."""
    floors = [(v["seconds_median"], m) for m, v in summary.items()
              if split_method(m, "")[0] in methods and "seconds_median" in v]
    if not floors:
        return None, None
    seconds, method = min(floors)
    return method, seconds


# the issue-15 targets: (method, reference, limit); reference "floor" is the best floor method through the page
# cache (that issue's floor: floor_direct came later, and is in every x floor)
PAGE_CACHE_FLOORS = tuple(f for f in FLOORS if f != "floor_direct")
ISSUE15_TARGETS = (
    ("save_clean@none", "floor", 1.25), ("save_clean@int8", "floor", 1.6), ("save_clean@int4-g128", "floor", 1.6),
    ("save_clean@none", "save_pretrained_fsync@none", 1.0), ("save_clean@int8", "save_pretrained_fsync@int8", 1.0),
)


def targets(size: dict) -> dict:
    """Memory bound and time ratios of every save_clean row (issue 15)."""
    s = size["summary"]
    bound = 2 * size["model"]["largest_tensor_bytes"] + 64 * 2**20
    floor_method, floor_s = best_floor(s)
    out = {"memory_bound_bytes": bound, "floor_method": floor_method, "floor_seconds": floor_s, "rows": []}
    for method, v in s.items():
        if split_method(method, "")[0] != "save_clean" or "seconds_median" not in v:
            continue
        row = {"method": method, "seconds": v["seconds_median"],
               "x_floor": v["seconds_median"] / floor_s if floor_s else None,
               "fsync_share": (v["fsync_s_median"] or 0) / v["seconds_median"],
               "writeback_start_share": (v["fadvise_s_median"] or 0) / v["seconds_median"],
               "verify_x_export": (v["verify_s_median"] / v["seconds_median"]) if v["verify_s_median"] else None,
               "verify_ok": v["verify_ok"], "peak_extra_anon": v["peak_extra_anon"], "peak_extra_rss": v["peak_extra_rss"],
               "memory_ok": max(v["peak_extra_anon"], v["peak_extra_rss"]) <= bound}
        scheme = split_method(method, "none")[1]
        spf = s.get(f"save_pretrained_fsync@{scheme}", {})
        if "seconds_median" in spf:
            row["x_save_pretrained_fsync"] = v["seconds_median"] / spf["seconds_median"]
        out["rows"].append(row)
    out["checks"] = []
    page_cache_floor_s = best_floor(s, PAGE_CACHE_FLOORS)[1]
    for method, ref, limit in ISSUE15_TARGETS:
        if method not in s or "seconds_median" not in s[method]:
            continue
        ref_s = page_cache_floor_s if ref == "floor" else s.get(ref, {}).get("seconds_median")
        if ref_s:
            ratio = s[method]["seconds_median"] / ref_s
            out["checks"].append({"method": method, "vs": ref, "ratio": ratio, "limit": limit, "met": ratio <= limit})
    return out


def table(sizes: list[dict]) -> str:
    """A markdown table of every size and method."""
    head = ("size", "method", "s median", "s min", "s max", "GB/s", "+RssAnon MiB", "+VmRSS MiB",
            "x floor", "fsync s", "verify s", "sync after s", "max load", "tensors check")
    rows = [head, tuple("---" for _ in head)]
    mb = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    num = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for size in sizes:
        s = size["summary"]
        _, floor_s = best_floor(s)
        for method, v in s.items():
            if "error" in v:
                rows.append((size["label"], method, "FAILED: " + v["error"][:60]) + ("",) * (len(head) - 3))
                continue
            rows.append((size["label"], method, f"{v['seconds_median']:.2f}", f"{v['seconds_min']:.2f}",
                         f"{v['seconds_max']:.2f}", f"{v['gb_per_s']:.2f}", mb(v["peak_extra_anon"]),
                         mb(v["peak_extra_rss"]), num(v["seconds_median"] / floor_s if floor_s else None),
                         num(v["fsync_s_median"]), num(v["verify_s_median"]), num(v["sync_after_s_median"]),
                         num(v["load_max"]), v["check"]))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def targets_text(sizes: list[dict]) -> str:
    lines = []
    pct = lambda x: "-" if x is None else f"{100 * x:.0f} %"  # noqa: E731
    num = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for size in sizes:
        t = size["targets"]
        lines.append(f"{size['label']}: floor = {t['floor_method']} {num(t['floor_seconds'])} s; memory bound "
                     f"2 x largest + 64 MiB = {t['memory_bound_bytes'] / 2**20:.0f} MiB")
        for c in t["checks"]:
            lines.append(f"  {c['method']:24s} {c['ratio']:.2f} x {c['vs']} (target <= {c['limit']}): "
                         f"{'met' if c['met'] else 'MISSED'}")
        for r in t["rows"]:
            lines.append(f"  {r['method']:24s} {num(r['x_floor'])} x floor, "
                         f"{num(r.get('x_save_pretrained_fsync'))} x save_pretrained+fsync, fsync {pct(r['fsync_share'])}"
                         f" of the time (+ {pct(r['writeback_start_share'])} starting writeback), verify {num(r['verify_x_export'])} x export "
                         f"({'ok' if r['verify_ok'] else 'FOUND MISMATCHES'}), +RssAnon {r['peak_extra_anon'] / 2**20:.0f}"
                         f" / +VmRSS {r['peak_extra_rss'] / 2**20:.0f} MiB ({'ok' if r['memory_ok'] else 'OVER'})")
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
    p.add_argument("--issue15", action="store_true",
                   help="sizes qwen3-0.6b, methods: the floors, save_clean@<each scheme>, save_pretrained_fsync@none/int8")
    p.add_argument("--scheme", default="auto",
                   help="fake quantization before export: none | int8 | fp8 | int4-g128 | nvfp4 | auto "
                        "(int8 when offload_export.adapters.builtin exists, else none)")
    p.add_argument("--cold", action="store_true", help="drop the sources from the page cache before each run")
    p.add_argument("--methods", help=f"comma-separated, each one of {','.join(METHODS)}, optionally @scheme "
                                     f"(default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--code", metavar="LABEL=DIR,...", help="other checkouts: every save_clean method also runs "
                   "with PYTHONPATH=DIR, as METHOD#LABEL, interleaved with the rest")
    p.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    default_sizes = "qwen3-0.6b" if args.issue15 else "50M" if args.quick else "100M,400M,1.5G"
    args.sizes = (args.sizes or default_sizes).split(",")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.methods = [m.strip() for m in (args.methods or ",".join(ISSUE15_METHODS if args.issue15 else DEFAULT_METHODS)).split(",")]
    unknown = {split_method(m, "")[0] for m in args.methods} - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    args.code = dict(item.split("=", 1) for item in args.code.split(",")) if args.code else {}
    args.methods += [f"{m}#{label}" for m in args.methods if split_method(m, "")[0] == "save_clean" for label in args.code]
    if args.scheme == "auto":
        args.scheme = "int8" if importlib.util.find_spec("offload_export") else "none"
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
            "methods": {m: DESCRIPTIONS[split_method(m, "")[0]] for m in args.methods},
            "fsync": {m: FSYNCS[split_method(m, "")[0]] for m in args.methods}, "code": args.code}
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
