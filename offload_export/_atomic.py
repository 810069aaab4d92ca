"""Atomic directory commit: write beside the destination, fsync, rename into place; clean up after dead exports.

A staging directory is named ``.<dest>.offload-export-<owner>-<pid>-<start>-<random>``. ``<owner>`` hashes the
kernel's boot id with the PID (and time) namespace, so another export can tell whether the process that made
it is one it can see: only then, and only when that process is gone (its PID free, or reused by a process
that started later), are the leftovers removed. A directory whose owner cannot be judged (another machine,
boot, PID namespace or container, or no ``/proc``) is kept, and the export says so in its notes.

The destination is resolved first: a symlink is followed and the checkpoint lands at its target (the link
stays). The commit is then:

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
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["check_destination", "is_staging_dir", "resolve_destination", "staging"]

_TAG = ".offload-export-"
_BACKUP = "-backup"
_NAME = re.compile(r"^\.(?P<dest>.+)" + re.escape(_TAG) + r"(?P<owner>[0-9a-f]{16}|[0-9a-f]{8})-(?P<pid>\d+)-"
                   r"(?P<start>\d+)-[0-9a-f]{8}(?P<suffix>-old|-backup)?$")  # 8 hex, -old: older versions
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_active: set[str] = set()  # this process's staging directories and backups that are still in use


# ------------------------------------------------------------------------------------------- destination


def resolve_destination(out_dir: str | os.PathLike) -> Path:
    """The directory a checkpoint for ``out_dir`` is written to: absolute, every symlink followed.

    A symlink (also a dangling one) stands for its target: the checkpoint lands there and the link stays.

    Args:
        out_dir: the destination the user named.

    Returns:
        The resolved path.
    """
    return Path(os.path.realpath(os.path.abspath(out_dir)))


def _named(out_dir: str | os.PathLike, target: Path) -> str:
    return str(out_dir) if Path(os.path.abspath(out_dir)) == target else f"{out_dir} (-> {target})"


def _check_sources(out_dir: str | os.PathLike, target: Path, protected: Iterable[str | os.PathLike]) -> None:
    """Raise ValueError when ``target`` is, or contains, a file or folder the model reads its weights from."""
    for source in protected:
        real = resolve_destination(source)
        if real == target or target in real.parents:
            relation = "is" if real == target else "contains"
            raise ValueError(f"cannot export into {_named(out_dir, target)}: it {relation} {source}, which the "
                             f"model reads its offloaded weights from, and exporting there would replace them; "
                             f"choose a destination that does not contain it (a new folder inside an offload "
                             f"folder is fine)")


def check_destination(out_dir: str | os.PathLike, *, overwrite: bool,
                      protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Fail early, before anything is written, on a destination that cannot or must not be written.

    Args:
        out_dir: the destination directory; a symlink stands for its target.
        overwrite: whether a non-empty destination may be replaced.
        protected: files and folders the model reads its weights from (offload folders, the source
            checkpoint's safetensors files: ``offload_export.layout(model).source_paths()``).

    Returns:
        The resolved destination (see :func:`resolve_destination`), where the checkpoint will be.

    Raises:
        ValueError: the destination is, or contains, one of ``protected``.
        FileExistsError: the destination is a file, or a non-empty directory and ``overwrite`` is false.
        PermissionError: the nearest existing ancestor directory is not writable.
    """
    target = resolve_destination(out_dir)
    _check_sources(out_dir, target, protected)
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise FileExistsError(f"{_named(out_dir, target)} exists and is not a directory; choose another destination")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{_named(out_dir, target)} is not empty; pass overwrite=True to replace it once the "
                              f"new checkpoint is complete, or choose another destination")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    effective = os.access in os.supports_effective_ids  # a setuid/seteuid process is judged by its euid
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise PermissionError(f"cannot write into {parent}: permission denied; choose a writable destination")
    return target


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
            _remove_tree(backup)
            return []
        if _move_noreplace(backup, dest):
            _fsync(dest.parent)
            return [f"restored {dest} from {backup.name}: an export that was replacing it died between the "
                    f"two renames of its commit"]
    except FileNotFoundError:
        return []  # another export's cleanup got there first
    return [f"kept {backup}: the previous checkpoint of {dest}, which appeared meanwhile; delete it by hand "
            f"if {dest} is what you want"]


def _remove_tree(path: Path) -> None:
    """Remove a directory tree as far as possible, never raising: what is left is removed as stale later."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass  # rmtree closes a descriptor again when its close failed, and raises EBADF despite ignore_errors


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
            _remove_tree(path)
    return notes


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


@contextmanager
def staging(out_dir: str | os.PathLike, *, overwrite: bool, notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``out_dir``; on success fsync it and rename it into place.

    ``out_dir`` is resolved first (:func:`resolve_destination`): the checkpoint lands at a symlink's target.
    Leftovers of dead exports in the same parent directory are removed first (backups of a dead overwrite
    are put back). On any exception (disk full, Ctrl-C) the staging directory is removed and the exception
    propagates; ``out_dir`` is untouched. With ``overwrite`` the previous checkpoint stays complete until the
    new one replaces it.

    Args:
        out_dir: the destination directory.
        overwrite: replace a non-empty destination.
        notes: where to append what the cleanup did or left alone (for ``ExportReport.notes``).

    Yields:
        The staging directory to write the checkpoint's files into.

    Raises:
        FileExistsError: ``out_dir`` appeared while exporting and ``overwrite`` is false, or is a file.
    """
    out_dir = resolve_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cleanup = _remove_stale(out_dir.parent)
    if notes is not None:
        notes += cleanup
    tmp = out_dir.parent / _temp_name(out_dir)
    tmp.mkdir()
    _active.add(str(tmp))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        _commit(tmp, out_dir, overwrite)
    finally:
        _remove_tree(tmp)  # the failed export, or the replaced checkpoint
        _active.discard(str(tmp))
