"""Many positional writes in one system call (Linux's native AIO, ``io_submit``), so that a writing thread hands the
GIL over once per batch rather than once per write.

Every system call releases the GIL, and taking it back waits for a thread running Python (an export's pack thread)
to give it up, up to the switch interval: a writer making a ``pwritev`` call per 512 KiB then writes at a fraction
of the disk's rate (``benchmarks/bench_writer_beside.py``). ``io_submit`` performs the buffered writes it is given
(``IOCB_CMD_PWRITEV``) inside the call, in order, each as ``pwritev`` would, so a batch costs the kernel what its
calls would and the GIL one hand-over. Where it is not available (another OS or CPU, a kernel or sandbox without
it, the system's AIO context limit reached), :func:`pwritev_many` writes nothing and the caller uses ``pwritev``.

On a file opened with ``O_DIRECT`` the same requests are asynchronous: :func:`pwrite_direct` copies a run of bytes
through a few aligned buffers of the thread, each written by the disk while the next is filled, past the page cache.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import threading
import weakref
from collections.abc import Sequence

__all__ = ["BLOCK", "pwrite_direct", "pwritev_many"]

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PWRITE = 1
_IOCB_CMD_PWRITEV = 8
_EVENTS = 256  # requests one thread's context holds at once (a batch is split beyond)
BLOCK = 4096  # what direct writes are aligned to (offset, length, memory): a multiple of every disk's logical block
_BOUNCE = 4 << 20  # bytes of each of a thread's direct-write buffers ...
_BOUNCES = 3  # ... of which all but the one being filled may be on their way to the disk
_CLEANUP_WAIT = 30.0  # seconds a failed direct write waits for each of the requests still in flight
_UNAVAILABLE = (errno.ENOSYS, errno.EINVAL, errno.EAGAIN, errno.EPERM, errno.EOPNOTSUPP)


class _Iocb(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


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

    def reap_one(self, timeout: float | None = None) -> tuple[int, int] | None:
        """``(data, result)`` of the next request to complete (bytes written, or ``-errno``); None when none did
        within ``timeout`` seconds.

        Raises:
            OSError: as :meth:`reap`.
        """
        event = _Event()
        limit = None if timeout is None else _Timespec(int(timeout), int(timeout % 1 * 1e9))
        while True:
            k = self._call(ctypes.c_long(self._getevents), self.id, ctypes.c_long(1), ctypes.c_long(1),
                           ctypes.byref(event), None if limit is None else ctypes.byref(limit))
            if k == 1:
                return event.data, event.res
            if k == 0 and limit is not None:
                return None
            if k < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            raise OSError(ctypes.get_errno() or errno.EIO, "io_getevents")


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
    """This thread's context is not to be used again (nor by another thread): pwritev from now on. Its direct-write
    buffers go with it: a write left in flight may still read them."""
    _local.held[0] = None
    _local.bounces = None


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


def _bounces() -> list[memoryview]:
    """This thread's direct-write buffers (anonymous mappings: page-aligned), made at its first direct write."""
    bounces = getattr(_local, "bounces", None)
    if bounces is None:
        bounces = _local.bounces = [memoryview(mmap.mmap(-1, _BOUNCE)) for _ in range(_BOUNCES)]
    return bounces


def _fill(dst: memoryview, sources: Sequence[memoryview], i: int, pos: int) -> tuple[int, int, int]:
    """Copy ``sources`` from source ``i`` byte ``pos`` on into ``dst`` until it is full or they end; ``memmove``
    hands the GIL over while it copies (a slice assignment would hold it).

    Returns:
        The bytes copied, and the source and byte to go on from.
    """
    n = 0
    base = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    while i < len(sources) and n < len(dst):
        src = sources[i]
        k = min(len(src) - pos, len(dst) - n)
        if not k:  # an empty source
            i, pos = i + 1, 0
            continue
        address = _address(src)
        if address is None:
            dst[n:n + k] = src[pos:pos + k]
        else:
            ctypes.memmove(base + n, address + pos, k)
        n, pos = n + k, pos + k
        if pos == len(src):
            i, pos = i + 1, 0
    return n, i, pos


