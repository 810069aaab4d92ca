"""A package copy for ``gpu_versions.py`` whose writer copies its pinned pieces out of the GPU on a stream of its own.

    git archive HEAD offload_export | tar -x -C benchmarks/v_cs && python benchmarks/variant_copy_stream.py benchmarks/v_cs

Every thread of an export queues its GPU work on the one default stream: the pack's kernels (the lane), the
read-ahead's copies into the GPU and the writer's copies of its 16 MiB pieces out of it. Each piece's copy then
waits for whatever the other threads queued before it, and the I/O thread, whose pace sets the 4B NVFP4 export's
after its first byte, waited 154 ms of 1.21 s for those copies (H100, README run 38, the sampled round). Here
:func:`offload_export._transfer.host_pieces` copies on a per-thread stream that waits once per run of tensors for
the current stream (the work that made them), not for what other threads queue there meanwhile; and a tensor that
fits one piece is not split (one tensor op fewer, each op a hand-over of the GIL). Measured in README run 39 (H100,
with and without the wait for the current stream): no change beyond the rounds' spread; not landed.
"""

import argparse
from pathlib import Path

from variant_read_ahead import patch

STREAM = ('''def indexed(device: torch.device | str) -> torch.device:''', '''def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's stream for copies out of ``device``, made once."""
    cache = _local.__dict__.setdefault("copy_streams", {})
    if device not in cache:
        cache[device] = torch.cuda.Stream(device)
    return cache[device]


def indexed(device: torch.device | str) -> torch.device:''')
HOST = ('''    buffers, events, stream = _staging(tensors[0].device)
    pieces = _gathered(tensors)''', '''    device = tensors[0].device
    (buffers, events, current), stream = _staging(device), _copy_stream(device)
    stream.wait_stream(current)
    pieces = _gathered(tensors)''')
SPLIT = ('''        for i, part in enumerate(t.reshape(-1).view(torch.uint8).split(sizes)):''',
         '''        flat = t.reshape(-1).view(torch.uint8)
        for i, part in enumerate(flat.split(sizes) if len(sizes) > 1 else (flat,)):''')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    transfer = parser.parse_args().dir / "offload_export" / "_transfer.py"
    for old, new in (STREAM, HOST, SPLIT):
        patch(transfer, old, new)


if __name__ == "__main__":
    main()
