"""Fused-expert MoE models (Qwen3-MoE, Mixtral) quantized with ModelOpt: transformers' save-time conversion.

transformers 5 keeps MoE experts fused (``mlp.experts.gate_up_proj``) and splits them back per expert when
saving. Up to 5.17 its patterns also caught ModelOpt's quantizer buffers (``..._weight_quantizers.0._amax``)
and the export failed; these tests run on every transformers 5.x we claim (see ``.ci/old_transformers``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from layouts import LayoutSpec, apply_layout_with_artifacts, fixed_input_ids, forward_logits, make_model
from test_export import assert_same_tensors, read_checkpoint
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig

import offload_export as oe
from offload_export.conversion import save_conversion
from offload_export.quiet import quiet_libraries

mtq = pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("transformers.core_model_loading", reason="transformers 4.x has no fused experts")

CALIB = fixed_input_ids(seed=7)
SCHEMES = {"int8_wo": "INT8_WEIGHT_ONLY_CFG", "fp8": "FP8_DEFAULT_CFG", "int4_awq": "INT4_AWQ_CFG",
           "nvfp4": "NVFP4_DEFAULT_CFG"}
KINDS = ("qwen3_moe", "mixtral")
# experts on disk, attention offloaded to CPU RAM, the rest resident: every store kind in one model
_MIXED = tuple([("model.embed_tokens", "resident"), ("model.norm", "resident"), ("lm_head", "cpu")]
               + [(f"model.layers.{i}.{m}", p) for i in range(2) for m, p in
                  (("self_attn", "cpu"), ("mlp.gate", "resident"), ("mlp.experts", "disk"),
                   ("input_layernorm", "resident"), ("post_attention_layernorm", "cpu"))])
LAYOUTS = {"resident": LayoutSpec("resident"), "cpu_offload": LayoutSpec("cpu_offload", offload_buffers=True),
           "disk_offload": LayoutSpec("disk_offload"), "dispatch": LayoutSpec("dispatch", _MIXED)}


def _mixtral(seed: int = 0) -> nn.Module:
    cfg = MixtralConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=32, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(seed)
    with quiet_libraries():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(10_007 + seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name or "gate.weight" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _model(kind: str) -> nn.Module:
    return _mixtral() if kind == "mixtral" else make_model(kind)


def _quantized(kind: str, scheme: str) -> nn.Module:
    with quiet_libraries():
        return mtq.quantize(_model(kind), getattr(mtq, SCHEMES[scheme]), lambda m: m(input_ids=CALIB, use_cache=False))


def _saved_names(kind: str, tmp: Path) -> set[str]:
    _model(kind).save_pretrained(tmp)
    return set(read_checkpoint(tmp))


def _modelopt_reference(model: nn.Module, out: Path) -> dict[str, torch.Tensor]:
    from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint

    with quiet_libraries():
        export_hf_vllm_fq_checkpoint(copy.deepcopy(model), out)
    return read_checkpoint(out)


def _quantizer_keys(model: nn.Module) -> set[str]:
    return {k for q in oe.find_quantizers(model) for k in q.state_keys}


# ------------------------------------------------------------------------------ save_conversion, no data


@pytest.mark.parametrize("kind", KINDS)
def test_conversion_of_a_quantized_moe_names_experts_like_save_pretrained_and_leaves_quantizers_alone(kind, tmp_path):
    model = _quantized(kind, "fp8")  # fp8: 0-dim _amax buffers, the IndexError of transformers <= 5.17
    lay = oe.layout(model)
    quantizer_keys = _quantizer_keys(model)
    assert any("experts.gate_up_proj_weight_quantizers" in k for k in quantizer_keys)
    convert = save_conversion(model, lay, exclude=quantizer_keys)
    assert convert is not None
    meta = {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in lay.items()}
    weights = {k: v for k, v in meta.items() if k not in quantizer_keys}
    assert set(convert(weights)) == _saved_names(kind, tmp_path / "expected")
    quantizers = {k: v for k, v in meta.items() if k in quantizer_keys}
    assert convert(dict(quantizers)) == quantizers  # passed through untouched, never converted


@pytest.mark.parametrize("kind", ["llama_untied", "qwen3_tied"])
def test_conversion_is_none_for_dense_models_and_plain_modules(kind):
    model = _quantized(kind, "int8_wo")
    assert save_conversion(model, oe.layout(model), exclude=_quantizer_keys(model)) is None
    plain = nn.Sequential(nn.Linear(4, 4))
    assert save_conversion(plain, oe.layout(plain)) is None


def test_a_buffer_caught_by_a_converter_pattern_is_not_converted(tmp_path):
    """A toolkit's buffer that nobody told us about (not in ``exclude``) still stays out of the conversion."""
    model = make_model("qwen3_moe")
    for i in range(2):  # 0-dim and 2-D: the two ways transformers <= 5.17 fails on them
        experts = model.model.layers[i].mlp.experts
        experts.register_buffer("gate_up_proj_scale", torch.tensor(0.5))
        experts.register_buffer("down_proj_zero", torch.zeros(4, 2))
    lay = oe.layout(model)
    convert = save_conversion(model, lay)
    meta = {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in lay.items()}
    out = convert(meta)
    buffers = {f"model.layers.{i}.mlp.experts.{b}" for i in range(2) for b in ("gate_up_proj_scale", "down_proj_zero")}
    assert set(out) == _saved_names("qwen3_moe", tmp_path / "expected") | buffers
    report = oe.save_clean(model, tmp_path / "out")
    assert buffers <= set(read_checkpoint(tmp_path / "out")) and report.tensors == len(out)


