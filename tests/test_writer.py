"""The shard writer: bytes equal to safetensors' own, bounded descriptors, in-kernel copies, every fd closed.

Descriptor limits run in a child process (``RLIMIT_NOFILE`` is per process): this file is run as a script
there (``python test_writer.py <mode> <dir>``) and prints one JSON line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file
from torch import nn

from offload_export import writer as writer_mod
from offload_export._store import SAFETENSORS_DTYPES, FileSpan, safetensors_header
from offload_export.writer import Descriptors, ShardWriter, TensorSpec

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64)


def _tensors(seed: int, n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        dtype = DTYPES[i % len(DTYPES)]
        shape = (int(torch.randint(0, 5, (), generator=gen)), int(torch.randint(1, 7, (), generator=gen)))
        out[f"t{i}.weight"] = (torch.randn(shape, generator=gen) * 50).to(dtype)
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n_files=st.integers(1, 6), max_open=st.integers(1, 3))
def test_interleaved_shards_under_a_small_cap_equal_save_file(tmp_path_factory, seed, n_files, max_open):
    tmp = tmp_path_factory.mktemp("w")
    files = [_tensors(seed + k, 1 + (seed + k) % 4) for k in range(n_files)]
    pool = Descriptors(max_open)
    writers = [ShardWriter(str(tmp / f"s{k}.safetensors"), [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in f.items()],
                           {"format": "pt"}, descriptors=pool) for k, f in enumerate(files)]
    # round-robin over the files: every write may evict another file's descriptor
    queue = [(k, name, t) for k, f in enumerate(files) for name, t in f.items()]
    queue.sort(key=lambda item: (list(files[item[0]]).index(item[1]), item[0]))
    for k, name, t in queue:
        writers[k].write(name, t)
        assert pool.open_count <= max_open
    for w in writers:
        w.close()
    assert pool.open_count == 0
    for k, f in enumerate(files):
        save_file(f, str(tmp / f"ref{k}.safetensors"), metadata={"format": "pt"})
        assert (tmp / f"s{k}.safetensors").read_bytes() == (tmp / f"ref{k}.safetensors").read_bytes()


def test_a_shard_is_fsynced_and_closed_as_soon_as_it_is_complete(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(writer_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    t = _tensors(0, 3)
    w = ShardWriter(str(tmp_path / "a.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in t.items()])
    assert not (tmp_path / "a.safetensors").exists()  # opened lazily
    names = list(t)
    w.write(names[0], t[names[0]])
    assert w.is_open and not synced
    for n in names[1:]:
        w.write(n, t[n])
    assert not w.is_open and len(synced) == 1
    w.close()  # nothing left to do
    assert len(synced) == 1
    assert {k: v for k, v in load_file(str(tmp_path / "a.safetensors")).items()}.keys() == t.keys()


def test_file_span_is_copied_byte_for_byte(tmp_path):
    src = {"a": torch.randn(300, 70).to(torch.bfloat16), "b": torch.arange(1000, dtype=torch.int64)}
    save_file(src, str(tmp_path / "src.safetensors"))
    start, header = safetensors_header(str(tmp_path / "src.safetensors"))
    out = {"a": src["a"], "b": src["b"], "c": torch.ones(3)}
    w = ShardWriter(str(tmp_path / "out.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in out.items()])
    for name in ("a", "b"):
        span = FileSpan(str(tmp_path / "src.safetensors"), start + header[name]["data_offsets"][0], src[name].dtype,
                        tuple(src[name].shape))
        assert torch.equal(span.read(), src[name])
        w.write(name, span)
    w.write("c", out["c"])
    w.close()
    save_file(out, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 8), spans=st.integers(0, 2), order=st.randoms(),
       split=st.booleans(), staged=st.booleans())
def test_the_crc32_computed_beside_the_writes_is_the_files(tmp_path_factory, seed, n, spans, order, split, staged):
    """Also with every piece above 64 bytes split into 96-byte parts among three threads (as large pieces are),
    up to 200 bytes of them still being checksummed while the next ones are written; and with every batch staged
    first, then written in another thread in any order."""
    tmp = tmp_path_factory.mktemp("crc")
    tensors = _tensors(seed, n)  # zero-row tensors included
    src = {f"span{i}": torch.randn(40 + i, 3) for i in range(spans)}
    save_file(src, str(tmp / "src.safetensors"))
    start, header = safetensors_header(str(tmp / "src.safetensors"))
    items = [(k, v) for k, v in tensors.items()] + [
        (k, FileSpan(str(tmp / "src.safetensors"), start + header[k]["data_offsets"][0], v.dtype, tuple(v.shape)))
        for k, v in src.items()]
    order.shuffle(items)  # any arrival order: the pieces are combined in file order
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in items]
    sizes = (mock.patch.multiple(writer_mod, _CRC_BESIDE=64, _CRC_PIECE=96, _CRC_BACKLOG=200) if split
             else contextlib.nullcontext())
    with ThreadPoolExecutor(3 if split else 1) as pool, sizes:
        w = ShardWriter(str(tmp / "out.safetensors"), specs, {"format": "pt"}, checksums=pool)
        cuts = sorted(order.sample(range(1, len(items)), order.randint(0, max(0, len(items) - 1))))
        batches = [items[a:b] for a, b in zip([0, *cuts], [*cuts, len(items)])]  # of any size, as units arrive
        if staged:
            writes = [w.stage(batch) for batch in batches]
            order.shuffle(writes)
            with ThreadPoolExecutor(1) as io:
                for done in [io.submit(write) for write in writes]:
                    done.result()
        else:
            for batch in batches:
                w.write_many(batch)
        w.close()
    assert w.crc32 == zlib.crc32((tmp / "out.safetensors").read_bytes())
    save_file({k: v.read() if isinstance(v, FileSpan) else v for k, v in items}, str(tmp / "ref.safetensors"),
              metadata={"format": "pt"})
    assert (tmp / "out.safetensors").read_bytes() == (tmp / "ref.safetensors").read_bytes()


def test_a_staged_tensor_is_refused_a_second_time_before_its_write_is_made(tmp_path):
    t = _tensors(2, 3)
    names = list(t)
    w = ShardWriter(str(tmp_path / "a.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in t.items()])
    writes = w.stage([(names[0], t[names[0]])])
    with pytest.raises(ValueError, match="twice"):
        w.stage([(names[0], t[names[0]])])
    with pytest.raises(ValueError, match="twice"):
        w.stage([(names[1], t[names[1]]), (names[0], t[names[0]])])
    assert not (tmp_path / "a.safetensors").exists()  # staging writes nothing
    rest = w.stage([(n, t[n]) for n in names[1:]])  # the refused batch staged nothing of itself
    rest()
    writes()
    assert w.complete
    save_file(t, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_views_are_written_as_their_values(tmp_path):
    base = torch.randn(6, 4)
    t = {"neg": torch._neg_view(torch.randn(3, 2)), "t": base.t(), "slice": base[2:4], "bf16": base.to(torch.bfloat16)[1],
         "zero": torch._efficientzerotensor(5, dtype=torch.float16)}
    w = ShardWriter(str(tmp_path / "a.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in t.items()])
    w.write_many(list(t.items()))
    save_file({k: v.resolve_neg().contiguous().clone() for k, v in t.items()}, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_batch_with_a_bad_tensor_writes_nothing_of_it(tmp_path):
    t = _tensors(1, 4)
    w = ShardWriter(str(tmp_path / "a.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in t.items()])
    names = list(t)
    with pytest.raises(ValueError, match="planned"):
        w.write_many([(names[0], t[names[0]]), (names[1], t[names[1]].to(torch.float64))])
    with pytest.raises(ValueError, match="twice"):
        w.write_many([(names[0], t[names[0]]), (names[0], t[names[0]])])
    assert not (tmp_path / "a.safetensors").exists()
    w.write_many(list(t.items()))
    save_file(t, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=12), most=st.integers(1, 500), iov=st.integers(1, 4),
       cap=st.integers(1, 700))
def test_neighbours_go_out_in_few_calls_and_short_writes_are_resumed(tmp_path_factory, sizes, most, iov, cap):
    """At most ``iov`` buffers and ``cap`` bytes a call, each call writing at most ``most`` bytes (a filling disk
    writes short)."""
    path = tmp_path_factory.mktemp("v") / "f"
    buffers = [memoryview(os.urandom(n)) for n in sizes]
    real, calls = os.pwritev, []

    def short(fd, bufs, offset):
        assert 0 < len(bufs) <= iov and all(len(b) for b in bufs) and sum(len(b) for b in bufs) <= cap
        calls.append(len(bufs))
        return real(fd, writer_mod._byte_range(bufs, 0, most), offset)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with mock.patch.object(writer_mod.os, "pwritev", short), \
                mock.patch.multiple(writer_mod, _IOV_MAX=iov, _WRITE_CALL=cap):
            writer_mod._pwrite_all(fd, buffers, 3)
    finally:
        os.close(fd)
    data = b"".join(bytes(b) for b in buffers)
    assert path.read_bytes() == b"\0" * 3 * bool(data) + data
    nonempty = sum(1 for n in sizes if n)
    assert -(-len(data) // cap) <= len(calls) <= -(-len(data) // cap) + -(-nonempty // iov) + -(-len(data) // most)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=12), cap=st.integers(1, 700), made=st.integers(0, 12),
       short=st.integers(-5, 300))
def test_calls_submitted_together_are_resumed_from_what_the_batch_wrote(tmp_path_factory, sizes, cap, made, short):
    """The batch writes the first ``made`` calls, the last of them short (``short`` bytes) or failed (``short`` < 0);
    ``pwritev`` writes the rest, nothing twice. A single call is not submitted as a batch."""
    path = tmp_path_factory.mktemp("b") / "f"
    buffers = [memoryview(bytearray(os.urandom(n))) for n in sizes]
    real, again = os.pwritev, []

    def made_by_batch(calls) -> list[int]:
        out = []
        for i, (_, bufs) in enumerate(calls[:made]):
            size = sum(len(b) for b in bufs)
            out.append(size if i + 1 < made else max(0, min(short, size)))
            if out[-1] < size:
                break
        return out

    def batch(fd, calls):
        for (at, bufs), n in zip(calls, made_by_batch(calls)):
            real(fd, writer_mod._byte_range(bufs, 0, n), at)
        return made_by_batch(calls)

    def counted(fd, bufs, offset):
        again.append(sum(len(b) for b in bufs))
        return real(fd, bufs, offset)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with mock.patch.object(writer_mod._aio, "pwritev_many", batch), \
                mock.patch.object(writer_mod.os, "pwritev", counted), mock.patch.object(writer_mod, "_WRITE_CALL", cap):
            writer_mod._pwrite_all(fd, buffers, 3)
            calls = [(0, call) for call in writer_mod._calls(buffers)]
    finally:
        os.close(fd)
    data = b"".join(bytes(b) for b in buffers)
    assert path.read_bytes() == b"\0" * 3 * bool(data) + data
    assert sum(again) == len(data) - (sum(made_by_batch(calls)) if len(calls) > 1 else 0)  # one call: pwritev


def test_aio_writes_what_pwritev_would(tmp_path):
    """Calls with gaps between them and many buffers each, through Linux AIO where there is one."""
    gen = torch.Generator().manual_seed(0)
    calls = [(at, [memoryview(bytearray(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).numpy()))
                   for n in sizes])
             for at, sizes in ((5, (1, 4096, 7)), (9000, (600_000,)), (700_000, (3,) * 1024), (4096, (10, 20)))]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        done = writer_mod._aio.pwritev_many(fd, calls)
    finally:
        os.close(fd)
    if not done:
        pytest.skip("no Linux AIO here: the writer uses pwritev")
    assert done == [sum(len(b) for b in bufs) for _, bufs in calls]
    expected = bytearray(max(at + sum(len(b) for b in bufs) for at, bufs in calls))
    for at, bufs in calls:
        data = b"".join(bytes(b) for b in bufs)
        expected[at:at + len(data)] = data
    assert (tmp_path / "f").read_bytes() == bytes(expected)


def test_an_interrupt_while_a_batch_is_reaped_retires_the_threads_aio_context(tmp_path, monkeypatch):
    """Its requests' events may be left in the context: no later batch may read them as its own, so the thread
    writes through ``pwritev`` from then on."""
    aio = writer_mod._aio
    calls = [(0, [memoryview(bytearray(b"a" * 10))]), (10, [memoryview(bytearray(b"b" * 10))])]

    def interrupted(self, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(aio._Context, "reap", interrupted)
    seen = []

    def write():  # a new thread: its own context
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            try:
                seen.append(aio.pwritev_many(fd, calls))
            except KeyboardInterrupt:
                seen.append("interrupted")
            seen.append(aio.pwritev_many(fd, calls))
        finally:
            os.close(fd)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    if seen[0] == []:
        pytest.skip("no Linux AIO here")
    assert seen == ["interrupted", []]


def test_a_thread_that_ends_leaves_its_aio_context_to_the_next_thread_and_a_retired_one_to_none(tmp_path,
                                                                                               monkeypatch):
    """Destroying a context waits for the kernel's RCU grace period (tens of milliseconds at the end of every export's
    I/O thread): a thread's context outlives it, idle, for the next thread to write with; a context retired after
    an interrupted batch is never handed on."""
    aio = writer_mod._aio
    monkeypatch.setattr(aio, "_idle", [])
    calls = [(0, [memoryview(bytearray(b"a" * 10))]), (10, [memoryview(bytearray(b"b" * 10))])]
    used = []

    def write(interrupt: bool = False):
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            used.append(aio._context())
            if interrupt:
                with mock.patch.object(aio._Context, "reap", side_effect=KeyboardInterrupt), \
                        pytest.raises(KeyboardInterrupt):
                    aio.pwritev_many(fd, calls)
            else:
                assert aio.pwritev_many(fd, calls) == [10, 10]
        finally:
            os.close(fd)

    for interrupt in (False, False, True, False):
        thread = threading.Thread(target=write, args=(interrupt,))
        thread.start()
        thread.join()
    if used[0] is None:
        pytest.skip("no Linux AIO here")
    assert used[1] is used[0] and used[2] is used[0]  # one context, thread after thread
    assert used[3] is not used[0] and used[3] is not None  # the interrupted thread's was retired: a new one
    assert aio._idle == [used[3]]


def test_a_batch_into_a_read_only_descriptor_raises_its_error(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            writer_mod._pwrite_all(fd, [memoryview(bytearray(3 << 20))], 0)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EBADF
    assert (tmp_path / "f").read_bytes() == b""


def test_without_aio_the_writes_go_through_pwritev(tmp_path, monkeypatch):
    """Another OS, a sandbox refusing the calls, or the system's AIO limit reached: nothing changes but the calls."""
    monkeypatch.setattr(writer_mod._aio, "_SYSCALL", None)
    buffers = [memoryview(bytearray(os.urandom(n))) for n in (5, 2 << 20, 17)]
    result = []

    def write():  # a new thread: each thread has its own AIO context, made at its first batch
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            result.append(writer_mod._aio.pwritev_many(fd, [(0, buffers[:1]), (5, buffers[1:])]))
            writer_mod._pwrite_all(fd, buffers, 0)
        finally:
            os.close(fd)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert result == [[]]
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(b) for b in buffers)


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
def test_crc32_combine_is_zlibs(a, b):
    assert writer_mod.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_an_export_reads_nothing_back_to_journal_its_shards(tmp_path, monkeypatch):
    """The journal's CRC comes from the writes: reading the shards back would read the disk (the writer lets
    the kernel drop written pages)."""
    from test_distributed import SHARD, _tiny_model

    import offload_export as oe
    from offload_export import resume as resume_mod

    read_back = []
    monkeypatch.setattr(resume_mod, "file_digest", lambda path: read_back.append(path))
    report = oe.save_clean(_tiny_model(offload_dir=tmp_path / "offload"), tmp_path / "out", max_shard_size=SHARD)
    assert report.shards > 3 and not read_back


