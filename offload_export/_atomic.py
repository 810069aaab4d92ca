"""Atomic directory commit: write beside the destination, fsync, rename into place; clean up after dead exports.

A staging directory is named ``.<dest>.offload-export-<owner>-<pid>-<start>-<random>``. ``<owner>`` hashes the
kernel's boot id with the PID (and time) namespace, so another export can tell whether the process that made
it is one it can see: only then, and only when that process is gone (its PID free, or reused by a process
that started later), are the leftovers removed. A directory whose owner cannot be judged (another machine,
boot, PID namespace or container, or no ``/proc``) is kept, and the export says so in its notes.

The destination is resolved and checked first (:mod:`._destination`): a symlink is followed and the checkpoint
lands at its target (the link stays); with ``overwrite`` it must hold nothing but a checkpoint, checked again
right before the commit (what appeared there meanwhile is never replaced). The commit is then:

* Linux, local file systems: one ``renameat2`` call, ``RENAME_NOREPLACE`` (two racing exports: exactly one
  wins, the other gets ``FileExistsError``) or ``RENAME_EXCHANGE`` (``overwrite``: the previous checkpoint
  stays whole until the new one takes its place, in one step).
* Elsewhere (macOS, NFS, CIFS, overlayfs, old glibc; ``renameat2`` missing or ``EINVAL``): a check then a
  rename; with ``overwrite``, two renames. Between them the previous checkpoint is
  ``.<dest>.offload-export-…-backup``: if the export dies there, the next export into the same parent
  directory moves it back to ``<dest>`` (one that cannot judge the dead process keeps it and says so); no
  cleanup ever deletes a backup whose destination is missing.
  A rival export can still slip in between the check and the rename of a fresh destination only when the
  destination is an empty directory, which counts as absent.

A staging directory is registered as live before it is created, so another export's cleanup in the same
process never takes it for an abandoned one. The replaced checkpoint is removed under our staging name, its
read-only directories made writable first (only inside it); what cannot be removed is named in the notes.

Files and directories are fsynced (``F_FULLFSYNC`` where the platform has it, as on macOS). Without /proc
(macOS) an owner is judged by ``kill(pid, 0)`` alone: a free PID means dead, a PID in use keeps the directory.
Windows is not tested: directories are not fsynced there and no other process's staging directory is ever
judged dead.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from ._destination import check_destination, check_replaceable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["check_destination", "is_staging_dir", "staging"]  # check_destination: _destination's, for the callers

_TAG = ".offload-export-"
_BACKUP = "-backup"
_NAME = re.compile(r"^\.(?P<dest>.+)" + re.escape(_TAG) + r"(?P<owner>[0-9a-f]{16}|[0-9a-f]{8})-(?P<pid>\d+)-"
                   r"(?P<start>\d+)-[0-9a-f]{8}(?P<suffix>-old|-backup)?$")  # 8 hex, -old: older versions
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_active: set[str] = set()  # this process's staging directories and backups that are still in use


def is_staging_dir(path: Path) -> bool:
    """Whether ``path`` is named like a staging directory or backup of an export (live or stale)."""
    return _NAME.search(Path(path).name) is not None


# ------------------------------------------------------------------------------------------- who owns it


def _read(path: str, link: bool = False) -> str | None:
    try:
        if link:
            return os.readlink(path)
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _identity() -> str:
    """16 hex digits naming what this process's PIDs are relative to: kernel boot + PID and time namespace.

    Without ``/proc`` (macOS) the host name stands in; PIDs are then judged by ``kill(pid, 0)`` alone.
    """
    boot, pid_ns = _read("/proc/sys/kernel/random/boot_id"), _read("/proc/self/ns/pid", link=True)
    if boot is None or pid_ns is None:
        key = f"host:{socket.gethostname()}"
    else:
        key = f"{boot}:{pid_ns}:{_read('/proc/self/ns/time', link=True) or ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _proc_stat(pid: int | str) -> tuple[str, str] | None:
    """``(state, start time in clock ticks after boot)`` of a process from /proc, or None where it cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _own_start() -> str:
    stat = _proc_stat("self")
    return stat[1] if stat else "0"


def _proc_is_ours() -> bool:
    """Whether /proc shows this process's PID namespace (it does not after ``unshare -p`` without a new /proc)."""
    return _read("/proc/self", link=True) == str(os.getpid())


def _pid_exists(pid: int) -> bool | None:
    """Whether a process ``pid`` exists in this PID namespace; None where that cannot be asked safely."""
    if os.name == "nt":
        return None  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return True


def _judge(owner: str, pid: int, start: str) -> str | None:
    """None when the export that made a staging directory is dead; else why it is kept ("" when it is alive)."""
    if owner != _identity():
        return ("left by an export on another machine, boot, PID namespace or container (or by an older "
                "offload_export), whose process cannot be checked from here")
    if pid == os.getpid() and start == _own_start():
        return None  # this process's, and not in use (abandoned by an earlier call)
    exists = _pid_exists(pid)
    if exists is None:
        return f"left by process {pid}, which cannot be checked on this platform"
    if not exists:
        return None
    stat = _proc_stat(pid) if _proc_is_ours() else None
    if stat is None or start == "0":
        return f"process {pid} exists and its start time cannot be checked, so it may still be exporting"
    state, started = stat
    return None if state in ("Z", "X") or started != start else ""  # zombie / PID reused, or alive


