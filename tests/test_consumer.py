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
