"""save_clean(format="modelopt") over real accelerate layouts equals ModelOpt's resident export_hf_checkpoint, byte for byte."""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import LayoutSpec, apply_layout, fixed_input_ids, forward_logits, layout_specs, make_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3Config

import offload_export as oe
from offload_export.quiet import quiet_libraries

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.export import export_hf_checkpoint  # noqa: E402

# CPU-calibratable configs; NVFP4 calibrates on CPU (max), NVFP4-AWQ needs CUDA (benchmarks/gpu_packed_check.py)
CONFIGS = ("INT8_WEIGHT_ONLY_CFG", "INT8_SMOOTHQUANT_CFG", "FP8_DEFAULT_CFG+FP8_KV_CFG", "INT4_AWQ_CFG",
           "W4A8_AWQ_BETA_CFG", "NVFP4_DEFAULT_CFG")
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def tiny_qwen3(dtype=torch.bfloat16, seed: int = 0):
    """Qwen3, 2 layers, every linear input dim a multiple of 128 (ModelOpt packs INT4 by blocks of 128)."""
    cfg = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, vocab_size=128, tie_word_embeddings=True,
                      max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(seed)
    with quiet_libraries():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.config.architectures = [type(model).__name__]
    return model


def quant_config(name: str) -> dict:
    parts = name.split("+")
    cfg = copy.deepcopy(getattr(mtq, parts[0]))
    for extra in parts[1:]:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(getattr(mtq, extra)["quant_cfg"])
    return cfg


def quantize(model, name: str):
    calib = (fixed_input_ids(batch=2, seq=16, seed=7) % model.config.vocab_size).to(model.device)
    with quiet_libraries():
        mtq.quantize(model, quant_config(name), lambda m: m(input_ids=calib, use_cache=False))
    return model


def modelopt_export(model, out: Path) -> Path:
    with quiet_libraries():
        export_hf_checkpoint(copy.deepcopy(model), export_dir=out)
    return out


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                assert k not in tensors, f"{k} written twice"
                tensors[k] = h.get_tensor(k)
    return tensors


def assert_same_checkpoint(actual: Path, expected: Path) -> None:
    a, e = read_dir(actual), read_dir(expected)
    assert sorted(a) == sorted(e)
    for k, v in e.items():
        assert a[k].dtype == v.dtype and a[k].shape == v.shape, (k, a[k].dtype, v.dtype, a[k].shape, v.shape)
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert json.loads((actual / "hf_quant_config.json").read_text()) == \
        json.loads((expected / "hf_quant_config.json").read_text())
    config, reference = (json.loads((d / "config.json").read_text()) for d in (actual, expected))
    assert "auto_map" not in config
    assert config["quantization_config"] == reference["quantization_config"]
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in reference.items() if k != "dtype"}


def model_state(model) -> dict:
    """Layout, every tensor's bytes (onloaded), every quantizer's flags: what must survive the export."""
    lay = oe.layout(model)
    with oe.materialized(model):
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {q.name: [{a: getattr(leaf, a) for a in ("_disabled", "_enable_pre_quant_scale", "_if_calib",
                                                      "_if_quant") if hasattr(leaf, a)}
                      for leaf in (q.handle if isinstance(q.handle, torch.nn.ModuleList) else [q.handle])]
             for q in oe.find_quantizers(model)}
    return {"layout": [(k, i.kind, str(i.device)) for k, i in lay.items()], "tensors": tensors, "flags": flags}


def assert_same_state(after: dict, before: dict) -> None:
    assert after["layout"] == before["layout"] and after["flags"] == before["flags"]
    assert sorted(after["tensors"]) == sorted(before["tensors"])
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


_REFERENCES: dict[str, tuple] = {}


def reference(name: str, tmp_root: Path):
    """A quantized resident model and ModelOpt's export of it, built once per config."""
    if name not in _REFERENCES:
        model = quantize(tiny_qwen3(), name)
        _REFERENCES[name] = (model, modelopt_export(model, tmp_root / f"ref-{name}"))
    model, out = _REFERENCES[name]
    return copy.deepcopy(model), out


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory):
    return tmp_path_factory.mktemp("modelopt-refs")


