"""Atomic directory commit: write beside the destination, fsync, rename into place; clean up on failure.

A temporary directory is named ``.<dest>.offload-export-<host>-<pid>-<start>-<random>``: the name itself is
the marker that lets a later export recognise (and remove) the leftovers of one that was SIGKILLed.
On Linux the commit is one ``renameat2`` call: ``RENAME_NOREPLACE`` (two racing exports: exactly one
wins, the other gets ``FileExistsError``) or ``RENAME_EXCHANGE`` (``overwrite``: the previous checkpoint
stays whole until the new one takes its place). Elsewhere a check-then-rename fallback is used.
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
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

__all__ = ["check_destination", "is_staging_dir", "staging"]

_TAG = ".offload-export-"
_NAME = re.compile(re.escape(_TAG) + r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}(?:-old)?$")
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_active: set[str] = set()  # this process's temporary directories that are still in use


def check_destination(out_dir: Path, *, overwrite: bool) -> None:
    """Fail early on a destination that cannot be written.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty directory and ``overwrite`` is false.
        PermissionError: the nearest existing ancestor directory is not writable.
    """
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another destination")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it once the new "
                              f"checkpoint is complete, or choose another destination")
    parent = _parent(out_dir)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    effective = os.access in os.supports_effective_ids  # a setuid/seteuid process is judged by its euid
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise PermissionError(f"cannot write into {parent}: permission denied; choose a writable destination")


def is_staging_dir(path: Path) -> bool:
    """Whether ``path`` is named like a temporary directory of an export (live or stale)."""
    return _NAME.search(path.name) is not None


def _parent(out_dir: Path) -> Path:
    return out_dir.absolute().parent


@lru_cache(maxsize=1)
def _host_id() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks)`` of a Linux process, or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _temp_name(out_dir: Path) -> str:
    stat = _proc_stat(os.getpid())
    start = stat[1] if stat else "0"
    return f".{out_dir.name}{_TAG}{_host_id()}-{os.getpid()}-{start}-{uuid.uuid4().hex[:8]}"


def _alive(host: str, pid: int, start: str) -> bool:
    """Whether the export that created a temporary directory may still be running (when unsure: yes)."""
    if host != _host_id():
        return True  # another machine sharing this file system: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (start == "0" or started == start)  # a zombie, or the pid was reused


def _remove_stale(parent: Path) -> None:
    """Remove temporary directories in ``parent`` left by exports that died (SIGKILL, power loss)."""
    for path in parent.glob(f".*{_TAG}*"):
        m = _NAME.search(path.name)
        if m is None or not path.is_dir() or path.is_symlink() or str(path) in _active:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or not _alive(m["host"], pid, m["start"]):
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
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


def _move_noreplace(tmp: Path, out_dir: Path) -> bool:
    """Rename ``tmp`` to ``out_dir`` unless ``out_dir`` exists; False (nothing moved) when it does."""
    try:
        if _renameat2(tmp, out_dir, _RENAME_NOREPLACE):
            return True
        if out_dir.exists() or out_dir.is_symlink():
            return False
        os.rename(tmp, out_dir)  # fails on a non-empty directory, which a rival export's always is
        return True
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise


def _swap(tmp: Path, out_dir: Path) -> None:
    """Put ``tmp`` at ``out_dir`` and the previous ``out_dir`` at ``tmp``, atomically where possible."""
    if _renameat2(tmp, out_dir, _RENAME_EXCHANGE):
        return
    backup = tmp.with_name(tmp.name + "-old")  # still named like a temp dir: removed if we die here
    os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    os.rename(backup, tmp)


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and not out_dir.is_symlink():
        try:
            out_dir.rmdir()  # an empty destination counts as absent
        except OSError:
            pass
    elif out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} appeared as a file while exporting; nothing was written")
    if not _move_noreplace(tmp, out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared while exporting (another export into the same "
                                  f"destination won the race); nothing was written")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise FileExistsError(f"{out_dir} appeared as a file while exporting; nothing was written")
        _swap(tmp, out_dir)  # tmp now holds the previous checkpoint
    _fsync(out_dir.parent)


@contextmanager
def staging(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success fsync it and rename it into place.

    Leftovers of dead exports in the same parent directory are removed first. On any exception (disk
    full, Ctrl-C) the temporary directory is removed and the exception propagates; ``out_dir`` is
    untouched. With ``overwrite`` the previous checkpoint stays complete until the new one replaces it.

    Raises:
        FileExistsError: ``out_dir`` appeared while exporting and ``overwrite`` is false.
    """
    parent = _parent(out_dir)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent)
    tmp = parent / _temp_name(out_dir)
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
        shutil.rmtree(tmp, ignore_errors=True)  # the failed export, or the replaced checkpoint
        _active.discard(str(tmp))
