"""What makes two exports the same: digests of the plan, the quantizers and what the model reads.

:func:`plan_facts` describes an export by parts (the shards with their header bytes, the format, the
quantizers' configuration and state, the identity of the files the model reads); :func:`fingerprint` is the
sha256 of their canonical JSON. Two jobs with the same fingerprint write the same weight shards, byte for
byte, as long as the tensors held in memory are the same too: :func:`memory_digest` hashes those (it reads
them all, so it is computed apart from the rest). A resumed export compares both with those recorded by
the export it continues; ranks of a distributed export compare fingerprints before they write.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import threading
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from ._store import read_store
from ._transfer import small_to_host
from .checkpoint import SHARD_METADATA
from .job import Job
from .layout import Layout, TensorInfo
from .pipeline import usable_cores
from .quantizers import Quantizer, json_digest, json_safe

__all__ = ["differing_parts", "fingerprint", "memory_digest", "memory_keys", "plan_facts", "quantizer_digests",
           "source_identity"]

_CHUNK = 16 << 20  # bytes of a GPU tensor copied to the CPU at once for hashing
_PARALLEL = 1 << 20  # state tensors from this size on are read and digested in threads, smaller ones at once


def _tensor_crc(t: torch.Tensor) -> str:
    """``dtype:shape:crc32`` of a tensor's bytes (GPU tensors copied to the CPU a chunk at a time)."""
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    step = max(1, raw.numel()) if raw.device.type == "cpu" else _CHUNK
    crc = 0
    for start in range(0, raw.numel(), step):
        crc = zlib.crc32(memoryview(raw[start:start + step].cpu().numpy()), crc)
    return f"{t.dtype}:{list(t.shape)}:{crc:08x}"


def quantizer_digests(quantizers: Iterable[Quantizer], lay: Layout) -> list[dict]:
    """Each quantizer's name, role, target, JSON configuration (a distributed export's ranks compare and name it) and a
    digest of its state tensors (each one's name, dtype, shape and CRC-32, as :func:`memory_digest`: per-group scales
    may be a sixteenth of the model's bytes, and they are digested before the first byte is written), in name order.

    The configuration and tensors are those of the adapter's ``state()`` (what a format writes of it); state on
    the meta device is read from its offload store (``lay``). ``state`` is None where some of it is on the meta
    device without one (a rank of a distributed export that does not hold it: another rank compares it).
    """
    states = []
    for q in sorted(quantizers, key=lambda q: q.name):
        tensors, config = q.adapter.state(q)
        stored = {k: lay.get(f"{q.name}.{k}") for k, t in tensors.items() if t.device.type == "meta"}
        if any(info is None or info.ref is None for info in stored.values()):
            tensors = None
        states.append((q, tensors, stored, config))
    held = [t for _, tensors, stored, _ in states if tensors is not None for k, t in tensors.items() if k not in stored]
    held = iter(small_to_host(held))
    items = [(k, stored[k] if k in stored else next(held))
             for _, tensors, stored, _ in states if tensors is not None for k in tensors]
    with ThreadPoolExecutor(min(8, usable_cores()), thread_name_prefix="offload-export-digest") as pool:
        # reading, copying from a GPU and CRC-32 release the GIL; the small ones are on the host by now
        large = {i: pool.submit(_crc_item, item) for i, item in enumerate(items) if item[1].nbytes >= _PARALLEL}
        done = iter([large[i].result() if i in large else _crc_item(item) for i, item in enumerate(items)])
    return [{"name": q.name, "role": q.role, "target": q.target, "config": json_safe(config),
             "state": None if tensors is None else json_digest(sorted(next(done) for _ in tensors))}
            for q, tensors, _, config in states]


def _crc_item(item: tuple[str, torch.Tensor | TensorInfo]) -> tuple[str, str]:
    """``(key, dtype:shape:crc32)`` of a tensor, or of one read from its store (a :class:`TensorInfo`)."""
    key, t = item
    if isinstance(t, TensorInfo):
        t = read_store(t.ref.store, t.dtype, t.shape)
    return key, _tensor_crc(t)


def source_identity(lay: Layout) -> dict[str, list[int]]:
    """``path -> [size, mtime_ns]`` of every file the offloaded entries of ``lay`` are read from.

    Files that cannot be stat-ed are ``[-1, -1]`` (the export itself reports them).
    """
    paths = {os.path.realpath(i.ref.store.path) for i in lay.values()
             if i.ref is not None and i.ref.store.path is not None and i.kind != "missing"}
    out = {}
    for path in sorted(paths):
        try:
            st = os.stat(path)
            out[path] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[path] = [-1, -1]
    return out


