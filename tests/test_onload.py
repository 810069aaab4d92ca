"""The read-ahead moves the sources a format computes with on a GPU there before the unit's turn, and only where the
GPU has room: the checkpoint is the same byte for byte whether it moved them, did not, or ran out of room."""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from layouts import LayoutSpec, apply_layout, make_model

import offload_export as oe
from offload_export import pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _moved_by_the_reader(monkeypatch) -> tuple[list[str], list[str]]:
    """Where each tensor the read-ahead thread moves to a GPU comes from (``"host"`` memory, or its ``"file"`` read
    straight into the pinned buffers), and how each GPU output leaves it: ``"copied"``
    (by the fold's thread, at once), ``"queued"`` (with other small ones, behind the work that made them) or
    ``"streamed"`` (to its file by the I/O thread)."""
    from offload_export import writer as writer_mod

    moved: list[str] = []
    ways: list[str] = []
    to_device, filled_on_device, to_host, small_to_host, host_pieces = (
        pipeline.to_device, pipeline.filled_on_device, pipeline.to_host, pipeline.small_to_host, writer_mod.host_pieces)

    def spy_in(t, device):
        if threading.current_thread().name == "offload-export-reader":
            moved.append("host")
        return to_device(t, device)

    def spy_filled(fill, shape, dtype, device):
        if threading.current_thread().name == "offload-export-reader":
            moved.append("file")
        return filled_on_device(fill, shape, dtype, device)

    def seen(tensors, way):
        ways.extend(way for t in tensors if t.is_cuda)
        return tensors

    def queued(tensors, non_blocking=False):
        return small_to_host(seen(tensors, "queued" if non_blocking else "copied"), non_blocking=non_blocking)

    def streamed(tensors):
        assert threading.current_thread().name.startswith("offload-export-io")  # the writes run there
        return host_pieces(seen(tensors, "streamed"))

    monkeypatch.setattr(pipeline, "to_device", spy_in)
    monkeypatch.setattr(pipeline, "filled_on_device", spy_filled)
    monkeypatch.setattr(pipeline, "to_host", lambda t: to_host(seen([t], "copied")[0]))
    monkeypatch.setattr(pipeline, "small_to_host", queued)
    monkeypatch.setattr(writer_mod, "host_pieces", streamed)
    return moved, ways


