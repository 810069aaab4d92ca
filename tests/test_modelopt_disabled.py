"""quantizers_disabled() on ModelOpt SmoothQuant / AWQ models: each ``which`` equals ModelOpt's own
``disable_quantizer`` with the matching wildcard, and ``"all"`` gives the unquantized model."""

from __future__ import annotations

import copy

import pytest
import torch
from layouts import forward_logits
from test_format_modelopt import quantize, tiny_qwen3

import offload_export as oe

mtq = pytest.importorskip("modelopt.torch.quantization")

_WILDCARD = {"all": "*", "weight": "*weight_quantizer", "input": "*input_quantizer"}


@pytest.mark.parametrize("config", ["INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG"])
def test_each_which_equals_modelopts_disable_quantizer(config):
    plain_model = tiny_qwen3(torch.float32)
    plain = forward_logits(plain_model)
    model = quantize(copy.deepcopy(plain_model), config)
    quantized = forward_logits(model)
    assert (quantized - plain).abs().max() > 0.1
    for which, wildcard in _WILDCARD.items():
        with oe.quantizers_disabled(model, which):
            ours = forward_logits(model)
        reference = copy.deepcopy(model)
        mtq.disable_quantizer(reference, wildcard)
        assert torch.equal(ours, forward_logits(reference)), which
        if which == "all":
            assert (ours - plain).abs().max() < 1e-4  # the pre_quant_scale / weight-scale pair, rounded
    assert torch.equal(forward_logits(model), quantized)  # every flag restored
