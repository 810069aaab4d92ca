"""Resumable export: a journal of completed shards in the staging directory, and picking it up again.

Every export keeps a journal in its staging directory (``.offload-export-journal.<rank>.<nonce>.jsonl``, one
per writing process, held under an exclusive ``flock`` while the process lives): first a header with the
plan's fingerprint (:mod:`offload_export.fingerprint`), then one record per weight shard that was completed,
fsync-ed and checksummed (``{"file", "size", "crc32"}``: the CRC-32 of the bytes the writer wrote into it,
computed beside the writes), each record fsync-ed. A CRC is what the journal needs: it guards a staging
directory this package owns against torn, truncated or accidentally damaged shards, not against an
adversary (the plan itself is identified by sha256 digests). An export that does not resume works the header
out in the journal's thread when a record first needs it: when its first shard is complete, or once every unit is
made (:meth:`ResumeSession.header_due`), beside the last writes while the export's other threads wait for them; with
large quantizer state at once, beside its first writes (:func:`facts_beside_writes`). Until a shard is complete there
is nothing to resume, so the export's first byte never waits for the header. The digest of the tensors the model
holds in memory follows once a background thread has computed it; records count only once it is there. That thread
starts only after the export has run for as long as the digest takes (:data:`DIGEST_DEFER_RATE`), or at
once when the export fails: an export too short to be worth resuming never pays for it.

``save_clean(..., resume=True)`` hands :class:`Resumer` to the staging directory's creation: among the
staging directories an earlier export into the same destination left behind (owner dead, or not judgeable
from here), the one made for the same fingerprint with the most recorded bytes is renamed to this export's
own staging name. :func:`resume_session` then keeps every planned shard whose size and CRC-32 still match a
record of a journal with the same fingerprint and the same in-memory digest, removes everything else, and
returns the plan of what is left to write. Journals are removed right before the commit, so the checkpoint
holds none.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ._process import quick_switching
from .checkpoint import SHARD_METADATA
from .fingerprint import differing_parts, fingerprint, memory_digest, memory_keys, plan_facts
from .job import Job
from .layout import Layout
from .pipeline import usable_cores
from .plan import ExportPlan, select_shards
from .writer import range_crc32

try:
    import fcntl
except ImportError:  # Windows: no locks, a live owner is then judged by its PID alone
    fcntl = None

__all__ = ["DIGEST_DEFER_RATE", "FACTS_BESIDE_WRITES", "JOURNAL_PREFIX", "Resumer", "ResumeSession",
           "combined_fingerprint", "facts_beside_writes", "file_digest", "is_journal", "remove_journals",
           "resume_session"]

JOURNAL_PREFIX = ".offload-export-journal"
DIGEST_DEFER_RATE = 1e9
"""Bytes held in memory per second of export before the in-memory digest starts. The digest competes with the
export for the CPU and the GIL (benchmarks/README.md: about 1 s of an 8 GB GPU export); deferred by its
size at 1 GB/s, an export that ends sooner never pays, and one killed before it starts loses no more than
that many seconds of work."""
FACTS_BESIDE_WRITES = 64 << 20
"""Bytes of quantizer state from which an export that does not resume digests it beside its first writes
(:func:`facts_beside_writes`)."""


def facts_beside_writes(job: Job) -> bool:
    """Whether an export that does not resume works its plan facts (:func:`plan_facts`) out beside its first writes
    rather than later (:meth:`ResumeSession.header_due`): when its quantizer state is large (per-group scales).
    Digesting that is mostly reading and checksumming, which hand the GIL over, and may take longer than the last
    writes; a small state's digest is mostly Python, which beside the first writes delays them as much as it would
    before them (benchmarks/README.md, run 24)."""
    return sum(job.lay[k].nbytes for q in job.quantizers for k in q.state_keys if k in job.lay) >= FACTS_BESIDE_WRITES


def is_journal(name: str) -> bool:
    """Whether a file name in a staging directory is a journal (bookkeeping, never committed)."""
    return name.startswith(JOURNAL_PREFIX) and name.endswith(".jsonl")


def combined_fingerprint(fingerprints: Sequence[str]) -> str:
    """One fingerprint for the ranks of an export: the ranks' own when they agree, else a digest of the set."""
    distinct = sorted(set(fingerprints))
    if len(distinct) == 1:
        return distinct[0]
    return hashlib.sha256(json.dumps(distinct).encode()).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (:func:`~offload_export.writer.range_crc32`)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return f"{range_crc32(fd, 0, os.fstat(fd).st_size):08x}"
    finally:
        os.close(fd)


