"""Fake quantizers of any toolkit behind one small protocol, and ``quantizers_disabled()``.

An adapter finds a toolkit's quantizers in a model and knows how to switch each one off and back,
fold it into a weight, and describe its state as tensors + JSON. The adapters that ship with the package
live in :mod:`offload_export.adapters` (ModelOpt, compressed-tensors, the built-in fake quantizers); module
quantizers that follow the ``enabled`` convention (a user's own) are one :func:`register_quantizer` away, and
:func:`register_adapter` adds any other.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._errors import add_note
from ._hooks import unhooked

__all__ = [
    "ModuleQuantizerAdapter",
    "Quantizer",
    "QuantizerAdapter",
    "find_quantizers",
    "json_digest",
    "json_safe",
    "module_quantizers",
    "quantizers_disabled",
    "register_adapter",
    "register_quantizer",
]

ROLES = ("weight", "input", "output")


@dataclass(frozen=True, eq=False)
class Quantizer:
    """One fake quantizer found in a model.

    Attributes:
        name: qualified name (the quantizer module's, or ``owner.<role>`` for module-less schemes).
        owner: the module whose weight or activation it quantizes; ``owner_name`` its qualified name.
        role: ``"weight"``, ``"input"`` or ``"output"`` (any activation quantizer that is not an input).
        target: for weight quantizers, the owner's attribute it folds into (``"weight"``).
        handle: the adapter's own object (e.g. the ``TensorQuantizer`` module).
        adapter: the adapter that found it.
        state_keys: state-dict keys that hold its state; they are never exported as weights.
    """

    name: str
    owner: nn.Module
    owner_name: str
    role: str
    target: str | None
    handle: Any
    adapter: QuantizerAdapter
    state_keys: tuple[str, ...] = field(default=())

    @property
    def enabled(self) -> bool:
        return self.adapter.is_enabled(self)


class QuantizerAdapter(ABC):
    """The protocol one toolkit implements. Subclass it and pass an instance to :func:`register_adapter`."""

    name: str = "adapter"

    @abstractmethod
    def find(self, model: nn.Module) -> Iterator[Quantizer]:
        """Yield every quantizer of this toolkit in ``model``."""

    @abstractmethod
    def is_enabled(self, q: Quantizer) -> bool:
        """Whether ``q`` currently changes the values that pass through it."""

    @abstractmethod
    def snapshot(self, q: Quantizer) -> Any:
        """Capture whatever :meth:`disable` changes, for :meth:`restore`."""

    @abstractmethod
    def disable(self, q: Quantizer) -> None:
        """Make ``q`` the identity."""

    @abstractmethod
    def restore(self, q: Quantizer, snapshot: Any) -> None:
        """Put back exactly the state captured by :meth:`snapshot`."""

    @abstractmethod
    def fold(self, q: Quantizer, weight: torch.Tensor) -> torch.Tensor:
        """Return the fake-quantized ``weight`` (same shape and dtype) for an enabled weight quantizer."""

    def fold_device(self, q: Quantizer) -> torch.device | None:
        """The device the quantizer's state lives on (its kernels run there), if it has real state; an accelerator
        when the state is split between one and the CPU (the fold moves the rest there for the fold)."""
        handle = q.handle if isinstance(q.handle, nn.Module) else None
        devices = [t.device for t in (handle.buffers() if handle is not None else ()) if t.device.type != "meta"]
        return next((d for d in devices if d.type != "cpu"), devices[0] if devices else None)

    def state(self, q: Quantizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The quantizer's tensors (keyed relative to ``q.name``) and a JSON-able configuration."""
        handle = q.handle if isinstance(q.handle, nn.Module) else None
        tensors = dict(handle.state_dict()) if handle is not None else {}
        return tensors, {"adapter": self.name, "role": q.role, "enabled": self.is_enabled(q)}


_ADAPTERS: list[QuantizerAdapter] = []


def register_adapter(adapter: QuantizerAdapter) -> QuantizerAdapter:
    """Add ``adapter`` to the adapters every function of this package consults.

    Args:
        adapter: an instance of a :class:`QuantizerAdapter` subclass.

    Returns:
        ``adapter``, so the call can decorate or be chained.

    Raises:
        TypeError: ``adapter`` does not implement the protocol.
    """
    if not isinstance(adapter, QuantizerAdapter):
        raise TypeError(f"expected a QuantizerAdapter instance, got {type(adapter).__name__}")
    _ADAPTERS.append(adapter)
    return adapter


def find_quantizers(model: nn.Module, which: str = "all") -> list[Quantizer]:
    """Every quantizer of every registered adapter in ``model`` whose role matches ``which``.

    Args:
        model: the model to search.
        which: ``"weight"``, ``"input"``, ``"output"`` or ``"all"``.

    Returns:
        Quantizers in module order.

    Raises:
        ValueError: ``which`` is not one of the accepted values.
    """
    if which not in (*ROLES, "all"):
        raise ValueError(f"which={which!r}: expected one of 'weight', 'input', 'output', 'all'")
    found = []
    seen = set()
    for adapter in _ADAPTERS:
        for q in adapter.find(model):
            if (id(q.handle), q.role) not in seen and (which == "all" or q.role == which):
                seen.add((id(q.handle), q.role))
                found.append(q)
    return found


@contextmanager
def quantizers_disabled(model: nn.Module, which: str = "weight") -> Iterator[list[Quantizer]]:
    """Turn fake quantizers off for the duration of the block; each one's own prior state comes back.

    A quantizer that was already disabled stays disabled after the block. ModelOpt quantizers are disabled
    as ModelOpt's own ``disable_quantizer`` does: an input quantizer's ``pre_quant_scale`` (SmoothQuant, AWQ)
    and a rotation still apply, since those methods scaled (rotated) the weight by their inverse. So
    ``"all"`` gives the unquantized model (up to float rounding of the scale pair), ``"weight"`` the model with
    only its activations quantized, ``"input"`` with only its weights quantized: each equal to ModelOpt's
    ``disable_quantizer`` with the matching wildcard. Nests with itself and with
    :func:`offload_export.materialized`.

    Args:
        model: the model (or any submodule).
        which: ``"weight"`` (default), ``"input"``, ``"output"`` or ``"all"``.

    Yields:
        The quantizers that were found.

    Raises:
        ValueError: ``which`` is not one of the accepted values.
        Exception: an adapter's own error while switching a quantizer off or back, as its own type with a
            note naming the quantizer; every other quantizer is restored first.

    Example:
        >>> with offload_export.quantizers_disabled(model, which="all"):  # doctest: +SKIP
        ...     reference_logits = model(input_ids).logits
    """
    quantizers = find_quantizers(model, which)
    saved = []
    try:
        for q in quantizers:
            try:
                saved.append((q, q.adapter.snapshot(q)))
                q.adapter.disable(q)
            except Exception as e:
                add_note(e, f"offload_export: disabling {q.name} ({q.adapter.name}) failed; the quantizers "
                            f"switched off so far were restored")
                raise
        yield quantizers
    finally:
        _restore_all(saved)


def _restore_all(saved: list[tuple[Quantizer, Any]]) -> None:
    """Restore every quantizer, even when one fails; one whose restore a ``KeyboardInterrupt`` stopped is restored
    again. Then raise the first failure (its own type, with a note), an interrupt before any other error."""
    failed: list[tuple[Quantizer, BaseException]] = []
    for q, snap in reversed(saved):
        try:
            try:
                q.adapter.restore(q, snap)
            except KeyboardInterrupt:
                q.adapter.restore(q, snap)  # putting a snapshot back is idempotent: Ctrl-C must not skip it
                raise
        except BaseException as e:  # noqa: B036 - the others are restored first, then it is raised
            failed.append((q, e))
    if failed:
        q, error = next((f for f in failed if not isinstance(f[1], Exception)), failed[0])
        add_note(error, f"offload_export: restoring {q.name} ({q.adapter.name}) failed; "
                        f"{len(saved) - len(failed)} of {len(saved)} quantizer(s) were restored")
        raise error


def _role_of(attr: str) -> tuple[str, str | None]:
    """``("weight", "weight")`` for ``weight_quantizer``; the role and folded attribute of a quantizer slot."""
    base = attr.rstrip("s") if attr.endswith("quantizers") else attr
    if base.endswith("weight_quantizer"):
        return "weight", base.removesuffix("_quantizer")
    if base.endswith("input_quantizer"):
        return "input", None
    return "output", None


def _state_keys(module: nn.Module, name: str) -> tuple[str, ...]:
    return tuple(f"{name}.{k}" for k in module.state_dict(keep_vars=True))


def module_quantizers(model: nn.Module, adapter: QuantizerAdapter, is_quantizer) -> Iterator[Quantizer]:
    """Quantizer modules found as named children (``*_quantizer`` or ``*_quantizers`` lists) of their owners."""
    for owner_name, owner in model.named_modules():
        for attr, child in owner.named_children():
            if not attr.endswith(("quantizer", "quantizers")) or not is_quantizer(child):
                continue
            name = f"{owner_name}.{attr}" if owner_name else attr
            role, target = _role_of(attr)
            if target is not None and not hasattr(owner, target):  # `gate_up_proj_weight_quantizers`
                target = target.removesuffix("_weight")
            yield Quantizer(name, owner, owner_name, role, target, child, adapter, _state_keys(child, name))


def _as_json(o: Any) -> Any:
    return o.model_dump() if hasattr(o, "model_dump") else repr(o)


def json_safe(value: Any) -> Any:
    """``value`` as JSON reads it back; objects JSON cannot hold become their ``model_dump()`` (pydantic) or ``repr``."""
    return json.loads(json.dumps(value, default=_as_json))


def json_digest(value: Any) -> str:
    """sha256 of ``value``'s canonical JSON (sorted keys, no whitespace), other objects as :func:`json_safe` has them."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=_as_json).encode()
                          ).hexdigest()


class ModuleQuantizerAdapter(QuantizerAdapter):
    """Quantizer modules of class ``cls`` stored as ``<x>_quantizer`` children, switched by a bool attribute.

    The convention of the built-in :mod:`offload_export.adapters.builtin` quantizers, and the quickest way to
    plug in a user's own (see :func:`register_quantizer`): ``module(weight)`` returns the fake-quantized
    weight and ``module.<enabled_attr>`` turns it on and off.
    """

    def __init__(self, cls: type[nn.Module], *, enabled_attr: str = "enabled", name: str | None = None):
        self.cls, self.enabled_attr = cls, enabled_attr
        self.name = name or f"{cls.__module__}.{cls.__qualname__}"

    def find(self, model):
        return module_quantizers(model, self, lambda m: isinstance(m, self.cls))

    def is_enabled(self, q):
        return bool(getattr(q.handle, self.enabled_attr))

    def snapshot(self, q):
        return getattr(q.handle, self.enabled_attr)

    def disable(self, q):
        setattr(q.handle, self.enabled_attr, False)

    def restore(self, q, snapshot):
        setattr(q.handle, self.enabled_attr, snapshot)

    def fold(self, q, weight):
        with torch.no_grad():
            return unhooked(q.handle)(weight).to(weight.dtype)

    def state(self, q):
        tensors, config = super().state(q)
        extra = getattr(q.handle, "config", None)
        config["class"] = type(q.handle).__qualname__
        if callable(extra):
            config["config"] = json_safe(extra())
        return tensors, config


def register_quantizer(cls: type[nn.Module], *, enabled_attr: str = "enabled") -> QuantizerAdapter:
    """Make a user's own quantizer module class known to ``quantizers_disabled`` and ``save_clean``.

    The class must be attached as a child named ``*weight_quantizer`` / ``*input_quantizer`` /
    ``*output_quantizer``, return the fake-quantized tensor from ``forward`` and carry a bool attribute
    ``enabled_attr``; its buffers are saved as its state, and an optional ``config()`` method's JSON-able
    result as its configuration.

    Args:
        cls: the quantizer module class.
        enabled_attr: the attribute that switches it on and off.

    Returns:
        The registered adapter.

    Example:
        >>> offload_export.register_quantizer(MyQuantizer)  # doctest: +SKIP
    """
    return register_adapter(ModuleQuantizerAdapter(cls, enabled_attr=enabled_attr))