MIXED = LayoutSpec("dispatch", placement=(("model.embed_tokens", "cpu"), ("model.layers.0", "disk"),
                                          ("model.layers.1.self_attn", "resident"), ("model.layers.1.mlp", "cpu"),
                                          ("model.layers.1.input_layernorm", "disk"),
                                          ("model.layers.1.post_attention_layernorm", "resident"),
                                          ("model.norm", "cpu"), ("lm_head", "cpu")))


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_export_of_a_mixed_layout_equals_modelopts_resident_export(name, ref_root, tmp_path, monkeypatch):
    """Large weights are packed a few rows at a time: forced here (8 KB chunks) so the stitching is checked."""
    from offload_export.formats import modelopt as modelopt_format

    monkeypatch.setattr(modelopt_format, "_ROW_CHUNK_BYTES", {"cpu": 8192})
    model, expected = reference(name, ref_root)
    runs_on_cpu = "NVFP4" not in name  # NVFP4's fake-quant forward needs CUDA
    logits = forward_logits(model) if runs_on_cpu else None
    model = apply_layout(model, MIXED, tmp_path / "layout")
    before = model_state(model)
    report = oe.save_clean(model, tmp_path / "out", format="modelopt", max_shard_size="60KB")
    assert report.format == "modelopt" and report.shards > 1
    assert_same_checkpoint(tmp_path / "out", expected)
    assert not (tmp_path / "out" / "quantizer_state.safetensors").exists()
    assert_same_state(model_state(model), before)
    if runs_on_cpu:
        assert torch.equal(forward_logits(model), logits)


# from_pretrained reloads lose ModelOpt's quantizers; place_submodules cannot place `_global_amax` (see test_export)
reloadless = layout_specs("qwen3_tied").filter(lambda s: s.method not in ("from_pretrained", "place_submodules"))


@pytest.mark.slow
@SETTINGS
@given(st.sampled_from(CONFIGS), reloadless, st.sampled_from(["5GB", "40KB"]))
def test_packed_export_equals_modelopts_resident_export_on_every_layout(name, spec, shard):
    assert_layout_exports_the_reference(reference(name, Path(tempfile.gettempdir()) / "oe-modelopt-refs"), spec, shard)


def assert_layout_exports_the_reference(reference: tuple, spec, shard: str) -> None:
    """``reference`` (a resident quantized model, ModelOpt's export of it) put into the layout ``spec``:
    ``format="modelopt"`` writes the same checkpoint and leaves the model as it was."""
    model, expected = reference
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = apply_layout(model, spec, tmp / "layout")
        before = model_state(model)
        oe.save_clean(model, tmp / "out", format="modelopt", max_shard_size=shard)
        assert_same_checkpoint(tmp / "out", expected)
        assert_same_state(model_state(model), before)


def test_packed_export_of_a_model_quantized_after_from_pretrained_disk_offload(tmp_path):
    """Quantize after from_pretrained(device_map, offload_folder) with weights in the user's safetensors."""
    name = "FP8_DEFAULT_CFG+FP8_KV_CFG"
    source = tiny_qwen3()
    source.save_pretrained(tmp_path / "src")
    expected = modelopt_export(quantize(tiny_qwen3(), name), tmp_path / "ref")  # the same weights, never saved
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with quiet_libraries():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", device_map=device_map, dtype=torch.bfloat16,
                                                     offload_folder=str(tmp_path / "offload"))
    quantize(model, name)
    assert oe.layout(model).summary().get("safetensors")
    logits = forward_logits(model)
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)
    assert torch.equal(forward_logits(model), logits)