# ------------------------------------------------------------------------------------------- stale cleanup


def _restore(backup: Path, dest: Path) -> list[str]:
    """Handle the backup of a dead overwrite: put it back where the destination is missing, else drop it."""
    try:
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            dest.rmdir()  # an empty destination counts as absent
        if dest.exists() or dest.is_symlink():  # the new checkpoint made it to the destination
            return _remove(backup, "the checkpoint it replaced")
        if _move_noreplace(backup, dest):
            _fsync(dest.parent)
            return [f"restored {dest} from {backup.name}: an export that was replacing it died between the "
                    f"two renames of its commit"]
    except FileNotFoundError:
        return []  # another export's cleanup got there first
    return [f"kept {backup}: the previous checkpoint of {dest}, which appeared meanwhile; delete it by hand "
            f"if {dest} is what you want"]


def _remove_stale(parent: Path) -> list[str]:
    """Remove staging directories in ``parent`` left by dead exports; put back backups of dead overwrites.

    Returns:
        Notes for the export report: backups restored, directories kept because their owner cannot be judged.
    """
    notes = []
    for path in sorted(parent.glob(f".*{_TAG}*")):
        m = _NAME.match(path.name)
        if m is None or str(path) in _active or path.is_symlink() or not path.is_dir():
            continue
        reason = _judge(m["owner"], int(m["pid"]), m["start"])
        if reason:
            notes.append(f"kept {path}: {reason}; delete it by hand once no export is running there")
        elif reason is None and m["suffix"] == _BACKUP:
            notes += _restore(path, parent / m["dest"])
        elif reason is None:
            notes += _remove(path, "a dead export's files")
    return notes


def _remove_tree(path: Path) -> None:
    """``rmtree`` that tolerates entries removed meanwhile (by another export's cleanup)."""
    def gone(func, name, exc):
        exc = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(exc, FileNotFoundError):
            raise exc

    shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": gone})


def _make_writable(path: Path) -> None:
    """Give the owner full access to ``path`` and every directory below it (files are left as they are)."""
    stack = [path]
    while stack:  # top-down, so that each directory can be listed once it is accessible
        folder = stack.pop()
        os.chmod(folder, stat.S_IMODE(os.lstat(folder).st_mode) | stat.S_IRWXU)
        with os.scandir(folder) as entries:
            stack += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]


def _remove(path: Path, what: str) -> list[str]:
    """Remove one of our staging directories or backups, making its read-only directories writable if need be.

    Only ``path`` (which carries our staging name) and the directories inside it are ever chmodded.

    Returns:
        A note naming ``path`` and ``what`` it holds when it could not be removed, else nothing.
    """
    try:
        try:
            _remove_tree(path)
        except PermissionError:  # a read-only checkpoint: its directories cannot have entries removed
            _make_writable(path)
            _remove_tree(path)
    except FileNotFoundError:
        return []
    except OSError as e:
        return [f"could not remove {path} ({e}): it holds {what}; delete it by hand"]
    return []


# ------------------------------------------------------------------------------------------- commit


