"""Built-in reference fake quantizers (int8, fp8, int4-g128, nvfp4) and ``quantize_weights()``.

For users without a PTQ toolkit, the demo and the tests. Each scheme reproduces NVIDIA ModelOpt's CPU
numerics bit for bit (same float32 operations in the same order, same rounding), so a checkpoint folded
here equals one folded by ModelOpt with the matching config:

========== ================================== ==============================================
scheme     ModelOpt config                    ModelOpt code reproduced
========== ================================== ==============================================
int8       ``INT8_WEIGHT_ONLY_CFG``           ``tensor_quant._tensor_quant`` (CPU path)
fp8        ``FP8_PER_CHANNEL_PER_TOKEN_CFG``  ``tensor_quant._fp8_eager`` (CPU path)
int4-g128  ``INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` ``tensor_quant._tensor_quant`` on 128-blocks
nvfp4      ``NVFP4_DEFAULT_CFG`` weights      ``NVFP4QTensor.quantize`` + ``dequantize``
========== ================================== ==============================================

Fake quantization is row-chunkable: the rows ``[a:b]`` of a weight are quantized from those rows and
the quantizer's buffers alone (``quantizer(w[a:b], rows=slice(a, b))`` equals ``quantizer(w)[a:b]``),
so a large weight can be folded in chunks.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import threading
from collections.abc import Callable, Iterable
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from .._hooks import add_store_entry, align_hooks, offloaded_tensors, offloads
from .._buffers import anon_empty
from ..layout import layout
from ..materialize import onloaded
from ..quantizers import register_quantizer

__all__ = ["SCHEMES", "FakeQuantizer", "quantize_weights"]

SCHEMES: tuple[str, ...] = ("int8", "fp8", "int4-g128", "nvfp4")

E4M3_MAX = 448.0
E2M1_MAX = 6.0
_INT_MAX = {"int8": 127.0, "int4-g128": 7.0}
_GROUP = {"int8": None, "fp8": None, "int4-g128": 128, "nvfp4": 16}
_CHUNK_ELEMENTS = 1 << 19  # rows per CPU fold step: about this many elements (1 << 20: ~10 % slower, busy box)
_DEVICE_CHUNK_ELEMENTS = 1 << 20  # on an accelerator: fewer, larger kernel launches
_EPS = 1.0 / (1 << 24)  # ModelOpt: an amax at or below this quantizes its group to 0 (int) / uses 1 (fp8)


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown fake-quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """``(rows, cols)`` -> ``(rows, ceil(cols / group), group)``, the trailing partial group zero-padded."""
    pad = -w.shape[1] % group
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(w.shape[0], -1, group)


def _int_scales(amax: torch.Tensor, max_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt ``_tensor_quant``'s factors for ``amax``: ``(scale, divisor)``, 0 and 1 where ``amax <= 2**-24``."""
    bound = torch.tensor(max_bound, device=amax.device)
    scale = bound / amax
    zero = amax <= _EPS
    scale = torch.where(zero, 0.0, scale)  # a group with amax 0 quantizes to 0 ...
    return scale, torch.where(zero, 1.0, scale)


def _int_fake_quant(x: torch.Tensor, scale: torch.Tensor, divisor: torch.Tensor, max_bound: float) -> torch.Tensor:
    """ModelOpt ``_tensor_quant`` with ``narrow_range=False``: integers in ``[-max_bound - 1, max_bound]``.

    Works in place on ``x`` (a float32 scratch copy): the same operations, in the same order.
    """
    return x.mul_(scale).round_().clamp_(-max_bound - 1.0, max_bound).div_(divisor)


