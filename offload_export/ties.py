"""Which stores hold the other sides of a tied tensor: the entries of the same store that are the same data, and
the sides of every tie a transformers model above the module declares (``_tied_weights_keys``), wherever they live.

Modules do not know their parents: the model above a module is found through the garbage collector's list of
objects (one pass, once per model: every module under it is cached).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ._hooks import Store, StoreRef, offloaded_tensors, resolve_store
from .layout import declared_ties

__all__ = ["TieFinder", "TiedSide", "model_root", "store_aliases"]


@dataclass(frozen=True)
class TiedSide:
    """Another side of a tie: its store entry, or (``store`` None) a resident tensor.

    Attributes:
        name: the side's qualified name (the entry's key for an alias).
        store: where it is stored when offloaded.
        tensor: the resident tensor when not.
        alias: whether it is another key for the same data of the same store.
    """

    name: str
    store: Store | None
    tensor: torch.Tensor | None = None
    alias: bool = False


def store_aliases(store: Store) -> list[Store]:
    """Other entries of ``store``'s mapping that are the same data: the same CPU tensor, or the same tensor of
    the same safetensors file (how accelerate and transformers keep tied weights)."""
    if store.kind == "cpu":
        value = store.dataset[store.key]
        return [Store("cpu", store.dataset, k) for k, v in store.dataset.items()
                if k != store.key and isinstance(v, torch.Tensor) and _same_memory(v, value)]
    if store.kind == "safetensors":
        index, loader_state = store.dataset.index, store.dataset.state_dict
        return [resolve_store(store.dataset, k) for k, info in index.items()
                if k != store.key and k not in loader_state and info.get("safetensors_file") == store.path
                and info.get("weight_name", k) == store.file_key]
    return []


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device == b.device and a.device.type != "meta" and a.data_ptr() == b.data_ptr()
                      and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)


class TieFinder:
    """The tie sides of tensors of ``module`` (its ancestors and their offload maps found once, on first use)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._ancestors: list[tuple[nn.Module, str]] | None = None
        self._refs: dict[int, dict[tuple[int, str], StoreRef]] = {}

    def sides(self, name: str, store: Store, shape: torch.Size, current: torch.Tensor | None) -> list[TiedSide]:
        """The other sides of ``module``'s tensor ``name`` (stored in ``store``; ``current`` is its tensor now).

        Args:
            name: the tensor's name relative to ``module``.
            store: where it is stored.
            shape: its shape (a declared side of another shape is no tie).
            current: the tensor in its slot now (a resident side that is this object is no other side).
        """
        found = [TiedSide(s.key, s, alias=True) for s in store_aliases(store)]
        for ancestor, prefix in self.ancestors():
            ties = declared_ties(ancestor)
            full = prefix + name
            source = ties.get(full, full)
            for other in sorted({source, *(k for k, v in ties.items() if v == source)} - {full}):
                side = self._side(ancestor, other, shape, current)
                if side is not None:
                    found.append(side)
        return found

    def ancestors(self) -> list[tuple[nn.Module, str]]:
        """``(module, prefix of the module in it)`` for ``module`` and every module above it."""
        if self._ancestors is None:
            root = model_root(self.module)
            path = next(n for n, m in root.named_modules(remove_duplicate=False) if m is self.module)
            parts = path.split(".") if path else []
            self._ancestors = [(root.get_submodule(".".join(parts[:i])),
                                ".".join(parts[i:]) + "." if parts[i:] else "") for i in range(len(parts) + 1)]
        return self._ancestors

    def _side(self, ancestor: nn.Module, name: str, shape: torch.Size, current) -> TiedSide | None:
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = ancestor.get_submodule(owner_name)
        except AttributeError:
            return None
        tensor = owner._parameters.get(attr, owner._buffers.get(attr))
        if tensor is None or tensor.shape != shape:
            return None
        refs = self._refs.get(id(ancestor))
        if refs is None:
            refs = self._refs[id(ancestor)] = offloaded_tensors(ancestor, include_suspended=True)
        ref = refs.get((id(owner), attr))
        if ref is not None:
            return TiedSide(name, ref.store)
        if tensor.device.type == "meta" or tensor is current:
            return None
        return TiedSide(name, None, tensor)


_root_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_root(module: nn.Module) -> nn.Module:
    """The topmost module containing ``module``, cached for every module under it while it still contains it."""
    cached = _root_of.get(module)
    root = cached() if cached is not None else None
    if root is not None and any(m is module for m in root.modules()):
        return root
    parents = _parents()
    root, seen = module, {id(module)}
    while (parent := parents.get(id(root))) is not None and id(parent) not in seen:
        root = parent
        seen.add(id(root))
    for m in root.modules():
        _root_of[m] = weakref.ref(root)
    return root


def _parents() -> dict[int, nn.Module]:
    """``id(child) -> a module holding it`` over every module alive (one pass over the garbage collector's
    objects: modules do not know their parents)."""
    parents: dict[int, nn.Module] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), nn.Module):
            for child in obj.__dict__.get("_modules", {}).values():
                if child is not None:
                    parents.setdefault(id(child), obj)
    return parents
