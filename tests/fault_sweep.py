"""The child side of the I/O fault sweep (``test_fault_sweep.py``): fail the k-th call of one file-system function.

Run as ``python fault_sweep.py <json>`` in a child process. The child builds one real disk-offloaded model per
scenario, runs the scenario's operation once to count the calls it makes of each function in :data:`FAULTS`
(every thread counted), then runs it again once per injection point ``(function, k, errno)``, the k-th call of
that function failing with that errno, and checks after each what must hold whatever failed (SQLite's
I/O-error tests are the model):

- the operation raised the injected ``OSError`` (itself, or as the cause / context of the library's
  exception), or succeeded with a complete, verified result (a hint such as ``posix_fadvise`` may be ignored);
- nothing at the destination and nothing beside it (no staging directory), nothing left in ``TMPDIR``;
- the model unchanged: every tensor's home (meta / device, the same objects), its quantizers, the logits;
- no descriptor, no thread more than before, ``torch.get_num_threads()`` unchanged;
- every offload store (offload folders, the source checkpoint) byte-identical; for a ``writeback`` each file
  is wholly its old or wholly its new bytes.

It prints one JSON line per event: ``{"counts": ...}`` per scenario, then ``{"start": point}`` and
``{"point": point, "violations": [...], ...}`` per injection, so the parent can kill a child that hangs and
name the injection point that hung.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

import offload_export as oe
from offload_export import _aio, _atomic, resume, writer

# function name -> (module holding it, attribute, errnos it is failed with: the first by default, all in -m slow).
# A point's function may name a call site: ("close@_same_bytes", k, errno) fails the k-th close made there.
# Python retries EINTR itself in every os.* call here (PEP 475); renameat2 goes through ctypes, which does not.
FAULTS: dict[str, tuple[object, str, tuple[int, ...]]] = {
    "open": (os, "open", (errno.EMFILE, errno.EIO)),
    "builtins.open": (builtins, "open", (errno.EMFILE, errno.ENOSPC)),
    "pwrite": (os, "pwrite", (errno.ENOSPC, errno.EIO)),
    "pwritev": (os, "pwritev", (errno.ENOSPC, errno.EIO)),
    "pwritev_many": (_aio, "pwritev_many", (errno.ENOSPC, errno.EIO)),  # pwritev calls submitted together (Linux AIO)
    "write": (os, "write", (errno.ENOSPC,)),
    "copy_file_range": (os, "copy_file_range", (errno.ENOSPC, errno.EIO)),
    "sendfile": (os, "sendfile", (errno.ENOSPC,)),
    "preadv": (os, "preadv", (errno.EIO,)),
    "pread": (os, "pread", (errno.EIO,)),
    "readv": (os, "readv", (errno.EIO,)),
    "fsync": (os, "fsync", (errno.EIO,)),
    "fdatasync": (os, "fdatasync", (errno.EIO,)),
    "ftruncate": (os, "ftruncate", (errno.EIO, errno.ENOSPC)),
    "rename": (os, "rename", (errno.EIO, errno.ENOSPC)),
    "replace": (os, "replace", (errno.EIO,)),
    "renameat2": (_atomic, "_renameat2_fn", (errno.EIO, errno.EINTR)),
    "mkdir": (os, "mkdir", (errno.ENOSPC, errno.EIO)),  # os.makedirs and Path.mkdir call it
    "posix_fadvise": (os, "posix_fadvise", (errno.EIO,)),
    "close": (os, "close", (errno.EIO,)),  # as on Linux: the descriptor is released, then the error reported
}


class Injector:
    """Wraps the functions of :data:`FAULTS` while active: counts their calls, fails the armed one."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.target: tuple[str, int, int] | None = None
        self.fired = self.in_cleanup = False
        self.where: list[str] = []  # the innermost frames of the failed call
        self._short = False  # the armed call wrote short (disk full): the next call of it fails
        self._lock = threading.Lock()

    def _hit(self, name: str, short: bool = False) -> int:
        """Count a call of ``name``; the errno to fail it with, -1 to make it write short, or 0."""
        with self._lock:
            self.counts[name] += 1
            if self.target is None or self.target[0].partition("@")[0] != name:
                return 0
            if self._short:
                self._short = False
                return self.target[2]
            site = self.target[0].partition("@")[2]  # "close@_same_bytes": the k-th call from that function
            if site:
                if not any(f.f_code.co_name == site for f in list(_frames())[1:4]):
                    return 0
                self.counts[self.target[0]] += 1
            if self.counts[self.target[0]] != self.target[1]:
                return 0
            self.fired = True
            frames = list(_frames())
            self.where = [f"{f.f_code.co_filename.rpartition('/')[2]}:{f.f_lineno} {f.f_code.co_name}"
                          for f in frames[:6]]
            # in shutil.rmtree: cleanup after the operation failed or finished, which cannot be forced
            self.in_cleanup = any(f.f_code.co_name in ("rmtree", "_rmtree_safe_fd") for f in frames)
            if short and self.target[2] == errno.ENOSPC:
                self._short = True  # as a filling disk does: a short write first, ENOSPC at the next call
                return -1
            return self.target[2]

    def _wrap(self, name: str, real):
        if name == "renameat2":  # _renameat2_fn() returns the ctypes function, or None where there is none
            def fn_getter():
                fn = real()
                if fn is None:
                    return None

                def renameat2(*args):
                    err = self._hit(name)
                    if err:
                        ctypes.set_errno(err)
                        return -1
                    return fn(*args)
                return renameat2
            return fn_getter

        def wrapper(*args, **kwargs):
            err = self._hit(name, short=name in _SHORT and _SHORT[name](args) > 1)
            if err < 0:
                return real(*_halved(name, args))
            if not err:
                return real(*args, **kwargs)
            if name == "close":
                real(*args, **kwargs)
            raise OSError(err, f"{os.strerror(err)} (injected: {name} call {self.counts[name]})")
        return wrapper

    @contextmanager
    def active(self, target: tuple[str, int, int] | None = None):
        self.counts, self.target, self.fired, self.in_cleanup, self._short = Counter(), target, False, False, False
        self.where = []
        saved = []
        for name, (owner, attr, _) in FAULTS.items():
            real = getattr(owner, attr, None)
            if real is None:
                continue
            saved.append((owner, attr, real))
            setattr(owner, attr, self._wrap(name, real))
        io_open = io.open
        io.open = builtins.open  # pathlib and tempfile open through io.open: the same function as builtins.open
        try:
            yield self
        finally:
            io.open = io_open
            for owner, attr, real in reversed(saved):
                setattr(owner, attr, real)
            self.target = None


