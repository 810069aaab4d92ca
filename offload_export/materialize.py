"""``materialized()``: offloaded weights made real for the duration of a block, then restored exactly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import swap_tensors

from ._hooks import CacheHook, StoreRef, offloaded_tensors
from ._store import read_store, write_store

__all__ = ["materialized"]


@dataclass
class _Onloaded:
    """A module tensor made real: ``original`` now holds the data, ``placeholder`` the meta tensor."""

    original: torch.Tensor
    placeholder: torch.Tensor
    ref: StoreRef
    name: str
    depth: int = 1


# Shared by all contexts so that nesting (and threads onloading different modules) compose: a tensor is
# onloaded by the first context that needs it and restored by the last one that leaves.
_lock = threading.RLock()
_active: dict[int, _Onloaded] = {}
_suspended: dict[int, list] = {}  # id(hook) -> [hook, depth]


def _real_twin(meta: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if isinstance(meta, nn.Parameter):
        return type(meta)(value, requires_grad=meta.requires_grad)
    return value


def _onload(name: str, tensor: torch.Tensor, ref: StoreRef, device: torch.device) -> _Onloaded:
    value = read_store(ref.store, tensor.dtype, tuple(tensor.shape))
    copy = ref.store.kind == "cpu" or value.device == device  # never hand out the store's own memory
    value = value.to(device, copy=copy)
    twin = _real_twin(tensor, value)
    swap_tensors(tensor, twin)  # `tensor` keeps its identity (and every reference to it) but now holds data
    return _Onloaded(tensor, twin, ref, name)


def _offload(entry: _Onloaded, writeback: bool) -> None:
    try:
        if writeback:
            stored = read_store(entry.ref.store, entry.original.dtype, tuple(entry.original.shape))
            if not torch.equal(stored, entry.original.detach().to(stored.device)):
                write_store(entry.ref.store, entry.original.detach())
    finally:
        swap_tensors(entry.original, entry.placeholder)


def _slots(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        prefix = f"{owner_name}." if owner_name else ""
        for attr, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
            if tensor is not None:
                yield prefix + attr, owner, attr, tensor


def _enter(module: nn.Module, device: torch.device | None, refs: dict, skip: frozenset
           ) -> tuple[list[_Onloaded], list]:
    mine: list[_Onloaded] = []
    hooks: list = []
    try:
        for name, owner, attr, tensor in _slots(module):
            if (id(owner), attr) in skip:
                continue
            ref = refs.get((id(owner), attr))
            if ref is None:
                if tensor.device.type == "meta" and id(tensor) not in _active:
                    raise RuntimeError(
                        f"{name} is on the meta device and no offloading hook inside this module supplies it;\n"
                        f"  if an enclosing module's hook owns it (place_submodules), materialize that module")
                continue
            if id(tensor) in _active:
                _active[id(tensor)].depth += 1
            else:
                _active[id(tensor)] = _onload(name, tensor, ref, device or ref.execution_device)
            mine.append(_active[id(tensor)])
            if id(ref.hook) not in {id(h) for h in hooks}:
                hooks.append(ref.hook)
    except BaseException:
        _exit(mine, [], writeback=False)
        raise
    for hook in hooks:  # accelerate's post_forward would set the weights back to meta
        entry = _suspended.setdefault(id(hook), [hook, 0, hook.offload])
        entry[1] += 1
        hook.offload = False
    return mine, hooks


def _exit(mine: list[_Onloaded], hooks: list, writeback: bool) -> None:
    for hook in hooks:
        entry = _suspended[id(hook)]
        entry[1] -= 1
        if entry[1] == 0:
            hook.offload = entry[2]
            del _suspended[id(hook)]
    errors = []
    for entry in reversed(mine):
        entry.depth -= 1
        if entry.depth:
            continue
        del _active[id(entry.original)]
        try:
            _offload(entry, writeback)
        except Exception as e:  # restore every other tensor before reporting
            errors.append((entry.name, e))
    if errors:
        name, error = errors[0]
        raise RuntimeError(f"writing back {name} failed ({len(errors)} tensor(s) failed): {error}") from error


@contextmanager
def materialized(module: nn.Module, device: torch.device | str | None = None, *,
                 writeback: bool = False) -> Iterator[nn.Module]:
    """Make every offloaded parameter and buffer of ``module`` real for the duration of the block.

    Inside, each offloaded tensor holds its stored value on its hook's execution device (or ``device``),
    and accelerate's hooks do not offload them again after a forward. On exit (also on an exception or
    ``KeyboardInterrupt``) every tensor is the same object as before, back on the meta device, and the
    hooks are as they were. Contexts nest, also on overlapping modules.

    Args:
        module: a model or any submodule carrying (or below) accelerate ``AlignDevicesHook``s.
        device: where to put the onloaded tensors instead of each hook's execution device.
        writeback: on a normal exit, persist tensors whose values changed into the offload store
            (a ``.dat`` in the offload folder, the CPU dict, never the user's own safetensors file).

    Yields:
        ``module`` itself.

    Raises:
        RuntimeError: a meta tensor has no hook in ``module`` that can supply it, a writeback failed, or
            ``writeback`` was asked for a module offloaded by compressed-tensors' ``OffloadCache``.

    Example:
        >>> with offload_export.materialized(model.model.layers[3]) as layer:  # doctest: +SKIP
        ...     print(layer.mlp.up_proj.weight.abs().max())
    """
    refs = offloaded_tensors(module)
    if writeback and any(isinstance(r.hook, CacheHook) for r in refs.values()):
        raise RuntimeError("materialized(writeback=True) does not support modules offloaded by compressed-tensors'\n"
                           "  own OffloadCache (it hands out a fresh copy on every access, so edits would be lost);\n"
                           "  edit through compressed-tensors' `update_offload_parameter` instead")
    with onloaded(module, device, refs, writeback=writeback):
        yield module


@contextmanager
def onloaded(module: nn.Module, device: torch.device | str | None, refs: dict[tuple[int, str], StoreRef], *,
             writeback: bool = False, skip: frozenset[tuple[int, str]] = frozenset()) -> Iterator[None]:
    """:func:`materialized` with the offload map given, e.g. the whole model's (hooks above ``module``).

    ``skip`` lists ``(id(owner), attr)`` slots to leave offloaded (the caller already holds their data).
    """
    device = torch.device(device) if device is not None else None
    with _lock:
        mine, hooks = _enter(module, device, refs, skip)
    ok = False
    try:
        yield
        ok = True
    finally:
        with _lock:
            _exit(mine, hooks, writeback=writeback and ok)
