"""Host <-> GPU copies through pinned buffers (offload_export._transfer): the same bytes as a plain copy."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload_export import _transfer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = (torch.bfloat16, torch.float32, torch.uint8, torch.float8_e4m3fn, torch.int32)


def _random(n: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    raw = torch.randint(0, 256, (n * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8)
    return raw.view(dtype).to(device)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


def _small_chunks(monkeypatch, n: int) -> None:
    """Pinned buffers of ``n`` bytes, this test's own: a thread's buffers are made once at ``_CHUNK`` and kept, so
    buffers made under the patched size would otherwise outlive it into the next test of the process."""
    monkeypatch.setattr(_transfer, "_CHUNK", n)
    monkeypatch.setattr(_transfer, "_local", threading.local())


def test_on_the_cpu_both_are_plain_copies_or_the_tensor_itself():
    t = _random(1000, torch.bfloat16).reshape(10, 100)
    assert _transfer.to_host(t) is t
    assert _transfer.to_device(t, torch.device("cpu")) is t
    assert _same(_transfer.to_host(t.t()), t.t())


@cuda
@pytest.mark.gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.integers(0, 5), extra=st.integers(-3, 3), dtype=st.sampled_from(DTYPES),
       transpose=st.booleans())
def test_round_trips_equal_a_plain_copy_around_chunk_boundaries(monkeypatch, chunks, extra, dtype, transpose):
    _small_chunks(monkeypatch, 4096)  # many chunks of a small tensor, the buffers reused
    size = torch.empty((), dtype=dtype).element_size()
    n = max(8, (chunks * 4096 + extra * 64) // size // 8 * 8)
    host = _random(n, dtype).reshape(8, -1)
    host = host.t() if transpose else host
    on_gpu = _transfer.to_device(host, torch.device("cuda"))
    assert on_gpu.device.type == "cuda" and _same(on_gpu, host.contiguous())
    back = _transfer.to_host(on_gpu)
    assert back.device.type == "cpu" and _same(back, host.contiguous())
    assert _same(_transfer.to_host(on_gpu.t()), host.contiguous().t())  # a non-contiguous view
    pieces = [bytes(p.numpy()) for p in _transfer.host_pieces([on_gpu.contiguous(), on_gpu[:0], on_gpu.contiguous()])]
    assert all(len(p) == 4096 for p in pieces[:-1]) and all(0 < len(p) <= 4096 for p in pieces)
    assert b"".join(pieces) == bytes(host.contiguous().reshape(-1).view(torch.uint8).numpy()) * 2


@cuda
@pytest.mark.gpu
def test_work_queued_after_to_device_sees_the_data_and_threads_have_their_own_buffers(monkeypatch):
    _small_chunks(monkeypatch, 1 << 16)
    errors = []

    def run(seed: int):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(20):
                host = torch.randint(-1000, 1000, (300_000,), generator=g, dtype=torch.int32)
                on_gpu = _transfer.to_device(host, torch.device("cuda"))
                host.add_(1)  # the source may change once to_device returns
                assert torch.equal((on_gpu * 2).cpu(), (host - 1) * 2)
                assert torch.equal(_transfer.to_host(on_gpu), host - 1)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


class _Event:
    """A CUDA event's stand-in for the CPU: the copies it would follow are done when queued."""

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 5 * 64 + 3), min_size=1, max_size=4), dtype=st.sampled_from(DTYPES))
def test_the_pinned_buffers_bookkeeping_covers_every_byte_once(monkeypatch, sizes, dtype):
    """The chunking of ``filled_on_device`` and ``host_pieces`` on the CPU, the buffers and events stood in for (the
    CUDA copies themselves: the ``gpu`` tests above): every chunk, the last partial one included, lands where it
    belongs; the pieces of several tensors are laid end to end, each full but the last; empty tensors give none."""
    monkeypatch.setattr(_transfer, "_CHUNK", 64)
    buffers = tuple(torch.full((64,), 0xEE, dtype=torch.uint8) for _ in range(2))
    monkeypatch.setattr(_transfer, "_staging", lambda device: (buffers, (_Event(), _Event()), None))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    element = torch.empty((), dtype=dtype).element_size()
    tensors = [_random(n // element, dtype) for n in sizes]
    for t in [t for t in tensors if t.numel()]:
        raw = t.view(torch.uint8)
        starts = []

        def fill(buffer: torch.Tensor, start: int, raw=raw, starts=starts) -> None:
            starts.append(start)
            buffer.copy_(raw[start:start + buffer.numel()])

        assert _same(_transfer.filled_on_device(fill, tuple(t.shape), t.dtype, torch.device("cpu")), t)
        assert starts == list(range(0, raw.numel(), 64))
    pieces = [bytes(p.numpy()) for p in _transfer.host_pieces(tensors)]
    assert all(len(p) == 64 for p in pieces[:-1]) and all(0 < len(p) <= 64 for p in pieces)
    assert b"".join(pieces) == b"".join(bytes(t.view(torch.uint8).numpy()) for t in tensors)


def test_small_to_host_leaves_cpu_and_meta_tensors_as_they_are():
    tensors = [torch.tensor(1.5), torch.ones(3, 2).t(), torch.empty(4, device="meta")]
    assert all(a is b for a, b in zip(_transfer.small_to_host(tensors), tensors))


@cuda
@pytest.mark.gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.sampled_from([(), (0,), (3,), (4, 5), (2, 600)]),
                                st.sampled_from(["cuda", "cpu"]), st.booleans()), max_size=12))
def test_small_to_host_copies_the_small_gpu_tensors_in_batches_and_leaves_the_rest(monkeypatch, specs):
    monkeypatch.setattr(_transfer, "_SMALL", 2000)  # (2, 600) of 2+ bytes per element is "large"
    monkeypatch.setattr(_transfer, "_BATCH", 50)    # batches split often
    tensors = []
    for dtype, shape, device, transpose in specs:
        t = _random(max(1, torch.Size(shape).numel()), dtype)[:torch.Size(shape).numel()].reshape(shape).to(device)
        tensors.append(t.t() if transpose and t.dim() == 2 else t)
    out = _transfer.small_to_host(tensors)
    for t, o in zip(tensors, out):
        small = t.numel() * t.element_size() <= 2000
        if t.device.type == "cuda" and small:
            assert o.device.type == "cpu" and _same(o, t)
        else:
            assert o is t
