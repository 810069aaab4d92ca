"""``format="compressed-tensors"``: the packed checkpoint llm-compressor writes, one module at a time.

llm-compressor saves a compressed-tensors model with ``ModelCompressor.from_pretrained_model(model)``,
``compress_model(model)`` (which replaces every quantized module's weight by its packed form, in place),
``save_pretrained`` and ``update_config``. This format writes the same tensors (names, dtypes, shapes,
bytes) and the same ``quantization_config`` without touching the model: each quantized module's weight and
qparams are read (onloaded copies), passed in row chunks through compressed-tensors' own per-module
compressor (``BaseCompressor.compress`` of ``pack-quantized``, ``float-quantized``, ``int-quantized``,
``nvfp4-pack-quantized``) on the quantizer's device, and written; the model's parameters, schemes and
statuses are never changed.

The built-in fake quantizers (:func:`offload_export.quantize_weights`) export too: their fake-quantized
weight and a compressed-tensors scheme whose scales reproduce it (``int8`` and ``int4-g128`` ->
``pack-quantized``, ``fp8`` -> ``float-quantized``, ``nvfp4`` -> ``nvfp4-pack-quantized``), so the
checkpoint holds exactly the fake quantizer's integer / FP8 / FP4 codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._buffers import anon_empty, cast
from .._hooks import unhooked
from ..adapters.builtin import FakeQuantizer
from ..quantizers import Quantizer
from ..toolkits import require_toolkit
from .base import Format, Reader, Source, StateDict, register_format

__all__ = ["FORMATS_WRITTEN", "CompressedTensors", "Packing", "pack", "packed_specs", "packings"]

#: compressed-tensors formats this export writes (others raise ValueError before anything is written)
FORMATS_WRITTEN = ("pack-quantized", "float-quantized", "int-quantized", "nvfp4-pack-quantized")
NAME = "compressed-tensors"
_CHUNK_ELEMENTS = 1 << 20  # weight elements per compress call: a few MB of temporaries
_ROW_ALIGN = 128  # chunk rows: a multiple of 32 (dense int32 packing of zero points along rows) and of blocks
_EPS = 2.0**-24  # the built-in quantizers quantize a group with amax at or below this to 0


@dataclass(frozen=True)
class Packing:
    """One quantized module to pack.

    Attributes:
        key: its weight's state-dict key; ``owner`` the module's qualified name.
        format: the compressed-tensors format (one of :data:`FORMATS_WRITTEN`).
        scheme: the compressed-tensors ``QuantizationScheme`` (for a built-in quantizer, one made for it).
        qparams: ``local name -> state-dict key`` of the module's own qparams (compressed-tensors schemes).
        quantizer: the weight quantizer (its ``handle`` is the :class:`FakeQuantizer` for built-in schemes).
    """

    key: str
    owner: str
    format: str
    scheme: Any
    qparams: dict[str, str]
    quantizer: Quantizer

    @property
    def builtin(self) -> bool:
        return isinstance(self.quantizer.handle, FakeQuantizer)


def _fail(owner: str, problem: str, todo: str) -> ValueError:
    return ValueError(f"format={NAME!r}: {owner + ': ' if owner else ''}{problem}.\n  {todo}")


def _ct_scheme_format(q: Quantizer) -> tuple[Any, str]:
    from compressed_tensors.compressors.base import COMPRESSIBLE_MODULE_TYPES
    from compressed_tensors.compressors.format import infer_module_format

    scheme, owner = q.owner.quantization_scheme, q.owner
    status = getattr(getattr(owner, "quantization_status", None), "value", None)
    if not isinstance(owner, COMPRESSIBLE_MODULE_TYPES):
        raise _fail(q.owner_name, f"a {type(owner).__name__} with a compressed-tensors scheme (attention / KV-cache "
                                  f"quantization) is not packed by this export", "export with format='fake-quant'")
    fmt = getattr(scheme.format, "value", scheme.format) or infer_module_format(type(owner), scheme).value
    if fmt not in FORMATS_WRITTEN:
        raise _fail(q.owner_name, f"compressed-tensors format {fmt!r} is not written by this export (it writes "
                                  f"{', '.join(FORMATS_WRITTEN)})", "export with format='fake-quant'")
    if status == "compressed":
        raise _fail(q.owner_name, "already compressed (quantization_status='compressed'): its weight holds packed "
                                  "values", "save it with model.save_pretrained, or decompress it first")
    if status == "initialized":
        raise RuntimeError(f"format={NAME!r}: {q.owner_name}: weight_scale was never calibrated (quantization_status="
                           f"'initialized': compressed-tensors allocates it with torch.empty).\n  Calibrate the scales "
                           f"and set quantization_status to QuantizationStatus.FROZEN before exporting")
    if status == "decompressed":
        raise _fail(q.owner_name, "quantization_status='decompressed': its forward no longer quantizes the weight",
                    "set quantization_status to QuantizationStatus.FROZEN to pack it (a decompressed weight "
                    "quantizes back to the same codes), or export with format='fake-quant'")
    if scheme.weights.dynamic:
        raise _fail(q.owner_name, "dynamic weight quantization has no stored scales to pack",
                    "export with format='fake-quant'")
    return scheme, fmt


def _builtin_scheme(q: Quantizer) -> tuple[Any, str]:
    """The compressed-tensors scheme that holds a :class:`FakeQuantizer`'s codes, and its format."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    fq: FakeQuantizer = q.handle
    cols = fq.shape[1]
    if cols % fq.group_size:
        raise _fail(q.owner_name, f"{fq.scheme} groups of {fq.group_size} do not divide in_features={cols} "
                                  f"(compressed-tensors needs whole groups)", "export with format='fake-quant'")
    # weights only, as the fake-quant model computes (no activation quantization)
    fmt = {"int8": "pack-quantized", "int4-g128": "pack-quantized", "fp8": "float-quantized",
           "nvfp4": "nvfp4-pack-quantized"}[fq.scheme]
    if fq.scheme == "nvfp4":
        return preset_name_to_scheme("NVFP4A16", ["Linear"]).model_copy(update={"format": fmt}), fmt
    kind, bits = ("float", 8) if fq.scheme == "fp8" else ("int", 8 if fq.scheme == "int8" else 4)
    group = {"strategy": "group", "group_size": fq.group_size} if fq.scheme == "int4-g128" else {"strategy": "channel"}
    args = QuantizationArgs(num_bits=bits, type=kind, symmetric=True, **group)
    return QuantizationScheme(targets=["Linear"], weights=args, format=fmt), fmt


