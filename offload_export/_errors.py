"""Context for exceptions that pass through: a note added to the exception itself, never a new wrapper.

An exception raised by user or toolkit code (a quantizer's fold, a forward hook, a peer rank) keeps its own
type, so that ``except torch.OutOfMemoryError`` or a toolkit's own exception class still works upstream.
"""

from __future__ import annotations

__all__ = ["add_note"]


def add_note(error: BaseException, note: str) -> BaseException:
    """Attach ``note`` to ``error`` (``BaseException.add_note`` on Python 3.11+, ``__notes__`` before) and return it.

    Example:
        >>> try:
        ...     raise KeyError("x")
        ... except KeyError as e:
        ...     add_note(e, "while reading layer 3").__notes__
        ['while reading layer 3']
    """
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10: the traceback module prints __notes__ from 3.11 on; keep the same attribute
        notes = getattr(error, "__notes__", None)
        if not isinstance(notes, list):
            notes = []
            error.__notes__ = notes
        notes.append(note)
    return error
