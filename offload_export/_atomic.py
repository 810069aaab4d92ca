"""Atomic directory commit: write beside the destination, fsync, rename into place; clean up on failure."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["check_destination", "staging"]

_TAG = ".offload-export-"
_MARKER = ".offload_export_incomplete"


def check_destination(out_dir: Path, *, overwrite: bool) -> None:
    """Fail early on a destination that cannot be written.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty directory and ``overwrite`` is false.
        PermissionError: the parent directory is not writable.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another destination")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it once the new "
                              f"checkpoint is complete")
    parent = _parent(out_dir)
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {parent}: permission denied")


def _parent(out_dir: Path) -> Path:
    return out_dir.absolute().parent


def _alive(marker: Path) -> bool:
    """Whether the export that wrote ``marker`` may still be running."""
    try:
        host, pid = marker.read_text().split()
        if host != socket.gethostname():
            return True
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True  # unreadable or not ours to judge: leave it
    return True


def _remove_stale(out_dir: Path) -> None:
    """Remove temporary directories of dead exports into ``out_dir`` (crash, SIGKILL)."""
    parent = _parent(out_dir)
    for path in parent.glob(f".{out_dir.name}{_TAG}*"):
        marker = path / _MARKER
        if path.is_dir() and marker.exists() and not _alive(marker):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    backup = None
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared while exporting (another export?); nothing was written")
        backup = tmp.with_name(tmp.name + "-old")
        os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except OSError as e:
        if backup is not None:
            os.rename(backup, out_dir)
        raise FileExistsError(f"{out_dir} appeared while exporting (another export?); nothing was written") from e
    _fsync_dir(out_dir.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def staging(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success fsync it and rename it into place.

    On any exception (disk full, Ctrl-C) the temporary directory is removed and the exception propagates;
    ``out_dir`` is untouched.
    """
    parent = _parent(out_dir)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    tmp = parent / f".{out_dir.name}{_TAG}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        (tmp / _MARKER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / _MARKER).unlink()
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _commit(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
