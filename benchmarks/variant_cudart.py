"""A package copy for ``gpu_versions.py`` whose writer queues its copies out of the GPU without handing the GIL over.

    git archive HEAD offload_export | tar -x -C benchmarks/v_rt && python benchmarks/variant_cudart.py benchmarks/v_rt

Each torch op hands the GIL over and waits to take it back behind the threads running Python (the pack's), up to the
switch interval: run 38's sampled 4B export had the I/O thread 141 ms in the ops that cut and copy its pieces
(``_gathered``'s ``reshape``/``view``/``split`` per tensor, ``start``'s ``copy_`` per part) besides 154 ms in the
waits for the copies. Here a piece's parts are ``(address, bytes)`` found by arithmetic on ``data_ptr()``, and each
part's copy is queued with the CUDA runtime's ``cudaMemcpyAsync`` called through ``ctypes.PyDLL`` (the GIL kept: the
call only queues the copy and returns in microseconds). The wait for a piece (``Event.synchronize``) still hands it
over. Measured in README run 39 (H100): no change beyond the rounds' spread; not landed.
"""

import argparse
from pathlib import Path

from variant_read_ahead import replace_from

NEW = '''def _cudart_copy():
    """``cudaMemcpyAsync`` of the CUDA runtime torch loaded, called with the GIL held (it only queues the copy)."""
    import ctypes

    cache = _local.__dict__
    if "memcpy" not in cache:
        with open("/proc/self/maps") as maps:
            path = next(line.split()[-1] for line in maps if "libcudart.so" in line)
        f = ctypes.PyDLL(path).cudaMemcpyAsync
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        f.restype = ctypes.c_int
        cache["memcpy"] = f
    return cache["memcpy"]


def host_pieces(tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """(variant: the parts' copies queued by cudaMemcpyAsync on addresses; see benchmarks/variant_cudart.py)"""
    if not tensors:
        return
    device = tensors[0].device
    buffers, events, stream = _staging(device)
    pieces = _gathered(tensors)
    sizes = [sum(n for _, n in parts) for parts in pieces]
    copy, handle = _cudart_copy(), stream.cuda_stream

    def start(i: int) -> None:
        dst = buffers[i % 2].data_ptr()
        with torch.cuda.device(device):
            for src, n in pieces[i]:
                if err := copy(dst, src, n, 2, handle):  # cudaMemcpyDeviceToHost
                    raise RuntimeError(f"cudaMemcpyAsync failed: CUDA error {err}")
                dst += n
        events[i % 2].record(stream)

    if pieces:
        start(0)
    for i in range(len(pieces)):
        if i + 1 < len(pieces):
            start(i + 1)
        events[i % 2].synchronize()
        yield _head(buffers[i % 2], sizes[i])


def _gathered(tensors: Sequence[torch.Tensor]) -> list[list[tuple[int, int]]]:
    """(variant) For each 16 MiB piece, the ``(address, bytes)`` of the tensors' parts it holds, in order."""
    pieces: list[list[tuple[int, int]]] = []
    room = 0
    for t in tensors:
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        while nbytes:
            if not room:
                pieces.append([])
                room = _CHUNK
            n = min(room, nbytes)
            pieces[-1].append((ptr, n))
            ptr, nbytes, room = ptr + n, nbytes - n, room - n
    return pieces


'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    replace_from(parser.parse_args().dir / "offload_export" / "_transfer.py", "def host_pieces(", "def _drain(", NEW)


if __name__ == "__main__":
    main()
