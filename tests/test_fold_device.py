"""Quantizer state resident on another device than the fold / block device is moved there for the block and put
back afterwards (ModelOpt leaves ``_amax`` on the CPU after calibrating a model offloaded to a GPU)."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import offload_export as oe


class DeviceCheckingQuantizer(nn.Module):
    """Scales by ``1 + amax`` and insists, as CUDA-only kernels do, that its state is on the input's device."""

    def __init__(self, rows: int):
        super().__init__()
        self.register_buffer("amax", torch.linspace(0.5, 1.5, rows)[:, None])
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.amax.device != w.device:
            raise AssertionError(f"amax must be on {w.device} (is on {self.amax.device})")
        return w * (1 + self.amax)


oe.register_quantizer(DeviceCheckingQuantizer)


class QuantLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def _model(execution_device: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(16, 8), QuantLinear(8, 4))
    for linear in model:
        linear.weight_quantizer = DeviceCheckingQuantizer(linear.out_features)
    model = cpu_offload(model, execution_device=torch.device(execution_device))
    for linear in model:  # the weights are offloaded; the quantizers' state on the CPU, as calibration leaves it
        linear.weight_quantizer.amax = linear.weight_quantizer.amax.cpu()
        assert linear.weight.device.type == "meta" and linear.weight_quantizer.amax.device.type == "cpu"
    return model


def test_same_device_leaves_the_state_alone():
    model = _model("cpu")
    amax = model[0].weight_quantizer.amax
    with oe.materialized(model, device="cpu"):
        assert model[0].weight_quantizer.amax is amax and amax.device.type == "cpu"
        assert model(torch.ones(2, 16)).shape == (2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_state_on_the_cpu_is_moved_to_the_fold_and_block_device_and_put_back(tmp_path):
    model = _model("cuda")
    x = torch.ones(2, 16, device="cuda")
    with pytest.raises(AssertionError, match="amax must be on"):
        model(x)
    amax = [linear.weight_quantizer.amax for linear in model]
    with oe.materialized(model, device="cuda"):
        assert all(a.device.type == "cuda" for a in amax)
        out = model(x)
        model[1].weight_quantizer.amax.mul_(2)  # a calibration inside the block is kept
    assert all(linear.weight_quantizer.amax is a and a.device.type == "cpu" for linear, a in zip(model, amax))
    assert torch.equal(amax[1], torch.linspace(0.5, 1.5, 4)[:, None] * 2)
    with oe.materialized(model):
        expected = (model[0].weight.detach().cpu() * (1 + amax[0]))
    oe.save_clean(model, tmp_path / "out", device="cuda")
    assert all(linear.weight_quantizer.amax.device.type == "cpu" for linear in model)
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["0.weight"], expected)
    assert out.shape == (2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_state_split_between_cuda_and_the_cpu_folds_on_cuda(tmp_path):
    model = _model("cuda")
    for linear in model:
        linear.weight_quantizer.register_buffer("scale_2", torch.ones((), device="cuda"))
    oe.save_clean(model, tmp_path / "out")  # without device=: the fold runs where part of the state is
    assert all(linear.weight_quantizer.amax.device.type == "cpu" for linear in model)
