"""``materialized()``: offloaded weights made real for the duration of a block, then restored exactly.

All blocks share one registry under :data:`._hooks.state_lock`, so they nest, overlap out of order and run in
several threads:

- each onloaded tensor is an :class:`_Onloaded`, claimed once per block and slot; the last claim released
  puts it back on the meta device, whichever block (or thread) that is;
- each compressed-tensors ``OffloadCache`` is replaced for the block by a dict of onloaded copies
  (:class:`_CacheSwap`), counted the same way;
- each accelerate hook's ``offload`` flag is suspended and resumed with a count (``_hooks.suspend_offload``).

A ``writeback=True`` block that exits normally writes every tensor it covers whose value differs (bit for bit)
from the store when *it* exits, even while other blocks keep the tensor onloaded; every value is checked before
the first write, and a tied tensor's new value goes to every store of the tie.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn
from torch.utils import swap_tensors

from ._errors import add_note
from ._hooks import (Store, StoreRef, cache_store, is_offload_cache, offloaded_tensors, resolve_store, resume_offload,
                     state_lock, suspend_offload, suspensions)
from ._store import read_store, write_store
from .quantizers import find_quantizers
from .ties import TiedSide, TieFinder

__all__ = ["materialized", "no_other_blocks", "onloaded", "same_bits", "waits_for_blocks"]

_Key = tuple[int, str]  # (id(owner module), attribute name)
_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class _Slot:
    """One place a tensor lives: ``owner._parameters[attr]`` or ``owner._buffers[attr]``."""

    name: str
    owner: nn.Module
    attr: str
    ref: StoreRef | None
    is_param: bool

    def current(self) -> torch.Tensor | None:
        return (self.owner._parameters if self.is_param else self.owner._buffers).get(self.attr)

    def put(self, tensor: torch.Tensor) -> None:
        (self.owner._parameters if self.is_param else self.owner._buffers)[self.attr] = tensor


def _real_twin(meta: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` dressed like ``meta``: same class, ``requires_grad`` and Python attributes."""
    twin = type(meta)(value, requires_grad=meta.requires_grad) if isinstance(meta, nn.Parameter) else value
    if twin is not value or type(meta) is not torch.Tensor:
        twin.__dict__.update(meta.__dict__)
    return twin


def _holders(tensor: torch.Tensor) -> str:
    """What may still reference ``tensor``, in words, for errors and warnings."""
    refs = len(weakref.getweakrefs(tensor))
    return (f"{tensor._use_count() - 1} other reference(s) to its data (a view of it, or an autograd graph built "
            f"from it with grad enabled)" + (f" and {refs} weakref(s)" if refs else ""))


