"""Variants of a package copy's read-ahead for ``gpu_versions.py``: how offloaded weights reach the GPU.

    git archive HEAD offload_export | tar -x -C benchmarks/v_du5 && python benchmarks/variant_read_ahead.py benchmarks/v_du5 --units 5
    ... benchmarks/v_across --across      # the pinned double buffer kept going across a unit's tensors
    ... benchmarks/v_register --register  # each large CPU source pinned in place (cudaHostRegister), one DMA

The tables' 4B layout holds 6.26 GB of its weights in CPU memory: every byte crosses pageable memory -> pinned
buffer -> GPU before its pack, a cost the disk floor does not count. ``--units N``: a lane's device budget holds N
of its largest units instead of 3 (more read ahead while the writer waits on the disk). ``--across``: one
``filled_on_device`` loop per unit and device instead of one per tensor, so the DMA of a tensor's last chunk overlaps
the next tensor's first copy rather than being waited for. ``--register``: ``cudaHostRegister`` of each staged CPU
source, an asynchronous copy, a wait, ``cudaHostUnregister`` (falls back to the pinned buffers where the driver
refuses). ``benchmarks/gpu_h2d.py`` times the same ways on their own. Experiments, not the package's way.
"""

import argparse
from pathlib import Path

ACROSS_TRANSFER = ('''def to_host(t: torch.Tensor) -> torch.Tensor:''', '''def to_device_all(sources, device: torch.device) -> list[torch.Tensor]:
    """CPU tensors and file spans on ``device``, the pinned double buffer kept going across them."""
    device = indexed(device)
    out, jobs = [], []
    for s in sources:
        if isinstance(s, torch.Tensor) and not (s.device.type == "cpu" and _staged(s)):
            out.append(s.to(device, non_blocking=True))
            continue
        if isinstance(s, torch.Tensor):
            src = _pieces(s)
            fill = lambda buffer, start, src=src: buffer.copy_(src[start // _CHUNK])
        else:
            fill = s.read_into
        out.append(torch.empty(tuple(s.shape), dtype=s.dtype, device=device))
        jobs.append((fill, out[-1]))
    (buffers, events, stream), i = _staging(device), 0
    with torch.cuda.stream(stream):
        for fill, t in jobs:
            for j, piece in enumerate(_pieces(t)):
                k, n = i % 2, piece.numel()
                i += 1
                buffer = _head(buffers[k], n)
                events[k].synchronize()
                fill(buffer, j * _CHUNK)
                piece.copy_(buffer, non_blocking=True)
                events[k].record(stream)
    for event in events:
        event.synchronize()
    return out


def to_host(t: torch.Tensor) -> torch.Tensor:''')

ACROSS_PIPELINE = ('''            for k, device in targets.items():
                t = raw[k]
                raw[k] = (filled_on_device(t.read_into, t.shape, t.dtype, device) if isinstance(t, FileSpan)
                          else to_device(t, device))
                moved.append(k)''', '''            from ._transfer import to_device_all
            for device in wanted:
                keys = [k for k, d in targets.items() if d == device]
                for k, t in zip(keys, to_device_all([raw[k] for k in keys], device)):
                    raw[k] = t
                    moved.append(k)''')

REGISTER_TRANSFER = ('''    src = _pieces(t)
    return filled_on_device(''', '''    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(ptr, nbytes, 0)) == 0:
        try:
            out = torch.empty(t.shape, dtype=t.dtype, device=device)
            out.copy_(t, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
        finally:
            cudart.cudaHostUnregister(ptr)
        return out
    src = _pieces(t)
    return filled_on_device(''')


def patch(path: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in ``path``; stop when ``old`` is not there (the package copy's code changed)."""
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{path}: the code this variant patches has changed")
    path.write_text(text.replace(old, new))


def replace_from(path: Path, first: str, stop: str, new: str) -> None:
    """Replace the text of ``path`` from ``first`` up to (not including) ``stop`` by ``new``; stop when either is not
    there (the package copy's code changed)."""
    text = path.read_text()
    if first not in text or stop not in text:
        raise SystemExit(f"{path}: the code this variant replaces has changed")
    start, end = text.index(first), text.index(stop)
    path.write_text(text[:start] + new + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--units", type=int, default=None)
    parser.add_argument("--across", action="store_true")
    parser.add_argument("--register", action="store_true")
    args = parser.parse_args()
    package = args.dir / "offload_export"
    if args.units is not None:
        patch(package / "pipeline.py", "_DEVICE_UNITS = 3 ", f"_DEVICE_UNITS = {args.units} ")
    if args.across:
        patch(package / "_transfer.py", *ACROSS_TRANSFER)
        patch(package / "pipeline.py", *ACROSS_PIPELINE)
    if args.register:
        patch(package / "_transfer.py", *REGISTER_TRANSFER)


if __name__ == "__main__":
    main()
