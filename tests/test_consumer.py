"""No silent wrong result: inputs the export cannot express are refused before anything is written, and what
it writes loads in the consumers (transformers, compressed-tensors) as the model computes it."""

from __future__ import annotations

import io

import pytest
import torch
from test_bad_inputs import assert_nothing_written, two_linears
from torch import nn

import offload_export as oe


@pytest.mark.parametrize("dtype", [torch.int8, "int8", torch.uint8, torch.bool, "torch.int32", torch.int64])
def test_a_non_floating_dtype_is_refused(tmp_path, dtype):
    with pytest.raises(ValueError, match="is not a floating-point dtype"):
        oe.save_clean(two_linears(), tmp_path / "out", dtype=dtype)
    assert_nothing_written(tmp_path, tmp_path / "out")


class _WithExtraState(nn.Linear):
    def __init__(self, extra):
        super().__init__(4, 4)
        self.extra = extra

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


def test_layout_lists_extra_state_and_the_export_refuses_an_object(tmp_path):
    model = nn.Sequential(_WithExtraState({"step": 3}), nn.Linear(4, 4))
    lay = oe.layout(model)
    assert lay.opaque == {"0._extra_state": "dict"} and "0.weight" in lay
    with pytest.raises(ValueError, match=r"0\._extra_state is a dict \(the extra state of module '0'"):
        oe.save_clean(model, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_tensor_extra_state_is_exported_and_verified(tmp_path):
    model = nn.Sequential(_WithExtraState(torch.arange(3.0)), nn.Linear(4, 4))
    oe.save_clean(model, tmp_path / "out")
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["0._extra_state"], torch.arange(3.0))
    assert oe.verify(model, tmp_path / "out").ok


def test_verify_checks_the_vllm_fq_state(tmp_path):
    from layouts import fixed_input_ids, make_model
    from test_export import _int8

    model = _int8(make_model("llama_untied"), fixed_input_ids(seed=7))
    out = tmp_path / "out"
    oe.save_clean(model, out, vllm_fq_state=True)
    assert oe.verify(model, out).ok
    state = out / "vllm_fq_modelopt_state.pth"
    good = state.read_bytes()
    state.write_bytes(b"garbage")
    report = oe.verify(model, out)
    assert any(m.startswith("vllm_fq_modelopt_state.pth: does not load with torch.load(weights_only=True)")
               for m in report.mismatches), report
    loaded = torch.load(io.BytesIO(good), weights_only=True)
    loaded["modelopt_state_weights"] = {}
    torch.save(loaded, state)
    report = oe.verify(model, out)
    assert any(m.startswith("vllm_fq_modelopt_state.pth: differs from what the model gives at ['modelopt_state_weights']")
               for m in report.mismatches), report


# ---------------------------------------------------------------- verify's second opinion


def test_a_systematic_fold_error_is_caught_by_the_quantizers_own_forward(tmp_path, monkeypatch):
    """An export path that folds wrongly reproduces its own error; the quantizer's forward does not."""
    from layouts import make_model

    from offload_export.quantizers import ModuleQuantizerAdapter

    model = make_model("llama_untied")
    n = oe.quantize_weights(model, "int8")
    monkeypatch.setattr(ModuleQuantizerAdapter, "fold", lambda self, q, weight: weight.clone())  # forgets to quantize
    oe.save_clean(model, tmp_path / "out")
    sampled = oe.verify(model, tmp_path / "out")
    assert sampled.forward_checked == 3 and len(sampled.mismatches) == 3, sampled
    assert all("differ from its quantizer's own forward" in m for m in sampled.mismatches), sampled
    thorough = oe.verify(model, tmp_path / "out", thorough=True)
    assert thorough.forward_checked == n and len(thorough.mismatches) == n, thorough
    monkeypatch.undo()
    assert oe.verify(model, tmp_path / "out", thorough=True).forward_checked == n


def test_a_tie_whose_sides_differ_in_the_model_is_reported(tmp_path):
    from layouts import LayoutSpec, apply_layout, make_model

    from offload_export._store import write_store

    model = apply_layout(make_model("qwen3_tied"), LayoutSpec("cpu_offload"), tmp_path / "layout")
    lay = oe.layout(model)
    assert lay["lm_head.weight"].kind == "tied"
    store = lay["lm_head.weight"].ref.store
    write_store(store, torch.zeros(lay["lm_head.weight"].shape))  # one side of the tie changed, as a writeback can
    oe.save_clean(model, tmp_path / "out")
    report = oe.verify(model, tmp_path / "out")
    assert any(m.startswith("lm_head.weight: tied to model.embed_tokens.weight (written once), but the model holds")
               for m in report.mismatches), report


def test_files_the_consumers_refuse_are_reported_by_them(tmp_path):
    import json

    from layouts import make_model

    model = make_model("llama_untied")
    oe.save_clean(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["model_type"] = "no-such-model"
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    report = oe.verify(model, tmp_path / "out")
    assert any(m.startswith("config.json: transformers cannot load it") for m in report.mismatches), report


# ---------------------------------------------------------------- transforms a fake-quant checkpoint cannot hold


def test_a_compressed_tensors_rotation_is_refused_by_the_fake_quant_export(tmp_path):
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme, apply_transform_config

    model = two_linears()
    scheme = TransformScheme(type="hadamard", apply=[TransformArgs(targets=["Linear"], location="input"),
                                                     TransformArgs(targets=["Linear"], location="weight_input",
                                                                   inverse=True)])
    apply_transform_config(model, TransformConfig(config_groups={"quip": scheme}))
    with pytest.raises(ValueError, match=r"format='fake-quant': the forward of 0 applies a compressed-tensors "
                                         r"transform"):
        oe.save_clean(model, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_modelopt_rotation_is_refused_by_the_fake_quant_export(tmp_path):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from layouts import fixed_input_ids, make_model

    model = make_model("llama_untied")
    ids = fixed_input_ids()
    mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG, lambda m: m(input_ids=ids, use_cache=False))
    # rotate=True (a Hadamard rotation in the quantizer's forward) needs CUDA kernels to calibrate: set it after
    model.model.layers[0].self_attn.q_proj.weight_quantizer._rotate = True
    with pytest.raises(ValueError, match=r"applies a ModelOpt quantizer that rotates its tensor \(model\.layers\.0\."):
        oe.save_clean(model, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")