def _check_value(name: str, value: object, like: torch.Tensor) -> torch.Tensor:
    """The value to persist for ``name``: a tensor of ``like``'s shape and dtype.

    Raises:
        ValueError: ``value`` is missing, not a tensor, or of another shape or dtype.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"materialized(writeback=True): {name} was removed or replaced by {type(value).__name__};\n"
                         f"  the offload store keeps a {like.dtype} tensor of shape {tuple(like.shape)}: "
                         f"assign a tensor of that shape and dtype, or leave the block without writeback")
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ValueError(f"materialized(writeback=True): {name} was replaced by a tensor the offload store cannot take\n"
                         f"  expected: {like.dtype}, shape {tuple(like.shape)}\n"
                         f"  actual:   {value.dtype}, shape {tuple(value.shape)}\n"
                         f"  cast/reshape it (or copy_ into the existing tensor) before the block ends")
    return value


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (``torch.equal`` calls ``-0.0`` equal to ``0.0`` and a nan unequal to itself)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8),
                                                                      b.view(-1).view(torch.uint8))


def _differs(store, value: torch.Tensor) -> bool:
    """Whether ``store`` holds something other than ``value`` (read back and compared bit for bit)."""
    return not same_bits(read_store(store, value.dtype, tuple(value.shape)), value)


@dataclass(eq=False)
class _Change:
    """A value to persist into ``store`` (``write`` it; :func:`._store.write_store` when None)."""

    name: str
    value: torch.Tensor
    store: Store
    slot: _Slot | None = None
    write: Callable[[torch.Tensor], None] | None = None

    @property
    def key(self) -> tuple[int, str]:
        return id(self.store.dataset), self.store.key

    def apply(self) -> None:
        (self.write or functools.partial(write_store, self.store))(self.value)


@dataclass(eq=False)
class _Onloaded:
    """An accelerate-offloaded tensor made real.

    ``live`` sits in every slot and holds the data; ``meta`` goes back on restore. Normally ``live`` is the
    module's own object (its content swapped with a real twin, so references to it stay valid) and ``meta`` the
    twin; where that swap was impossible, ``live`` is the twin and ``meta`` the module's own object.
    """

    name: str
    live: torch.Tensor
    meta: torch.Tensor
    swapped: bool
    slots: dict[_Key, _Slot] = field(default_factory=dict)
    count: int = 0

    @classmethod
    def load(cls, slot: _Slot, tensor: torch.Tensor, device: torch.device) -> _Onloaded:
        """Read ``tensor``'s store entry onto ``device`` and put the data under ``tensor`` (or in its slot)."""
        value = read_store(slot.ref.store, tensor.dtype, tuple(tensor.shape))
        copy = slot.ref.store.kind in ("cpu", "mapping")  # never hand out the store's own memory
        return cls._swap_in(slot, tensor, value.to(device, copy=copy))

    @classmethod
    def _swap_in(cls, slot: _Slot, tensor: torch.Tensor, value: torch.Tensor) -> _Onloaded:
        twin, home = _real_twin(tensor, value), tensor.device
        try:
            swap_tensors(tensor, twin)  # `tensor` keeps its identity but now holds the data
            return cls(slot.name, tensor, twin, True)
        except RuntimeError:  # a weakref or a view holds the meta tensor: work on the slot instead
            slot.put(twin)
            return cls(slot.name, twin, tensor, False)
        except BaseException:  # e.g. Ctrl-C right after the swap, before the entry exists: undo it
            if tensor.device != home:
                swap_tensors(tensor, twin)
            raise

    def changes(self) -> list[_Change]:
        """Each slot's current value (also a replacement Parameter) that differs from that slot's store."""
        changes = []
        for slot in self.slots.values():
            if slot.ref is not None:
                value = _check_value(slot.name, slot.current(), self.meta)
                store = _current(slot.ref.store)
                if _differs(store, value):
                    changes.append(_Change(slot.name, value.detach(), store, slot))
        return changes

    def restore(self) -> None:
        """Back on meta; every slot holds the module's own object again (its meta placeholder as a last resort)."""
        if self.swapped:
            try:
                swap_tensors(self.live, self.meta)
            except RuntimeError:
                self._restore_by_slot()
                return
        own = self.live if self.swapped else self.meta
        for slot in self.slots.values():
            if slot.current() is not own:
                slot.put(own)

    def _restore_by_slot(self) -> None:
        for slot in self.slots.values():
            slot.put(self.meta)
        warnings.warn(
            f"materialized(): {self.name} is still referenced after the block ({_holders(self.live)}), so it could "
            f"not be put back on meta in place.\n  The module now holds its meta placeholder (a new "
            f"{type(self.meta).__name__} object); the old object keeps its {self.live.device} memory until those "
            f"references go. Read it under torch.no_grad() and drop views before the block ends.",
            ResourceWarning, stacklevel=_caller_level())


