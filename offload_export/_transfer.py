"""Host <-> GPU copies of large tensors through two small pinned buffers.

A copy between pageable host memory and a GPU goes through the CUDA driver's own staging: one memcpy on
the calling thread, 2-4 GB/s. An export moves every offloaded weight in and every folded weight out, so
that one thread bounds a GPU export below the disk's speed. Here each 16 MiB chunk is copied between the
tensor and a pinned buffer by torch's intra-op threads (all the cores a fold may use) and moved by DMA,
two buffers alternating so that the memcpy of one chunk overlaps the DMA of the other. The buffers are
kept per thread and device (2 x 16 MiB pinned each, held by torch's pinned-memory cache). Many small tensors
(quantizer state) go to the host the other way round: all in one copy (:func:`small_to_host`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from ._buffers import anon_empty

__all__ = ["filled_on_device", "host_pieces", "indexed", "small_to_host", "to_device", "to_host"]

_CHUNK = 16 << 20  # bytes per pinned buffer
_SMALL = 1 << 20  # bytes of the largest tensor small_to_host batches ...
_BATCH = 64 << 20  # ... and of one of its copies
_local = threading.local()


def _staging(device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple, torch.cuda.Stream]:
    """This thread's two pinned buffers for ``device``, an event per buffer, and the device's current stream."""
    cache = _local.__dict__.setdefault("staging", {})
    if device not in cache:
        buffers = tuple(torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2))
        cache[device] = (buffers, tuple(torch.cuda.Event() for _ in range(2)))
    return (*cache[device], torch.cuda.current_stream(device))


def indexed(device: torch.device | str) -> torch.device:
    """``cuda`` as the ``cuda:N`` it means (the current device); other devices as they are."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _pieces(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The bytes of contiguous ``t`` as views of up to 16 MiB (uint8), from its start, made by one ``split``.

    An op that makes a tensor hands the GIL over and waits to take it back: beside a thread running Python (an
    export's pack), tens to hundreds of microseconds an op, so a chunk's views are not sliced one at a time."""
    return t.reshape(-1).view(torch.uint8).split(_CHUNK)


def _head(buffer: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bytes of a pinned buffer: the buffer itself when it is all of it (no new view)."""
    return buffer if n == buffer.numel() else buffer[:n]


def _staged(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() > _CHUNK and t.is_contiguous() and t.dim() > 0


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a large contiguous CPU tensor bound for a GPU goes through pinned buffers.

    The result is ready for work queued afterwards on the device's current stream (as with
    ``non_blocking=True`` from pinned memory); ``t`` may be freed or reused once this returns.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu" or not _staged(t):
        return t.to(device, non_blocking=True)
    src = _pieces(t)
    return filled_on_device(lambda buffer, start: buffer.copy_(src[start // _CHUNK]), tuple(t.shape), t.dtype, device)


def filled_on_device(fill: Callable[[torch.Tensor, int], object], shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """A new tensor of ``shape`` and ``dtype`` on GPU ``device`` whose bytes ``fill(buffer, start)`` puts into the
    pinned buffers, 16 MiB at a time: ``buffer`` (uint8) is to hold the bytes from ``start`` on. The DMA of one
    buffer overlaps the filling of the other. Ready for work queued afterwards on the device's current stream.

    Raises:
        What ``fill`` raises (the tensor is dropped; the buffers are waited for before their next use).
    """
    device = indexed(device)
    (buffers, events, stream), out = _staging(device), torch.empty(shape, dtype=dtype, device=device)
    with torch.cuda.stream(stream):
        for i, piece in enumerate(_pieces(out)):
            k, n = i % 2, piece.numel()
            buffer = _head(buffers[k], n)
            events[k].synchronize()  # the DMA that last read this buffer is done
            fill(buffer, i * _CHUNK)
            piece.copy_(buffer, non_blocking=True)
            events[k].record(stream)
    for event in events:  # the buffers are free again when this returns
        event.synchronize()
    return out


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` in its own anonymous mapping (:func:`anon_empty`); a CPU ``t`` as it is (contiguous)."""
    if t.device.type == "cpu":
        return t.contiguous()
    t = t.contiguous()
    out = anon_empty(tuple(t.shape), t.dtype)
    if t.device.type != "cuda" or not _staged(t):
        return out.copy_(t)
    buffers, events, stream = _staging(t.device)
    pending = None
    with torch.cuda.stream(stream):
        for i, (src, dst) in enumerate(zip(_pieces(t), _pieces(out))):
            k = i % 2
            _head(buffers[k], src.numel()).copy_(src, non_blocking=True)
            events[k].record(stream)
            if pending is not None:
                _drain(buffers, events, *pending)
            pending = (k, dst)
    _drain(buffers, events, *pending)
    return out


def host_pieces(tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The bytes of ``tensors`` (contiguous, on one GPU) laid end to end, in pieces of 16 MiB (the last one shorter),
    each in one of the pinned buffers (uint8). A piece gathers the parts of as many tensors as it holds, so that the
    wait for its copies, its write and its checksum come once per 16 MiB rather than once per tensor (a MoE layer's
    hundreds of per-expert weights). A piece is valid until the generator is resumed; the copies of the next one run
    meanwhile. A writer streams GPU tensors to a file this way, without a host copy of any of them."""
    if not tensors:
        return
    buffers, events, stream = _staging(tensors[0].device)
    pieces = _gathered(tensors)
    sizes = [[s.numel() for s in sources] for sources in pieces]

    def start(i: int) -> None:
        target = _head(buffers[i % 2], sum(sizes[i]))
        with torch.cuda.stream(stream):
            for part, source in zip(target.split(sizes[i]) if len(sizes[i]) > 1 else [target], pieces[i]):
                part.copy_(source, non_blocking=True)
            events[i % 2].record(stream)

    if pieces:
        start(0)
    for i in range(len(pieces)):
        if i + 1 < len(pieces):
            start(i + 1)  # into the other buffer, which the caller gave back by resuming
        events[i % 2].synchronize()
        yield _head(buffers[i % 2], sum(sizes[i]))


def _gathered(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The bytes of ``tensors`` laid end to end, cut into pieces of 16 MiB: for each piece, the views (uint8) of the
    tensors' parts it holds, in order; one ``split`` per tensor (see :func:`_pieces`)."""
    pieces: list[list[torch.Tensor]] = []
    room = 0  # bytes left in the last piece
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not nbytes:
            continue
        if not room:
            pieces.append([])
            room = _CHUNK
        sizes = [min(room, nbytes)]
        sizes += [_CHUNK] * ((nbytes - sizes[0]) // _CHUNK)
        if rest := nbytes - sum(sizes):
            sizes.append(rest)
        for i, part in enumerate(t.reshape(-1).view(torch.uint8).split(sizes)):
            if i:  # the part before filled its piece
                pieces.append([])
                room = _CHUNK
            pieces[-1].append(part)
            room -= part.numel()
    return pieces


def _drain(buffers, events, k: int, dst: torch.Tensor) -> None:
    events[k].synchronize()
    dst.copy_(_head(buffers[k], dst.numel()))


def small_to_host(tensors: list[torch.Tensor], *, non_blocking: bool = False) -> list[torch.Tensor]:
    """``tensors`` with each small one (up to 1 MiB: quantizer state) that is on a GPU replaced by a CPU copy, moved
    together: one copy per device and dtype (of at most 64 MiB); the others as they are.

    Each copy from a GPU waits for it: one per tensor, several hundred make a visible part of an export's start.
    The copies of one batch are views of one storage. With ``non_blocking``, the copies (into pinned memory) are
    only queued on each device's current stream: read them once that stream's work so far is done.
    """
    out = list(tensors)
    batches: dict[tuple[torch.device, torch.dtype], list[list[int]]] = {}
    filled: dict[tuple[torch.device, torch.dtype], int] = {}  # bytes in each key's last batch
    for i, t in enumerate(tensors):
        size, key = t.numel() * t.element_size(), (t.device, t.dtype)
        if t.device.type in ("cpu", "meta") or size > _SMALL:
            continue
        if key not in batches or filled[key] + size > _BATCH:
            batches.setdefault(key, []).append([])
            filled[key] = 0
        batches[key][-1].append(i)
        filled[key] += size
    for (_, dtype), index in ((key, batch) for key, each in batches.items() for batch in each):
        flat = torch.cat([tensors[i].detach().reshape(-1).view(torch.uint8) for i in index])
        flat = flat.to("cpu", non_blocking=non_blocking)
        for i, piece in zip(index, flat.split([tensors[i].numel() * dtype.itemsize for i in index])):
            out[i] = piece.view(dtype).view(tensors[i].shape)
    return out
