"""A package copy for ``gpu_versions.py`` whose writer's pieces are copied out of the GPU by a thread of their own.

    git archive HEAD offload_export | tar -x -C benchmarks/v_fd && python benchmarks/variant_feeder.py benchmarks/v_fd

The I/O thread sets the 4B NVFP4 export's pace after its first byte (README run 38: on a CPU 0.95 s of 1.21, 661 ms of
it copying 2.8 GB into the page cache): between two writes it cuts the next pieces, queues their copies out of the GPU
and waits for them, each step a hand-over of the GIL. Here :func:`offload_export._transfer.host_pieces` runs a feeder
thread that fills four pinned buffers ahead (the copies, the waits), so the I/O thread only writes and checksums: if
its Python between writes is what the disk waits for, the writes now follow each other as fast as the page cache
takes them. Measured in README run 39 (H100, 3 + 6 paired rounds): not faster (4B median 2.25 against 2.05 s in
the longer call); not landed.
"""

import argparse
from pathlib import Path

from variant_read_ahead import replace_from

NEW = '''def host_pieces(tensors: Sequence[torch.Tensor], depth: int = 4) -> Iterator[torch.Tensor]:
    """(variant: a feeder thread fills ``depth`` pinned buffers ahead; see benchmarks/variant_feeder.py)"""
    import queue

    if not tensors:
        return
    device = tensors[0].device
    cache = _local.__dict__.setdefault("feeder", {})
    if device not in cache:
        cache[device] = (tuple(torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(depth)),
                         tuple(torch.cuda.Event() for _ in range(depth)))
    buffers, events = cache[device]
    pieces = _gathered(tensors)
    sizes = [[s.numel() for s in sources] for sources in pieces]
    free, ready = queue.SimpleQueue(), queue.SimpleQueue()
    for k in range(depth):
        free.put(k)

    def feed() -> None:
        try:
            with torch.cuda.device(device):
                stream = torch.cuda.current_stream(device)
                for i in range(len(pieces)):
                    k = free.get()
                    if k is None:
                        return
                    target = _head(buffers[k], sum(sizes[i]))
                    for part, source in zip(target.split(sizes[i]) if len(sizes[i]) > 1 else [target], pieces[i]):
                        part.copy_(source, non_blocking=True)
                    events[k].record(stream)
                    events[k].synchronize()
                    ready.put((k, target))
        except BaseException as e:
            ready.put(e)

    feeder = threading.Thread(target=feed, name="offload-export-feeder", daemon=True)
    feeder.start()
    try:
        for _ in range(len(pieces)):
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            k, piece = item
            yield piece
            free.put(k)
    finally:
        free.put(None)
        feeder.join()


'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    replace_from(parser.parse_args().dir / "offload_export" / "_transfer.py", "def host_pieces(", "def _gathered(", NEW)


if __name__ == "__main__":
    main()
