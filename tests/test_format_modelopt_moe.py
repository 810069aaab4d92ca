"""save_clean(format="modelopt") of fused MoE experts equals ModelOpt's resident export_hf_checkpoint, byte for byte.

transformers 5 keeps a MoE layer's experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]); ModelOpt quantizes them as ``_QuantFusedExperts`` and its export writes them per expert
(``experts.{e}.gate_proj.weight`` + scales, Mixtral's ``block_sparse_moe.experts.{e}.w1`` ...).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from layouts import LayoutSpec, apply_layout, fixed_input_ids, forward_logits, layout_specs
from memory_child import measure
from test_format_modelopt import (
    SETTINGS,
    assert_a_flipped_bit_falls_back,
    assert_layout_exports_the_reference,
    assert_refused,
    assert_same_checkpoint,
    assert_same_state,
    forward_refused,
    model_state,
    modelopt_export,
    quant_config,
    quantize,
    read_dir,
)
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import offload_export as oe
from offload_export.quiet import quiet_libraries

mtq = pytest.importorskip("modelopt.torch.quantization")

# the ModelOpt configs whose fused-expert export ModelOpt itself completes (AWQ fails in its resmoothing)
CONFIGS = ("FP8_DEFAULT_CFG+FP8_KV_CFG", "INT8_WEIGHT_ONLY_CFG", "INT8_SMOOTHQUANT_CFG", "NVFP4_DEFAULT_CFG")
_COMMON = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
               vocab_size=128, tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.1)


def tiny_moe(kind: str = "qwen3_moe", dtype=torch.bfloat16, seed: int = 0, layers: int = 2):
    """Qwen3-MoE (module names as tests/layouts.py's "qwen3_moe") or Mixtral, ``layers`` layers, 4 experts, dims of
    128."""
    common = {**_COMMON, "num_hidden_layers": layers}
    if kind == "mixtral":
        cfg = MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **common)
    else:
        cfg = Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                             norm_topk_prob=True, **common)
    torch.manual_seed(seed)
    with quiet_libraries():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.config.architectures = [type(model).__name__]
    return model


_REFERENCES: dict[tuple, tuple] = {}


def reference(name: str, root: Path, kind: str = "qwen3_moe"):
    """A quantized resident MoE model and ModelOpt's export of it, built once per (config, kind)."""
    if (name, kind) not in _REFERENCES:
        model = quantize(tiny_moe(kind), name)
        _REFERENCES[name, kind] = (model, modelopt_export(model, root / f"ref-{kind}-{name}"))
    model, out = _REFERENCES[name, kind]
    return copy.deepcopy(model), out


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory):
    return tmp_path_factory.mktemp("modelopt-moe-refs")


