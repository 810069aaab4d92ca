"""A package copy for ``gpu_versions.py`` whose writer starts each 64 MiB step's writeback with one call over the
step's whole span instead of one ``POSIX_FADV_DONTNEED`` per written range.

    git archive HEAD offload_export | tar -x -C benchmarks/v_sp && python benchmarks/variant_advice.py benchmarks/v_sp
    ... --sync-file-range: ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` over the span (the pages stay cached)

A MoE's per-expert tensors reach the writer out of file order (streamed GPU runs, host batches of small ones), so a
step's written ranges have gaps and :meth:`ShardWriter._advise` makes one ``fadvise`` call per range, each leaving
its partial pages dirty for the fsync. On an H100 (README run 40) the MoE FP8 export kept its disk busy 0.93-0.96 of
the time after its first byte yet wrote 2.2-2.5 GB/s against the floor's 2.6-2.8 (same bytes, one range a step),
and the I/O thread waited 0.22 s for the previous step's advice. Here a step's writeback is started from its first
written byte to its last (the whole pages inside), the pages of its gaps that are written meanwhile included
(a page written twice costs a page). ``--per-range``: one call per range as the package does (with
``--sync-file-range``: only the call changed).

Measured in README run 40 (H100s, against the package): the span slower (MoE FP8 +0.61 s paired, slower in 3 of 3,
its disk busy 0.82 against 0.93; 4B NVFP4 +0.30 s, 2 of 2); ``sync_file_range`` over the span or per range within
the rounds' spread (-0.30 to +0.29 s, the sign changing between calls). Not landed.
"""

import argparse
from pathlib import Path

from variant_read_ahead import patch

SPAN = ('''        if self._checksums is None:
            for at, n in ranges:
                _advise_writeback(fd, at, n)
            return
        self._settle_advice()
        self._advising = self._checksums.submit(lambda: [_advise_writeback(fd, at, n) for at, n in ranges])''',
        '''        lo, hi = ranges[0][0], ranges[-1][0] + ranges[-1][1]
        ranges = [(lo, hi - lo)]
        if self._checksums is None:
            for at, n in ranges:
                _advise_writeback(fd, at, n)
            return
        self._settle_advice()
        self._advising = self._checksums.submit(lambda: [_advise_writeback(fd, at, n) for at, n in ranges])''')
SFR = ('''    try:
        advise(fd, start, end - start, os.POSIX_FADV_DONTNEED)''', '''    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.sync_file_range(fd, ctypes.c_longlong(start), ctypes.c_longlong(end - start), 2) != 0:
            raise OSError(ctypes.get_errno(), "sync_file_range")''')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--sync-file-range", action="store_true")
    parser.add_argument("--per-range", action="store_true", help="keep one call per written range (no span)")
    args = parser.parse_args()
    writer = args.dir / "offload_export" / "writer.py"
    if not args.per_range:
        patch(writer, *SPAN)
    if args.sync_file_range:
        patch(writer, *SFR)


if __name__ == "__main__":
    main()