def test_awq_resmoothing_is_replayed_without_touching_the_model(ref_root, tmp_path):
    """W4A8 AWQ: q/k/v and gate/up get one pre_quant_scale (weights resmoothed, amax re-collected, max taken)
    and it is folded into the layernorms -- in the export only; every quantizer buffer stays as it was."""
    model, expected = reference("W4A8_AWQ_BETA_CFG", ref_root)
    before = model_state(model)
    fmt = oe.formats.get_format("modelopt")
    job = oe.job.prepare_job(model, tmp_path / "unused", format="modelopt")
    steps = {s.kind for q in job.format.packer.modules.values() for s in q.steps}
    assert {"update_pqs", "weight_amax", "input_amax", "drop_pqs"} <= steps and job.format.packer.norms
    assert isinstance(job.format, fmt)
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)
    written = read_dir(tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj.pre_quant_scale" not in written      # folded into input_layernorm
    assert "model.layers.0.self_attn.o_proj.pre_quant_scale" in written
    assert_same_state(model_state(model), before)


@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "W4A8_AWQ_BETA_CFG"])
def test_units_modelopt_does_not_pack_are_copied_from_their_files(name, ref_root, tmp_path):
    """The embedding and the layernorms are written as they are (file to file, never through a GPU); a layernorm
    that takes the AWQ groups' pre_quant_scale, a packed linear and a tensor the export casts are made."""
    from offload_export._store import FileSpan
    from offload_export.job import prepare_job

    model, expected = reference(name, ref_root)
    model = apply_layout(model, LayoutSpec("disk_offload"), tmp_path / "layout")
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)

    def copied(key: str, **kwargs) -> bool:
        job = prepare_job(model, tmp_path / "unused", format="modelopt", overwrite=True, check_out=False, **kwargs)
        unit = next(u for u in job.plan.units if key in u.sources)
        return isinstance(job.reader().read(unit)[key], FileSpan)

    assert copied("model.embed_tokens.weight") and copied("model.norm.weight")
    assert copied("model.layers.0.input_layernorm.weight") is ("AWQ" not in name)
    assert not copied("model.layers.0.self_attn.q_proj.weight")
    assert not copied("model.embed_tokens.weight", dtype=torch.float16)


# ------------------------------------------------------------------ bad input: one ValueError, nothing written


@contextmanager
def forward_refused(model):
    """A block in which running ``model``'s own forward fails the test."""
    def refuse(*args):
        raise AssertionError("the model's own forward ran")

    handle = model.register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