MIXED = LayoutSpec("dispatch", placement=(("model.embed_tokens", "cpu"), ("model.layers.0", "disk"),
                                          ("model.layers.1.self_attn", "resident"), ("model.layers.1.mlp.gate", "resident"),
                                          ("model.layers.1.mlp.experts", "disk"), ("model.layers.1.input_layernorm", "cpu"),
                                          ("model.layers.1.post_attention_layernorm", "resident"),
                                          ("model.norm", "cpu"), ("lm_head", "cpu")))


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_experts_of_a_mixed_layout_equal_modelopts_resident_export(name, kind, ref_root, tmp_path, monkeypatch):
    """Per-expert names (Mixtral's hub names w1/w2/w3 under block_sparse_moe, as ModelOpt reverts them; Qwen3-MoE's
    rules rename each to itself), packed tensors, hf_quant_config (its exclude_modules renamed too) and config.json
    equal, ModelOpt's rename rules run on each name once (the plan's names reused by the pack); verify agrees; the
    model is untouched."""
    from modelopt.torch.export import quant_aware_conversion

    renamed, apply = [], quant_aware_conversion.apply_reverse_rules

    def spy(state_dict, splits, renames):
        renamed.extend(state_dict)
        return apply(state_dict, splits, renames)

    model, expected = reference(name, ref_root, kind)
    runs_on_cpu = "NVFP4" not in name  # NVFP4's fake-quant forward needs CUDA
    logits = forward_logits(model) if runs_on_cpu else None
    model = apply_layout(model, MIXED, tmp_path / "layout")
    before = model_state(model)
    monkeypatch.setattr(quant_aware_conversion, "apply_reverse_rules", spy)
    report = oe.save_clean(model, tmp_path / "out", format="modelopt", max_shard_size="200KB")
    monkeypatch.undo()
    assert report.shards > 1
    assert_same_checkpoint(tmp_path / "out", expected)
    written = read_dir(tmp_path / "out")
    assert len(renamed) == len(set(renamed)) == len(written)
    expert = "model.layers.1.block_sparse_moe.experts.3.w2" if kind == "mixtral" else "model.layers.1.mlp.experts.3.down_proj"
    assert f"{expert}.weight" in written and not any("gate_up_proj" in k for k in written)
    assert oe.verify(model, tmp_path / "out", format="modelopt").ok
    assert_same_state(model_state(model), before)
    if runs_on_cpu:
        assert torch.equal(forward_logits(model), logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_fused_experts_offloaded_beside_a_gpu_are_packed_there_and_equal_modelopts_export(name, tmp_path, monkeypatch):
    """Experts calibrated on a GPU, then offloaded to the CPU and to disk with the GPU executing (accelerate's
    ``dispatch_model``): the read-ahead moves each layer's experts there and they are packed a stack at a time (the
    second layer's without ModelOpt's export of one expert), the plan's per-expert templates there too; the
    checkpoint is ModelOpt's resident export byte for byte and the model unchanged."""
    import accelerate

    from offload_export.formats import modelopt as modelopt_format

    devices, template = [], modelopt_format.ModelOptPacker._expert_template

    def spy(self, x, e, one, device):
        devices.append(device.type)
        return template(self, x, e, one, device)

    monkeypatch.setattr(modelopt_format.ModelOptPacker, "_expert_template", spy)

    model = quantize(tiny_moe().cuda(), name)
    expected = modelopt_export(model, tmp_path / "expected")
    device_map = {"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": 0,
                  "model.rotary_emb": 0, "lm_head": 0}
    # from the host, as a checkpoint is loaded: the offloaded weights are then host memory and .dat files
    model = accelerate.dispatch_model(model.cpu(), device_map, main_device=0, offload_dir=str(tmp_path / "offload"))
    before = model_state(model)
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert devices and set(devices) == {"cuda"}
    assert_same_checkpoint(tmp_path / "out", expected)
    assert_same_state(model_state(model), before)


# from_pretrained reloads lose ModelOpt's quantizers; place_submodules cannot place `_global_amax` (see test_export)
reloadless = layout_specs("qwen3_moe").filter(lambda s: s.method not in ("from_pretrained", "place_submodules"))


@pytest.mark.slow
@SETTINGS
@given(st.sampled_from(CONFIGS), reloadless, st.sampled_from(["5GB", "100KB"]))
def test_fused_experts_equal_modelopts_resident_export_on_every_layout(name, spec, shard):
    assert_layout_exports_the_reference(reference(name, Path(tempfile.gettempdir()) / "oe-modelopt-moe-refs"), spec, shard)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_fused_experts_of_a_model_quantized_after_from_pretrained_disk_offload(kind, tmp_path):
    """Experts loaded through transformers' conversion (per-expert hub tensors fused at load) into the
    offload folder, quantized there, exported packed; equal to ModelOpt's export of the same weights kept resident."""
    name = "FP8_DEFAULT_CFG"
    tiny_moe(kind).save_pretrained(tmp_path / "src")
    expected = modelopt_export(quantize(tiny_moe(kind), name), tmp_path / "ref")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with quiet_libraries():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", device_map=device_map, dtype=torch.bfloat16,
                                                     offload_folder=str(tmp_path / "offload"))
    quantize(model, name)
    assert oe.layout(model).summary().get("disk") or oe.layout(model).summary().get("safetensors")
    logits = forward_logits(model)
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)
    assert torch.equal(forward_logits(model), logits)


