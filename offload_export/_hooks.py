"""The one adapter over accelerate's hooks: which hook supplies which tensor, and from where.

Everything that reads ``_hf_hook``, ``SequentialHook``, ``PrefixedDataset`` or ``OffloadedWeightsLoader``
lives here, so the rest of the package sees plain :class:`Store` records.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CacheHook", "Store", "StoreRef", "add_store_entry", "align_hooks", "cache_store", "execution_device",
           "is_offload_cache", "no_onloading", "offloaded_tensors", "offloads", "resolve_store", "resume_offload",
           "state_lock", "store_paths", "suspend_offload", "suspensions", "unhooked"]

# Guards every change :func:`offload_export.materialized` makes to hooks, modules and stores (one lock for all
# of them, so that blocks entered from several threads compose). Re-entrant: a block may enter another.
state_lock = threading.RLock()
_suspended: dict[int, list] = {}  # id(hook) -> [hook, number of suspensions, offload flag to restore]


@dataclass(frozen=True)
class Store:
    """Where one offloaded value physically is.

    Attributes:
        kind: ``"cpu"`` (a tensor in RAM), ``"disk"`` (a ``.dat`` memmap of an offload folder),
            ``"safetensors"`` (a tensor inside a safetensors file, usually the user's checkpoint) or
            ``"mapping"`` (any other ``Mapping``; read through ``__getitem__``).
        dataset: the innermost mapping holding the entry.
        key: the entry's key in ``dataset``.
        path: the file for ``"disk"`` / ``"safetensors"`` entries.
        file_key: the tensor's name inside a safetensors file.
        file_dtype: the dtype of a ``.dat`` file's raw bytes.
    """

    kind: str
    dataset: Mapping
    key: str
    path: str | None = None
    file_key: str | None = None
    file_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class StoreRef:
    """An offloaded tensor: the hook that supplies it and the store that holds it."""

    hook: object
    hook_module: str
    execution_device: torch.device
    store: Store


def unhooked(module: nn.Module) -> Callable:
    """``module``'s own forward, without accelerate's hook around it: that hook moves the inputs to its execution
    device, which is not the fold device when the export folds elsewhere (``device=``); the export has already made
    the module's state real where it folds."""
    return getattr(module, "_old_forward", module)


def align_hooks(module: nn.Module) -> Iterator[object]:
    """Yield the ``AlignDevicesHook``-like hooks on ``module``, looking inside ``SequentialHook``."""
    stack = [getattr(module, "_hf_hook", None)]
    while stack:
        hook = stack.pop(0)
        if hook is None:
            continue
        if hasattr(hook, "hooks"):
            stack[:0] = list(hook.hooks)
        elif hasattr(hook, "weights_map") and hasattr(hook, "offload"):
            yield hook


def suspend_offload(hook) -> None:
    """Stop ``hook`` from loading weights before and offloading them after a forward; counted, so it nests.

    Call with :data:`state_lock` held; every call needs one :func:`resume_offload`.
    """
    entry = _suspended.setdefault(id(hook), [hook, 0, hook.offload])
    entry[1] += 1
    hook.offload = False


def resume_offload(hook) -> None:
    """Undo one :func:`suspend_offload`; the last one gives ``hook`` back its own ``offload`` flag."""
    entry = _suspended[id(hook)]
    entry[1] -= 1
    if entry[1] == 0:
        hook.offload = entry[2]
        del _suspended[id(hook)]


def suspensions(hook) -> int:
    """How many :func:`suspend_offload` calls on ``hook`` are not resumed yet."""
    entry = _suspended.get(id(hook))
    return entry[1] if entry is not None else 0


def offloads(hook) -> bool:
    """Whether ``hook`` offloads its module's tensors, also while :func:`suspend_offload` holds it off."""
    entry = _suspended.get(id(hook))
    return bool(entry[2] if entry is not None else hook.offload)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def execution_device(hook) -> torch.device:
    """The device a hook runs its module on (accelerate allows ints for CUDA indices)."""
    device = hook.execution_device
    if device is None:
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _unprefix(weights_map: Mapping, name: str) -> tuple[Mapping, str]:
    """The innermost mapping under ``PrefixedDataset`` wrappers and ``name``'s full key in it."""
    dataset, key = weights_map, name
    while hasattr(dataset, "prefix") and hasattr(dataset, "dataset"):
        dataset, key = dataset.dataset, f"{dataset.prefix}{key}"
    return dataset, key


def add_store_entry(weights_map: Mapping, name: str, value: torch.Tensor) -> Callable[[], None]:
    """Add a CPU copy of ``value`` as ``name`` to a hook's ``weights_map`` (a dict, or a loader's RAM entries).

    Returns:
        A function that puts the entry back as it was (absent, or its previous value).

    Raises:
        RuntimeError: the store cannot take new entries.
    """
    dataset, key = _unprefix(weights_map, name)
    if isinstance(getattr(dataset, "state_dict", None), MutableMapping) and hasattr(dataset, "index"):
        dataset = dataset.state_dict  # OffloadedWeightsLoader looks its RAM entries up first
    if not isinstance(dataset, MutableMapping):
        raise RuntimeError(f"cannot add {key} to an offload store of type {type(dataset).__name__}")
    missing = object()
    old = dataset.get(key, missing)
    dataset[key] = value.detach().to("cpu", copy=True)
    return lambda: dataset.pop(key, None) if old is missing else dataset.__setitem__(key, old)


def resolve_store(weights_map: Mapping, name: str) -> Store:
    """Follow ``PrefixedDataset`` wrappers down to the entry that holds ``name``.

    Args:
        weights_map: a hook's ``weights_map``.
        name: the tensor's name relative to the hook's module.

    Returns:
        The physical location of the entry.

    Raises:
        KeyError: the store has no entry for ``name``.
    """
    dataset, key = _unprefix(weights_map, name)
    loader_state = getattr(dataset, "state_dict", None)
    index = getattr(dataset, "index", None)
    if isinstance(loader_state, Mapping) and isinstance(index, Mapping):  # OffloadedWeightsLoader
        if key in loader_state:
            return Store("cpu", loader_state, key)
        info = index[key]
        if info.get("safetensors_file") is not None:
            return Store("safetensors", dataset, key, path=info["safetensors_file"],
                         file_key=info.get("weight_name", key))
        path = os.path.join(dataset.save_folder, f"{key}.dat")
        return Store("disk", dataset, key, path=path, file_dtype=_dtype(info["dtype"]))
    if isinstance(dataset, dict):
        if key not in dataset:
            raise KeyError(key)
        value = dataset[key]
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            return Store("cpu", dataset, key)
    return Store("mapping", dataset, key)


def _hook_tensors(module: nn.Module, hook) -> Iterator[tuple[str, nn.Module, str]]:
    """The tensors an offloading hook loads in ``pre_forward``, as (relative name, owner, attribute).

    Mirrors ``AlignDevicesHook.pre_forward``: parameters, buffers only with ``offload_buffers``, children's
    tensors only with ``place_submodules``, never non-persistent buffers. Tied duplicates are all listed.
    """
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        if owner_name and not hook.place_submodules:
            break
        prefix = f"{owner_name}." if owner_name else ""
        for attr in owner._parameters:
            if owner._parameters[attr] is not None:
                yield prefix + attr, owner, attr
        if hook.offload_buffers:
            for attr, value in owner._buffers.items():
                if value is not None and attr not in owner._non_persistent_buffers_set:
                    yield prefix + attr, owner, attr


def offloaded_tensors(model: nn.Module, *, include_suspended: bool = False) -> dict[tuple[int, str], StoreRef]:
    """Map every offloaded tensor slot ``(id(owner), attr)`` of ``model`` to its hook and store.

    Only hooks with ``offload=True`` and a ``weights_map`` count; a slot covered by several hooks
    (nested ``place_submodules``) is attributed to the innermost one, as accelerate loads it last.

    Args:
        model: the module to scan.
        include_suspended: also count hooks that ``materialized`` holds off right now (their tensors are
            real until the block ends). Off by default: inside a block, those tensors read as resident.
    """
    refs: dict[tuple[int, str], StoreRef] = {}
    for module_name, module in model.named_modules():
        for hook in align_hooks(module):
            if not (offloads(hook) if include_suspended else hook.offload) or hook.weights_map is None:
                continue
            device = execution_device(hook)
            for rel, owner, attr in _hook_tensors(module, hook):
                try:
                    store = resolve_store(hook.weights_map, rel)
                except KeyError:
                    continue  # accelerate would fail on forward too; the layout reports it as missing
                refs[(id(owner), attr)] = StoreRef(hook, module_name, device, store)
    refs.update(_ct_offloaded_tensors(model))
    return refs


def _loader_paths(dataset: Mapping) -> set[str]:
    """The offload folder and safetensors files an ``OffloadedWeightsLoader`` reads (nothing for other mappings)."""
    index = getattr(dataset, "index", None)
    if not isinstance(index, Mapping):
        return set()
    folder = getattr(dataset, "save_folder", None)
    paths = {str(folder)} if folder else set()
    return paths | {str(info["safetensors_file"]) for info in index.values()
                    if isinstance(info, Mapping) and info.get("safetensors_file")}


def store_paths(model: nn.Module) -> set[str]:
    """Every file and folder an offload store of ``model`` keeps weights in, whatever its tensors hold right now.

    Found from the stores themselves, not from which tensors are meta: inside ``materialized`` (hooks
    suspended, compressed-tensors caches swapped for dicts) the answer is the same. Covers accelerate hooks'
    ``weights_map`` (offload folders, the source checkpoint's safetensors files), the ``offload_dir`` of
    compressed-tensors ``DiskCache``s on ``model``, and the folder of every file compressed-tensors' process-wide
    disk index lists, with the source checkpoint's file where that file is a symlink to it.

    Args:
        model: the module to scan.

    Returns:
        Paths as the stores name them (not resolved).
    """
    paths: set[str] = set()
    seen: set[int] = set()
    for module in model.modules():
        for hook in align_hooks(module):
            dataset = _unprefix(hook.weights_map, "")[0] if hook.weights_map is not None else None
            if dataset is not None and id(dataset) not in seen:
                seen.add(id(dataset))
                paths |= _loader_paths(dataset)
        for cache in (module._parameters, module._buffers):
            if is_offload_cache(cache) and getattr(cache, "offload_dir", None):
                paths.add(str(cache.offload_dir))
    disk = sys.modules.get("compressed_tensors.offload.cache.disk")
    for info in list(getattr(getattr(disk, "DiskCache", None), "index", {}).values()):
        file = info.get("safetensors_file") if isinstance(info, Mapping) else None
        if file:  # a file it wrote, or a symlink to the source checkpoint's file
            paths.add(os.path.dirname(str(file)))
            if os.path.islink(file):
                paths.add(os.path.realpath(file))
    return paths


# --- compressed-tensors' own offloading (compressed_tensors.offload) ------------------------------------
# `offload_module` replaces a module's `_parameters` / `_buffers` dicts by an `OffloadCache` (a
# MutableMapping, not a dict): `offloaded_values[name]` holds the offloaded tensor (a CPU tensor for
# CPUCache, a meta tensor keyed into the class-wide `DiskCache.index` of safetensors files for DiskCache)
# and every `cache[name]` (so every `module.weight`) onloads a fresh copy to `onload_device`. There is
# no hook object and nothing is ever meta from the module's point of view.


class CacheHook:
    """Stands in for an accelerate hook over one compressed-tensors ``OffloadCache``.

    ``materialized`` does not suspend it: it replaces the module's ``OffloadCache`` by a dict of onloaded
    copies for the block instead (an ``OffloadCache`` onloads a fresh copy on every access).
    """

    def __init__(self, cache: Mapping):
        self.cache = cache
        self.offload = True


def is_offload_cache(mapping: object) -> bool:
    """Whether ``mapping`` (a module's ``_parameters`` / ``_buffers``) is a compressed-tensors ``OffloadCache``."""
    return not isinstance(mapping, dict) and hasattr(mapping, "offloaded_values") and hasattr(mapping, "onload_device")


def cache_store(cache, name: str) -> Store:
    """CPU-offloaded values are read in place; disk/device ones through the cache itself (its own onload)."""
    value = cache.offloaded_values[name]
    if str(getattr(cache, "offload_device", "")) == "cpu" and value.device.type == "cpu":
        return Store("cpu", cache.offloaded_values, name)
    return Store("mapping", cache, name)


def _ct_offloaded_tensors(model: nn.Module) -> dict[tuple[int, str], StoreRef]:
    """``offloaded_tensors`` for modules offloaded by compressed-tensors (``OffloadCache`` tensor dicts)."""
    refs: dict[tuple[int, str], StoreRef] = {}
    for module_name, module in model.named_modules():
        for cache in (module._parameters, module._buffers):
            if not is_offload_cache(cache):
                continue
            hook, device = CacheHook(cache), torch.device(cache.onload_device)
            for name, value in cache.offloaded_values.items():
                if value is not None:
                    refs[(id(module), name)] = StoreRef(hook, module_name, device, cache_store(cache, name))
    return refs


@contextmanager
def no_onloading() -> Iterator[None]:
    """Inside, compressed-tensors ``OffloadCache`` mappings hand out their offloaded values (CPU tensors, meta
    tensors for disk) instead of onloading a copy of each; a no-op when compressed-tensors is not loaded."""
    base = sys.modules.get("compressed_tensors.offload.cache.base")
    if base is None:
        yield
        return
    with base.OffloadCache.disable_onloading():
        yield
