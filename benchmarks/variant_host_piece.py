"""A package copy for ``gpu_versions.py`` whose writer streams GPU tensors in pieces of 64 MiB instead of 16 MiB.

    git archive 20ea6ba offload_export | tar -x -C benchmarks/v_hp && python benchmarks/variant_host_piece.py benchmarks/v_hp

(run 37's code: run 38's writer gathers several tensors into each piece, which this variant does not patch).

Each piece of :func:`offload_export._transfer.host_pieces` costs the I/O thread several hand-overs of the GIL (the
copy, the wait for it, the piece's writes and checksums), each a wait for a thread running Python of up to the switch
interval: beside a pure-Python thread the writer's ceiling was 1.5-1.6 x its time alone
(``gpu_writer_ceiling.py --beside python``, H100 run 36). Here the writer's two pinned buffers are 64 MiB (the
writeback step, so one piece per step) and a copy already done is not waited for (``Event.query`` keeps the GIL,
``Event.synchronize`` hands it over). The read-ahead's buffers stay 16 MiB. Measured (H100, README run 37): the
writer's ceiling beside Python 1.73 / 1.29 x the floor against 2.03 / 2.23 x, but the 4B table export the same
(1.30-1.89 x the round's floor against 1.32-1.74 x): not landed.
"""

import argparse
from pathlib import Path

from variant_read_ahead import patch

STAGING = ('''def _staging(device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple, torch.cuda.Stream]:
    """This thread's two pinned buffers for ``device``, an event per buffer, and the device's current stream."""
    cache = _local.__dict__.setdefault("staging", {})
    if device not in cache:
        buffers = tuple(torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2))
        cache[device] = (buffers, tuple(torch.cuda.Event() for _ in range(2)))
    return (*cache[device], torch.cuda.current_stream(device))''', '''def _staging(device: torch.device, size: int = _CHUNK):
    """This thread's two pinned buffers of ``size`` bytes for ``device``, an event per buffer, the current stream."""
    cache = _local.__dict__.setdefault("staging", {})
    if (device, size) not in cache:
        buffers = tuple(torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2))
        cache[device, size] = (buffers, tuple(torch.cuda.Event() for _ in range(2)))
    return (*cache[device, size], torch.cuda.current_stream(device))''')
PIECES = ('''def _pieces(t: torch.Tensor) -> tuple[torch.Tensor, ...]:''',
          '''def _pieces(t: torch.Tensor, size: int = _CHUNK) -> tuple[torch.Tensor, ...]:''')
SPLIT = ('''    return t.reshape(-1).view(torch.uint8).split(_CHUNK)''',
         '''    return t.reshape(-1).view(torch.uint8).split(size)''')
HOST = ('''    buffers, events, stream = _staging(tensors[0].device)
    pieces = [piece for t in tensors if t.numel() for piece in _pieces(t)]''',
        '''    buffers, events, stream = _staging(tensors[0].device, 64 << 20)
    pieces = [piece for t in tensors if t.numel() for piece in _pieces(t, 64 << 20)]''')
WAIT = ('''        events[i % 2].synchronize()
        yield _head(buffers[i % 2], piece.numel())''', '''        if not events[i % 2].query():
            events[i % 2].synchronize()
        yield _head(buffers[i % 2], piece.numel())''')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    transfer = parser.parse_args().dir / "offload_export" / "_transfer.py"
    for old, new in (STAGING, PIECES, SPLIT, HOST, WAIT):
        patch(transfer, old, new)


if __name__ == "__main__":
    main()