def pwrite_direct(fd: int, offset: int, sources: Sequence[memoryview], fallback: int) -> None:
    """Write ``sources``, laid end to end, at ``offset`` of ``fd`` (opened with ``O_DIRECT``; ``offset`` and their
    total length multiples of :data:`BLOCK`), copied through this thread's aligned buffers: each is written while the
    next is filled (Linux AIO), one after the other where AIO is not available. A direct write that writes short
    (a full disk) is finished through ``fallback``, a descriptor of the same file without ``O_DIRECT``, which reports
    the error.

    Raises:
        OSError: a write failed; EINVAL: the file takes no direct writes of this alignment (what was written of the
            range is unknown: the caller writes it again without ``O_DIRECT``).
    """
    ctx, bounces = _context(), _bounces()
    aio = ctx  # None once AIO refuses a request: the rest is written here, the requests queued before are reaped
    free = list(range(len(bounces)))
    flying: dict[int, tuple[int, int]] = {}  # buffer -> (offset, bytes) of the request queued from it

    def landed(slot: int, where: int, n: int, result: int) -> None:
        free.append(slot)
        if result < 0:
            raise OSError(-result, f"{os.strerror(-result)} (a direct write of {n} bytes at byte {where})")
        if result < n:  # the disk is full: the rest through the page cache reports it
            pwritev_all(fallback, [bounces[slot][result:n]], where + result)

    def reap_one() -> None:
        slot, result = ctx.reap_one()
        landed(slot, *flying.pop(slot), result)

    i = pos = 0
    at = offset
    try:
        while i < len(sources):
            if not free:
                reap_one()
            slot = free.pop()
            n, i, pos = _fill(bounces[slot], sources, i, pos)
            if not n:  # only empty sources were left
                free.append(slot)
                break
            if aio is not None and _submit_one(aio, fd, bounces[slot], n, at, slot):
                flying[slot] = (at, n)
            else:
                aio = None
                landed(slot, at, n, _pwrite_once(fd, bounces[slot][:n], at))
            at += n
        while flying:
            reap_one()
    except BaseException:  # noqa: B036 - an interrupt too: wait for what the disk still reads from the buffers
        try:
            while flying:
                # bounded: an interrupt right after a request was reaped leaves it in ``flying``, never to complete
                done = ctx.reap_one(timeout=_CLEANUP_WAIT)
                if done is None:
                    raise TimeoutError
                flying.pop(done[0])
        except BaseException:  # noqa: B036
            _retire()  # the context might still complete a request: never used again, nor its buffers
        raise


def _submit_one(ctx: _Context, fd: int, buffer: memoryview, n: int, offset: int, slot: int) -> bool:
    """Queue the write of ``buffer[:n]`` at ``offset``, its event tagged ``slot``; False when AIO refused it (the
    caller writes it itself)."""
    iocbs = (_Iocb * 1)()
    iocbs[0].data, iocbs[0].opcode, iocbs[0].fildes = slot, _IOCB_CMD_PWRITE, fd
    iocbs[0].buf, iocbs[0].nbytes, iocbs[0].offset = _address(buffer), n, offset
    try:
        return ctx.submit(iocbs) == 1
    except OSError as e:
        if e.errno == errno.EINTR or (e.errno in _UNAVAILABLE and e.errno != errno.EINVAL):
            return False  # EINVAL here is the file's: this alignment is not taken
        raise


def _pwrite_once(fd: int, buffer: memoryview, offset: int) -> int:
    """``os.pwrite``'s result, or ``-errno``."""
    try:
        return os.pwrite(fd, buffer, offset)
    except OSError as e:
        if e.errno is None:
            raise
        return -e.errno


def pwritev_all(fd: int, buffers: Sequence[memoryview], offset: int) -> None:
    """``os.pwritev`` of ``buffers`` at ``offset``, again for the rest after a short write (which a full disk answers
    with its error).

    Raises:
        OSError: a write fails, or writes nothing (EIO).
    """
    buffers = [b for b in buffers if len(b)]
    while buffers:
        n = os.pwritev(fd, buffers, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote nothing at byte {offset}")
        offset += n
        while n >= len(buffers[0]):
            n -= len(buffers.pop(0))
            if not buffers:
                return
        buffers[0] = buffers[0][n:]