# ------------------------------------------------------------------------------ exports


# by default the first kind's int8 on every layout and every case disk-offloaded; all of them under -m slow
MOE_EXPORT_CASES = [pytest.param(kind, scheme, method, marks=() if (kind, scheme) == (KINDS[0], "int8_wo")
                                 or method == "disk_offload" else pytest.mark.slow)
                    for kind in KINDS for scheme in ("int8_wo", "fp8") for method in sorted(LAYOUTS)]


@pytest.mark.parametrize("kind, scheme, method", MOE_EXPORT_CASES)
def test_moe_export_equals_modelopts_resident_export(kind, scheme, method, tmp_path):
    """Calibrate resident on the CPU, offload, export: ModelOpt's own export of the resident twin, tensor for tensor."""
    quantized = _quantized(kind, scheme)
    expected = _modelopt_reference(quantized, tmp_path / "modelopt")
    assert set(expected) == _saved_names(kind, tmp_path / "unquantized")
    logits = forward_logits(quantized)
    model, _ = apply_layout_with_artifacts(quantized, LAYOUTS[method], tmp_path / "layout")
    report = oe.save_clean(model, tmp_path / "out", max_shard_size=60_000)
    assert_same_tensors(read_checkpoint(tmp_path / "out"), expected)
    assert any(".experts." in k for k in report.folded)
    assert torch.equal(forward_logits(model), logits)  # the fake-quantized model is untouched
    if scheme == "int8_wo":  # weight-only: the plain reload computes what the fake-quantized model did
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert torch.allclose(forward_logits(reloaded), logits, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_int4_awq_moe_export_reloads_to_the_fake_quantized_model(kind, tmp_path):
    """ModelOpt 0.47's own export fails on fused experts with AWQ (``get_experts_list``: ``no len()``), so the
    reference is the fake-quantized model itself: a plain reload of the export computes the same logits."""
    quantized = _quantized(kind, "int4_awq")
    logits = forward_logits(quantized)
    resident = copy.deepcopy(quantized)
    oe.save_clean(resident, tmp_path / "resident")
    model, _ = apply_layout_with_artifacts(quantized, LAYOUTS["dispatch"], tmp_path / "layout")
    oe.save_clean(model, tmp_path / "out")
    written = read_checkpoint(tmp_path / "out")
    assert set(written) == _saved_names(kind, tmp_path / "unquantized")
    assert_same_tensors(written, read_checkpoint(tmp_path / "resident"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(forward_logits(reloaded), logits, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_nvfp4_moe_plans_on_the_cpu_and_exports_unfolded(kind, tmp_path):
    """NVFP4's fold needs CUDA (benchmarks/gpu_moe_conversion.py checks it against ModelOpt on a GPU); on
    the CPU its 0-dim ``_global_amax`` buffers must still stay out of the conversion."""
    quantized = _quantized(kind, "nvfp4")
    raw = {k: v.clone() for k, v in quantized.state_dict().items()}
    model, _ = apply_layout_with_artifacts(quantized, LAYOUTS["disk_offload"], tmp_path / "layout")
    oe.save_clean(model, tmp_path / "out", fold=False)
    written = read_checkpoint(tmp_path / "out")
    reference = _model(kind)
    reference.load_state_dict({k: v for k, v in raw.items() if k in reference.state_dict()})
    reference.save_pretrained(tmp_path / "expected")
    assert_same_tensors(written, read_checkpoint(tmp_path / "expected"))