def _version() -> str:
    try:
        return importlib.metadata.version("offload_export")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def plan_facts(job: Job) -> dict:
    """The parts of ``job`` that decide the bytes of its weight shards, as JSON-able values.

    Keys: ``version`` (of the package), ``format``, ``device`` (where folds run), ``shards`` (file names, each
    tensor's name/dtype/shape and the sha256 of the shard's header bytes), ``folds`` (folded weights),
    ``quantizers`` (:func:`quantizer_digests`), ``sources`` (:func:`source_identity`).
    """
    shards = [[s.filename, hashlib.sha256(s.layout(SHARD_METADATA)[0]).hexdigest(),
               [[t.name, str(t.dtype), list(t.shape)] for t in s.tensors]] for s in job.plan.shards]
    return {"version": _version(), "format": job.format.name, "device": str(job.device),
            "shards": shards, "folds": sorted(job.folds), "quantizers": quantizer_digests(job.quantizers, job.lay),
            "sources": source_identity(job.lay)}


def fingerprint(facts: Mapping) -> str:
    """The sha256 of :func:`plan_facts`' canonical JSON."""
    return json_digest(dict(facts))


_PART_NAMES = {"version": "the offload_export version", "format": "the output format",
               "device": "the fold device", "shards": "the planned shards (tensor names, dtypes, shapes or shard "
               "size)", "folds": "the folded weights", "quantizers": "the quantizer configuration or state"}


def differing_parts(old: Mapping, new: Mapping) -> list[str]:
    """Why two :func:`plan_facts` differ, in words (empty when they are equal)."""
    why = [desc for key, desc in _PART_NAMES.items() if old.get(key) != new.get(key)]
    if "quantizers" in old and old.get("quantizers") != new.get("quantizers"):
        before = {q["name"]: q for q in old["quantizers"]}
        changed = [q["name"] for q in new["quantizers"] if before.get(q["name"]) != q]
        if changed:
            why[-1] += f" (e.g. {changed[0]})"
    old_src, new_src = old.get("sources", {}), new.get("sources", {})
    if old_src != new_src:
        changed = sorted(p for p in set(old_src) | set(new_src) if old_src.get(p) != new_src.get(p))
        why.append(f"a file the model reads changed, was added or removed (e.g. {changed[0]}: size/mtime "
                   f"{old_src.get(changed[0])} -> {new_src.get(changed[0])})")
    return why


def _entry_tensor(lay: Layout, key: str) -> torch.Tensor | None:
    info = lay[key]
    if info.kind == "resident":
        return info.tensor
    if info.ref is not None and info.ref.store.path is None:  # in RAM or another mapping: its value
        return read_store(info.ref.store, info.dtype, info.shape)
    return None  # in a file (identified by source_identity) or missing on this rank


def memory_keys(lay: Layout, skip: Iterable[str] = ()) -> list[str]:
    """The keys of ``lay`` whose tensors are held in memory (resident, CPU-offloaded, other mappings), in layout
    order, ``skip`` left out: what :func:`memory_digest` reads."""
    skip = set(skip)
    return [k for k, i in lay.items() if k not in skip and i.kind in ("resident", "cpu", "mapping")]


def memory_digest(lay: Layout, skip: Iterable[str] = (), *, stop: threading.Event | None = None,
                  threads: int = 2) -> str | None:
    """A digest of every tensor ``lay`` holds in memory (resident, CPU-offloaded, other mappings): each tensor's
    dtype, shape and CRC-32, by key, under one sha256. It tells a resumed export whether the weights it would
    read from memory changed (an edit, another calibration); a CRC, 3-4 x cheaper than sha256 over what may be
    most of the model, catches any such change but a deliberately forged one.

    Args:
        lay: the layout.
        skip: keys left out (quantizer state, digested by :func:`quantizer_digests`).
        stop: when set, give up and return None.
        threads: tensors hashed at once (hashing releases the GIL).

    Returns:
        The digest, or None when ``stop`` was set first.
    """
    keys = memory_keys(lay, skip)

    def one(key: str) -> str | None:
        if stop is not None and stop.is_set():
            return None
        t = _entry_tensor(lay, key)
        return _tensor_crc(t) if t is not None else "file"

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="offload-export-digest") as pool:
        digests = list(pool.map(one, keys))
    if stop is not None and stop.is_set():
        return None
    return json_digest(list(zip(keys, digests)))