def packings(source: Source) -> dict[str, Packing]:
    """``weight key -> Packing`` for every quantized module of ``source``; checks that all of them can be packed.

    Raises:
        ValueError: no quantizers, quantizers of another toolkit (ModelOpt, ...), a weight quantizer that is
            disabled or not folded (``fold=False``), a scheme or format this export does not write, built-in
            and compressed-tensors quantizers mixed, or compressed-tensors transforms.
    """
    if not source.quantizers:
        raise _fail("", "the model has no quantizers", "quantize it (llm-compressor / compressed-tensors, or "
                    "offload_export.quantize_weights) or export with format='fake-quant'")
    if getattr(source.model, "transform_config", None) is not None:
        raise _fail("", "compressed-tensors transforms (transform_config) are not exported",
                    "export with format='fake-quant'")
    out: dict[str, Packing] = {}
    for q in source.quantizers:
        ct = q.adapter.name == NAME
        if not ct and not isinstance(q.handle, FakeQuantizer):
            todo = "export with format='modelopt'" if q.adapter.name == "modelopt" else "export with format='fake-quant'"
            raise _fail(q.owner_name, f"quantized by {q.adapter.name} ({q.name}), not by compressed-tensors or "
                                      f"offload_export.quantize_weights", todo)
        if q.role != "weight":
            if q.owner.quantization_scheme.weights is None:  # e.g. KV-cache / attention quantization
                raise _fail(q.owner_name, f"only its {q.role} activations are quantized ({type(q.owner).__name__}): "
                                          f"this export packs weights only", "export with format='fake-quant'")
            continue
        key = f"{q.owner_name}.{q.target}" if q.owner_name else str(q.target)
        scheme, fmt = _ct_scheme_format(q) if ct else _builtin_scheme(q)
        if key not in source.folds:
            raise _fail(q.owner_name, f"its weight quantizer {q.name} is disabled or not applied (fold=False)",
                        "enable it and pass fold=True: a packed weight is the quantized weight")
        qparams = {} if not ct else {k.rpartition(".")[2]: k for p in source.quantizers if p.owner is q.owner
                                     for k in p.state_keys}
        out[key] = Packing(key, q.owner_name, fmt, scheme, qparams, q)
    if len({p.builtin for p in out.values()}) > 1:
        raise _fail("", "built-in and compressed-tensors quantizers are mixed in one model",
                    "quantize the model with one of them")
    return out


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def packed_specs(fmt: str, scheme, local: StateDict, owner: str = "") -> StateDict:
    """Plan time: a module's local tensors (``weight``, ``bias``, ``weight_scale``, ..., any device) -> the
    names, dtypes and shapes (meta tensors) compressed-tensors' compressor of ``fmt`` makes of them."""
    from compressed_tensors.quantization import QuantizationStrategy

    out = {k: _meta(v.shape, v.dtype) for k, v in local.items()}
    w, args = out.pop("weight"), scheme.weights
    if w.dim() != 2:
        raise _fail(owner, f"a {w.dim()}-D weight is not packed by this export", "export with format='fake-quant'")
    rows, cols = w.shape
    expected = _scale_shape(args, rows, cols)
    if "weight_scale" not in out or expected is not None and tuple(out["weight_scale"].shape) != expected:
        got = tuple(out["weight_scale"].shape) if "weight_scale" in out else None
        raise _fail(owner, f"weight_scale has shape {got}, its {args.strategy} scheme needs {expected}",
                    "calibrate the scales for this scheme or export with format='fake-quant'")
    if fmt == "pack-quantized":
        out["weight_packed"] = _meta((rows, math.ceil(cols * args.num_bits / 32)), torch.int32)
        out["weight_shape"] = _meta((2,), torch.int64)
        zp = out.get("weight_zero_point")
        if zp is not None and not args.symmetric and args.strategy in (QuantizationStrategy.GROUP,
                                                                       QuantizationStrategy.CHANNEL):
            out["weight_zero_point"] = _meta((math.ceil(zp.shape[0] * args.num_bits / 32), *zp.shape[1:]), torch.int32)
    elif fmt == "nvfp4-pack-quantized":
        scale = out.pop("weight_scale")
        out["weight_packed"] = _meta((rows, cols // 2), torch.uint8)
        out["weight_scale"] = _meta(scale.shape, args.scale_dtype or torch.float8_e4m3fn)
    else:  # float-quantized / int-quantized: the weight in the scheme's dtype
        out["weight"] = _meta((rows, cols), args.pytorch_dtype())
    for role in ("input_activations", "weights", "output_activations"):
        role_args = getattr(scheme, role)
        if role_args is not None and role_args.symmetric:
            out.pop(f"{role.split('_')[0].removesuffix('s')}_zero_point", None)
    return out


def _scale_shape(args, rows: int, cols: int) -> tuple[int, ...] | None:
    """The weight scale's shape for a strategy (None: not checked)."""
    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (rows, 1)
    if strategy in ("group", "tensor_group"):
        return (rows, math.ceil(cols / args.group_size))
    if strategy == "block":
        return (math.ceil(rows / args.block_structure[0]), math.ceil(cols / args.block_structure[1]))
    return None


def _chunk(t: torch.Tensor, name: str, a: int, b: int, rows: int, args) -> tuple[torch.Tensor, bool]:
    """Rows ``a:b``'s part of a weight qparam (and whether it depends on the rows) or the whole tensor."""
    if not name.startswith("weight_") or t.dim() != 2:
        return t, False
    if args.strategy == "block":
        height = args.block_structure[0]
        return t[a // height: math.ceil(b / height)], True
    return (t[a:b], True) if t.shape[0] == rows else (t, False)


def pack(fmt: str, scheme, local: StateDict, weight_rows: Callable[[int, int], torch.Tensor],
         specs: StateDict, device: torch.device) -> StateDict:
    """Run time: compressed-tensors' compressor of ``fmt`` over a module, a chunk of rows at a time.

    Args:
        fmt, scheme: the format and the module's ``QuantizationScheme``.
        local: the module's local tensors (``weight`` may be meta: rows come from ``weight_rows``).
        weight_rows: ``(a, b) -> rows a:b of the weight to compress`` on ``device``.
        specs: :func:`packed_specs` of ``local``, the planned outputs.
        device: where the compressor runs.

    Returns:
        The outputs of :func:`packed_specs`, as CPU tensors, equal to ``compress`` of the whole module.

    Raises:
        RuntimeError: the compressor's output does not match ``specs`` (a compressed-tensors version this
            export does not know).
    """
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt)
    rows, cols = local["weight"].shape
    step = max(_ROW_ALIGN, _CHUNK_ELEMENTS // max(cols, 1) // _ROW_ALIGN * _ROW_ALIGN)
    out = {n: anon_empty(tuple(s.shape), s.dtype) for n, s in specs.items()}
    at = dict.fromkeys(out, 0)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        parts = {n: _chunk(t, n, a, b, rows, scheme.weights) for n, t in local.items() if n != "weight"}
        state = {n: t.to(device) for n, (t, _) in parts.items()}
        state["weight"] = weight_rows(a, b)
        result = compressor.compress(state, scheme)
        if set(result) != set(out):
            raise RuntimeError(f"compressed-tensors {fmt} compress made {sorted(result)}, planned {sorted(out)}")
        for n, t in result.items():
            by_rows = n in ("weight", "weight_packed") or parts.get(n, (None, False))[1]
            if n == "weight_shape" or (not by_rows and a):
                continue
            dst = out[n][at[n]: at[n] + t.shape[0]] if by_rows else out[n]
            if dst.shape != t.shape or dst.dtype != t.dtype:
                raise RuntimeError(f"compressed-tensors {fmt} compress made {n} {t.dtype} {tuple(t.shape)} for rows "
                                   f"{a}:{b}, planned {dst.dtype} {tuple(dst.shape)}")
            dst.copy_(t)
            at[n] += t.shape[0] if by_rows else 0
    if "weight_shape" in out:
        out["weight_shape"].copy_(torch.tensor([rows, cols]))
    return out


def _builtin_qparams(fq: FakeQuantizer, device: torch.device) -> StateDict:
    """compressed-tensors qparams whose quantization of the fake-quantized weight gives back its codes.

    int: ``scale = amax / 127`` (``/ 7``); fp8: ``scale = 1 / (448 / amax)``, the very factor the fake quantizer
    multiplies its E4M3 codes by; nvfp4: ``weight_scale = block_scale``, ``weight_global_scale = 1 / global_scale``
    (compressed-tensors divides the block scale by its global scale). Groups the fake quantizer zeroes get 1.
    """
    if fq.scheme == "nvfp4":
        gs = fq.global_scale.to(device, torch.float32)
        return {"weight_scale": fq.block_scale.to(device, torch.float32),
                "weight_global_scale": torch.where(gs > 0, 1 / gs, 1.0).reshape(1)}
    amax = fq.amax.to(device, torch.float32)
    zero = amax <= _EPS
    if fq.scheme == "fp8":
        return {"weight_scale": 1 / (448.0 / torch.where(zero, 1.0, amax))}
    return {"weight_scale": torch.where(zero, 1.0, amax / (127.0 if fq.scheme == "int8" else 7.0))}


def _builtin_meta(p: Packing) -> StateDict:
    fq = p.quantizer.handle
    groups = math.ceil(fq.shape[1] / fq.group_size)
    out = {"weight_scale": _meta((fq.shape[0], groups), torch.float32)}
    if fq.scheme == "nvfp4":
        out["weight_global_scale"] = _meta((1,), torch.float32)
    return out


def quantization_config(model: nn.Module, found: dict[str, Packing]) -> dict:
    """config.json's ``quantization_config``: what ``ModelCompressor.update_config`` writes after
    ``compress_model``, computed on copies of the schemes (the model's are not changed).

    Built-in quantizers of one scheme form one group that targets ``"Linear"`` (the rest are ignored); of
    several schemes, one group per scheme that targets its modules by name, as llm-compressor writes them.
    """
    import compressed_tensors
    from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_METHOD, QUANTIZATION_METHOD_NAME,
                                         SPARSITY_CONFIG_NAME, TRANSFORM_CONFIG_NAME)
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    by_owner = {p.owner: p for p in found.values()}
    if any(p.builtin for p in found.values()):
        schemes: list[Any] = []
        owners: list[list[str]] = []
        for p in found.values():
            if p.scheme not in schemes:
                schemes.append(p.scheme)
                owners.append([])
            owners[schemes.index(p.scheme)].append(p.owner)
        if len(schemes) > 1:  # one "Linear" group each would match every Linear twice: transformers refuses it
            schemes = [s.model_copy(update={"targets": names}) for s, names in zip(schemes, owners)]
        groups = {f"group_{i}": scheme for i, scheme in enumerate(schemes)}
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in by_owner]
        config = QuantizationConfig(config_groups=groups, ignore=ignore).model_copy(deep=True)
    else:
        original = QuantizationConfig.from_pretrained(model)  # holds the model's own scheme objects
        config = original.model_copy(deep=True)
        formats = {id(p.scheme): p.format for p in found.values()}
        for name, group in original.config_groups.items():
            config.config_groups[name].format = formats.get(id(group), group.format)
    written = {p.format for p in found.values()}
    config.format = written.pop() if len(written) == 1 else "mixed-precision"
    config.quantization_status = QuantizationStatus.COMPRESSED
    return {COMPRESSION_VERSION_NAME: compressed_tensors.__version__, QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
            SPARSITY_CONFIG_NAME: {}, TRANSFORM_CONFIG_NAME: {},
            **config.model_dump(mode="json", exclude=["quant_method"])}


@register_format
class CompressedTensors(Format):
    """compressed-tensors' packed checkpoint (what llm-compressor's ``save_pretrained`` writes); vLLM and
    transformers (with compressed-tensors installed) load it.

    Raises:
        ValueError: the model cannot be written in this format (see :func:`packings`), before any write.
    """

    name = NAME

    def __init__(self, source: Source):
        require_toolkit(self.name)
        super().__init__(source)
        self.packings = packings(source)
        self._config = quantization_config(source.model, self.packings)

    def _packing(self, keys) -> Packing | None:
        return next((self.packings[k] for k in keys if k in self.packings), None)

    def _local(self, p: Packing, tensors: StateDict) -> StateDict:
        prefix = f"{p.owner}." if p.owner else ""
        return {k.removeprefix(prefix): v for k, v in tensors.items()}

    def _qparam_meta(self, p: Packing) -> StateDict:
        if p.builtin:
            return _builtin_meta(p)
        return {n: _meta(self.source.lay[k].shape, self.source.lay[k].dtype) for n, k in p.qparams.items()}

    def outputs(self, meta: StateDict) -> StateDict:
        p = self._packing(meta)
        if p is None:
            return self.source.convert(meta) if self.source.convert is not None else meta
        lay = self.source.lay  # a packed module keeps its dtypes (dtype= casts the other tensors)
        local = self._local(p, {k: _meta(lay[k].shape, lay[k].dtype) for k in meta})
        local.update(self._qparam_meta(p))
        prefix = f"{p.owner}." if p.owner else ""
        return {prefix + n: t for n, t in packed_specs(p.format, p.scheme, local, p.owner).items()}

    def unchanged(self, unit, key: str) -> bool:
        return not (unit.converted or self.casts(key) or self._packing(unit.sources) is not None)

    def devices(self, reader: Reader, unit) -> dict:
        p = self._packing(unit.sources)
        return {p.key: reader.fold_device(p.key)} if p is not None else {}

    def finish(self, reader: Reader, unit, values: StateDict) -> StateDict:
        p = self._packing(values)
        if p is None:
            dtype = self.source.dtype
            out = {k: cast(t, dtype) for k, t in values.items()}
            return self.source.convert(out) if unit.converted else out
        local = self._local(p, values)
        weight = local["weight"]
        with reader.onloaded_quantizers(p.key) as device:
            if p.builtin:
                fq = p.quantizer.handle
                local.update(_builtin_qparams(fq, device))
                rows = lambda a, b: unhooked(fq)(weight[a:b].to(device, torch.float32), rows=slice(a, b))  # noqa: E731
            else:
                local.update({n: getattr(p.quantizer.owner, n).detach() for n in p.qparams})
                rows = lambda a, b: weight[a:b].to(device)  # noqa: E731
            specs = self._local(p, self._unit_specs(unit))
            packed = pack(p.format, p.scheme, local, rows, specs, device)
        prefix = f"{p.owner}." if p.owner else ""
        return {prefix + n: t for n, t in packed.items()}

    def _unit_specs(self, unit) -> StateDict:
        """Every output of ``unit`` as planned; a rank of a distributed export plans only those in its shards
        (``unit.outputs``), but the compressor makes them all."""
        lay = self.source.lay
        specs = self.outputs({k: _meta(lay[k].shape, lay[k].dtype) for k in unit.sources})
        specs.update({s.name: _meta(s.shape, s.dtype) for s in unit.outputs})
        return specs

    def config_updates(self) -> dict:
        return {"quantization_config": self._config}