def test_copy_falls_back_to_pread_pwrite_when_the_kernel_refuses(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(writer_mod.os, "copy_file_range", refuse, raising=False)
    data = torch.randn(1 << 16)
    (tmp_path / "raw.bin").write_bytes(b"x" * 24 + data.numpy().tobytes())
    w = ShardWriter(str(tmp_path / "out.safetensors"), [TensorSpec("d", data.dtype, tuple(data.shape))])
    w.write("d", FileSpan(str(tmp_path / "raw.bin"), 24, data.dtype, tuple(data.shape)))
    w.close()
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["d"], data)


def test_without_posix_fadvise_the_writer_still_works(tmp_path, monkeypatch):
    monkeypatch.delattr(writer_mod.os, "posix_fadvise", raising=False)  # as on macOS
    t = _tensors(1, 4)
    w = ShardWriter(str(tmp_path / "m.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in t.items()])
    for n, v in t.items():
        w.write(n, v)
    w.close()
    save_file(t, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_the_writeback_of_small_tensors_starts_every_64_mib_of_them(tmp_path, monkeypatch):
    """Tensors too small to start their own writeback (a MoE's per-expert ones) have it started once together
    they fill a step (64 MiB; 8 KiB here), rather than all of it waiting for the fsync at the end."""
    advised = []
    real = writer_mod.os.posix_fadvise
    monkeypatch.setattr(writer_mod.os, "posix_fadvise", lambda fd, at, n, how: (advised.append((at, n)),
                                                                                real(fd, at, n, how)))
    monkeypatch.setattr(writer_mod, "_WRITEBACK_STEP", 8192)
    tensors = {f"expert{i:02}": torch.full((1000,), i, dtype=torch.uint8) for i in range(40)}  # in file order
    w = ShardWriter(str(tmp_path / "m.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in tensors.items()])
    for n, v in tensors.items():
        w.write(n, v)
    w.close()
    assert len(advised) == 40 * 1000 // 9000  # every 9th tensor closes a step: one range of whole pages each
    assert all(at % 4096 == 0 and n % 4096 == 0 and n >= 4096 for at, n in advised)
    assert all(a + n <= b for (a, n), (b, _) in zip(advised, advised[1:]))  # each page once, in file order
    assert advised[-1][0] + advised[-1][1] >= 36 * 1000 - 4096  # the last 4 tensors are left to the fsync
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 30000), min_size=1, max_size=6), piece=st.integers(1, 20000))
def test_streamed_tensors_land_at_their_offsets_whatever_the_piece_and_step_sizes(sizes, piece, tmp_path_factory):
    """The writer's streaming loop on the CPU, the GPU side stood in for (``streams`` true for every tensor,
    ``host_pieces`` cutting each run into pieces of any size): a piece that ends past a writeback step (8 KiB here) is
    written whole and the next step goes on from its end, so every byte lands at its offset and is checksummed once."""
    tmp_path = tmp_path_factory.mktemp("stream")
    tensors = {f"t{i}": torch.randint(0, 256, (n,), dtype=torch.uint8) for i, n in enumerate(sizes)}

    def pieces(run):
        data = torch.cat([t.reshape(-1).view(torch.uint8) for t in run])
        yield from data.split(piece)

    with mock.patch.object(writer_mod, "streams", lambda t: isinstance(t, torch.Tensor)), \
            mock.patch.object(writer_mod, "host_pieces", pieces), mock.patch.object(writer_mod, "_WRITEBACK_STEP", 8192), \
            ThreadPoolExecutor(2) as pool:
        w = ShardWriter(str(tmp_path / "m.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in tensors.items()],
                        checksums=pool)
        w.write_many(list(tensors.items()))
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes() and w.crc32 == zlib.crc32(data)


def test_with_checksum_threads_the_writeback_starts_in_one_before_its_descriptor_closes(tmp_path, monkeypatch):
    """The kernel's work of starting the writeback runs beside the next writes, in a checksum thread; the descriptor
    is closed only after it (its number could name another file by then)."""
    import time

    advised = []
    real = writer_mod.os.posix_fadvise

    def slow(fd, at, n, how):
        time.sleep(0.01)
        advised.append((threading.current_thread().name, os.fstat(fd).st_ino))
        return real(fd, at, n, how)

    monkeypatch.setattr(writer_mod.os, "posix_fadvise", slow)
    monkeypatch.setattr(writer_mod, "_WRITEBACK_STEP", 8192)
    tensors = {f"expert{i:02}": torch.full((1000,), i, dtype=torch.uint8) for i in range(40)}
    path = tmp_path / "m.safetensors"
    with ThreadPoolExecutor(1, thread_name_prefix="crc") as pool:
        w = ShardWriter(str(path), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in tensors.items()],
                        checksums=pool)
        for n, v in tensors.items():
            w.write(n, v)
        w.close()
    assert len(advised) == 40 * 1000 // 9000
    assert all(name.startswith("crc") and ino == path.stat().st_ino for name, ino in advised)
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    assert path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes() and w.crc32 == zlib.crc32(path.read_bytes())


def test_abort_and_missing_tensors_close_the_descriptor(tmp_path):
    before = _fds()
    t = _tensors(2, 3)
    w = ShardWriter(str(tmp_path / "m.safetensors"), [TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in t.items()])
    w.write("t0.weight", t["t0.weight"])
    assert _fds() == before + 1
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    assert _fds() == before
    with pytest.raises(ValueError, match="planned"):
        ShardWriter(str(tmp_path / "x.safetensors"), [TensorSpec("a", torch.float32, (2,))]).write("a", torch.ones(3))
    assert _fds() == before


ALL_DTYPES = sorted(set(SAFETENSORS_DTYPES.values()), key=str)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size(),),
                         dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcAB._0123", min_size=1, max_size=6),
                       st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 3), max_size=3)),
                       min_size=1, max_size=8),
       st.booleans(), st.integers(0, 2**16))