def _append(fd: int, data: bytes) -> None:
    """Append ``data`` to a journal and flush it to disk (one record: written whole or torn at the end)."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # a file system without locks: the owner's PID was judged already


@dataclass
class _Journal:
    """One journal file as read back: header, in-memory digest, shard records (a torn tail is ignored)."""

    path: Path
    header: dict
    memory: str | None = None
    shards: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    @property
    def recorded_bytes(self) -> int:
        return sum(size for records in self.shards.values() for size, _ in records[-1:])


def _read_journal(path: Path) -> _Journal | None:
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return None
    journal = None
    for line in lines[:-1]:  # the last piece has no newline: empty, or a torn record
        try:
            record = json.loads(line)
        except ValueError:
            break
        if journal is None:
            if not isinstance(record, dict) or record.get("journal") != 1:
                return None
            journal = _Journal(path, record, record.get("memory"))
        elif "memory" in record:
            journal.memory = record["memory"]
        elif "file" in record and "crc32" in record:  # records of another digest (an older version) are ignored
            journal.shards.setdefault(record["file"], []).append((int(record["size"]), str(record["crc32"])))
    return journal


def _journals(folder: Path) -> list[_Journal]:
    try:
        names = sorted(p for p in folder.iterdir() if is_journal(p.name))
    except OSError:
        return []
    return [j for j in map(_read_journal, names) if j is not None]


def _in_use(folder: Path) -> bool:
    """Whether a live process holds one of ``folder``'s journals (it locks its journal while it exports)."""
    for path in folder.iterdir():
        if not is_journal(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if not _lock(fd):
                return True
        finally:
            os.close(fd)  # releases the lock just taken
    return False


class Resumer:
    """Chooses which leftover staging directory an export continues (``_atomic.staging``'s ``adopt``).

    Args:
        fingerprint: the export's (combined) plan fingerprint.
        facts: this process's :func:`~offload_export.fingerprint.plan_facts`, to say why another plan differs.
        notes: receives what was resumed or why not.
    """

    def __init__(self, fingerprint: str, facts: dict, notes: list[str]):
        self.fingerprint = fingerprint
        self.facts = facts
        self.notes = notes

    def __call__(self, candidates: Sequence[tuple[Path, str | None]]) -> Path | None:
        """Pick the candidate made for this plan with the most recorded bytes; None when none fits.

        Args:
            candidates: staging directories of earlier exports into the same destination whose owner is dead
                (``None``) or cannot be judged from here (the reason).
        """
        best, best_bytes = None, -1
        for path, reason in candidates:
            try:
                if _in_use(path):
                    self.notes.append(f"resume: kept {path}: an export still holds its journal")
                    continue
            except OSError:
                continue
            journals = _journals(path)
            same = [j for j in journals if j.header.get("fingerprint") == self.fingerprint]
            if not same:
                why = differing_parts(journals[0].header.get("facts", {}), self.facts) if journals else []
                self.notes.append(f"resume: started fresh instead of continuing {path.name}: " + (
                    "; ".join(why) if why else "it holds no journal of this export's plan (killed before its "
                    "first record, made by another version, or for other ranks)"))
                continue
            recorded = max(j.recorded_bytes for j in same)
            if recorded > best_bytes:
                best, best_bytes = path, recorded
                if reason:
                    self.notes.append(f"resume: continuing {path.name}, {reason}, because resume=True")
        return best


@dataclass
class ResumeSession:
    """What one process of an export writes and what it kept (see :func:`resume_session`).

    Attributes:
        plan: the shards still to write (all of the process's shards when nothing was resumed).
        reused_shards, reused_bytes: shards kept from the earlier export, and their size.
        written_shards, written_bytes: shards this export writes.
    """

    plan: ExportPlan
    reused_shards: int = 0
    reused_bytes: int = 0
    written_shards: int = 0
    written_bytes: int = 0
    _fd: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _digest_now: threading.Event = field(default_factory=threading.Event)
    _digest_state: str = "deferred"  # then "running" or "dropped" (under _lock)
    _memory_thread: threading.Thread | None = None
    _header: Future | None = None  # the header's record, when the journal's thread works it out
    _header_now: threading.Event = field(default_factory=threading.Event)  # ... which it does once this is set
    _kept: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {"reused_shards": self.reused_shards, "reused_bytes": self.reused_bytes,
                "written_shards": self.written_shards, "written_bytes": self.written_bytes}

    def _record(self, record: dict) -> None:
        with self._lock:
            if self._fd >= 0:
                _append(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def header_due(self) -> None:
        """Every unit is made: the journal's thread may work the header out now (when it does), beside the last
        writes, which the export's other threads only wait for."""
        self._header_now.set()

    def shard_done(self, path: str, crc32: int) -> None:
        """A shard was completed and fsync-ed with bytes of CRC-32 ``crc32``: append its record in the background
        (after the header, worked out first if it was not yet)."""
        if self._pool is None or self._stop.is_set():
            return
        self._header_now.set()

        def record() -> None:
            if not self._stop.is_set():
                self._record({"file": os.path.basename(path), "size": os.path.getsize(path), "crc32": f"{crc32:08x}"})

        self._pool.submit(record)

    def _digest_memory(self, lay: Layout, skip: set[str]) -> None:
        """Record the in-memory digest from a background thread once the export has run for its
        :data:`DIGEST_DEFER_RATE` delay (at once when :meth:`_close` says so)."""
        defer = sum(lay[k].nbytes for k in memory_keys(lay, skip)) / DIGEST_DEFER_RATE

        def run() -> None:
            self._digest_now.wait(defer)
            with self._lock:
                if self._digest_state == "dropped":
                    return
                self._digest_state = "running"
            value = memory_digest(lay, skip, stop=self._stop, threads=1)
            if self._header is not None:
                wait([self._header])  # a record before the header would void the journal
            if value is not None and not self._stop.is_set():
                self._record({"memory": value})

        self._memory_thread = threading.Thread(target=run, name="offload-export-memory-digest", daemon=True)
        self._memory_thread.start()

    def _record_header(self, header: dict, job: Job) -> None:
        """Record ``header`` with the plan's facts and fingerprint, worked out here (:func:`plan_facts`) once it is
        due, handing the GIL over at the export's short switch interval: at the default one, each of the writes'
        system calls would wait for this Python for up to 5 ms."""
        self._header_now.wait()
        if self._stop.is_set():  # cancelled: no record follows
            return
        with quick_switching():
            facts = plan_facts(job)
        self._record({**header, "fingerprint": fingerprint(facts), "facts": facts})

    def _close(self, *, cancel: bool, remove: Path | None, failed: bool = False) -> None:
        """Finish (or with ``cancel`` drop) the pending records; with ``remove``, delete every journal in it (before
        the commit); release the lock. A ``failed`` export computes its in-memory digest now if it had not, so
        that what it completed can be resumed; any other drops a digest not yet started."""
        if cancel:
            self._stop.set()
        if not failed:
            with self._lock:
                if self._digest_state == "deferred":
                    self._digest_state = "dropped"
        self._digest_now.set()
        self._header_now.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
        if self._memory_thread is not None:
            self._memory_thread.join()
        self._stop.set()
        try:
            if remove is not None:
                remove_journals(remove)
        finally:  # the journal's descriptor (and lock) is released whatever the removal raised
            with self._lock:
                if self._fd >= 0:
                    fd, self._fd = self._fd, -1
                    os.close(fd)

    def check_kept(self, tmp: Path) -> None:
        """Raise RuntimeError when a kept shard vanished or changed size meanwhile (another process's cleanup)."""
        for name, size in self._kept.items():
            try:
                actual = (tmp / name).stat().st_size
            except OSError:
                actual = -1
            if actual != size:
                raise RuntimeError(f"{tmp / name}, kept from the earlier export, changed while exporting; run the "
                                   f"export again")


def remove_journals(folder: Path) -> None:
    """Delete every journal in ``folder`` (right before the commit: the checkpoint must hold none)."""
    for path in folder.iterdir():
        if is_journal(path.name):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    _fsync_dir(folder)


def _shard_sizes(plan: ExportPlan) -> dict[str, int]:
    return {s.filename: len(s.layout(SHARD_METADATA)[0]) + s.nbytes for s in plan.shards}


def _verified(tmp: Path, plan: ExportPlan, journals: list[_Journal], threads: int) -> dict[str, int]:
    """The planned shards whose size and CRC-32 match a record of ``journals``: ``name -> size``."""
    sizes = _shard_sizes(plan)
    recorded: dict[str, set[str]] = {}
    for j in journals:
        for name, records in j.shards.items():
            recorded.setdefault(name, set()).update(d for size, d in records if size == sizes.get(name))

    def check(name: str) -> bool:
        path = tmp / name
        try:
            if path.is_symlink() or path.stat().st_size != sizes[name]:
                return False
            return file_digest(path) in recorded[name]
        except OSError:
            return False

    names = [n for n in sizes if recorded.get(n)]
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="offload-export-resume") as pool:
        ok = list(pool.map(check, names))
    return {n: sizes[n] for n, good in zip(names, ok) if good}


def _clear(tmp: Path, keep: set[str], mine: set[str], planned: set[str], owner: bool) -> None:
    """Remove what an earlier export left and this process does not keep: its own planned shards, and with
    ``owner`` everything that is neither a planned shard nor a journal (metadata, a tokenizer, a torn file)."""
    for path in tmp.iterdir():
        name = path.name
        if name in keep or is_journal(name) or not (name in mine or (owner and name not in planned)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _digest_threads() -> int:
    """Threads that hash at once when a resume starts (nothing else runs then): every core the process may use, at
    most 8."""
    return min(8, usable_cores())


@contextmanager
def resume_session(job: Job, tmp: Path, share: ExportPlan, *, plan_id: str | None, facts: dict | None, resume: bool,
                   notes: list[str], rank: int = 0, owner: bool = True, commit: bool = True
                   ) -> Iterator[ResumeSession]:
    """Start this process's journal in ``tmp``; with ``resume``, keep the verified shards an earlier export left.

    Args:
        job: the export.
        tmp: the staging directory (fresh, or adopted by :class:`Resumer`).
        share: the shards this process writes (the whole plan in one process).
        plan_id: the export's (combined) fingerprint; facts: this process's plan facts. None for both (only where
            ``resume`` is false): the journal's thread works them out for its header, when due (see the module's
            docstring).
        resume: keep what an earlier export left in ``tmp`` (needs ``plan_id`` and ``facts``).
        notes: receives what was kept and what was started over.
        rank: this process's rank (names its journal).
        owner: this process writes the metadata (it removes stray files an earlier export left).
        commit: remove every journal on a normal exit (the commit follows); else call :func:`remove_journals`
            before committing.

    Yields:
        The :class:`ResumeSession`: ``plan`` is what is left to write; call ``shard_done`` as shards complete and
        ``header_due`` once every unit is made.
        On a normal exit this process's lock is released (and with ``commit`` every journal removed); on an
        exception the journals stay, for the next ``resume=True``.
    """
    quantizer_keys = {k for q in job.quantizers for k in q.state_keys}
    memory = None
    kept: dict[str, int] = {}
    old = [j for j in _journals(tmp) if j.header.get("fingerprint") == plan_id] if resume else []
    if old:
        memory = memory_digest(job.lay, quantizer_keys, threads=_digest_threads())
        usable = [j for j in old if j.memory == memory]
        if not usable:
            notes.append("resume: the tensors the model holds in memory differ from the earlier export's (or "
                         "it was stopped before it recorded their digest, which an export does after about a second per GB "
                         "held in memory): every shard is written again")
        kept = _verified(tmp, share, usable, _digest_threads()) if usable else {}
    planned = {s.filename for s in job.plan.shards}
    if resume:
        _clear(tmp, set(kept), {s.filename for s in share.shards}, planned, owner)
    remaining = select_shards(share, [s.filename for s in share.shards if s.filename not in kept])
    session = ResumeSession(remaining, reused_shards=len(kept), reused_bytes=sum(kept.values()),
                            written_shards=len(remaining.shards), written_bytes=sum(_shard_sizes(remaining).values()),
                            _kept=kept)
    if old:
        notes.append(f"resume: kept {len(kept)} of {len(share.shards)} shard(s) ({sum(kept.values()) / 1e6:.1f} MB) "
                     f"from the earlier export; writing {len(remaining.shards)}")
    path = tmp / f"{JOURNAL_PREFIX}.{rank}.{uuid.uuid4().hex[:8]}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    session._fd = fd
    try:
        _lock(fd)
        header = {"journal": 1, "fingerprint": plan_id, "rank": rank, "memory": memory, "facts": facts,
                  "planned": len(planned)}
        if facts is not None:
            session._record(header)
        _fsync_dir(tmp)
        session._pool = ThreadPoolExecutor(1, thread_name_prefix="offload-export-journal")  # fsyncs off the writer
        if facts is None:  # first in the journal's queue: before any shard's record
            if facts_beside_writes(job):
                session._header_now.set()
            session._header = session._pool.submit(session._record_header, header, job)
        if memory is None:
            session._digest_memory(job.lay, quantizer_keys)
        yield session
        session.check_kept(tmp)
    except BaseException:
        session._close(cancel=False, remove=None, failed=True)  # what was completed is recorded, for the next resume
        raise
    session._close(cancel=commit, remove=tmp if commit else None)