def assert_refused(model, out: Path, *words: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(ValueError) as info:
        oe.save_clean(model, out, format="modelopt")
    message = str(info.value)
    assert "format='modelopt'" in message, message
    for word in words:
        assert word in message, message
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_model_without_modelopt_quantizers_is_refused(tmp_path):
    assert_refused(tiny_qwen3(), tmp_path / "a" / "out", "no ModelOpt quantizers", "fake-quant")
    builtin = tiny_qwen3()
    oe.quantize_weights(builtin, scheme="int8")
    assert_refused(builtin, tmp_path / "b" / "out", "no ModelOpt quantizers")


class HalvingQuantizer(torch.nn.Module):
    """A user's own weight quantizer (registered below): ModelOpt's export does not know it."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, x):
        return x * 0.5


oe.register_quantizer(HalvingQuantizer)


def test_a_registered_non_modelopt_quantizer_is_refused_naming_its_module(tmp_path):
    model = quantize(tiny_qwen3(), "INT8_WEIGHT_ONLY_CFG")
    model.model.embed_tokens.weight_quantizer = HalvingQuantizer()
    assert_refused(model, tmp_path / "x" / "out", "model.embed_tokens is quantized by", "HalvingQuantizer",
                   "not by NVIDIA ModelOpt", "fake-quant")
    model.model.embed_tokens.weight_quantizer.enabled = False  # a disabled one changes nothing: exported
    oe.save_clean(model, tmp_path / "y" / "out", format="modelopt")


def test_a_weight_modelopt_cannot_pack_is_refused_naming_it(tmp_path):
    model = quantize(make_model("qwen3_tied", dtype=torch.bfloat16), "INT4_AWQ_CFG")  # input dims 64 and 96
    assert_refused(model, tmp_path / "x" / "out", "model.layers.0.self_attn.q_proj.weight", "block size 128")


def test_linears_reading_one_input_but_quantized_differently_are_refused(tmp_path):
    """ModelOpt's export asserts one format per shared-input group (q/k/v here): k_proj in FP8, the rest NVFP4."""
    cfg = quant_config("NVFP4_DEFAULT_CFG")
    fp8 = {"num_bits": (4, 3), "axis": None}
    cfg["quant_cfg"] += [{"quantizer_name": f"*k_proj*{role}_quantizer", "cfg": fp8} for role in ("weight", "input")]
    model = tiny_qwen3()
    calib = (fixed_input_ids(batch=2, seq=16, seed=7) % model.config.vocab_size)
    with quiet_libraries():
        mtq.quantize(model, cfg, lambda m: m(input_ids=calib, use_cache=False))
    assert_refused(model, tmp_path / "x" / "out", "model.layers.0.self_attn.k_proj", "quantized differently")


def test_a_failure_part_way_leaves_nothing_and_the_model_as_it_was(ref_root, tmp_path, monkeypatch):
    from offload_export.formats.modelopt import ModelOptPacker

    model, _ = reference("INT8_SMOOTHQUANT_CFG", ref_root)
    model = apply_layout(model, MIXED, tmp_path / "layout")
    before = model_state(model)
    logits = forward_logits(model)
    calls, pack = [], ModelOptPacker.pack

    def failing_pack(self, module, *args, **kwargs):
        calls.append(module)
        if len(calls) == 6:
            raise OSError("disk went away")
        return pack(self, module, *args, **kwargs)

    monkeypatch.setattr(ModelOptPacker, "pack", failing_pack)
    out = tmp_path / "x" / "out"
    out.parent.mkdir()
    with pytest.raises(OSError, match="disk went away") as info:
        oe.save_clean(model, out, format="modelopt", max_shard_size="20KB")
    assert any("packing" in note for note in getattr(info.value, "__notes__", []))
    assert list(out.parent.iterdir()) == []
    assert_same_state(model_state(model), before)
    assert torch.equal(forward_logits(model), logits)


def test_a_shadow_shares_python_attributes_only_while_its_steps_set_amaxes():
    """A group's max amaxes edit a copy that shares the model's calibrators (its buffers are its own); the first other
    step makes a full copy with the earlier steps replayed. The model never changes."""
    from offload_export.formats._modelopt_replay import Step, clone_module
    from offload_export.formats.modelopt import _Quantized

    model = quantize(tiny_qwen3(), "NVFP4_DEFAULT_CFG")
    name = "model.layers.0.self_attn.q_proj"
    linear = model.get_submodule(name)
    before = model_state(model)
    q = _Quantized(name, "nvfp4", clone_module(linear, read_only=True))
    amax, weight_amax = linear.input_quantizer.amax.clone(), linear.weight_quantizer.amax.clone()
    q.apply(Step("input_amax", amax * 2))
    q.apply(Step("weight_amax", weight_amax * 3))
    light = q.shadow
    assert light.input_quantizer._calibrator is linear.input_quantizer._calibrator
    assert torch.equal(light.input_quantizer.amax, amax * 2) and torch.equal(light.weight_quantizer.amax, weight_amax * 3)
    assert torch.equal(q.pristine.input_quantizer.amax, amax)
    q.apply(Step("drop_pqs"))
    full = q.shadow
    assert full is not light and full.input_quantizer._calibrator is not linear.input_quantizer._calibrator
    assert torch.equal(full.input_quantizer.amax, amax * 2) and torch.equal(full.weight_quantizer.amax, weight_amax * 3)
    assert full.fused_with_prequant and [s.kind for s in q.steps] == ["input_amax", "weight_amax", "drop_pqs"]
    assert not getattr(linear, "fused_with_prequant", False)
    assert_same_state(model_state(model), before)


@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "W4A8_AWQ_BETA_CFG"])
def test_groups_found_on_the_twin_give_modelopts_export_without_running_the_model(name, ref_root, tmp_path):
    """With the shared-input groups from the twin that reads no weight, the export is ModelOpt's byte for byte,
    resmoothing and layernorm fusion included, and the model's forward never runs."""
    model, expected = reference(name, ref_root)
    model = apply_layout(model, MIXED, tmp_path / "layout")

    with forward_refused(model):
        oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)