def _uncalibrate(model) -> None:
    """Experts 1 and 3 (gate_up) and 2 (down) of layer 0 without calibration: amax zero (per tensor) or missing."""
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj_weight_quantizers, experts.down_proj_weight_quantizers
    with torch.no_grad():
        if gate_up[1]._amax.numel() == 1:
            gate_up[1]._amax.zero_()
        else:  # ModelOpt's fallback cannot set a per-tensor amax over a per-channel one: its amax is missing
            delattr(gate_up[1], "_amax")
    delattr(gate_up[3], "_amax")
    delattr(down[2], "_amax")


@pytest.mark.parametrize("name", ["FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_uncalibrated_experts_take_modelopts_amax_fallback(name, tmp_path):
    """Experts no calibration token reached: ModelOpt takes their amax from the weight (gate and up from the fused
    slice, so they share weight_scale_2) and warns; the same here, with one warning naming the experts."""
    model = quantize(tiny_moe(), name)
    _uncalibrate(model)
    expected = modelopt_export(model, tmp_path / "ref")
    model = apply_layout(model, LayoutSpec("disk_offload"), tmp_path / "layout")
    before = model_state(model)
    with pytest.warns(UserWarning, match=r"gate_up_proj: experts \[1, 3\]; down_proj: experts \[2\]"):
        oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)
    assert_same_state(model_state(model), before)


def test_uncalibrated_per_channel_experts_fail_as_modelopt_fails_before_anything_is_written(tmp_path):
    """INT8 (per-channel amax): ModelOpt's fallback gives a per-tensor amax its INT8 packing cannot index;
    its resident export raises IndexError, and so does this one, when planning, with a note."""
    model = quantize(tiny_moe(), "INT8_WEIGHT_ONLY_CFG")
    _uncalibrate(model)
    with pytest.raises(IndexError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modelopt_export(copy.deepcopy(model), tmp_path / "ref")
    out = tmp_path / "x" / "out"
    out.parent.mkdir()
    with pytest.raises(IndexError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oe.save_clean(model, out, format="modelopt")
    assert any("_export_fused_experts failed on expert 1 of model.layers.0.mlp.experts" in n
               for n in getattr(info.value, "__notes__", []))
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("name", ["INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG"])
def test_awq_fused_experts_are_refused_as_modelopt_cannot_export_them(name, tmp_path):
    """ModelOpt 0.47's MoE AWQ resmoothing takes len() of the fused experts module (TypeError): refused up front."""
    model = quantize(tiny_moe(), name)
    with pytest.raises(TypeError, match="has no len"):
        modelopt_export(copy.deepcopy(model), tmp_path / "ref")
    assert_refused(model, tmp_path / "x" / "out", "model.layers.0.mlp", "get_experts_list", "fake-quant")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_peak_memory_of_a_disk_offloaded_moe_export_stays_near_two_fused_expert_weights(name, tmp_path):
    """The 3-D gate_up_proj (32 experts: 128 MiB) is the largest tensor: its unit (gate_up + down) is packed one
    expert at a time, gate_up dropped once packed, so at most ~2 of it are held, never a layer or a shard."""
    result = measure(tmp_path, experts=32, layers=2, modelopt=name, export={"format": "modelopt", "max_shard_size": "100MB"})
    assert result["largest_source"] == 32 * 2048 * 1024 * 2
    assert result["model_bytes"] > 3 * result["largest_source"]
    # 2 x the largest tensor + 64 MiB is the design bound; 16 MiB more for the interpreter's own churn
    assert result["peak_extra"] <= 2 * result["largest_source"] + 80 * 2**20, result
    print(f"peak {result['peak_extra'] / 2**20:.0f} MiB, largest {result['largest_source'] / 2**20:.0f} MiB, "
          f"model {result['model_bytes'] / 2**20:.0f} MiB, written {result['bytes'] / 2**20:.0f} MiB")


def test_a_moe_layer_moved_to_a_gpu_leases_only_its_small_outputs_on_the_host(tmp_path, monkeypatch):
    """Arithmetic only (no GPU): the pack leaves each stack of packed experts where it was made and the writer streams
    the large per-expert tensors from there, so once a layer's experts are on a GPU its host lease is its small
    outputs only (copied to the host together), as an attention projection's is."""
    from offload_export import pipeline
    from offload_export.job import prepare_job

    monkeypatch.setattr(pipeline, "STREAMED", 4096)  # the tiny model's weights count as large
    model = apply_layout(quantize(tiny_moe(), "FP8_DEFAULT_CFG"), LayoutSpec("cpu_offload"), tmp_path / "layout")
    job = prepare_job(model, tmp_path / "out", format="modelopt")
    reader = job.reader()
    experts = [u for u in job.plan.units if u.module.endswith("mlp.experts")]
    projection = next(u for u in job.plan.units if u.module.endswith("self_attn.q_proj"))
    assert len(experts) == 2
    for unit in [*experts, projection]:
        small = sum(spec.nbytes for spec in unit.outputs if spec.nbytes < 4096)  # scales
        assert 0 < reader.onloaded_bytes(unit, unit.sources) == small < reader.held_bytes(unit)


def test_moe_kinds_not_packed_here_are_refused_naming_them(tmp_path):
    """GPT-OSS: ModelOpt exports its BMM-style experts (3-D gate_up_proj + per-tensor scales, no per-expert split);
    that kind is not packed by this export yet: refused before anything is written."""
    from transformers import GptOssConfig

    cfg = GptOssConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention"] * 2, **{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"})
    torch.manual_seed(0)
    with quiet_libraries():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.config.architectures = [type(model).__name__]
    quantize(model, "FP8_DEFAULT_CFG")
    assert_refused(model, tmp_path / "x" / "out", "model.layers.0.mlp (GptOssMLP)", "QuantGptOssExperts",
                   "not supported yet")


def test_experts_left_unquantized_are_written_per_expert_as_modelopt_writes_them(tmp_path):
    """FP8 everywhere but the experts (their quantizers disabled): ModelOpt still splits them per expert, unpacked."""
    cfg = quant_config("FP8_DEFAULT_CFG")
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": "*experts*", "enable": False}]
    model = tiny_moe()
    calib = fixed_input_ids(batch=2, seq=16, seed=7) % model.config.vocab_size
    with quiet_libraries():
        mtq.quantize(model, cfg, lambda m: m(input_ids=calib, use_cache=False))
    expected = modelopt_export(model, tmp_path / "ref")
    assert read_dir(expected)["model.layers.0.mlp.experts.1.up_proj.weight"].dtype == torch.bfloat16
    model = apply_layout(model, LayoutSpec("cpu_offload"), tmp_path / "layout")
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_shared_input_groups_come_from_a_twin_without_running_the_model(kind, tmp_path):
    """The groups ModelOpt's export fuses are found on a data-less twin (fused experts stand in): the model's own
    forward (which would read every offloaded weight) never runs, and they equal those of a forward of the model."""
    from offload_export.formats import _modelopt_replay as replay

    model = quantize(tiny_moe(kind), "NVFP4_DEFAULT_CFG")
    model = apply_layout(model, LayoutSpec("disk_offload"), tmp_path / "layout")
    expected = replay._traced_groups(model, replay._hooked_roles(model), torch.device("cpu"))

    with forward_refused(model):
        groups, norms = replay.shared_input_groups(model, torch.device("cpu"))
    assert (groups, norms) == expected
    assert any(len(g) == 3 for g in groups) and norms  # q/k/v after input_layernorm


def test_a_mixture_of_experts_held_in_memory_takes_its_groups_from_the_twin(ref_root, tmp_path):
    """Nothing on disk, yet the export never runs the model's forward for its groups (it would route through
    every expert): the twin stands in for them, and the export is ModelOpt's byte for byte."""
    model, expected = reference("NVFP4_DEFAULT_CFG", ref_root)
    model = apply_layout(model, LayoutSpec("cpu_offload"), tmp_path / "layout")

    with forward_refused(model):
        oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)


