"""A KeyboardInterrupt at any step of quantizers_disabled() and materialized() leaves the model as it was:
every quantizer switched back, every tensor back on meta, every hook offloading again."""

from __future__ import annotations

import pytest
import torch
from layouts import LayoutSpec, draw_offloaded, forward_logits
from torch import nn

import offload_export as oe
from offload_export import _hooks, materialize
from offload_export.adapters.builtin import FakeQuantizer
from offload_export.quantizers import ModuleQuantizerAdapter


class _Interrupt:
    """Wraps ``fn``: its ``at``-th call raises KeyboardInterrupt, before or after doing its work."""

    def __init__(self, fn, at: int, after: bool):
        self.fn, self.at, self.after, self.calls = fn, at, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at and not self.after:
            raise KeyboardInterrupt(f"before call {self.at}")
        out = self.fn(*args, **kwargs)
        if self.calls == self.at:
            raise KeyboardInterrupt(f"after call {self.at}")
        return out


def _quantized():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(4)))
    oe.quantize_weights(model, "int8", skip=())
    model[2].weight_quantizer.enabled = False  # an already disabled one stays disabled
    return model


@pytest.mark.parametrize("step", ["snapshot", "disable", "restore"])
@pytest.mark.parametrize("after", [False, True])
def test_interrupt_in_quantizers_disabled_restores_every_quantizer(step, after, monkeypatch):
    model = _quantized()
    before = [q.enabled for q in model.modules() if isinstance(q, FakeQuantizer)]
    calls = len(before)
    for at in range(1, calls + 1):
        wrapper = _Interrupt(getattr(ModuleQuantizerAdapter, step), at, after)
        monkeypatch.setattr(ModuleQuantizerAdapter, step, lambda self, *a, w=wrapper: w(self, *a))
        with pytest.raises(KeyboardInterrupt):
            with oe.quantizers_disabled(model, "all"):
                pass
        monkeypatch.undo()
        assert [q.enabled for q in model.modules() if isinstance(q, FakeQuantizer)] == before, (step, at)


_POINTS = [("read_store", False), ("read_store", True), ("swap_tensors", True), ("suspend_offload", False),
           ("suspend_offload", True), ("resume_offload", True), ("write_store", False), ("write_store", True),
           ("offloaded_tensors", False)]


def _state(model):
    tensors = {k: (v.device, id(v)) for k, v in model.state_dict(keep_vars=True).items()}
    hooks = {n: [h.offload for h in _hooks.align_hooks(m)] for n, m in model.named_modules()}
    return tensors, hooks


@pytest.mark.parametrize("layout", ["cpu_offload", pytest.param("disk_offload", marks=pytest.mark.slow)])
def test_interrupt_at_every_step_of_materialized_restores_the_model(layout, tmp_path, monkeypatch):
    reference, model = draw_offloaded("llama_untied", LayoutSpec(layout), tmp_path)
    layer = model.model.layers[0].mlp  # 3 tensors: every step of each, a few dozen interruptions
    expected = forward_logits(reference)
    with torch.no_grad():
        reference.model.layers[0].mlp.up_proj.weight.mul_(-1)
    edited = forward_logits(reference)
    covered = 0
    for name, after in _POINTS:
        at = 1
        while True:
            wrapper = _Interrupt(getattr(materialize, name), at, after)
            before = _state(model)  # (accelerate's forward replaces the meta tensors: take it each time)
            monkeypatch.setattr(materialize, name, wrapper)
            try:
                with oe.materialized(layer, writeback=True), torch.no_grad():
                    layer.up_proj.weight.neg_()
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            monkeypatch.undo()
            assert _state(model) == before, (name, after, at)
            assert not (materialize._by_slot or materialize._by_tensor or _hooks._suspended), (name, after, at)
            assert not (materialize._user_blocks or materialize._exports)
            logits = forward_logits(model)
            assert torch.equal(logits, expected) or torch.equal(logits, edited), (name, after, at)
            if torch.equal(logits, edited):  # written back: undo for the next step
                with oe.materialized(layer, writeback=True), torch.no_grad():
                    layer.up_proj.weight.neg_()
            if not interrupted:
                break
            covered += 1
            at += 1
    assert covered > 12