def _undefined_cases():
    def item(w, d):
        return (w * 2).sum().item()

    def branch(w, d):
        return bool((w > 0).any())

    def nonzero(w, d):
        return torch.nonzero(w + 1)

    def equal(w, d):
        return torch.equal(w, d)

    def through_a_view(w, d):
        d.view(-1)[:2].copy_(w.view(-1)[:2])  # undefined values written into d through a view of it
        return d.sum().item()

    def unfilled(w, d):
        return torch.empty(3).sum().item()

    def indexed_by(w, d):
        return d[w.long()]

    return [item, branch, nonzero, equal, through_a_view, unfilled, indexed_by]


@pytest.mark.parametrize("case", _undefined_cases(), ids=lambda f: f.__name__)
def test_the_twin_refuses_any_result_that_depends_on_undefined_values(case):
    """The twin's forward reads no weight: an op whose Python value or result shape depends on one (or on anything
    made of one, or on unfilled memory) raises, so that no branch is taken on garbage."""
    from offload_export.formats._modelopt_replay import _UndefinedValues, _ValueDependent

    w, d = torch.empty(2, 3), torch.zeros(2, 3)
    with _UndefinedValues([w]), pytest.raises(_ValueDependent):
        case(w, d)


def test_the_twin_computes_values_made_of_defined_tensors():
    """Values made of the input alone (positions, masks) are real in the twin, as in the model's forward."""
    from offload_export.formats._modelopt_replay import _UndefinedValues

    w, ids = torch.empty(4, 3), torch.ones(1, 2, dtype=torch.long)
    with _UndefinedValues([w]):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        assert bool((positions[:, -1] == 1).all()) and torch.equal(ids, torch.ones_like(ids))
        assert (w[ids] + positions.unsqueeze(-1)).shape == (1, 2, 3)


