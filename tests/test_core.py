"""layout(), materialized() and quantizers_disabled() over real accelerate layouts drawn by hypothesis."""

from __future__ import annotations

import copy
import hashlib
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import (MODEL_KINDS, LayoutSpec, apply_layout_with_artifacts, draw_offloaded, fixed_input_ids,
                     forward_logits, layout_specs, make_model)

import offload_export as oe

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
kinds_and_specs = st.sampled_from(MODEL_KINDS).flatmap(lambda k: st.tuples(st.just(k), layout_specs(k)))


def _snapshot(model):
    """Everything materialized() must restore: tensor objects, devices, meta-ness, hook offload flags."""
    tensors = {k: (id(v), v.device, v.dtype, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()}
    hooks = {name: [h.offload for h in oe._hooks.align_hooks(m)] for name, m in model.named_modules()}
    return tensors, hooks


def _hash_tree(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@SETTINGS
@given(kinds_and_specs)
def test_layout_reports_every_key_where_it_lives(kind_spec):
    kind, spec = kind_spec
    with tempfile.TemporaryDirectory() as tmp:
        reference, model = draw_offloaded(kind, spec, tmp)
        lay = oe.layout(model)
        assert list(lay) == list(model.state_dict())
        for key, info in lay.items():
            meta = info.tensor.device.type == "meta"
            assert info.kind != "missing", key
            if info.kind == "resident":
                assert not meta, key
            if info.offloaded:
                assert info.ref is not None and info.device.type == "cpu", key
            assert info.shape == tuple(reference.state_dict()[key].shape), key
        assert spec.offloads_something == any(i.offloaded for i in lay.values())
        if kind == "qwen3_tied":
            assert lay["lm_head.weight"].kind == "tied"
            assert lay["lm_head.weight"].tied_to == "model.embed_tokens.weight"
        assert "entries" in repr(lay)


@SETTINGS
@given(kinds_and_specs)
def test_materialized_values_forward_and_restore(kind_spec):
    kind, spec = kind_spec
    with tempfile.TemporaryDirectory() as tmp:
        reference, model = draw_offloaded(kind, spec, tmp)
        expected = forward_logits(reference)
        ref_sd = reference.state_dict()
        before = _snapshot(model)
        with oe.materialized(model) as m:
            assert m is model
            for key, value in model.state_dict().items():
                assert value.device.type != "meta", key
                assert torch.equal(value, ref_sd[key]), key
            assert torch.equal(forward_logits(model), expected)
            for key, value in model.state_dict().items():  # the forward did not re-offload
                assert value.device.type != "meta", key
        assert _snapshot(model) == before
        assert torch.equal(forward_logits(model), expected)


@SETTINGS
@given(kinds_and_specs, st.sampled_from([KeyboardInterrupt, ValueError]))
def test_materialized_restores_on_exception_and_nests(kind_spec, exc):
    kind, spec = kind_spec
    with tempfile.TemporaryDirectory() as tmp:
        reference, model = draw_offloaded(kind, spec, tmp)
        before = _snapshot(model)
        layer = model.model.layers[0]
        with pytest.raises(exc):
            with oe.materialized(model):
                with oe.materialized(layer):
                    pass
                # the inner exit must not re-offload what the outer context holds
                assert all(v.device.type != "meta" for v in layer.state_dict().values())
                raise exc()
        assert _snapshot(model) == before
        assert torch.equal(forward_logits(model), forward_logits(reference))


@SETTINGS
@given(kinds_and_specs)
def test_writeback_round_trips_and_never_touches_the_source(kind_spec):
    kind, spec = kind_spec
    with tempfile.TemporaryDirectory() as tmp:
        reference = make_model(kind)
        model, art = apply_layout_with_artifacts(make_model(kind), spec, tmp)
        source = _hash_tree(art.source_dir)
        target = model.model.layers[-1].mlp
        name = next(k for k, _ in target.named_parameters())
        with oe.materialized(target, writeback=True):
            edited = target.get_parameter(name)
            with torch.no_grad():
                edited.mul_(2)
            expected = edited.detach().clone()
        with oe.materialized(target):
            assert torch.equal(target.get_parameter(name), expected)
        if target.get_parameter(name).device.type == "meta":  # offloaded: without writeback, edits are discarded
            with oe.materialized(target):
                with torch.no_grad():
                    target.get_parameter(name).add_(1)
            with oe.materialized(target):
                assert torch.equal(target.get_parameter(name), expected)
        assert _hash_tree(art.source_dir) == source
        assert not torch.equal(forward_logits(model), forward_logits(reference))  # the edit is live


def test_materialized_onloads_only_the_submodule(tmp_path):
    model, _ = apply_layout_with_artifacts(make_model("llama_untied"), LayoutSpec("disk_offload"), tmp_path)
    layer = model.model.layers[1]
    with oe.materialized(layer):
        assert all(v.device.type != "meta" for v in layer.state_dict().values())
        others = [v for k, v in model.state_dict().items() if not k.startswith("model.layers.1.")]
        assert all(v.device.type == "meta" for v in others)


def _modelopt_int8(model, calib):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    return mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG, lambda m: m(input_ids=calib, use_cache=False))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_quantizers_disabled_gives_unquantized_forward_and_restores_each_state(kind, tmp_path):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    calib = fixed_input_ids(seed=7)
    plain = make_model(kind)
    model = _modelopt_int8(make_model(kind), calib)
    # ModelOpt's own switch-off: its fused-experts module differs from the plain one by float rounding
    unquantized = copy.deepcopy(model)
    mtq.disable_quantizer(unquantized, "*weight_quantizer*")
    if kind != "qwen3_moe":
        assert torch.equal(forward_logits(unquantized), forward_logits(plain))
    model = apply_layout_with_artifacts(model, LayoutSpec("cpu_offload"), tmp_path)[0]
    quantized = forward_logits(model)
    assert not torch.equal(quantized, forward_logits(plain))
    weight_qs = oe.find_quantizers(model, "weight")
    assert weight_qs and all(q.adapter.name == "modelopt" for q in weight_qs)
    weight_qs[0].handle.disable()  # already disabled before: must stay so
    states = [(q.name, q.enabled) for q in oe.find_quantizers(model)]
    with oe.quantizers_disabled(model, which="weight"):
        assert torch.equal(forward_logits(model), forward_logits(unquantized))
        with oe.quantizers_disabled(model, which="all"):
            assert not any(q.enabled for q in oe.find_quantizers(model))
        assert not any(q.enabled for q in oe.find_quantizers(model, "weight"))
    assert [(q.name, q.enabled) for q in oe.find_quantizers(model)] == states
    with pytest.raises(RuntimeError):
        with oe.quantizers_disabled(model, which="all"):
            raise RuntimeError("boom")
    assert [(q.name, q.enabled) for q in oe.find_quantizers(model)] == states
    with pytest.raises(ValueError, match="which="):
        with oe.quantizers_disabled(model, which="weights"):
            pass
