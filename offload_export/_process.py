"""Process-wide settings an export changes while it runs, shared by the exports that overlap in one process.

Each is applied when the first overlapping export starts and undone when the last one ends (threads of one
process may export at once), however they end:

- :func:`quick_switching`, while units stream: the interpreter's thread switch interval at 0.5 ms instead of 5 ms.
  The reader and writer threads spend their time in system calls and then need the GIL back for a moment, but a
  fold or pack that runs Python code (ModelOpt's export) keeps it for a whole switch interval, during which the
  disk idles (benchmarks/README.md has the measurement).
- :func:`no_full_collections`, around ``save_clean`` and ``verify``: no full pass of the cyclic garbage collector (its
  third threshold raised), and the objects older than the call frozen (``gc.freeze``) unless the process froze some
  itself. An export allocates enough small, long-lived objects while it plans (tensor specs, headers, copies of
  quantizers) to start a full collection, which walks every object of the process with every thread stopped: the
  model's modules, the toolkit's quantizers, their ``__dict__``s. For a MoE under ModelOpt that pass took longer than
  the rest of the plan, and 0.35-0.5 s of a 4B export on a GPU machine whose Python had frozen a few hundred objects
  at start-up, which made the freeze alone a no-op (benchmarks/README.md). The export frees none of those objects;
  the young generations are still collected.
"""

from __future__ import annotations

import functools
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["no_full_collections", "quick_switching"]

_T = TypeVar("_T")


class _Shared:
    """A process-wide setting held while at least one block is open: ``apply()`` at the first, which returns how to
    undo it (or None: nothing to undo), called when the last block ends."""

    def __init__(self, apply: Callable[[], Callable[[], None] | None]):
        self._apply = apply
        self._lock = threading.Lock()
        self._users = 0
        self._undo: Callable[[], None] | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._undo = self._apply()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._undo is not None:
                    self._undo()


_SWITCH_INTERVAL = 5e-4


def _switch_quickly() -> Callable[[], None]:
    saved = sys.getswitchinterval()
    quick = min(saved, _SWITCH_INTERVAL)
    sys.setswitchinterval(quick)

    def undo() -> None:
        if sys.getswitchinterval() == quick:  # unless someone else changed it meanwhile
            sys.setswitchinterval(saved)

    return undo


_NO_FULL_PASS = 1 << 30  # young passes before a full one (the collector's third threshold): never, in practice


def _pause_full_passes() -> Callable[[], None]:
    threshold = gc.get_threshold()
    paused = (*threshold[:2], _NO_FULL_PASS)
    gc.set_threshold(*paused)
    # a process that froze objects itself (a pre-forking server does) keeps them: unfreezing would undo that
    freeze = not gc.get_freeze_count()
    if freeze:
        gc.freeze()

    def undo() -> None:
        if freeze:
            gc.unfreeze()
        if gc.get_threshold() == paused:  # unless someone else changed it meanwhile
            gc.set_threshold(*threshold)

    return undo


quick_switching = _Shared(_switch_quickly)
_paused = _Shared(_pause_full_passes)


def no_full_collections(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Decorate ``fn`` to run without full passes of the cyclic garbage collector (the third of
    ``gc.set_threshold``'s thresholds, the young passes between two full ones, raised) and with the objects that
    exist when it starts moved to the collector's permanent generation (``gc.freeze``) and back when it ends
    (``gc.unfreeze``), however it ends.

    Objects created while ``fn`` runs are collected as usual by the young passes, cycles included; those that
    outlive them wait for the next full pass after ``fn``. Nothing is frozen when the process had already frozen
    objects: unfreezing would undo that.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> _T:
        with _paused():
            return fn(*args, **kwargs)

    return wrapper
