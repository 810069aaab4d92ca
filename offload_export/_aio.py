"""Many positional writes in one system call (Linux's native AIO, ``io_submit``), so that a writing thread hands the
GIL over once per batch rather than once per write.

Every system call releases the GIL, and taking it back waits for a thread running Python (an export's pack thread)
to give it up, up to the switch interval: a writer making a ``pwritev`` call per 512 KiB then writes at a fraction
of the disk's rate (``benchmarks/bench_writer_beside.py``). ``io_submit`` performs the buffered writes it is given
(``IOCB_CMD_PWRITEV``) inside the call, in order, each as ``pwritev`` would, so a batch costs the kernel what its
calls would and the GIL one hand-over. Where it is not available (another OS or CPU, a kernel or sandbox without
it, the system's AIO context limit reached), :func:`pwritev_many` writes nothing and the caller uses ``pwritev``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading
import weakref
from collections.abc import Sequence

__all__ = ["pwritev_many"]

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PWRITEV = 8
_EVENTS = 256  # requests one thread's context holds at once (a batch is split beyond)
_UNAVAILABLE = (errno.ENOSYS, errno.EINVAL, errno.EAGAIN, errno.EPERM, errno.EOPNOTSUPP)


class _Iocb(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _syscall():
    """libc's ``syscall`` and this CPU's AIO syscall numbers, or None where there are none."""
    linux64 = sys.platform.startswith("linux") and sys.maxsize > 2**32  # a 32-bit process has other numbers
    numbers = _SYSCALLS.get(platform.machine()) if linux64 else None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "syscall", None) if numbers else None
    if fn is None:
        return None
    fn.restype = ctypes.c_long
    return fn, numbers


class _Context:
    """An AIO context (``io_setup``), used by one thread at a time; destroyed once unreferenced (a context retired
    after an error), never at exit (the kernel frees a process's contexts then)."""

    def __init__(self, syscall, numbers):
        self._call, (_, destroy, self._getevents, self._submit) = syscall, numbers
        self.id = ctypes.c_ulong(0)
        if syscall(ctypes.c_long(numbers[0]), ctypes.c_long(_EVENTS), ctypes.byref(self.id)) != 0:
            raise OSError(ctypes.get_errno(), "io_setup")
        weakref.finalize(self, syscall, ctypes.c_long(destroy), self.id).atexit = False

    def submit(self, iocbs: ctypes.Array) -> int:
        """Requests submitted (all or a leading part); raises ``OSError`` when none was."""
        pointers = (ctypes.c_void_p * len(iocbs))(*[ctypes.addressof(c) for c in iocbs])
        n = self._call(ctypes.c_long(self._submit), self.id, ctypes.c_long(len(iocbs)), pointers)
        if n < 0:
            raise OSError(ctypes.get_errno(), "io_submit")
        return n

    def reap(self, n: int) -> list[int]:
        """The results of the ``n`` requests submitted, by their ``data`` (bytes written, or ``-errno``).

        Raises:
            OSError: ``io_getevents`` failed (the context may hold their events still: it must not be used again).
        """
        events = (_Event * n)()
        got = 0
        while got < n:
            k = self._call(ctypes.c_long(self._getevents), self.id, ctypes.c_long(n - got), ctypes.c_long(n - got),
                           ctypes.byref(events, got * ctypes.sizeof(_Event)), None)
            if k < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            if k <= 0:
                raise OSError(ctypes.get_errno() or errno.EIO, "io_getevents")
            got += k
        results = [0] * n
        for e in events:
            results[e.data] = e.res
        return results


_local = threading.local()
_SYSCALL = _syscall()
# contexts of threads that have ended, for the next threads: ``io_destroy`` waits for the kernel's RCU grace period,
# tens of milliseconds at the end of every writing thread (an export's last step)
_idle: list[_Context] = []
_idle_lock = threading.Lock()
os.register_at_fork(after_in_child=_idle.clear)  # a child's calls on its parent's contexts would fail


def _give_back(held: list) -> None:
    """A thread's local storage died: its context (``held[0]``, unless retired) is idle again."""
    if held[0] is not None:
        with _idle_lock:
            _idle.append(held[0])


class _ThreadEnd:
    """Kept in a thread's local storage: gives the thread's context back when that storage dies."""

    def __init__(self, held: list):
        weakref.finalize(self, _give_back, held).atexit = False


def _context() -> _Context | None:
    """This thread's context (an idle one, else a new one); None where AIO is not available (remembered for the
    thread)."""
    held = getattr(_local, "held", None)
    if held is None:
        ctx = None
        if _SYSCALL is not None:
            with _idle_lock:
                ctx = _idle.pop() if _idle else None
            try:
                ctx = ctx or _Context(*_SYSCALL)
            except OSError:
                pass  # ENOSYS, EPERM (a sandbox), EAGAIN (fs.aio-max-nr reached): pwritev it is
        held = _local.held = [ctx]
        _local.end = _ThreadEnd(held)
    return held[0]


def _retire() -> None:
    """This thread's context is not to be used again (nor by another thread): pwritev from now on."""
    _local.held[0] = None


def _address(view: memoryview) -> int | None:
    if view.readonly:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def pwritev_many(fd: int, calls: Sequence[tuple[int, Sequence[memoryview]]]) -> list[int]:
    """``os.pwritev(fd, buffers, offset)`` for each ``(offset, buffers)`` of ``calls`` (at most 1024 non-empty buffers
    each), in few system calls.

    Returns:
        The bytes written by the leading calls that were made, as ``pwritev`` returns them: a call that wrote short
        or failed ends the list (it and those after it are the caller's to write again, with ``pwritev``, which
        raises their error). Empty where AIO is not available, or a buffer is read-only: nothing was written.

    Raises:
        OSError: the submission itself failed for another reason than AIO being unavailable.
    """
    ctx = _context()
    if ctx is None:
        return []
    done: list[int] = []
    for start in range(0, len(calls), _EVENTS):
        batch = calls[start:start + _EVENTS]
        vectors = []
        for _, buffers in batch:
            addresses = [_address(b) for b in buffers]
            if None in addresses:
                return done
            vectors.append((_Iovec * len(buffers))(*[(a, len(b)) for a, b in zip(addresses, buffers)]))
        iocbs = (_Iocb * len(batch))()
        for i, ((offset, _), vector) in enumerate(zip(batch, vectors)):
            iocbs[i].data, iocbs[i].opcode, iocbs[i].fildes = i, _IOCB_CMD_PWRITEV, fd
            iocbs[i].buf, iocbs[i].nbytes, iocbs[i].offset = ctypes.addressof(vector), len(vector), offset
        try:
            submitted = ctx.submit(iocbs)
        except OSError as e:
            if e.errno == errno.EINTR:  # a signal before any was submitted: pwritev (which retries) writes them
                return done
            if e.errno not in _UNAVAILABLE:
                raise
            _retire()  # not for this file or no more: pwritev
            return done
        try:
            results = ctx.reap(submitted)
        except BaseException as e:  # noqa: B036 - an interrupt too
            _retire()  # events left unread must never be read as another batch's
            if not isinstance(e, OSError):
                raise
            return done  # the batch is written again through pwritev
        for (_, buffers), n in zip(batch, results):
            done.append(max(n, 0))
            if n != sum(len(b) for b in buffers):
                return done
        if submitted < len(batch):
            return done
    return done