def test_the_file_is_what_safetensors_save_writes(entries, with_metadata, seed):
    tensors = {name: _tensor(dtype, tuple(shape), seed + i) for i, (name, (dtype, shape)) in enumerate(entries.items())}
    metadata = {"format": "pt"} if with_metadata else None  # (safetensors orders a longer map at random)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        writer = ShardWriter(str(path), [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata)
        for name in reversed(list(tensors)):  # any arrival order
            writer.write(name, tensors[name])
        writer.close()
        assert path.read_bytes() == save(tensors, metadata=metadata)


# ------------------------------------------------------------------ child processes under RLIMIT_NOFILE

class Many(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(n))


def _child(mode: str, work: str) -> dict:
    import offload_export as oe

    resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    torch.manual_seed(0)
    model = Many(1500)
    if mode == "fail":
        from offload_export.quantizers import find_quantizers  # noqa: F401  (registers the built-ins)
        from offload_export.adapters.builtin import quantize_weights
        quantize_weights(model, "int8", modules=[f"layers.{i}" for i in range(1500)])
        model.layers[1000].weight_quantizer.amax.fill_(float("nan"))
        model.layers[1000].weight_quantizer.forward = None  # not callable: the fold of layer 1000 fails
    before = _fds()
    try:
        report = oe.save_clean(model, f"{work}/out", max_shard_size=64)
        return {"shards": report.shards, "fds_left": _fds() - before}
    except Exception as e:  # noqa: BLE001
        notes = " ".join(getattr(e, "__notes__", []))
        return {"error": f"{type(e).__name__}: {e} {notes}"[:500], "fds_left": _fds() - before,
                "left_in_work": sorted(os.listdir(work))}


