"""Where every state-dict entry of a model really lives, read from accelerate's hooks without loading data."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._hooks import StoreRef, no_onloading, offloaded_tensors, store_paths

__all__ = ["Layout", "TensorInfo", "layout"]

KINDS = ("resident", "cpu", "disk", "safetensors", "mapping", "tied", "missing")


@dataclass(frozen=True)
class TensorInfo:
    """One state-dict entry and where its data is.

    Attributes:
        key: the state-dict key.
        module: qualified name of the module that owns the tensor.
        attr: the tensor's attribute name on that module.
        kind: ``"resident"`` (a real tensor on ``device``), ``"cpu"`` / ``"disk"`` / ``"safetensors"`` /
            ``"mapping"`` (offloaded: see :class:`offload_export._hooks.Store`), ``"tied"`` (an alias of
            ``tied_to``) or ``"missing"`` (a meta tensor that no hook can supply).
        device: the resident tensor's device, or the hook's execution device for offloaded ones.
        shape, dtype, nbytes: as the module sees the tensor.
        tied_to: for ``"tied"`` entries, the key that is written in their place.
    """

    key: str
    module: str
    attr: str
    kind: str
    device: torch.device
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tied_to: str | None = None
    ref: StoreRef | None = field(default=None, repr=False, compare=False)
    tensor: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def offloaded(self) -> bool:
        return self.kind in ("cpu", "disk", "safetensors", "mapping")


class Layout(Mapping):
    """An ordered mapping ``state-dict key -> TensorInfo`` with a readable table as its repr."""

    def __init__(self, entries: dict[str, TensorInfo], stores: set[str] | frozenset[str] = frozenset(),
                 opaque: dict[str, str] | None = None, refs: dict[tuple[int, str], StoreRef] | None = None):
        self._entries = entries
        self._stores = frozenset(stores)
        #: state-dict entries that are not tensors (a module's ``get_extra_state`` object): key -> type name.
        #: They are not among the entries; safetensors cannot hold them.
        self.opaque = dict(opaque or {})
        #: every offloaded tensor slot ``(id(owner), attr)`` -> its hook and store (``offloaded_tensors``), the
        #: entries' and those outside the state dict (non-persistent buffers) alike: what onloading a module needs.
        self.refs = refs or {}

    def __getitem__(self, key: str) -> TensorInfo:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def summary(self) -> dict[str, tuple[int, int]]:
        """``kind -> (tensor count, bytes)`` over all entries, in :data:`KINDS` order."""
        out: dict[str, tuple[int, int]] = {}
        for kind in KINDS:
            infos = [i for i in self._entries.values() if i.kind == kind]
            if infos:
                out[kind] = (len(infos), sum(i.nbytes for i in infos))
        return out

    def source_paths(self) -> list[str]:
        """The files and folders the model's offload stores keep weights in (and are written back to), sorted.

        Returns:
            Offload folders (``.dat`` files, ``offload_folder``, compressed-tensors' ``DiskCache`` folders) and
            safetensors files (usually the user's own checkpoint); empty when nothing is offloaded to disk.
            Also inside ``materialized``, where the tensors are real for a while; for compressed-tensors'
            ``DiskCache`` (which ``materialized`` swaps out of the module), those of every disk-offloaded model
            in this process. An export must not replace any of them: pass them to
            ``check_destination(..., protected=...)``.
        """
        return sorted(self._stores)

    def __repr__(self) -> str:
        rows = [("key", "kind", "device", "dtype", "shape", "MiB", "source")]
        for info in self._entries.values():
            rows.append((info.key, info.kind, str(info.device), str(info.dtype).removeprefix("torch."),
                         "x".join(map(str, info.shape)) or "()", f"{info.nbytes / 2**20:.2f}", _source(info)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        totals = ", ".join(f"{kind}: {n} tensors {b / 2**20:.1f} MiB" for kind, (n, b) in self.summary().items())
        return "\n".join(lines + [f"-- {len(self)} entries; {totals}"])


def _source(info: TensorInfo) -> str:
    if info.kind == "tied":
        return f"= {info.tied_to}"
    if info.ref is None:
        return ""
    store = info.ref.store
    where = store.path if store.path is not None else f"{type(store.dataset).__name__}[{store.key!r}]"
    return f"{where} (hook on {info.ref.hook_module or '<root>'})"


def _named_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every ``qualified name -> (owner module, attribute)`` for parameters and buffers, duplicates kept."""
    slots = {}
    for owner_name, owner in model.named_modules(remove_duplicate=False):
        prefix = f"{owner_name}." if owner_name else ""
        for attr in list(owner._parameters) + list(owner._buffers):
            slots[prefix + attr] = (owner, attr)
    return slots


def declared_ties(model: nn.Module) -> dict[str, str]:
    """transformers' ``{tied key: source key}``, empty for other models."""
    ties = getattr(model, "all_tied_weights_keys", None)
    if ties is None:
        ties = getattr(model, "_tied_weights_keys", None)
    return dict(ties) if isinstance(ties, Mapping) else {}


def _tie_groups(keys: list[str], infos: dict[str, TensorInfo], model: nn.Module) -> list[list[str]]:
    """Group keys that hold one tensor: the same object, the same store entry, or a declared tie.

    accelerate replaces parameter objects on every offloaded forward, so identity alone misses ties of
    offloaded weights; declared ties are trusted only when one side is offloaded (resident tensors that
    are distinct objects were untied by the user).
    """
    parent = {k: k for k in keys}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a, b):
        parent[find(a)] = find(b)

    by_identity: dict[object, str] = {}
    for key in keys:
        info = infos[key]
        ident = (id(info.ref.store.dataset), info.ref.store.key) if info.ref else id(info.tensor)
        if ident in by_identity:
            union(key, by_identity[ident])
        by_identity.setdefault(ident, key)
    for tied, source in declared_ties(model).items():
        if tied in infos and source in infos and (infos[tied].offloaded or infos[source].offloaded) \
                and infos[tied].shape == infos[source].shape:
            union(tied, source)
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(find(key), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def _primary(group: list[str], model: nn.Module) -> str:
    """The key transformers keeps for a tie group: the first (sorted) that is not a declared tie target."""
    tied_targets = set(declared_ties(model))
    for key in sorted(group):
        if key not in tied_targets:
            return key
    return sorted(group)[0]


def _info(key: str, module: str, attr: str, tensor: torch.Tensor, ref: StoreRef | None) -> TensorInfo:
    if ref is not None:
        kind, device = ref.store.kind, ref.execution_device
    else:
        kind, device = ("missing" if tensor.device.type == "meta" else "resident"), tensor.device
    return TensorInfo(key, module, attr, kind, device, tuple(tensor.shape), tensor.dtype,
                      tensor.numel() * tensor.element_size(), ref=ref, tensor=tensor)


def layout(model: nn.Module) -> Layout:
    """Describe where each state-dict entry of ``model`` lives, without loading any data.

    Args:
        model: any ``nn.Module``, with or without accelerate hooks (``AlignDevicesHook``, also inside
            ``SequentialHook``; ``place_submodules``; ``offload_buffers``).

    Returns:
        A :class:`Layout` in state-dict order; print it for a table. State-dict entries that are not tensors
        (``get_extra_state`` objects) are listed in ``Layout.opaque`` instead.

    Example:
        >>> print(offload_export.layout(model))  # doctest: +SKIP
    """
    refs = offloaded_tensors(model)
    slots = _named_slots(model)
    infos: dict[str, TensorInfo] = {}
    opaque: dict[str, str] = {}
    with no_onloading():  # a compressed-tensors OffloadCache would onload every tensor for state_dict()
        state = model.state_dict(keep_vars=True)
    for key, value in state.items():
        owner, attr = slots.get(key, (None, None))
        module_name = key.rpartition(".")[0]
        if not isinstance(value, torch.Tensor):  # a module's get_extra_state() object
            opaque[key] = type(value).__name__
            continue
        if owner is None:
            infos[key] = _info(key, module_name, key.rpartition(".")[2], value, None)
            continue
        infos[key] = _info(key, module_name, attr, value, refs.get((id(owner), attr)))
    for group in _tie_groups(list(infos), infos, model):
        primary = _primary(group, model)
        for key in group:
            if key != primary:
                infos[key] = TensorInfo(key, infos[key].module, infos[key].attr, "tied", infos[key].device,
                                        infos[key].shape, infos[key].dtype, infos[key].nbytes,
                                        tied_to=primary, ref=infos[key].ref, tensor=infos[key].tensor)
    return Layout(infos, store_paths(model), opaque, refs)
