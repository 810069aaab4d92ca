"""Keep the cyclic garbage collector's full passes off the objects that were there before an export.

An export allocates many small, long-lived objects while it plans (tensor specs, headers, copies of
quantizers), enough to start a full collection, which walks every object of the process with every thread
stopped: the model's modules, the toolkit's quantizers, their ``__dict__``s. For a MoE under ModelOpt that
pass took longer than the rest of the plan (benchmarks/README.md), and the export frees none of those objects.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["old_objects_frozen"]

_T = TypeVar("_T")
_lock = threading.Lock()
_depth = 0  # exports inside the block (threads of one process may export at once)
_froze = False  # whether the outermost block froze (it did not when someone else had frozen objects)


def old_objects_frozen(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Decorate ``fn`` to run with the objects that exist when it starts moved to the collector's permanent
    generation (``gc.freeze``) and moved back when it ends, however it ends (``gc.unfreeze``).

    Objects created while ``fn`` runs are collected as usual, cycles included. Nothing is frozen when the process
    had already frozen objects (a pre-forking server does): unfreezing would undo that.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> _T:
        global _depth, _froze
        with _lock:
            if _depth == 0:
                _froze = gc.get_freeze_count() == 0
                if _froze:
                    gc.freeze()
            _depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _depth -= 1
                if _depth == 0 and _froze:
                    gc.unfreeze()

    return wrapper