def _fsync(path: Path) -> None:
    """Flush a file or directory to stable storage (``F_FULLFSYNC`` where there is one: macOS)."""
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a directory to flush it
    fd = os.open(path, os.O_RDONLY)
    try:
        full = getattr(fcntl, "F_FULLFSYNC", None)
        if full is not None:
            try:
                fcntl.fcntl(fd, full)
                return
            except OSError:
                pass  # not supported by this file system: a plain fsync
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def _renameat2_fn():
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the platform or file system does not support it.

    Raises:
        OSError: the rename failed (``EEXIST`` / ``ENOTEMPTY``: ``dst`` exists under ``RENAME_NOREPLACE``).
    """
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _move_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists; False (nothing moved) when it does."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return True
        if dst.exists() or dst.is_symlink():
            return False
        os.rename(src, dst)  # replaces at most an empty directory: a rival export's is never empty
        return True
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise


def _swap(tmp: Path, out_dir: Path) -> None:
    """Put ``tmp`` at ``out_dir`` and the previous ``out_dir`` at ``tmp``, atomically where the system can.

    The fallback takes two renames; in between the previous checkpoint is a backup that no cleanup deletes
    while ``out_dir`` is missing, and that the next export puts back if this process dies there.
    """
    if _renameat2(tmp, out_dir, _RENAME_EXCHANGE):
        return
    backup = tmp.with_name(tmp.name + _BACKUP)
    _active.add(str(backup))
    try:
        os.rename(out_dir, backup)
        os.rename(tmp, out_dir)
        _rename_quietly(backup, tmp)  # a plain staging name: removed by staging(), or as stale if we die first
    except BaseException:
        if not os.path.lexists(out_dir) and backup.is_dir():
            os.rename(backup, out_dir)
        raise
    finally:
        _active.discard(str(backup))


def _rename_quietly(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError:
        pass  # the new checkpoint is in place: the next export's cleanup drops the backup


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and not out_dir.is_symlink():
        try:
            out_dir.rmdir()  # an empty destination counts as absent
        except OSError:
            pass
    elif out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} appeared as a file or symlink while exporting; nothing was written")
    swapped = False
    if not _move_noreplace(tmp, out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared while exporting (another export into the same "
                                  f"destination won the race); nothing was written")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise FileExistsError(f"{out_dir} appeared as a file or symlink while exporting; nothing was written")
        check_replaceable(out_dir, out_dir)  # again: what was put there while exporting must not be lost
        _swap(tmp, out_dir)  # tmp now holds the previous checkpoint
        swapped = True
    try:
        _fsync(out_dir.parent)
    except BaseException:  # the rename may not be durable: a failed export leaves the destination as it was
        if swapped:
            _swap(tmp, out_dir)
        else:
            os.rename(out_dir, tmp)
        raise


def _temp_name(out_dir: Path) -> str:
    return f".{out_dir.name}{_TAG}{_identity()}-{os.getpid()}-{_own_start()}-{uuid.uuid4().hex[:8]}"


def _leftovers(out_dir: Path) -> list[tuple[Path, str | None]]:
    """Staging directories of earlier exports into ``out_dir`` whose owner is dead (None) or cannot be judged."""
    found = []
    for path in sorted(out_dir.parent.glob(f".*{_TAG}*")):
        m = _NAME.match(path.name)
        if (m is None or m["suffix"] or m["dest"] != out_dir.name or str(path) in _active or path.is_symlink()
                or not path.is_dir()):
            continue
        reason = _judge(m["owner"], int(m["pid"]), m["start"])
        if reason != "":
            found.append((path, reason))
    return found


def _adopt(out_dir: Path, adopt: Callable[[list[tuple[Path, str | None]]], Path | None]) -> Path | None:
    """Rename the leftover staging directory ``adopt`` picks to a fresh staging name of this process."""
    chosen = adopt(_leftovers(out_dir))
    if chosen is None:
        return None
    tmp = out_dir.parent / _temp_name(out_dir)
    _active.add(str(tmp))
    try:
        os.rename(chosen, tmp)  # the claim: a rival resuming the same directory finds it gone
    except OSError:
        _active.discard(str(tmp))
        return None
    return tmp


@contextmanager
def staging(out_dir: str | os.PathLike, *, overwrite: bool, notes: list[str] | None = None,
            adopt: Callable[[list[tuple[Path, str | None]]], Path | None] | None = None,
            keep_on_interrupt: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``out_dir``; on success fsync it and rename it into place.

    ``out_dir`` is checked first (:func:`check_destination`, without protected paths) and resolved: the
    checkpoint lands at a symlink's target. Leftovers of dead exports in the same parent directory are
    removed first (backups of a dead overwrite are put back). On any exception (disk full, Ctrl-C) the
    staging directory is removed and the exception propagates; ``out_dir`` is untouched. With ``overwrite``
    the previous checkpoint stays complete until the new one replaces it, and is removed afterwards.

    Args:
        out_dir: the destination directory.
        overwrite: replace a destination that holds a checkpoint.
        notes: where to append what the cleanup did or left alone (for ``ExportReport.notes``).
        adopt: given the staging directories of earlier exports into ``out_dir`` whose owner is dead or cannot
            be judged (``(path, None or why)``), returns the one to continue, which is renamed to this
            export's staging name and yielded (a resumed export), or None for a fresh one.
        keep_on_interrupt: on ``KeyboardInterrupt`` keep the staging directory (a later export may resume it).

    Yields:
        The staging directory to write the checkpoint's files into.

    Raises:
        ValueError: ``out_dir`` cannot be a destination, or (with ``overwrite``) holds more than a checkpoint,
            also when that appeared while exporting (see :func:`check_destination`).
        FileExistsError: ``out_dir`` appeared while exporting and ``overwrite`` is false, or is a file.
    """
    out_dir = check_destination(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    adopted = _adopt(out_dir, adopt) if adopt is not None else None
    cleanup = _remove_stale(out_dir.parent)
    if notes is not None:
        notes += cleanup
    tmp = adopted or out_dir.parent / _temp_name(out_dir)
    _active.add(str(tmp))  # live before it exists: another export's cleanup must never see it unregistered
    committed = interrupted = False
    try:
        if adopted is None:
            tmp.mkdir()
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        _commit(tmp, out_dir, overwrite)
        committed = True
    except KeyboardInterrupt:
        interrupted = keep_on_interrupt
        raise
    finally:  # the replaced checkpoint (now under our name), or the failed export's files
        left = [] if interrupted else _remove(
            tmp, f"the checkpoint {out_dir} held before" if committed else "a failed export's files")
        _active.discard(str(tmp))
        if notes is not None:
            notes += left
