"""Exceptions from quantizers (toolkit or user code) keep their own type through every entry point, with our
context added as a note; the model, the destination and the offload store are left as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from accelerate import disk_offload
from test_faults import leftovers
from torch import nn

import offload_export as oe


class ToolkitError(Exception):
    """A toolkit's own exception class, which a caller may catch by type."""


class RaisingQuantizer(nn.Module):
    """A weight quantizer whose kernel raises ``self.error`` once armed (forward, or switching it off/on)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("amax", torch.ones(1))
        self._enabled = True
        self.error: BaseException | None = None
        self.raise_on_switch = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self.raise_on_switch and self.error is not None:
            raise self.error
        self._enabled = value

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        return w


oe.register_quantizer(RaisingQuantizer)

ERRORS = {"toolkit": lambda: ToolkitError("kernel launch failed"),
          "oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")}


class FakeQuantLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight_quantizer(self.weight), self.bias)


def _model(offload_dir: Path) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(FakeQuantLinear(16, 16), FakeQuantLinear(16, 16))
    for linear in model:
        linear.weight_quantizer = RaisingQuantizer()
    return disk_offload(model, offload_dir, execution_device=torch.device("cpu"), offload_buffers=True)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _snapshot(model: nn.Module) -> tuple:
    return (repr(oe.layout(model)), [(q.name, q.enabled) for q in oe.find_quantizers(model)])


@pytest.fixture(params=sorted(ERRORS))
def error(request):
    return ERRORS[request.param]


def _arm(model: nn.Module, error, *, on_switch: bool = False) -> RaisingQuantizer:
    q = model[1].weight_quantizer
    q.error, q.raise_on_switch = error(), on_switch
    return q


def _notes(info) -> str:
    return "\n".join(getattr(info.value, "__notes__", ()))


def test_save_clean_keeps_the_quantizer_error_type(tmp_path, error):
    model = _model(tmp_path / "offload")
    before, digest = _snapshot(model), _digest(tmp_path / "offload")
    raised = type(_arm(model, error).error)
    with pytest.raises(raised) as info:
        oe.save_clean(model, tmp_path / "out")
    assert type(info.value) is raised
    assert "folding 1.weight_quantizer into 1.weight on cpu failed" in _notes(info)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert _snapshot(model) == before and _digest(tmp_path / "offload") == digest


def test_verify_keeps_the_quantizer_error_type(tmp_path, error):
    model = _model(tmp_path / "offload")
    oe.save_clean(model, tmp_path / "out")
    before, digest = _snapshot(model), _digest(tmp_path / "out")
    raised = type(_arm(model, error).error)
    with pytest.raises(raised) as info:
        oe.verify(model, tmp_path / "out")
    assert type(info.value) is raised and "1.weight" in _notes(info)
    assert _snapshot(model) == before and _digest(tmp_path / "out") == digest


def test_materialized_lets_a_quantizer_error_through_and_restores(tmp_path, error):
    model = _model(tmp_path / "offload")
    before, digest = _snapshot(model), _digest(tmp_path / "offload")
    raised = type(_arm(model, error).error)
    with pytest.raises(raised) as info:
        with oe.materialized(model, writeback=True):
            model(torch.ones(1, 16))
    assert type(info.value) is raised
    assert all(p.device.type == "meta" for p in model.parameters())
    assert _snapshot(model) == before and _digest(tmp_path / "offload") == digest


def test_quantizers_disabled_when_switching_back_fails(tmp_path, error):
    model = _model(tmp_path / "offload")
    first = model[0].weight_quantizer
    raised = type(error())
    with pytest.raises(raised) as info:
        with oe.quantizers_disabled(model):
            _arm(model, error, on_switch=True)
    assert type(info.value) is raised
    assert "restoring 1.weight_quantizer (" in _notes(info) and "1 of 2 quantizer(s) were restored" in _notes(info)
    assert first.enabled is True  # every other quantizer is restored before the error is raised


def test_quantizers_disabled_when_switching_off_fails(tmp_path, error):
    model = _model(tmp_path / "offload")
    first = model[0].weight_quantizer
    raised = type(_arm(model, error, on_switch=True).error)
    with pytest.raises(raised) as info:
        with oe.quantizers_disabled(model):
            pytest.fail("the block must not run when a quantizer cannot be switched off")
    assert "disabling 1.weight_quantizer" in _notes(info)
    assert first.enabled is True and model[1].weight_quantizer.enabled is True