def _model(kind: str, tmp: Path):
    model = make_model("llama_untied", dtype=torch.bfloat16)
    oe.quantize_weights(model, "int8")
    return apply_layout(model, LayoutSpec(kind), tmp / "layout")


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload"])
@pytest.mark.parametrize("stream", [False, True], ids=["default-stream", "own-stream"])
def test_moving_ahead_gives_the_same_checkpoint_as_not_moving(kind, stream, tmp_path, monkeypatch):
    """Outputs of a unit moved ahead are queued to the host behind the fold (or streamed by the writer), the others'
    copied by the fold's thread at once; on the export's own stream too (the moved tensors' memory is handed to it,
    the writer waits for its work)."""
    model = _model(kind, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_DEVICE_SPARE", 1 << 60)  # no GPU has that much room: nothing is moved ahead
        moved, ways = _moved_by_the_reader(m)
        oe.save_clean(model, tmp_path / "kept", device="cuda")
        assert moved == [] and set(ways) == {"copied"}
    moved, ways = _moved_by_the_reader(monkeypatch)
    with torch.cuda.stream(torch.cuda.Stream()) if stream else torch.cuda.stream(torch.cuda.current_stream()):
        oe.save_clean(model, tmp_path / "moved", device="cuda")
    assert len(moved) >= 7 and len(ways) - ways.count("copied") >= 7  # every folded weight
    # weights in the offload folder's files go from the file to the GPU without a copy in host memory
    assert set(moved) == {"file" if kind == "disk_offload" else "host"}
    assert _files(tmp_path / "moved") == _files(tmp_path / "kept")


def test_out_of_memory_while_moving_ahead_leaves_the_move_to_the_fold(tmp_path, monkeypatch):
    """Every other move ahead runs out of memory (another process took the room): those units are moved in turn (their
    weights, not read yet, read from their files then)."""
    model = _model("disk_offload", tmp_path)
    oe.save_clean(model, tmp_path / "expected", device="cuda")
    real, calls = pipeline.filled_on_device, []

    def out_of_memory(fill, shape, dtype, device):
        if threading.current_thread().name == "offload-export-reader":
            calls.append(shape)
            if len(calls) % 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(fill, shape, dtype, device)

    monkeypatch.setattr(pipeline, "filled_on_device", out_of_memory)
    oe.save_clean(model, tmp_path / "out", device="cuda")
    assert len(calls) >= 4 and _files(tmp_path / "out") == _files(tmp_path / "expected")


def test_a_read_that_fails_while_read_into_the_gpu_fails_the_export_as_itself(tmp_path, monkeypatch):
    """A read of an offload file into the pinned buffers fails (an I/O error): the export raises that error, commits
    nothing, and the next export of the model is whole."""
    model = _model("disk_offload", tmp_path)
    oe.save_clean(model, tmp_path / "expected", device="cuda")
    real = os.preadv

    def failing(fd, buffers, offset, *rest):
        if threading.current_thread().name == "offload-export-reader":
            raise OSError(errno.EIO, "injected read error")
        return real(fd, buffers, offset, *rest)

    with monkeypatch.context() as m:
        m.setattr(os, "preadv", failing)
        with pytest.raises(OSError) as err:
            oe.save_clean(model, tmp_path / "out", device="cuda")
    assert err.value.errno == errno.EIO and not (tmp_path / "out").exists()
    oe.save_clean(model, tmp_path / "out", device="cuda")
    assert _files(tmp_path / "out") == _files(tmp_path / "expected")


@pytest.mark.parametrize("floor", [None, 0], ids=["default", "no-floor"])
def test_the_units_moved_ahead_stay_within_the_device_budget(floor, tmp_path, monkeypatch):
    """Three times the largest unit's sources the format computes with on the GPU (the unit being written, the one
    being made and the next one), at least the floor that lets small units run ahead."""
    if floor is not None:
        monkeypatch.setattr(pipeline, "_MIN_DEVICE_AHEAD", floor)
    model = _model("cpu_offload", tmp_path)
    real, seen = pipeline._onload, []

    def spy(reader, unit, raw, budget):
        got = real(reader, unit, raw, budget)
        seen.append((got is not None, budget.used, budget.limit, reader.device_bytes(unit)))
        return got

    monkeypatch.setattr(pipeline, "_onload", spy)
    oe.save_clean(model, tmp_path / "out", device="cuda")
    largest = max(n for *_, n in seen)
    assert sum(moved for moved, *_ in seen) >= 7
    assert all(limit == max(3 * largest, pipeline._MIN_DEVICE_AHEAD) and used <= limit for _, used, limit, _ in seen)


@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_a_packed_export_moved_ahead_is_the_one_packed_in_turn(name, tmp_path, monkeypatch):
    """format='modelopt' on a GPU from a CPU-offloaded model: the same files whether the read-ahead moved the units
    it packs (their outputs queued to the host behind the pack) or not."""
    pytest.importorskip("modelopt.torch.quantization")
    from test_format_modelopt import quantize, tiny_qwen3

    model = apply_layout(quantize(tiny_qwen3(), name), LayoutSpec("cpu_offload"), tmp_path / "layout")
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_DEVICE_SPARE", 1 << 60)
        oe.save_clean(model, tmp_path / "kept", format="modelopt", device="cuda")
    moved, ways = _moved_by_the_reader(monkeypatch)
    oe.save_clean(model, tmp_path / "moved", format="modelopt", device="cuda")
    assert len(moved) >= 14 and "queued" in ways  # every packed linear's weight
    assert _files(tmp_path / "moved") == _files(tmp_path / "kept")


def test_a_unit_resident_on_the_gpu_is_packed_there_and_handed_to_the_writer_from_it(tmp_path, monkeypatch):
    """format='modelopt' of a model resident on the GPU: each packed unit's outputs stay there under the lane's device
    budget (queued to the host behind the pack, or streamed by the writer), none copied by the lane while the next
    unit waits; the files are those of an export whose GPU had no room for that."""
    pytest.importorskip("modelopt.torch.quantization")
    from test_format_modelopt import quantize, tiny_qwen3

    model = quantize(tiny_qwen3().cuda(), "NVFP4_DEFAULT_CFG")
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_DEVICE_SPARE", 1 << 60)
        moved, ways = _moved_by_the_reader(m)
        oe.save_clean(model, tmp_path / "kept", format="modelopt")
        assert moved == [] and "queued" not in ways
    moved, ways = _moved_by_the_reader(monkeypatch)
    oe.save_clean(model, tmp_path / "ahead", format="modelopt")
    assert moved == [] and ways.count("queued") >= 14  # every packed linear's outputs
    assert _files(tmp_path / "ahead") == _files(tmp_path / "kept")


def test_a_packed_unit_holds_only_its_outputs_gpu_memory_once_made(tmp_path, monkeypatch):
    """Once a unit moved ahead is packed its sources are gone: its device lease shrinks to the GPU memory its outputs
    still hold once the small ones are copied to the host (NVFP4: the packed weights, about a quarter of the
    sources), so that the read-ahead moves the next units meanwhile."""
    pytest.importorskip("modelopt.torch.quantization")
    from test_format_modelopt import quantize, tiny_qwen3

    from offload_export import writer as writer_mod

    for module in (pipeline, writer_mod):  # the tiny packed weights (4 KiB and more) stay on the GPU, the scales not
        monkeypatch.setattr(module, "STREAMED", 2048)
    model = apply_layout(quantize(tiny_qwen3(), "NVFP4_DEFAULT_CFG"), LayoutSpec("cpu_offload"), tmp_path / "layout")
    real, leases = pipeline._Onloaded.made, []

    def spy(self, outputs):
        before = self._lease._n
        real(self, outputs)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in outputs.values() if isinstance(t, torch.Tensor) and t.is_cuda}
        leases.append((before, self._lease._n, sum(storages.values()), len(storages)))

    monkeypatch.setattr(pipeline._Onloaded, "made", spy)
    oe.save_clean(model, tmp_path / "out", format="modelopt", device="cuda")
    assert len(leases) >= 14  # every packed linear
    assert all(after == held < before for before, after, held, _ in leases)
    assert sum(n for *_, n in leases) >= 14  # each packed weight left on the GPU for the writer