def _run_child(mode: str, tmp_path: Path) -> dict:
    run = subprocess.run([sys.executable, __file__, mode, str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_1500_shards_export_under_ulimit_200(tmp_path):
    result = _run_child("ok", tmp_path)
    assert result == {"shards": 1500, "fds_left": 0}, result
    assert len(list((tmp_path / "out").glob("model-*-of-01500.safetensors"))) == 1500


def test_a_failure_half_way_through_1500_shards_leaves_no_descriptor_open(tmp_path):
    result = _run_child("fail", tmp_path)
    assert result.get("error", "").startswith("TypeError") and "layers.1000" in result["error"], result
    assert result["fds_left"] == 0, result
    assert result["left_in_work"] == [], result


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2])))


def test_a_shards_header_is_computed_once_per_metadata_and_is_the_writers(tmp_path):
    """``Shard.layout`` is ``safetensors_layout`` of its tensors, computed once for each metadata (the fingerprint,
    the resume and the writer ask for it), and a writer given it writes ``save_file``'s bytes."""
    from offload_export.plan import Shard
    from offload_export.writer import safetensors_layout

    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    shard = Shard("x.safetensors", tuple(TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()))
    meta = {"format": "pt"}
    assert shard.layout(meta) == safetensors_layout(shard.tensors, meta)
    assert shard.layout(dict(meta)) is shard.layout(meta)
    assert shard.layout() == safetensors_layout(shard.tensors) != shard.layout(meta)
    writer = ShardWriter(str(tmp_path / shard.filename), shard.tensors, meta, layout=shard.layout(meta))
    writer.write_many(list(tensors.items()))
    save_file(tensors, tmp_path / "ref.safetensors", metadata=meta)
    assert (tmp_path / shard.filename).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