class _Moved(_Onloaded):
    """A resident quantizer tensor moved to the block's ``device`` (a fold or forward there needs its state there):
    ``meta`` holds it on its own device meanwhile and takes the block's final value back on restore."""

    @classmethod
    def load(cls, slot: _Slot, tensor: torch.Tensor, device: torch.device) -> _Moved:
        return cls._swap_in(slot, tensor, tensor.detach().to(device, copy=True))

    def restore(self) -> None:
        with torch.no_grad():
            self.meta.copy_(self.live)  # what the block computed (e.g. a calibration) stays
        super().restore()


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel of the first frame outside this module and ``contextlib``."""
    ours = {__file__, contextlib.__file__}
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename in ours:
        frame, level = frame.f_back, level + 1
    return level


@dataclass(eq=False)
class _CacheSwap:
    """A compressed-tensors ``OffloadCache`` (``owner._parameters`` or ``_buffers``) replaced by onloaded copies."""

    name: str  # "<prefix>parameters" / "<prefix>buffers", for messages
    prefix: str
    owner: nn.Module
    dict_name: str  # "_parameters" | "_buffers"
    cache: Mapping
    plain: dict
    skipped: frozenset[str]
    count: int = 0

    @classmethod
    def load(cls, name: str, owner: nn.Module, dict_name: str, device: torch.device | None,
             skip: frozenset[_Key]) -> _CacheSwap:
        """Onload every value of ``getattr(owner, dict_name)`` (skipped ones as meta) and swap the dict in."""
        cache = getattr(owner, dict_name)
        device = device or torch.device(cache.onload_device)
        skipped = frozenset(k for k in cache.offloaded_values if (id(owner), k) in skip)
        plain = {k: _onload_cached(cache, k, device, k in skipped) for k in cache.offloaded_values}
        setattr(owner, dict_name, plain)
        return cls(f"{name}{dict_name.lstrip('_')}", name, owner, dict_name, cache, plain, skipped)

    def changes(self) -> list[_Change]:
        """Changed values, written through compressed-tensors' own ``cache[key] = value`` (``update_offload``)."""
        stored, changes = self.cache.offloaded_values, []
        for key in sorted(set(stored) | set(self.plain)):
            if key not in stored:
                raise ValueError(f"materialized(writeback=True): {self.prefix}{key} was added inside the block;\n"
                                 f"  register it outside materialized() (compressed-tensors offloads it then)")
            if key in self.skipped or stored[key] is None:
                continue
            value = _check_value(f"{self.prefix}{key}", self.plain.get(key), stored[key])
            if _differs(cache_store(self.cache, key), value):
                changes.append(_Change(f"{self.prefix}{key}", value.detach(), cache_store(self.cache, key),
                                       None, functools.partial(self.cache.__setitem__, key)))
        return changes

    def restore(self) -> None:
        setattr(self.owner, self.dict_name, self.cache)


def _onload_cached(cache, key: str, device: torch.device, skipped: bool) -> torch.Tensor | None:
    offloaded = cache.offloaded_values[key]
    if offloaded is None:
        return None
    if skipped:
        return _real_twin(offloaded, torch.empty_like(offloaded, device="meta"))
    value = read_store(cache_store(cache, key), offloaded.dtype, tuple(offloaded.shape))
    return _real_twin(offloaded, value.to(device, copy=True))


def _current(store: Store) -> Store:
    """Where ``store``'s entry is now: a writeback repoints a loader's entry from the source safetensors file to
    a ``.dat`` in its offload folder (an earlier, e.g. nested, block may have done so since this one began)."""
    if store.kind in ("safetensors", "disk"):
        return resolve_store(store.dataset, store.key)
    return store


class _Ties:
    """The stores a block's changed tensor must also go to (:class:`.ties.TieFinder`), as changes."""

    def __init__(self, module: nn.Module):
        self.finder = TieFinder(module)

    def partners(self, change: _Change) -> list[_Change]:
        if change.slot is None:  # compressed-tensors caches: no ties
            return []
        found = []
        for side in self.finder.sides(change.slot.name, change.store, change.value.shape, change.slot.current()):
            if side.store is not None:
                found.append(_Change(side.name, change.value, side.store, None, _alias_writer(change.store, side)))
            else:  # a resident side of the tie takes the value too (resident tensors are their own store)
                found.append(_Change(side.name, change.value, Store("resident", {}, side.name), None,
                                     functools.partial(_copy_into, side.tensor)))
        return found