@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_packed_experts_made_behind_a_stalled_writer_stay_within_the_host_budget(name, tmp_path, monkeypatch):
    """Fused experts offloaded to the CPU beside a GPU: the read-ahead moves each layer's experts there, the pack
    leaves the large packed tensors on the GPU and copies the small ones to the host. While the writer stalls on the
    first unit, the units made meanwhile hold at most the read-ahead budget and one unit more of host memory (a
    format that put more on the host than its unit's lease counted would let the read-ahead ready every layer).
    The files are those of an export that did not stall."""
    pytest.importorskip("modelopt.torch.quantization")
    import accelerate
    from test_format_modelopt import quantize
    from test_format_modelopt_moe import tiny_moe

    from offload_export import checkpoint
    from offload_export import writer as writer_mod

    monkeypatch.setattr(pipeline, "_MIN_READ_AHEAD", 0)  # the budget the units size, however small they are
    for module in (pipeline, writer_mod):  # the tiny experts' tensors count as large
        monkeypatch.setattr(module, "STREAMED", 4096)
    model = quantize(tiny_moe(layers=6).cuda(), name)
    device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "model.norm": 0, "model.rotary_emb": 0,
                  "lm_head": 0}
    model = accelerate.dispatch_model(model.cpu(), device_map, main_device=0)
    oe.save_clean(model, tmp_path / "expected", format="modelopt")

    made, limits, queued = [], [], []
    finish, run_units, stage = pipeline.UnitReader.finish, checkpoint.run_units, writer_mod.ShardWriter.stage

    def finishing(self, unit, raw):  # the host memory each unit's outputs take (not the model's own)
        model_memory = self.model_memory(raw)
        out = finish(self, unit, raw)
        made.append(sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in out.values()
                         if isinstance(t, torch.Tensor) and t.device.type == "cpu"
                         and t.untyped_storage().data_ptr() not in model_memory}.values()))
        return out

    def running(*args, read_ahead_bytes, **kwargs):
        limits.append(read_ahead_bytes)
        return run_units(*args, read_ahead_bytes=read_ahead_bytes, **kwargs)

    def staging(self, items):
        if not queued:  # the first unit's write stalls while the lane makes what the budgets let it
            time.sleep(1.0)
            queued.append(list(made))
        return stage(self, items)

    monkeypatch.setattr(pipeline.UnitReader, "finish", finishing)
    monkeypatch.setattr(checkpoint, "run_units", running)
    monkeypatch.setattr(writer_mod.ShardWriter, "stage", staging)
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert len(limits) == 1 and len(made) >= 6 * 2  # every layer's experts and attention at least
    assert sum(queued[0]) <= limits[0] + max(made), (queued, limits)
    assert _files(tmp_path / "out") == _files(tmp_path / "expected")