def _fp8_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt ``_fp8_eager``'s factors for ``amax``: ``scale = 448 / amax`` (amax 1 where ``<= 2**-24``) and,
    for :func:`_fp8_fake_quant`, an eighth of its ``scale_inv = 1 / scale`` (exact: a power of two)."""
    safe_amax = torch.where(amax <= _EPS, torch.ones_like(amax), amax)
    scale = E4M3_MAX / safe_amax
    return scale, (1 / scale) * 0.125


@functools.cache
def _neg_zero(device: torch.device) -> torch.Tensor:
    """A -0.0 scalar tensor on ``device`` (made once per device)."""
    return torch.tensor(-0.0, device=device)


@functools.cache
def _exponent_mask(device: torch.device) -> torch.Tensor:
    """float32's exponent bits as an int32 scalar tensor on ``device`` (made once per device): on the CPU
    ``bits & 0x7F800000`` with a Python int ran 1.6 x slower than with this (72 vs 46 us per 512 K elements)."""
    return torch.tensor(0x7F800000, dtype=torch.int32, device=device)


def _fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor, scale_inv_8: torch.Tensor,
                    work: torch.Tensor | None = None) -> torch.Tensor:
    """ModelOpt ``_fp8_eager``: ``e4m3(clamp(x * scale, -448, 448)) * scale_inv`` in place on float32 ``x``.

    The E4M3 rounding of ``y = clamp(x * scale)``: with ``2**E`` the power of two at or below ``|y|``, E4M3
    holds the multiples of ``2**(max(E, -6) - 3)`` around ``y`` (8 per binade; below its smallest normal 2**-6
    the multiples of 2**-9) and the parity of the multiple is the parity of the code, so with
    ``e = 2**max(E, -6)`` (``y``'s exponent bits) ``round(8 * y / e) * e / 8`` is the cast to float8_e4m3fn
    and back, bit for bit: ``torch.round`` rounds half to even and keeps the sign of a zero (``-0.001 ->
    -0.0``, as the cast), and every other step scales by a power of two (exact). The ``/ 8`` goes into
    ``scale_inv_8 = scale_inv / 8``: ``(q * e) * scale_inv_8`` and ``(q * e / 8) * scale_inv`` round the same
    exact product once. ``work``: an int32 tensor shaped like ``x`` (allocated when None).
    """
    y = x.mul_(scale).clamp_(-E4M3_MAX, E4M3_MAX)
    bits = y.view(torch.int32)
    e = work if work is not None else torch.empty_like(bits)
    e = torch.bitwise_and(bits, _exponent_mask(y.device), out=e)  # 2**E
    e = e.clamp_min_((127 - 6) << 23).view(torch.float32)  # 2**max(E, -6): zeros and subnormals too
    # -0.0 + 8 * y / e in one pass (every step exact in any order; adding -0.0 keeps every value, -0.0 too)
    torch.addcdiv(_neg_zero(y.device), y, e, value=8.0, out=y)
    return y.round_().mul_(e).mul_(scale_inv_8)


def _e2m1_round(x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to even, saturating at +-6 (ModelOpt ``_cast_fp4``), in place.

    After the clamp to +-6, E2M1 holds the multiples of ``2**(E - 1)`` in ``x``'s binade ``[2**E, 2**(E + 1))``
    (E is 0, 1 or 2; below 1 the multiples of 0.5) and the parity of the multiple is the parity of the code.
    With ``e = 2**max(E, 0)`` (``x``'s exponent bits) and ``C = 1.5 * 2**22 * e``, ``x + C`` stays in ``C``'s
    binade, where float32's spacing is ``e / 2``: the addition rounds ``x`` to a multiple of ``e / 2`` by the
    FPU's round-half-even (``C`` is an even multiple of it) and subtracting ``C`` is exact; ``C`` itself is
    exact, so ``add_(e, alpha=1.5 * 2**22)`` is that addition in one pass. A negative ``x`` that rounds to 0
    becomes +0, as in ModelOpt's table. ``work``: an int32 tensor shaped like ``x`` (allocated when None).
    """
    bits = x.clamp_(min=-E2M1_MAX, max=E2M1_MAX).view(torch.int32)
    e = work if work is not None else torch.empty_like(bits)
    e = torch.bitwise_and(bits, _exponent_mask(x.device), out=e)
    e = e.clamp_min_(127 << 23).view(torch.float32)  # 2**max(E, 0)
    return x.add_(e, alpha=1.5 * 2**22).sub_(e, alpha=1.5 * 2**22)


_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # torch's own cast, per code


def _nvfp4_scales(block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``block_scale.float() * global_scale`` for float8_e4m3fn ``block_scale``: each code's float32 value times
    ``global_scale`` (the same products) looked up in a 256-entry table; torch's CPU fp8 casts are scalar code,
    ~3 x slower than the lookup."""
    table = _E4M3_VALUES.to(global_scale.device) * global_scale
    return torch.index_select(table, 0, block_scale.view(torch.uint8).reshape(-1).long()).view(block_scale.shape)


def _nvfp4_fake_quant(x: torch.Tensor, scale: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """``E2M1(x / scale) * scale`` for ``x`` of shape ``(rows, blocks, 16)`` and ``scale`` ``(rows, blocks, 1)``.

    In place on ``x`` when every scale is positive (the division broadcasts over each block of 16: measured
    faster than dividing by a full-size copy of the scales); an all-zero weight (global_scale 0) gives 0.
    """
    if bool(scale.min() > 0):  # False for a nan too (faster than (scale > 0).all())
        return _e2m1_round(x.div_(scale), work).mul_(scale)
    scaled = torch.where(scale > 0, x / scale, 0.0)
    return _e2m1_round(scaled) * scale


_SCRATCH = threading.local()


def _scratch(size: int, count: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``count`` buffers of ``size`` 4-byte elements (a float32 one, then int32 ones) for one fold step.

    On the CPU they are kept per thread and reused by every fold: freshly allocated they cost more page
    faults than the fold itself (glibc returns large freed blocks to the OS). At most one chunk's worth.
    """
    kinds = (torch.float32,) + (torch.int32,) * (count - 1)
    if device.type != "cpu":
        return tuple(torch.empty(size, dtype=k, device=device) for k in kinds)
    cached = getattr(_SCRATCH, "buffers", ())
    if len(cached) < count or cached[0].numel() < size:
        n = max(size, cached[0].numel() if cached else 0)
        cached = _SCRATCH.buffers = tuple(torch.empty(n, dtype=torch.int32) for _ in range(max(count, len(cached))))
    return tuple(b[:size].view(k) for b, k in zip(cached, kinds))


class FakeQuantizer(nn.Module):
    """Fake-quantizes one 2-D weight ``(out_features, in_features)``; its scales are buffers.

    Every scheme computes in float32 and returns the input's dtype; ``amax`` is taken from the weight by
    :meth:`calibrate` (``w`` below is the weight in float32, ``round`` rounds half to even):

    - ``"int8"``: per output channel, ``amax[r] = max|w[r, :]|``, ``s = 127 / amax``,
      ``q = clamp(round(w * s), -128, 127)`` (ModelOpt's default ``narrow_range=False``; -128 is
      unreachable with a scale calibrated on the same weight), value ``q / s``. A channel with
      ``amax <= 2**-24`` becomes 0. The exported scale is ``amax / 127``.
    - ``"fp8"``: per output channel E4M3, ``s = 448 / amax`` (1 where ``amax <= 2**-24``), value
      ``float(e4m3(clamp(w * s, -448, 448))) * (1 / s)``; ``e4m3`` rounds to nearest even.
    - ``"int4-g128"``: as int8 in groups of 128 consecutive input columns with 7 for 127 and
      ``clamp(..., -8, 7)``; ``amax`` has shape ``(out, ceil(in / 128))``. When ``in_features`` is not a
      multiple of 128 the last group is shorter (quantized as if zero-padded, like ModelOpt).
    - ``"nvfp4"``: ``global_scale = max|w| / (6 * 448)`` (FP32), per 16-element block
      ``block_scale = e4m3(clamp(block_amax / (6 * global_scale), 2**-9, 448))`` (a zero block gets 1),
      stored as ``float8_e4m3fn``; with ``S = float(block_scale) * global_scale`` the value is
      ``E2M1(w / S) * S`` where ``E2M1`` rounds to the nearest of ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with
      its sign, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4,
      5 -> 4) and saturates at 6. This is ModelOpt's export (``NVFP4QTensor``) numerics; its CUDA
      fake-quant kernel differs only for blocks whose scale underflows (``block_amax`` below about
      ``4.4e-6 * max|w|`` or ``6e-5`` in absolute value), which it zeroes.

    Rows are independent: ``self(w[a:b], rows=slice(a, b)) == self(w)[a:b]``.

    Args:
        scheme: one of :data:`SCHEMES`.
        shape: the weight's ``(out_features, in_features)``.
        device: where the buffers live (the weight's execution device).

    Raises:
        ValueError: unknown scheme or a shape that is not two positive sizes.

    Example:
        >>> q = FakeQuantizer("int8", tuple(w.shape)); q.calibrate(w); w_q = q(w)  # doctest: +SKIP
    """

    def __init__(self, scheme: str, shape: tuple[int, int], *, device: torch.device | str | None = None):
        super().__init__()
        _check_scheme(scheme)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"FakeQuantizer({scheme!r}) needs a 2-D weight shape (out, in), got {tuple(shape)}")
        self.scheme, self.shape, self.enabled = scheme, (int(shape[0]), int(shape[1])), True
        cols = math.ceil(self.shape[1] / self.group_size)
        if scheme == "nvfp4":
            self.register_buffer("block_scale", torch.ones(self.shape[0], cols, device=device).to(torch.float8_e4m3fn))
            self.register_buffer("global_scale", torch.zeros((), device=device))
        else:
            self.register_buffer("amax", torch.zeros(self.shape[0], cols, device=device))

    @property
    def group_size(self) -> int:
        """Input columns that share one scale (``in_features`` for per-channel schemes)."""
        return _GROUP[self.scheme] or self.shape[1]

    @property
    def scale(self) -> torch.Tensor:
        """The dequantization scale per channel / group: ``amax / 127`` (int8), ``amax / 448`` (fp8),
        ``amax / 7`` (int4-g128), ``float(block_scale) * global_scale`` (nvfp4)."""
        if self.scheme == "nvfp4":
            return _nvfp4_scales(self.block_scale, self.global_scale)
        return self.amax / (_INT_MAX.get(self.scheme) or E4M3_MAX)

    def config(self) -> dict:
        """The JSON-able description saved next to the buffers."""
        return {"scheme": self.scheme, "shape": list(self.shape), "group_size": self.group_size,
                "enabled": self.enabled}

    def extra_repr(self) -> str:
        return f"{self.scheme}, shape={self.shape}, group_size={self.group_size}, enabled={self.enabled}"

    def _check(self, w: torch.Tensor, rows: slice | None) -> None:
        expected = (len(range(self.shape[0])[rows]) if rows is not None else self.shape[0], self.shape[1])
        if tuple(w.shape) != expected:
            raise ValueError(f"FakeQuantizer({self.scheme!r}) was built for a weight of shape {self.shape};\n"
                             f"  expected {expected} for rows={rows}, got {tuple(w.shape)}")

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        """Compute the scales from the whole weight ``w`` (any float dtype, on the buffers' device).

        Raises:
            ValueError: ``w`` does not have the shape the quantizer was built for.
        """
        self._check(w, None)
        device = next(self.buffers()).device
        groups = _groups(w.detach().to(device, torch.float32), self.group_size)
        group_amax = groups.abs().amax(dim=-1)
        if self.scheme != "nvfp4":
            self.amax.copy_(group_amax)
            return
        global_scale = group_amax.amax() / (E2M1_MAX * E4M3_MAX)
        block = group_amax / (E2M1_MAX * global_scale)
        block[block == 0] = 1.0  # an all-zero block
        block = torch.nan_to_num(block, nan=1.0)  # an all-zero weight (0 / 0); ModelOpt would give nan
        self.block_scale.copy_(block.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn))
        self.global_scale.copy_(global_scale)

    def forward(self, w: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The fake-quantized ``w`` (same shape and dtype), or ``w`` itself when disabled.

        Args:
            w: the weight, or its rows ``rows`` for a chunked fold.
            rows: which rows of the calibrated weight ``w`` holds (a step-1 slice); all when None.

        Raises:
            ValueError: ``w`` does not have the expected shape.
        """
        if not self.enabled:
            return w
        self._check(w, rows)
        if torch.is_grad_enabled() and w.requires_grad:
            return _StraightThrough.apply(w, functools.partial(self._fold, rows=rows))
        return self._fold(w, rows)

    @torch.no_grad()
    def _fold(self, w: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """:meth:`forward`'s value, computed in place in scratch buffers (no autograd graph)."""
        start = range(self.shape[0])[rows or slice(None)].start if len(w) else 0
        out = anon_empty(tuple(w.shape), w.dtype) if w.device.type == "cpu" else torch.empty_like(w)
        factors = self._factors(slice(start, start + len(w)))
        # a few MB of float32 per step, in scratch buffers reused by every step: nothing is allocated (and
        # page-faulted) per step, memory stays near the weight's size
        step = max(1, (_CHUNK_ELEMENTS if w.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS) // w.shape[1])
        groups = math.ceil(self.shape[1] / self.group_size)
        scratch = _scratch(min(step, len(w)) * groups * self.group_size, 1 if self.scheme in _INT_MAX else 2, w.device)
        for a in range(0, len(w), step):
            out[a:a + step] = self._fake_quant(w[a:a + step], [f[a:a + step] for f in factors], scratch)
        return out

    def _factors(self, rows: slice) -> tuple[torch.Tensor, ...]:
        """This scheme's per-row (per-group) float32 factors for the weight rows ``rows``, shaped
        ``(rows, groups, 1)`` to broadcast over the ``(rows, groups, group_size)`` view of a chunk."""
        if self.scheme == "nvfp4":
            return (_nvfp4_scales(self.block_scale[rows], self.global_scale).unsqueeze(-1),)
        amax = self.amax[rows].unsqueeze(-1)
        if self.scheme == "fp8":
            return _fp8_scales(amax)
        return _int_scales(amax, _INT_MAX[self.scheme])

    def _fake_quant(self, w: torch.Tensor, factors: list[torch.Tensor], scratch: tuple[torch.Tensor, ...]
                    ) -> torch.Tensor:
        n, cols = w.shape
        groups = math.ceil(cols / self.group_size)
        x, *work = (t[:n * groups * self.group_size].view(n, groups, self.group_size) for t in scratch)
        flat = x.view(n, -1)
        flat[:, :cols].copy_(w)  # float32, the trailing partial group zero-padded (as ``_groups``)
        if flat.shape[1] > cols:
            flat[:, cols:].zero_()
        if self.scheme == "nvfp4":
            out = _nvfp4_fake_quant(x, *factors, *work)
        elif self.scheme == "fp8":
            out = _fp8_fake_quant(x, *factors, *work)
        else:
            out = _int_fake_quant(x, *factors, _INT_MAX[self.scheme])
        return out.reshape(n, -1)[:, :cols]


class _StraightThrough(torch.autograd.Function):
    """``fold(w)`` forward, identity backward: the straight-through estimator of ModelOpt's fake quantizers
    (within the calibrated range, which holds every element of a weight calibrated on itself)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fold) -> torch.Tensor:
        return fold(w.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


register_quantizer(FakeQuantizer)

_FAKE_QUANT_CLASSES: dict[type, type] = {}


def _linear_forward(self, input: torch.Tensor) -> torch.Tensor:
    return F.linear(input, self.weight_quantizer(self.weight), self.bias)


def _fake_quant_class(base: type[nn.Linear]) -> type[nn.Linear]:
    """``FakeQuant<Base>``: ``base`` whose forward multiplies by the fake-quantized weight (one class per base)."""
    if base not in _FAKE_QUANT_CLASSES:
        cls = type(f"FakeQuant{base.__name__}", (base,), {"forward": _linear_forward, "__module__": __name__})
        _FAKE_QUANT_CLASSES[base] = cls
        _FAKE_QUANT_CLASSES[cls] = cls  # a swapped class maps to itself: `_install` recognises it
    return _FAKE_QUANT_CLASSES[base]


def _check_installable(name: str, linear: nn.Linear) -> None:
    """Raise the ``ValueError`` :func:`_install` would, without changing anything."""
    base = type(linear)
    current = getattr(linear, "weight_quantizer", None)
    if current is not None and not isinstance(current, FakeQuantizer):
        raise ValueError(f"{name} already has a weight_quantizer of type {type(current).__name__}; "
                         f"remove it or leave {name} out (skip=...)")
    if base is _FAKE_QUANT_CLASSES.get(base):
        return
    if base.forward is not nn.Linear.forward:
        raise ValueError(f"{name} ({base.__name__}) overrides nn.Linear.forward; fake quantization would change "
                         f"its computation: leave it out (skip=...)")
    old_forward = linear.__dict__.get("_old_forward")
    if "forward" in linear.__dict__ and getattr(old_forward, "__func__", None) is not base.forward:
        raise ValueError(f"{name}.forward was replaced by something other than an accelerate hook; "
                         f"cannot route it through the fake quantizer")


def _install(name: str, linear: nn.Linear, quantizer: FakeQuantizer) -> Callable[[], None]:
    """Attach ``quantizer`` and switch ``linear`` to its ``FakeQuant`` class, accelerate hook included.

    accelerate's ``add_hook_to_module`` keeps the original bound forward in ``_old_forward`` and calls it
    from the hook; that bound method is rebound to the new class's forward.

    Returns:
        A function that undoes the change.
    """
    _check_installable(name, linear)
    base, old_quantizer = type(linear), linear._modules.get("weight_quantizer")
    old_forward = linear.__dict__.get("_old_forward")

    def undo() -> None:
        linear.__class__ = base
        if old_forward is not None:
            linear._old_forward = old_forward
        if old_quantizer is not None:
            linear.weight_quantizer = old_quantizer
        else:
            del linear.weight_quantizer

    linear.weight_quantizer = quantizer
    if base is not _FAKE_QUANT_CLASSES.get(base):
        linear.__class__ = _fake_quant_class(base)
        if old_forward is not None:
            linear._old_forward = MethodType(linear.__class__.forward, linear)
    return undo


def _add_to_offloading_hooks(model: nn.Module, name: str, quantizer: FakeQuantizer, undo: list) -> None:
    """Give the quantizer's buffers a store entry in hooks that load the buffers of submodules.

    An ``AlignDevicesHook`` with ``place_submodules`` and ``offload_buffers`` (on the Linear or above)
    loads every buffer below it from its ``weights_map`` in ``pre_forward``; without an entry it fails.
    Each entry's undo function is appended to ``undo``.
    """
    parts = name.split(".") if name else []
    for i in range(len(parts) + 1):
        owner = model.get_submodule(".".join(parts[:i]))
        prefix = ".".join([*parts[i:], "weight_quantizer"])
        for hook in align_hooks(owner):
            if offloads(hook) and hook.offload_buffers and hook.place_submodules and hook.weights_map is not None:
                for buffer_name, buffer in quantizer.named_buffers():
                    undo.append(add_store_entry(hook.weights_map, f"{prefix}.{buffer_name}", buffer))


def _targets(model: nn.Module, modules: Iterable[str] | None, skip: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    if modules is not None:
        found = []
        for name in modules:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear; only Linear layers "
                                 f"can be fake-quantized by quantize_weights")
            found.append((name, module))
        return found
    skip = tuple(skip)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rpartition(".")[2], p)
                        for p in skip)]


@torch.no_grad()
def quantize_weights(model: nn.Module, scheme: str = "int8", *, modules: Iterable[str] | None = None,
                     skip: Iterable[str] = ("lm_head",)) -> int:
    """Fake-quantize the weights of ``model``'s ``nn.Linear`` layers with a built-in scheme.

    Each Linear gets a :class:`FakeQuantizer` child ``weight_quantizer`` calibrated on its weight, with
    buffers on the weight's execution device, and its class becomes ``FakeQuant<Linear>`` whose forward
    is ``F.linear(x, weight_quantizer(weight), bias)``; accelerate hooks keep working. The state dict only
    gains ``<linear>.weight_quantizer.*`` buffers; ``<linear>.weight`` stays the raw weight, and
    :func:`offload_export.save_clean` folds it. Offloaded weights are read one Linear at a time. A Linear
    that already has a ``FakeQuantizer`` is re-quantized with ``scheme``.

    Args:
        model: the model, resident or offloaded by accelerate.
        scheme: one of :data:`SCHEMES`.
        modules: qualified names of the Linear layers to quantize; default every Linear not in ``skip``.
        skip: ``fnmatch`` patterns matched against a Linear's qualified name or its last component;
            used only when ``modules`` is None. ``lm_head`` stays unquantized by default, as in ModelOpt.

    Returns:
        The number of Linear layers quantized.

    Raises:
        ValueError: unknown scheme, a named module that is not a Linear, or a Linear whose forward was
            replaced by something other than accelerate. On any error the model is left unchanged.

    Example:
        >>> offload_export.quantize_weights(model, "nvfp4")  # doctest: +SKIP
        196
    """
    _check_scheme(scheme)
    targets = _targets(model, modules, skip)
    for name, linear in targets:
        _check_installable(name, linear)
    lay = layout(model)
    refs = offloaded_tensors(model)
    quantizers = []
    for name, linear in targets:
        device = lay[f"{name}.weight" if name else "weight"].device
        quantizer = FakeQuantizer(scheme, tuple(linear.weight.shape), device=device)
        with onloaded(linear, None, refs):
            quantizer.calibrate(linear.weight)
        quantizers.append(quantizer)
    undo: list[Callable[[], None]] = []
    try:  # all or nothing: every check and calibration passed; a failure here undoes what was installed
        for (name, linear), quantizer in zip(targets, quantizers):
            undo.append(_install(name, linear, quantizer))
            _add_to_offloading_hooks(model, name, quantizer, undo)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return len(targets)