def _copy_into(tensor: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(value)


def _alias_writer(source: Store, side: TiedSide) -> Callable[[torch.Tensor], None] | None:
    """For an alias in the same CPU dict: share the tensor :func:`write_store` just put under ``source``."""
    alias = side.store
    if not side.alias or alias.kind != "cpu" or source.kind != "cpu" or alias.dataset is not source.dataset:
        return None
    return lambda value: alias.dataset.__setitem__(alias.key, source.dataset[source.key])


# The registry: what is onloaded now, by slot and by tensor object (tied: one tensor in several slots).
_by_slot: dict[_Key, _Onloaded] = {}
_by_tensor: dict[int, _Onloaded] = {}
_swaps: dict[_Key, _CacheSwap] = {}


@dataclass(eq=False)
class _Block:
    """What one ``with`` block claimed: entries (once per claim) and the hooks it suspended."""

    label: str
    module: nn.Module
    quantizer_modules: frozenset[int] = frozenset()  # ids of quantizer modules (and their children) inside
    claims: list = field(default_factory=list)
    hooks: list = field(default_factory=list)


def _claim_caches(block: _Block, prefix: str, owner: nn.Module, device, skip: frozenset[_Key]) -> None:
    for name in ("_parameters", "_buffers"):
        key = (id(owner), name)
        swap = _swaps.get(key)
        if swap is None:
            if not is_offload_cache(owner.__dict__.get(name)):
                continue
            swap = _swaps[key] = _CacheSwap.load(prefix, owner, name, device, skip)
        swap.count += 1
        block.claims.append(swap)


def _claim_tensor(block: _Block, slot: _Slot, tensor: torch.Tensor, device) -> None:
    key = (id(slot.owner), slot.attr)
    entry = _by_slot.get(key) or _by_tensor.get(id(tensor))
    if entry is None:
        if slot.ref is None:
            if tensor.device.type == "meta":
                raise RuntimeError(
                    f"{slot.name} is on the meta device and no offloading hook inside this module supplies it;\n"
                    f"  if an enclosing module's hook owns it (place_submodules), materialize that module")
            if device is None or tensor.device == device or id(slot.owner) not in block.quantizer_modules:
                return
            entry = _Moved.load(slot, tensor, device)
        else:
            entry = _Onloaded.load(slot, tensor, device or slot.ref.execution_device)
        _by_tensor[id(entry.live)] = _by_tensor[id(entry.meta)] = entry
    if key not in entry.slots:
        entry.slots[key] = slot
        _by_slot[key] = entry
        if slot.current() is entry.meta:  # a tied slot of a tensor that could not be swapped in place
            slot.put(entry.live)
    entry.count += 1
    block.claims.append(entry)
    hook = slot.ref.hook if slot.ref is not None else None
    if hook is not None and all(h is not hook for h in block.hooks):
        before = suspensions(hook)
        try:
            suspend_offload(hook)  # accelerate's post_forward would set the weights back to meta
        finally:
            if suspensions(hook) > before:  # also when interrupted right after suspending
                block.hooks.append(hook)


def _enter(block: _Block, device, refs: dict[_Key, StoreRef], skip: frozenset[_Key]) -> None:
    """Claim every offloaded tensor of ``block.module`` (onloading those nobody holds yet); on an error the
    caller releases what ``block`` claimed so far."""
    named = list(block.module.named_modules(remove_duplicate=False))
    if device is not None:
        block.quantizer_modules = frozenset(id(m) for q in find_quantizers(block.module)
                                            if isinstance(q.handle, nn.Module) for m in q.handle.modules())
    for prefix, owner in named:  # compressed-tensors caches first: their dicts are then plain
        _claim_caches(block, f"{prefix}." if prefix else "", owner, device, skip)
    for prefix, owner in named:
        for name in ("_parameters", "_buffers"):
            if (id(owner), name) not in _swaps:
                _claim_dict(block, prefix, owner, name, device, refs, skip)


def _claim_dict(block, prefix: str, owner: nn.Module, name: str, device, refs, skip) -> None:
    for attr, tensor in list(getattr(owner, name).items()):
        if tensor is not None and (id(owner), attr) not in skip:
            slot = _Slot(f"{prefix}.{attr}" if prefix else attr, owner, attr, refs.get((id(owner), attr)),
                         name == "_parameters")
            _claim_tensor(block, slot, tensor, device)


def _release(block: _Block, error: BaseException | None) -> None:
    """Drop the block's claims; the last claim of an entry restores it. Hooks resume afterwards.

    Every claim is released and every hook resumed even if one step fails (or a ``KeyboardInterrupt`` arrives
    in one). With ``error`` given (the block is already failing), those failures become notes on it.

    Raises:
        RuntimeError: (without ``error``) a tensor could not be restored.
        KeyboardInterrupt: arrived while restoring (after everything was restored).
    """
    failures: list[tuple[str, BaseException]] = []
    claims, hooks = block.claims[::-1], block.hooks[:]
    block.claims.clear()
    block.hooks.clear()
    for claim in claims:
        try:
            claim.count -= 1
            if claim.count == 0:
                _forget(claim)
                claim.restore()
        except BaseException as e:  # noqa: B036 - restore the others first
            failures.append((claim.name + (f" (held by {_holders(claim.live)})" if isinstance(claim, _Onloaded)
                                           else ""), e))
    for hook in hooks:
        try:
            resume_offload(hook)
        except BaseException as e:  # noqa: B036 - resume the others first
            failures.append((f"resuming the offloading of a {type(hook).__name__}", e))
    _report_release(block, failures, error)


def _forget(claim) -> None:
    if isinstance(claim, _CacheSwap):
        del _swaps[(id(claim.owner), claim.dict_name)]
        return
    _by_tensor.pop(id(claim.live), None)
    _by_tensor.pop(id(claim.meta), None)
    for key in claim.slots:
        _by_slot.pop(key, None)


def _report_release(block: _Block, failures: list, error: BaseException | None) -> None:
    if not failures:
        return
    text = "; ".join(f"{name}: {type(e).__name__}: {e}" for name, e in failures)
    if error is not None:
        add_note(error, f"restoring {block.label} after this error also failed for {text}")
        return
    interrupt = next((e for _, e in failures if not isinstance(e, Exception)), None)
    if interrupt is not None:
        raise interrupt
    raise RuntimeError(f"materialized({block.label}): {len(failures)} tensor(s) could not be put back on their "
                       f"offload device: {text}") from failures[0][1]


def _planned_changes(block: _Block) -> list[_Change]:
    """Every changed tensor the block covers, plus the other stores of the ties it belongs to.

    Raises:
        ValueError: two sides of one tie were changed to different values.
        Exception: a claim's value could not be checked or read (a note names it; nothing was written).
    """
    planned: dict[tuple[int, str], _Change] = {}
    ties = _Ties(block.module)
    for claim in dict.fromkeys(block.claims):  # once each, in claim order
        try:
            changes = claim.changes()
        except Exception as e:
            add_note(e, f"while writing back {claim.name} on exit from materialized({block.label}, writeback=True); "
                        f"every tensor was restored to its offload device and nothing was written back")
            raise
        for change in changes:
            for partner in [change, *ties.partners(change)]:
                other = planned.setdefault(partner.key, partner)
                if other is not partner and not same_bits(other.value, partner.value):
                    raise ValueError(
                        f"materialized(writeback=True): {other.name} and {change.name} are one tied tensor "
                        f"(store entry {partner.store.key!r}) but were changed to different values;\n  nothing was "
                        f"written back: give both the same value, or untie them outside materialized()")
    return list(planned.values())


def _write_back(block: _Block) -> None:
    """Persist every changed tensor the block covers (and its ties); all are tried, the first failure is raised."""
    done, failed, first = [], [], None
    for change in _planned_changes(block):
        try:
            change.apply()
            done.append(change.name)
        except Exception as e:
            failed.append(change.name)
            first = first or e
    if first is not None:
        add_note(first, f"while writing back {failed[0]} on exit from materialized({block.label}, writeback=True); "
                        f"every tensor was restored to its offload device.\n  written back: {done or 'none'}\n"
                        f"  not written back: {failed}")
        raise first


def _leave(block: _Block, writeback: bool) -> None:
    try:
        if writeback:
            _write_back(block)
    except BaseException as error:
        _release(block, error)
        raise
    _release(block, None)


@contextlib.contextmanager
def materialized(module: nn.Module, device: torch.device | str | None = None, *,
                 writeback: bool = False) -> Iterator[nn.Module]:
    """Make every offloaded parameter and buffer of ``module`` real for the duration of the block.

    Inside, each offloaded tensor holds its stored value on its hook's execution device (or ``device``; a
    tensor another open block already holds stays where that block put it), and accelerate's hooks do not
    offload them again after a forward. Modules offloaded by compressed-tensors' own ``OffloadCache`` get a
    dict of onloaded copies for the block. Blocks nest, overlap in any order and may run in several
    threads: each tensor is restored when the last block holding it exits. A block entered while another
    thread exports or verifies the same model (``save_clean``, ``verify``) waits for that to finish, and they
    wait for the blocks other threads have open over the model. On exit (also on an exception
    or ``KeyboardInterrupt``) every tensor is the same object as before, back on the meta device, and the
    hooks are as they were; a tensor still referenced from outside (a view, an autograd graph) cannot be
    swapped back in place, so its slot gets a meta placeholder instead (with a ``ResourceWarning``).

    Args:
        module: a model or any submodule carrying (or below) accelerate ``AlignDevicesHook``s or
            compressed-tensors ``OffloadCache``s.
        device: where to put the onloaded tensors instead of each hook's execution device; quantizer state
            resident on another device (e.g. ModelOpt's ``_amax`` left on the CPU by calibrating an offloaded
            model) is moved there too for the block, and put back on its own device, with the block's final
            values, afterwards.
        writeback: on a normal exit of *this* block, persist every tensor it covers whose value differs from
            the store (in-place edits and replaced Parameters alike) into the offload store (the CPU dict, a
            ``.dat`` in the offload folder, compressed-tensors' cache; never the user's own safetensors file),
            also while an enclosing or overlapping block keeps the tensor onloaded. A tied tensor (accelerate
            keeps a store entry per side; transformers' ``_tied_weights_keys``) is written to every side's
            store, so ``materialized(model.model.embed_tokens, writeback=True)`` also updates ``lm_head``.

    Yields:
        ``module`` itself.

    Raises:
        ValueError: with ``writeback``, a tensor was replaced by one of another shape or dtype (or removed), or
            two sides of a tie were changed to different values; nothing was written back.
        RuntimeError: a meta tensor has no hook in ``module`` that can supply it.
        Exception: anything raised inside the block or by a store write passes through with its own type and
            a note saying what was restored and written.

    Example:
        >>> with offload_export.materialized(model.model.layers[3]) as layer:  # doctest: +SKIP
        ...     print(layer.mlp.up_proj.weight.abs().max())
    """
    entry = (threading.get_ident(), module)
    try:
        with _blocks_changed:
            _blocks_changed.wait_for(lambda: not _conflict(_exports, module))
            _user_blocks.append(entry)
        with onloaded(module, device, None, writeback=writeback):
            try:
                yield module
            except Exception as e:
                add_note(e, f"raised inside offload_export.materialized({type(module).__name__}): its offloaded "
                            f"tensors were restored{', nothing was written back' if writeback else ''}")
                raise
    finally:
        _unregister(_user_blocks, entry)


# Open materialized() blocks and running exports, as (thread ident, module): an export waits until no other
# thread has a block open over its model, and blocks of other threads wait for the export to finish.
_user_blocks: list[tuple[int, nn.Module]] = []
_exports: list[tuple[int, nn.Module]] = []
_blocks_changed = threading.Condition(state_lock)


def _overlap(a: nn.Module, b: nn.Module) -> bool:
    return a is b or any(m is a for m in b.modules()) or any(m is b for m in a.modules())


def _conflict(entries: list[tuple[int, nn.Module]], module: nn.Module) -> bool:
    me = threading.get_ident()
    return any(thread != me and _overlap(other, module) for thread, other in entries)


@contextlib.contextmanager
def no_other_blocks(model: nn.Module) -> Iterator[None]:
    """Wait until no other thread is inside :func:`materialized` over (a part of) ``model``, and keep other
    threads' new blocks waiting until this block exits. For readers of the whole model (the export, ``verify``):
    a block that exits in another thread mid-read would put tensors back on meta under them. Blocks of the
    calling thread are not waited for (an export inside ``with materialized(model):`` reads its values).
    """
    entry = (threading.get_ident(), model)
    try:
        with _blocks_changed:
            _blocks_changed.wait_for(lambda: not _conflict(_user_blocks, model))
            _exports.append(entry)
        yield
    finally:
        _unregister(_exports, entry)


def _unregister(entries: list[tuple[int, nn.Module]], entry: tuple[int, nn.Module]) -> None:
    """Remove ``entry`` itself (not an equal one of a nested block), if it was registered, and wake the waiters."""
    with _blocks_changed:
        for i, e in enumerate(entries):
            if e is entry:
                del entries[i]
                break
        _blocks_changed.notify_all()


def waits_for_blocks(reader: Callable[..., _T]) -> Callable[..., _T]:
    """Decorate ``reader(model, ...)`` to run inside :func:`no_other_blocks` of its ``model``."""

    @functools.wraps(reader)
    def wrapper(model: nn.Module, *args, **kwargs) -> _T:
        with no_other_blocks(model):
            return reader(model, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device | str | None, refs: dict[_Key, StoreRef] | None, *,
             writeback: bool = False, skip: frozenset[_Key] = frozenset()) -> Iterator[None]:
    """:func:`materialized` with the offload map given, e.g. the whole model's (hooks above ``module``).

    Args:
        refs: ``offloaded_tensors(model)`` of a model containing ``module``; ``None``: ``module``'s own.
        skip: ``(id(owner), attr)`` slots to leave offloaded (the caller already holds their data).
    """
    device = torch.device(device) if device is not None else None
    block = _Block(type(module).__name__, module)
    try:
        with state_lock:
            refs = offloaded_tensors(module, include_suspended=True) if refs is None else refs
            _enter(block, device, refs, skip)
        yield
    except BaseException as error:
        with state_lock:
            _release(block, error)
        raise
    with state_lock:
        _leave(block, writeback)