def _streamed_pieces(tmp_path: Path, monkeypatch, items: list[tuple[str, torch.Tensor]]) -> list[int]:
    """Write ``items`` into one shard with the checksums beside the writes in other threads; check the file is
    safetensors' own and its CRC-32 the file's; return the bytes of each pinned piece the GPU tensors went through."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    from offload_export import writer as writer_mod

    specs = [writer_mod.TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in items]
    pieces, real = [], writer_mod.host_pieces

    def spy(tensors):
        for piece in real(tensors):
            pieces.append(piece.numel())
            yield piece

    monkeypatch.setattr(writer_mod, "host_pieces", spy)
    with ThreadPoolExecutor(2) as pool:
        w = writer_mod.ShardWriter(str(tmp_path / "out.safetensors"), specs, {"format": "pt"}, checksums=pool)
        w.write_many(items)
    save_file({k: v.cpu().contiguous() for k, v in items}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    data = (tmp_path / "out.safetensors").read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes() and w.crc32 == zlib.crc32(data)
    return pieces


@pytest.mark.parametrize("megabytes", [16, 40])
def test_a_large_gpu_tensor_is_streamed_to_its_file_and_checksummed(megabytes, tmp_path, monkeypatch):
    """Pieces of 16 MiB through pinned buffers, a partial last one, then the next GPU tensors (one of them not
    contiguous), beside CPU and small GPU tensors of the same batch: the file is safetensors' own and its CRC-32 the
    file's, with the checksums beside the writes in other threads."""
    torch.manual_seed(0)
    big = torch.randn(megabytes << 18, device="cuda").view(-1, 1024)[:-3]  # not a whole number of pieces
    items = [("a", torch.randn(7, 5)), ("big", big), ("c", torch.randn(300, 3, device="cuda")),
             ("d", torch.randn(3 << 18, device="cuda")), ("e", torch.randn(3, 1 << 18, device="cuda").T)]
    pieces = _streamed_pieces(tmp_path, monkeypatch, items)
    full, rest = divmod(big.numel() * 4, 16 << 20)
    # "c" was copied to the host; "d" and "e", end to end in the file, share a piece
    assert pieces == [16 << 20] * full + [rest] * (rest > 0) + [6 << 20]


def test_gpu_tensors_end_to_end_in_the_file_are_streamed_together_in_full_pieces(tmp_path, monkeypatch):
    """A MoE layer's per-expert weights left on the GPU (1.5 MiB each, end to end in the file, views of stacks):
    each 16 MiB piece gathers several, cut across their boundaries, so the copies, the write and the checksum come
    once per piece; a tensor elsewhere in the file starts its own run. The file is safetensors' own, its CRC-32 the
    file's."""
    torch.manual_seed(0)
    stacks = [torch.randn(20, 768, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    items = [(f"experts.{s * 20 + e:02d}.weight", stack[e]) for s, stack in enumerate(stacks) for e in range(20)]
    items += [("lone", torch.randn(1 << 19, device="cuda")), ("norm", torch.randn(64))]  # F32: elsewhere in the file
    pieces = _streamed_pieces(tmp_path, monkeypatch, items)
    assert pieces == [2 << 20] + [16 << 20] * 3 + [12 << 20]  # "lone" first (F32), then 40 x 1.5 MiB


def test_a_resident_gpu_embedding_is_written_from_the_gpu_and_held_by_no_lease(tmp_path, monkeypatch):
    """The model's own GPU tensor, unchanged by the format, goes to the writer as it is: never copied whole to the
    host, not counted in the read-ahead's host budget, and the checkpoint is the one written through the host."""
    from offload_export import writer as writer_mod
    from offload_export.job import prepare_job

    model = make_model("llama_untied", dtype=torch.bfloat16).cuda()
    oe.quantize_weights(model, "int8")
    oe.save_clean(model, tmp_path / "expected")
    for module in (pipeline, writer_mod):
        monkeypatch.setattr(module, "STREAMED", 1024)  # the tiny model's embedding and lm_head
    job = prepare_job(model, tmp_path / "unused", check_out=False)
    reader = job.reader()
    unit = next(u for u in job.plan.units if "model.embed_tokens.weight" in u.sources)
    assert reader.streamed(unit) == {"model.embed_tokens.weight"} and reader.held_bytes(unit) == 0
    streamed = []
    real = writer_mod.host_pieces
    monkeypatch.setattr(writer_mod, "host_pieces", lambda ts: streamed.extend(t.data_ptr() for t in ts) or real(ts))
    oe.save_clean(model, tmp_path / "out")
    assert model.model.embed_tokens.weight.data_ptr() in streamed
    assert _files(tmp_path / "out") == _files(tmp_path / "expected")