@pytest.mark.parametrize("config", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG+FP8_KV_CFG"])
def test_a_batched_expert_pack_unlike_modelopts_own_falls_back_to_one_expert_at_a_time(monkeypatch, tmp_path, config):
    """NVFP4 and per-tensor FP8 experts are packed a stack at a time with ModelOpt's functions, after packing one
    expert both ways: a stacked pack that differs (here a flipped bit in the packed weights) is caught there, warned
    about, and the experts are packed one at a time: the checkpoint still equals ModelOpt's."""
    model, expected = reference(config, tmp_path)
    assert_a_flipped_bit_falls_back(model, expected, r"packing the experts of model\.layers\.0\.mlp\.experts together "
                                    r"gives model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight unlike", tmp_path / "out",
                                    monkeypatch)


@pytest.mark.parametrize("config", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG+FP8_KV_CFG"])
def test_experts_are_packed_a_stack_at_a_time_but_the_first_of_their_kind_and_the_uncalibrated(
        monkeypatch, ref_root, tmp_path, config):
    """While exporting, ModelOpt's per-expert export runs for the first calibrated expert of the first experts module
    of its kind (packed both ways; the model's experts modules are alike but for their quantizers' amaxes) and for
    each uncalibrated one (its amax comes from its weight); the rest are packed a stack at a time, and the checkpoint
    is ModelOpt's byte for byte (every expert's ``input_scale`` included, made without ModelOpt's export after the
    first module)."""
    from offload_export.formats import modelopt as fmt

    model, expected = reference(config, ref_root)
    expected_calls = []
    for name, module in model.named_modules():
        if hasattr(module, "down_proj_weight_quantizers"):
            lists = [getattr(module, f"{p}_weight_quantizers") for p in ("gate_up_proj", "down_proj")]
            alone = [e for e in range(module.num_experts)
                     if any(getattr(q[e], "_amax", None) is None or not q[e]._amax.any() for q in lists)]
            first = [] if expected_calls else [next(e for e in range(module.num_experts) if e not in alone)]
            expected_calls += [(name, e) for e in sorted({*first, *alone})]
    calls, packing = [], []
    pack_experts, pack_expert = fmt.ModelOptPacker._pack_experts, fmt.ModelOptPacker._pack_expert

    def counted_pack_experts(self, x, *args, **kwargs):
        packing.append(x.name)
        try:
            return pack_experts(self, x, *args, **kwargs)
        finally:
            packing.pop()

    def counted_pack_expert(self, x, e, *args, **kwargs):
        if packing:  # not the plan's templates
            calls.append((x.name, e))
        return pack_expert(self, x, e, *args, **kwargs)

    monkeypatch.setattr(fmt.ModelOptPacker, "_pack_experts", counted_pack_experts)
    monkeypatch.setattr(fmt.ModelOptPacker, "_pack_expert", counted_pack_expert)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*packing the experts")  # no fallback
        oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert sorted(calls) == sorted(expected_calls)
    assert_same_checkpoint(tmp_path / "out", expected)


def test_the_export_leaves_each_quantizers_last_seen_input_dtype_as_it_was(tmp_path):
    """Finding the linears that share an input runs a forward of the model with its quantizers off; a disabled
    ModelOpt quantizer records the dtype it sees (``_input_dtype``, part of its saved state): restored after."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    model, _ = reference("NVFP4_DEFAULT_CFG", tmp_path)
    before = {n: m._input_dtype for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    after = {n: m._input_dtype for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    assert after == before