# the byte count of the writes that a full disk cuts short
_SHORT = {"pwrite": lambda a: len(memoryview(a[1])), "pwritev": lambda a: sum(len(memoryview(b)) for b in a[1]),
          "copy_file_range": lambda a: a[2]}


def _halved(name: str, args: tuple) -> tuple:
    if name == "pwrite":
        fd, data, offset = args
        return fd, memoryview(data)[:len(memoryview(data)) // 2], offset
    if name == "pwritev":  # the first half of the bytes
        fd, buffers, offset = args
        left, half = [], _SHORT[name](args) // 2
        for b in map(memoryview, buffers):
            left.append(b[:half])
            half -= len(left[-1])
        return fd, [b for b in left if len(b)], offset
    return (*args[:2], args[2] // 2, *args[3:])


def _frames():
    f = sys._getframe(2)
    while f is not None:
        yield f
        f = f.f_back


def select(counts: dict[str, int], mode: str | list) -> list[tuple[str, int, int]]:
    """Injection points for ``counts``, per function: ``"first"``, ``"last"``, ``"sample"`` (first, middle and last
    call) or ``"all"`` calls with the function's first errno, ``"every-errno"``: all calls with each errno; a list of
    modes and ``[function, k, errno]`` points: all of them."""
    if not isinstance(mode, str):
        return list(dict.fromkeys(p for m in mode for p in (select(counts, m) if isinstance(m, str) else [tuple(m)])))
    points = []
    for name, n in sorted(counts.items()):
        ks = {"first": [1], "last": [n], "sample": sorted({1, (n + 1) // 2, n})}.get(mode, range(1, n + 1))
        errnos = FAULTS[name][2] if mode == "every-errno" else FAULTS[name][2][:1]
        points += [(name, k, e) for k in ks for e in errnos]
    return points


# ------------------------------------------------------------------------------------------ invariants


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def open_fds() -> set[int]:
    """The descriptors open on files and directories (not sockets: gloo closes its own as it likes; not the one
    listing them, closed once listed)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd") if _fd_path(int(fd)).startswith("/")}


def threads() -> set[int]:
    return {t.ident for t in threading.enumerate()}


def chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def carries(e: BaseException, err: int) -> bool:
    """Whether ``e`` is the injected OSError, or carries it as cause / context (or a rank's message names it)."""
    if any(isinstance(x, OSError) and x.errno == err for x in chain(e)):
        return True
    text = " ".join([str(e), *getattr(e, "__notes__", [])])  # a distributed peer's failure, as text
    return os.strerror(err) in text


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# ------------------------------------------------------------------------------------------ scenarios

SHARD = 60_000  # the tiny model exports into about ten shards


def _tests_module(name: str):
    sys.path.insert(0, str(Path(__file__).parent))
    return __import__(name)


def logits(model) -> torch.Tensor:
    """The model's logits, computed in one intra-op thread (with more, OpenMP's spinning workers cost this tiny
    forward 15 x the CPU time on a busy machine); the caller's setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _tests_module("layouts").forward_logits(model)
    finally:
        torch.set_num_threads(threads)


class Scenario:
    """One operation on one model: ``build`` once, then ``run`` per injection with a fresh destination."""

    format = "fake-quant"
    check_output = True  # a successful run leaves a checkpoint at dest, verified afterwards

    def __init__(self, work: Path):
        self.work = work
        self.model, self.stores = self.build()
        self.logits = logits(self.model)

    def build(self):
        raise NotImplementedError

    def prepare(self, dest: Path) -> None:
        """Outside the injection: anything the run needs at ``dest`` before it starts."""

    def run(self, dest: Path):
        return oe.save_clean(self.model, dest, max_shard_size=SHARD, format=self.format)

    def succeeded(self, dest: Path, result) -> list[str]:
        """What is wrong with a run that raised nothing though a call failed (empty: the result is complete)."""
        if not self.check_output:
            return []
        report = oe.verify(self.model, dest, format=self.format, dtype=getattr(self, "dtype", None))
        return [] if report.ok else [f"export succeeded but verify fails: {report}"]

    def stores_ok(self, before: dict, after: dict) -> list[str]:
        return [] if before == after else [f"offload stores changed: {_diff(before, after)}"]

    def reset(self) -> None:
        """Outside the injection, after each run: undo what a successful run changed in the stores."""

    def sync(self) -> None:
        """Wait for the other ranks (before a run, before checking, before cleaning up): a no-op in one process."""


def _diff(a: dict, b: dict) -> str:
    out = []
    for root in sorted(set(a) | set(b)):
        x, y = a.get(root, {}), b.get(root, {})
        out += [f"{root}/{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    return ", ".join(out[:8])


class TinyExport(Scenario):
    """A tiny int8 Llama (built-in quantizers) disk-offloaded with ``accelerate.disk_offload``: ~10 shards."""

    quantized_by = "builtin"

    def __init__(self, work: Path, format: str = "fake-quant"):
        self.format = format
        super().__init__(work)

    def build(self):
        td = _tests_module("test_distributed")
        offload = self.work / "offload"
        return td._tiny_model(offload_dir=offload, quantized_by=self.quantized_by), [offload]

    def run(self, dest: Path):
        # its writes cut into calls of 4 KiB, as a real model's are into 512 KiB ones: they go out in batches; and
        # their writeback started every 64 KiB, as a real model's every 64 MiB (in a checksum thread)
        with mock.patch.object(writer, "_WRITE_CALL", 4096), mock.patch.object(writer, "_WRITEBACK_STEP", 64 << 10):
            return super().run(dest)


class CompressedTensorsExport(TinyExport):
    """``format="compressed-tensors"``, its plan facts worked out beside the first writes, as for a real model's
    per-group scales (``FACTS_BESIDE_WRITES``; the tiny model's state is under it)."""

    def __init__(self, work: Path):
        super().__init__(work, "compressed-tensors")

    def run(self, dest: Path):
        with mock.patch.object(resume, "FACTS_BESIDE_WRITES", 0):
            return super().run(dest)


class ModelOptExport(TinyExport):
    """The same Llama quantized by ModelOpt (FP8, calibrated on CPU) before offloading: ``format="modelopt"``."""

    quantized_by = "modelopt"


class Verify(TinyExport):
    """``oe.verify`` of a complete checkpoint: it raises or reports, never hangs or leaks; the checkpoint stays."""

    check_output = False

    def prepare(self, dest: Path) -> None:
        oe.save_clean(self.model, dest, max_shard_size=SHARD)
        self.checkpoint = tree_digest(dest)

    def run(self, dest: Path):
        report = oe.verify(self.model, dest)
        if not report.ok:
            raise RuntimeError(f"verify reported: {report}")  # a report counts as the failure being told
        return report

    def succeeded(self, dest: Path, result) -> list[str]:
        return []


class Overwrite(TinyExport):
    """``save_clean(overwrite=True)`` over a previous checkpoint (other shards): it stays whole until replaced."""

    def prepare(self, dest: Path) -> None:
        oe.save_clean(self.model, dest, max_shard_size=SHARD * 2)

    def run(self, dest: Path):
        return oe.save_clean(self.model, dest, max_shard_size=SHARD, overwrite=True)


class Writeback(TinyExport):
    """``materialized(layer, writeback=True)`` with two weights edited: each ``.dat`` old or new, never half."""

    check_output = False

    def build(self):
        model, stores = super().build()
        self.layer = model.model.layers[1].mlp
        self.old = tree_digest(stores[0])
        with oe.materialized(self.layer) as layer:
            self.original = {n: p.detach().clone() for n, p in layer.named_parameters()}
        self.edited = None
        return model, stores

    def _set(self, values: dict[str, torch.Tensor]) -> None:
        with oe.materialized(self.layer, writeback=True) as layer:
            for name, p in layer.named_parameters():
                if name in values:
                    p.data.copy_(values[name])

    def run(self, dest: Path):
        self._set({n: v + 0.5 for n, v in self.original.items() if n.endswith(("up_proj.weight", "down_proj.weight"))})

    def succeeded(self, dest: Path, result) -> list[str]:
        return []

    def stores_ok(self, before: dict, after: dict) -> list[str]:
        (root, old), = before.items()
        if self.edited is None:
            self.edited = after[root]  # the counting run: what a complete writeback leaves
        new = after[root]
        bad = [k for k in sorted(set(old) | set(new)) if new.get(k) not in (old.get(k), self.edited.get(k))]
        return [f"half-written or stray store files: {bad}"] if bad else []

    def reset(self) -> None:
        self._set(self.original)
        assert tree_digest(self.stores[0]) == self.old, "could not restore the offload store"


class LargeExport(Scenario):
    """A Llama with a 64 MiB embedding and lm_head, loaded by ``from_pretrained`` with embedding, layer and head on
    ``"disk"`` (read from the source checkpoint), int8 quantizers; exported in bfloat16 (so the embedding is read
    and cast, holding the read-ahead budget, not copied file to file), shards of 20 MB."""

    dtype = torch.bfloat16

    def build(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        lt = _tests_module("layouts")
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=16384, hidden_size=1024, intermediate_size=256,
                                            num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                                            tie_word_embeddings=False)).eval()
        spec = lt.LayoutSpec("from_pretrained", (("model.embed_tokens", "disk"), ("model.layers.0", "disk"),
                                                 ("model.norm", "resident"), ("lm_head", "disk")))
        model, art = lt.apply_layout_with_artifacts(base, spec, self.work)
        oe.quantize_weights(model, "int8")
        return model, [art.workdir]

    def run(self, dest: Path):
        return oe.save_clean(self.model, dest, max_shard_size="20MB", dtype=self.dtype)


class GlooExport(TinyExport):
    """One rank of a 2-rank gloo export: both ranks hold the whole model (each its own offload folder)."""

    def __init__(self, work: Path, rank: int):
        self.rank = rank
        super().__init__(work)

    def run(self, dest: Path):
        from datetime import timedelta

        return oe.save_clean(self.model, dest, max_shard_size=SHARD, timeout=timedelta(seconds=30))

    def sync(self) -> None:
        import torch.distributed as dist

        dist.barrier()


SCENARIOS = {
    "fake-quant": lambda w: TinyExport(w),
    "compressed-tensors": CompressedTensorsExport,
    "modelopt": lambda w: ModelOptExport(w, "modelopt"),
    "overwrite": Overwrite,
    "verify": Verify,
    "writeback": Writeback,
    "large": LargeExport,
}


# ------------------------------------------------------------------------------------------ one injection


def check_one(scn: Scenario, inj: Injector, dest: Path, target) -> dict:
    """Run ``scn`` once with ``target`` armed (None: counting) and return what happened and what broke."""
    tmpdir = Path(os.environ["TMPDIR"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    scn.prepare(dest)
    scn.sync()
    model_before = _tests_module("test_faults").model_state(scn.model)
    before = dict(fds=open_fds(), threads=threads(), num_threads=torch.get_num_threads(), parent=listing(dest.parent),
                  dest=tree_digest(dest) if dest.exists() else None, tmp=listing(tmpdir),
                  stores={str(r): tree_digest(r) for r in scn.stores})
    error = result = None
    with inj.active(target):
        try:
            result = scn.run(dest)
        except BaseException as e:  # KeyboardInterrupt included: an injected fault must not turn into one
            error = e
    out = {"raised": None if error is None else f"{type(error).__name__}: {str(error)[:300]}", "fired": inj.fired,
           "cleanup": inj.in_cleanup, "where": inj.where, "counts": dict(inj.counts)}
    violations = []
    if error is not None:
        out["trace"] = "".join(traceback.format_exception(error))[-3000:]
        if target is None or not inj.fired:
            violations.append("raised without an injected fault")
        elif not carries(error, target[2]) and not (inj.in_cleanup and isinstance(error, OSError)):
            # (shutil.rmtree closes a descriptor twice when close fails: EBADF instead of the injected error)
            violations.append(f"raised {type(error).__name__}, not the injected {errno.errorcode[target[2]]}")
    del error
    scn.sync()
    leaked = open_fds() - before["fds"]  # one that only garbage collection would close is leaked as well
    if leaked:
        violations.append(f"open descriptors left: {sorted(f'{fd} -> {_fd_path(fd)}' for fd in leaked)}")
    if threads() - before["threads"]:
        new = [t.name for t in threading.enumerate() if t.ident not in before["threads"]]
        violations.append(f"threads left: {new}")
    if torch.get_num_threads() != before["num_threads"]:
        violations.append(f"torch.get_num_threads() {before['num_threads']} -> {torch.get_num_threads()}")
    ok = out["raised"] is None
    if not inj.in_cleanup:  # a directory that rmtree failed to remove is left; the next export removes a staging one
        if listing(tmpdir) != before["tmp"]:
            violations.append(f"left in TMPDIR: {sorted(set(listing(tmpdir)) - set(before['tmp']))}")
        expected = sorted(set(before["parent"]) | ({"out"} if ok and scn.check_output else set()))
        if listing(dest.parent) != expected:
            violations.append(f"beside the destination: {listing(dest.parent)} (expected {expected})")
    if before["dest"] is not None and not (ok and scn.check_output) and tree_digest(dest) != before["dest"]:
        violations.append("the checkpoint already at the destination changed")
    if ok:
        violations += scn.succeeded(dest, result)
    state = _tests_module("test_faults").model_state(scn.model)
    if not _tests_module("test_faults").same_state(state, model_before):
        violations.append("the model's tensors, hooks or quantizers changed")
    violations += scn.stores_ok(before["stores"], {str(r): tree_digest(r) for r in scn.stores})
    scn.sync()
    shutil.rmtree(dest.parent, ignore_errors=True)
    scn.reset()
    if not torch.equal(logits(scn.model), scn.logits):
        violations.append("the model's logits changed")
    out["violations"] = violations
    return out


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main(args: dict) -> None:
    """``args``: ``work``; ``scenarios``: {name: a :func:`select` mode}."""
    work = Path(args["work"])
    inj = Injector()
    for name, selection in args["scenarios"].items():
        start = time.perf_counter()
        scn = SCENARIOS[name](work / name / "model")
        counted = check_one(scn, inj, work / name / "count" / "out", None)
        emit({"scenario": name, "counts": counted["counts"], "violations": counted["violations"],
              "trace": counted.get("trace")})
        points = select(counted["counts"], selection)
        for i, point in enumerate(points):
            emit({"scenario": name, "start": point})
            res = check_one(scn, inj, work / name / f"p{i}" / "out", tuple(point))
            emit({"scenario": name, "point": point, **res})
        emit({"scenario": name, "done": len(points), "seconds": time.perf_counter() - start})


def rank_main(args: dict) -> None:
    """One rank of one run of the gloo sweep: ``args``: ``work``, ``rank``, ``port``, ``point``.

    ``point`` is ``(function, k, errno, rank)``: the k-th call on that rank fails, the other rank runs unharmed;
    both check the invariants. Without a point, a counting run. One export per process: a second distributed
    export in one process can fail in gloo's rendezvous (see test_fault_sweep.py).
    """
    from datetime import timedelta

    import torch.distributed as dist

    work, rank, point = Path(args["work"]), args["rank"], args["point"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args['port']}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=90))
    inj = Injector()
    scn = GlooExport(work / f"model{rank}", rank)
    target = tuple(point[:3]) if point and point[3] == rank else None
    res = check_one(scn, inj, work / "run" / "out", target)
    if point and point[3] != rank:  # the other rank: it raises, telling the injected rank's error, or both succeed
        res["violations"] = [v for v in res["violations"] if v != "raised without an injected fault"]
        if res["raised"] and os.strerror(point[2]) not in res.get("trace", ""):
            res["violations"].append(f"raised without naming the other rank's error: {res['raised']}")
    emit({"scenario": "gloo", "rank": rank, "point": point, **res})
    dist.destroy_process_group()


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    rank_main(args) if "rank" in args else main(args)