def test_groups_of_a_forward_that_branches_on_a_weight_come_from_the_model_itself(tmp_path, monkeypatch):
    """A module whose forward branches on its weight's values cannot run on the twin: the groups then come from the
    model's own forward, and equal those of a model without the branch."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from offload_export.formats import _modelopt_replay as replay

    class BranchingRMSNorm(Qwen3RMSNorm):
        def forward(self, hidden_states):
            out = super().forward(hidden_states)
            return out if bool((self.weight != 0).any()) else out * 0

    model = quantize(tiny_qwen3(), "NVFP4_DEFAULT_CFG")
    expected = replay.shared_input_groups(model, torch.device("cpu"))
    norm = model.model.layers[1].input_layernorm
    norm.__class__ = BranchingRMSNorm
    traced, trace = [], replay._traced_groups
    monkeypatch.setattr(replay, "_traced_groups", lambda m, *a: (traced.append(m), trace(m, *a))[1])
    assert replay.shared_input_groups(model, torch.device("cpu")) == expected
    assert len(traced) == 2 and traced[0] is not model and traced[1] is model  # the twin failed, then the model


def test_an_offloaded_model_whose_twin_cannot_run_exports_with_the_groups_of_its_own_forward(ref_root, tmp_path,
                                                                                             monkeypatch):
    """The twin fails (a layernorm branches on its weight's values), so the first quantized pack runs the offloaded
    model's own forward through its hooks: the checkpoint is still ModelOpt's and the model as it was."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from offload_export.formats import _modelopt_replay as replay

    class BranchingRMSNorm(Qwen3RMSNorm):
        def forward(self, hidden_states):
            out = super().forward(hidden_states)
            return out if bool((self.weight != 0).any()) else out * 0

    model, expected = reference("NVFP4_DEFAULT_CFG", ref_root)
    model = apply_layout(model, MIXED, tmp_path / "layout")
    model.model.layers[1].input_layernorm.__class__ = BranchingRMSNorm
    traced, trace = [], replay._traced_groups
    monkeypatch.setattr(replay, "_traced_groups", lambda m, *a: (traced.append(m), trace(m, *a))[1])
    before = model_state(model)
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert [m is model for m in traced] == [False, True]
    assert_same_checkpoint(tmp_path / "out", expected)
    assert_same_state(model_state(model), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_quantizer_state_on_a_gpu_is_snapshotted_to_the_host_and_the_export_is_modelopts(name, tmp_path):
    """Quantizer state kept on a GPU (buffers and the calibrators' running amax) is copied to the host together
    when the packer snapshots it; the export is still ModelOpt's byte for byte and the model unchanged."""
    from offload_export.formats.modelopt import ModelOptPacker

    model = quantize(tiny_qwen3().cuda(), name)
    expected = modelopt_export(model, tmp_path / "expected")
    before = model_state(model)
    packer = ModelOptPacker(model, quantizers=oe.find_quantizers(model), read=None, refs={})
    for q in packer.modules.values():
        original = model.get_submodule(q.name)
        for key, t in q.pristine.named_buffers():
            assert t.device.type == "cpu" and torch.equal(t, original.get_buffer(key).cpu()), (q.name, key)
        calibrators = [m._calibrator for m in q.pristine.modules() if getattr(m, "_calibrator", None) is not None]
        assert all(c._calib_amax is None or c._calib_amax.device.type == "cpu" for c in calibrators), q.name
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", expected)
    assert_same_state(model_state(model), before)


@pytest.mark.parametrize("name, before_groups", [
    ("NVFP4_DEFAULT_CFG", ["model.embed_tokens", "model.layers.1.post_attention_layernorm", "model.norm",
                           "model.layers.0.self_attn.q_proj"]),
    ("W4A8_AWQ_BETA_CFG", []),
])
def test_the_groups_are_found_by_the_first_quantized_pack_unless_a_pre_quant_scale_is_resmoothed(
        name, before_groups, ref_root, tmp_path, monkeypatch):
    """NVFP4 (no ``pre_quant_scale``: the groups set amax values only, no planned shape): the groups are found by
    the first quantized module's pack, so the units made before it (the embedding, then the norms after the last
    quantized module: :func:`~offload_export.checkpoint.write_order`) are written meanwhile. AWQ folds
    ``pre_quant_scale`` away (a planned output less): its groups come before anything. Either way, once, and the
    checkpoint is ModelOpt's."""
    from offload_export.formats import modelopt as modelopt_format

    model, expected = reference(name, ref_root)
    model = apply_layout(model, MIXED, tmp_path / "layout")
    calls, pack, find = [], modelopt_format.ModelOptPacker.pack, modelopt_format.shared_input_groups
    monkeypatch.setattr(modelopt_format.ModelOptPacker, "pack",
                        lambda self, module, *a, **k: (calls.append(module), pack(self, module, *a, **k))[1])
    monkeypatch.setattr(modelopt_format, "shared_input_groups",
                        lambda *a, **k: (calls.append("groups"), find(*a, **k))[1])
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert calls.count("groups") == 1
    assert calls[:calls.index("groups")] == before_groups
    assert_same_checkpoint(tmp_path / "out", expected)


@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG+FP8_KV_CFG"])
def test_linears_are_packed_directly_but_the_first_of_each_kind(name, ref_root, tmp_path, monkeypatch):
    """NVFP4 and per-tensor FP8 linears are packed with ModelOpt's functions directly; ModelOpt's export handler runs
    only for the first linear of each kind (weight shape, quantizer properties), packed both ways, and the
    checkpoint is ModelOpt's byte for byte, with no warning of a fallback."""
    from offload_export.formats import modelopt as modelopt_format

    model, expected = reference(name, ref_root)
    model = apply_layout(model, MIXED, tmp_path / "layout")
    linears = {n: m for n, m in model.named_modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.is_enabled}
    handled, export_copy = [], modelopt_format._export_copy
    monkeypatch.setattr(modelopt_format, "_export_copy",
                        lambda work, module, *a: (handled.append(module), export_copy(work, module, *a))[1])
    batches, direct_scalars = [], modelopt_format._direct_scalars
    monkeypatch.setattr(modelopt_format, "_direct_scalars",
                        lambda members, device: (batches.append([m.name for m in members]),
                                                 direct_scalars(members, device))[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*directly gives")
        oe.save_clean(model, tmp_path / "out", format="modelopt")
    kinds = {}
    for n, m in linears.items():
        kinds.setdefault(tuple(oe.layout(m)["weight"].shape), n)
    assert sorted(handled) == sorted(kinds.values())
    # the per-tensor scales of all linears alike are made by one call (ModelOpt's checks of them read them back)
    assert sorted(n for batch in batches for n in batch) == sorted(linears) and len(batches) < len(linears) / 2, batches
    assert_same_checkpoint(tmp_path / "out", expected)


def assert_a_flipped_bit_falls_back(model, expected: Path, warning: str, out: Path, monkeypatch) -> None:
    """With the direct and stacked packs' weight packing (ModelOpt's numerics, recomputed; ModelOpt's export handler
    does not call it) flipping a bit of what it returns, the export warns (``warning``, a regex) and still writes
    ModelOpt's checkpoint."""
    from offload_export.formats import modelopt as fmt

    real = fmt._pack_weight

    def off_by_one_bit(*args, **kwargs):
        packed, made = real(*args, **kwargs)
        return (packed.view(torch.uint8) ^ 1).view(packed.dtype), made

    monkeypatch.setattr(fmt, "_pack_weight", off_by_one_bit)
    with pytest.warns(UserWarning, match=warning):
        oe.save_clean(model, out, format="modelopt")
    assert_same_checkpoint(out, expected)


@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG+FP8_KV_CFG"])
def test_a_direct_pack_unlike_modelopts_export_falls_back_to_its_handler(name, ref_root, tmp_path, monkeypatch):
    """A linear packed directly is checked against ModelOpt's export handler for the first of its kind: a
    difference (here a flipped bit in the packed weight) is warned about, and that kind is packed by the handler:
    the checkpoint is ModelOpt's."""
    model, expected = reference(name, ref_root)
    assert_a_flipped_bit_falls_back(model, expected, r"packing model\.layers\.0\.self_attn\.q_proj directly gives "
                                    r"model\.layers\.0\.self_attn\.q_proj\.weight unlike", tmp_path / "out", monkeypatch)


def test_verify_checks_hf_quant_config_with_types_and_as_loaders_read_it(tmp_path):
    model = quantize(tiny_qwen3(), "FP8_DEFAULT_CFG")
    out = tmp_path / "out"
    oe.save_clean(model, out, format="modelopt")
    assert oe.verify(model, out, format="modelopt").ok
    data = json.loads((out / "hf_quant_config.json").read_text())
    data["quantization"]["exclude_modules"] = "lm_head"  # a string where loaders iterate module names
    (out / "hf_quant_config.json").write_text(json.dumps(data))
    mismatches = oe.verify(model, out, format="modelopt").mismatches
    assert "hf_quant_config.json: quantization.exclude_modules is not a list of module names" in mismatches
    assert any(m.startswith("hf_quant_config.json: 'quantization' is ") for m in mismatches), mismatches


@pytest.mark.parametrize("edit", ["input quantizer off", "input amax per channel"])
def test_linears_alike_but_for_their_quantizers_are_planned_apart(edit, tmp_path):
    """The plan shares the packed weight and scales it computed for one linear with every other of the same format,
    weight shape and quantizer kind; two down_proj of one shape whose input quantizers differ (one disabled: no
    input_scale; one with a per-channel amax: an input_scale of that shape) get their own, ModelOpt's."""
    model = quantize(tiny_qwen3(), "NVFP4_DEFAULT_CFG")
    iq = model.model.layers[0].mlp.down_proj.input_quantizer
    if edit == "input quantizer off":
        iq.disable()
    else:
        iq._buffers["_amax"] = iq.amax.expand(model.config.intermediate_size).clone()  # ModelOpt refuses a reshape
    expected = read_dir(modelopt_export(model, tmp_path / "ref"))
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert_same_checkpoint(tmp_path / "out", tmp_path / "ref")
    scales = [expected.get(f"model.layers.{i}.mlp.down_proj.input_scale") for i in (0, 1)]
    assert scales[1].shape == ()
    assert scales[0] is None if edit == "input quantizer off" else scales[0].shape == (model.config.intermediate_size,)
