"""Tests of the offload-layout fixture itself (tests/layouts.py).

They prove that every drawn layout is *real* (tensors really on meta, stores really read
during the forward) and *correct* (bitwise-identical logits to an independent resident
twin).  See the docstring of layouts.py for the accelerate behaviours that surprised us.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from layouts import (
    METHODS,
    MODEL_KINDS,
    LayoutSpec,
    apply_layout,
    apply_layout_with_artifacts,
    draw_offloaded,
    fixed_input_ids,
    forward_logits,
    layout_specs,
    make_model,
    offload_hooks,
    offloaded_keys,
    resident_state_dict,
)

FAST = settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
IDS = fixed_input_ids()


def _unit_of(key: str, placement: dict[str, str]) -> str:
    (unit,) = [u for u in placement if key == u or key.startswith(u + ".")]
    return unit


def _expected_offloaded(spec: LayoutSpec, all_keys) -> set[str]:
    if spec.method in ("cpu_offload", "disk_offload"):
        return set(all_keys)
    if spec.method == "resident":
        return set()
    placement = spec.placement_dict
    return {k for k in all_keys if placement[_unit_of(k, placement)] != "resident"}


def _hook_for_key(model, key: str):
    """(owner_module_name, hook, key relative to the hook's weights_map) for an offloaded key."""
    owners = [(n, h) for n, h in offload_hooks(model) if n == "" or key.startswith(n + ".")]
    assert owners, f"no offloading hook owns {key}"
    name, hook = max(owners, key=lambda nh: len(nh[0]))  # innermost owner
    rel = key[len(name) + 1 :] if name else key
    return name, hook, rel


def _store_tensors(model):
    """Every tensor reachable from the offload hooks' weights maps (materialised)."""
    out = []
    for _, hook in offload_hooks(model):
        wm = hook.weights_map
        ds = wm.dataset if isinstance(wm, PrefixedDataset) else wm
        if isinstance(ds, OffloadedWeightsLoader):
            out.extend(ds.state_dict.values())
        else:
            out.extend(ds.values())
    return out


# --------------------------------------------------------------------------- make_model


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_make_model_deterministic_and_nontrivial(kind):
    a, b, c = make_model(kind), make_model(kind), make_model(kind, seed=1)
    sa, sb, sc = resident_state_dict(a), resident_state_dict(b), resident_state_dict(c)
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    for k, v in sa.items():
        assert v.numel() == 1 or not bool((v == v.flatten()[0]).all()), f"{k} is constant"
    assert not a.training
    assert (a.config.tie_word_embeddings, a.lm_head.weight is a.model.embed_tokens.weight) == (
        (True, True) if kind == "qwen3_tied" else (False, False)
    )
    # resident_state_dict clones
    assert all(sa[k].data_ptr() != v.data_ptr() for k, v in a.state_dict().items())
    assert make_model(kind, dtype=torch.bfloat16).dtype == torch.bfloat16


# --------------------------------------------------------------------------- core property


@pytest.mark.parametrize("kind", MODEL_KINDS)
@FAST
@given(data=st.data(), dtype=DTYPES)
def test_layout_is_real_and_bitwise_correct(kind, data, dtype, tmp_path_factory):
    spec = data.draw(layout_specs(kind), label="spec")
    tmp = tmp_path_factory.mktemp("layouts")
    reference, model = draw_offloaded(kind, spec, tmp, dtype=dtype)
    keys = set(model.state_dict().keys())
    assert keys == set(reference.state_dict().keys())

    expected = _expected_offloaded(spec, keys)
    assert offloaded_keys(model) == expected
    assert bool(expected) == spec.offloads_something
    assert offloaded_keys(reference) == set()

    # Independent twin: nothing in the reference shares storage with the offload stores.
    ref_ptrs = {v.untyped_storage().data_ptr() for v in reference.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in ref_ptrs for t in _store_tensors(model))

    out = forward_logits(model, IDS)
    assert torch.equal(out, forward_logits(reference, IDS)), spec
    # stays offloaded (post_forward puts the tensors back on meta) and is repeatable
    assert offloaded_keys(model) == expected
    assert torch.equal(forward_logits(model, IDS), out)


# --------------------------------------------------------------------------- stores are live


def _perturb_store(model, art, key: str) -> None:
    """Change the stored value of ``key`` in place, wherever it lives."""
    _, hook, rel = _hook_for_key(model, key)
    wm = hook.weights_map
    ds = wm.dataset if isinstance(wm, PrefixedDataset) else wm
    full = f"{wm.prefix}{rel}" if isinstance(wm, PrefixedDataset) else rel
    if isinstance(ds, OffloadedWeightsLoader) and full not in ds.state_dict:
        info = ds.index[full]
        assert "safetensors_file" not in info  # .dat memmap
        path = os.path.join(ds.save_folder, f"{full}.dat")
        np_dtype = "int16" if info["dtype"] == "bfloat16" else info["dtype"]
        arr = np.memmap(path, dtype=np_dtype, mode="r+", shape=tuple(info["shape"]) or (1,))
        arr[...] = arr[::-1].copy() if arr.ndim == 1 else arr[:, ::-1].copy()
        arr.flush()
    else:
        store = ds.state_dict if isinstance(ds, OffloadedWeightsLoader) else ds
        store[full].mul_(-1.5)


@pytest.mark.parametrize(
    "spec",
    [
        LayoutSpec("cpu_offload"),
        LayoutSpec("disk_offload"),
        LayoutSpec("dispatch", (("model.embed_tokens", "resident"), ("model.layers.0", "cpu"),
                                ("model.layers.1", "disk"), ("model.norm", "cpu"), ("lm_head", "resident"))),
        LayoutSpec("place_submodules", (("model.embed_tokens", "resident"), ("model.layers.0", "cpu"),
                                        ("model.layers.1", "disk"), ("model.norm", "resident"),
                                        ("lm_head", "resident")), append_hook="after"),
    ],
    ids=lambda s: s.method,
)
@pytest.mark.parametrize("key", ["model.layers.0.post_attention_layernorm.weight", "model.layers.1.mlp.up_proj.weight"])
def test_forward_reads_the_store(spec, key, tmp_path):
    """Mutating the store changes the output: the forward really reads the offload store."""
    model, art = apply_layout_with_artifacts(make_model("llama_untied"), spec, tmp_path)
    before = forward_logits(model, IDS)
    assert key in offloaded_keys(model)
    _perturb_store(model, art, key)
    assert not torch.equal(forward_logits(model, IDS), before)


# --------------------------------------------------------------------------- method specifics


@pytest.mark.parametrize("kind", MODEL_KINDS)
@FAST
@given(data=st.data())
def test_dispatch_stores(kind, data, tmp_path_factory):
    spec = data.draw(layout_specs(kind).filter(lambda s: s.method == "dispatch"), label="spec")
    model, art = apply_layout_with_artifacts(make_model(kind), spec, tmp_path_factory.mktemp("dispatch"))
    assert art.device_map is not None and model.hf_device_map == art.device_map
    placement = spec.placement_dict
    for key in offloaded_keys(model):
        name, hook, rel = _hook_for_key(model, key)
        assert hook.execution_device == torch.device("cpu") and not hook.place_submodules
        wm = hook.weights_map
        assert isinstance(wm, PrefixedDataset) and isinstance(wm.dataset, OffloadedWeightsLoader)
        ds, full = wm.dataset, wm.prefix + rel
        assert full == key
        # surprise: __len__ is the whole dataset's, __iter__ yields full (prefixed) keys
        assert len(wm) == len(ds)
        assert all(k.startswith(wm.prefix) for k in wm)
        if placement[_unit_of(key, placement)] == "cpu":
            # genuinely CPU-offloaded: a real CPU tensor in the loader's RAM dict
            assert key in ds.state_dict and key not in ds.index
            t = ds.state_dict[key]
            assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
        else:
            assert key not in ds.state_dict and "safetensors_file" not in ds.index[key]
            assert ds.save_folder == str(art.offload_dir)
            assert os.path.isfile(os.path.join(ds.save_folder, f"{key}.dat"))
            assert ds[key].device.type == "cpu"


@pytest.mark.parametrize("kind", MODEL_KINDS)
@FAST
@given(data=st.data(), dtype=DTYPES)
def test_from_pretrained_disk_points_into_source(kind, data, dtype, tmp_path_factory):
    spec = data.draw(layout_specs(kind).filter(lambda s: s.method == "from_pretrained"), label="spec")
    model, art = apply_layout_with_artifacts(make_model(kind, dtype=dtype), spec, tmp_path_factory.mktemp("fp"))
    assert art.source_file.is_file()
    with safe_open(str(art.source_file), "pt") as f:
        source_keys = set(f.keys())
    load_dtype = getattr(torch, spec.load_dtype) if spec.load_dtype else dtype
    assert model.dtype == load_dtype
    placement = spec.placement_dict
    for key in offloaded_keys(model):
        _, hook, rel = _hook_for_key(model, key)
        ds = hook.weights_map.dataset
        assert isinstance(ds, OffloadedWeightsLoader)
        place = placement[_unit_of(key, placement)]
        if place == "cpu":  # torch.device("cpu") trick: RAM dict, no index
            assert key in ds.state_dict and ds.state_dict[key].device.type == "cpu" and not ds.index
            assert ds.state_dict[key].dtype == load_dtype
            continue
        assert place == "disk" and not ds.state_dict
        info = ds.index[key]
        assert info["dtype"] == str(load_dtype).removeprefix("torch.")
        if kind == "qwen3_moe" and ".mlp.experts." in key:
            # fused by a load-time WeightConverter -> resaved into offload_folder
            assert os.path.dirname(info["safetensors_file"]) == str(art.offload_dir)
        else:
            assert info["safetensors_file"] == str(art.source_file)
            assert info["weight_name"] in source_keys
            if key == "lm_head.weight" and kind == "qwen3_tied":
                assert info["weight_name"] == "model.embed_tokens.weight"
        assert ds[key].dtype == load_dtype
    # transformers 5 never writes accelerate .dat memmaps
    if art.offload_dir.exists():
        assert not [p for p in os.listdir(art.offload_dir) if p.endswith(".dat")]


@pytest.mark.parametrize("append_hook", [None, "before", "after"])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_place_submodules_hooks(append_hook, offload_buffers, tmp_path):
    spec = LayoutSpec(
        "place_submodules",
        (("model.embed_tokens", "cpu"), ("model.layers.0", "cpu"), ("model.layers.1", "disk"),
         ("model.norm", "resident"), ("lm_head", "cpu")),
        offload_buffers=offload_buffers,
        append_hook=append_hook,
    )
    reference = make_model("qwen3_tied")
    model, art = apply_layout_with_artifacts(make_model("qwen3_tied"), spec, tmp_path)
    layer0 = model.model.layers[0]
    hook = layer0._hf_hook
    if append_hook is None:
        assert isinstance(hook, AlignDevicesHook)
        inner = hook
    else:
        assert isinstance(hook, SequentialHook) and len(hook.hooks) == 2
        inner = hook.hooks[1 if append_hook == "before" else 0]
    assert inner.offload and inner.place_submodules and inner.offload_buffers == offload_buffers
    # one hook owns the children's tensors: children carry no hooks of their own
    assert all(not hasattr(m, "_hf_hook") for m in layer0.modules() if m is not layer0)
    assert {n for n, _ in offload_hooks(model)} == {"model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head"}
    # tied keys alias one cloned tensor in the RAM store
    assert art.store["lm_head.weight"] is art.store["model.embed_tokens.weight"]
    assert torch.equal(forward_logits(model, IDS), forward_logits(reference, IDS))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_cpu_offload_store_is_the_models_own_tensors(kind, tmp_path):
    """Documents cpu_offload's default store: the former parameters' own storage."""
    model = make_model(kind)
    old = {n: p for n, p in model.named_parameters()}
    out = apply_layout(model, LayoutSpec("cpu_offload"), tmp_path)
    assert out is model
    (_, hook), *_ = offload_hooks(model)
    store = hook.weights_map.dataset
    assert type(store) is dict
    for n, p in old.items():
        assert store[n].data_ptr() == p.data_ptr()  # shared storage, no copy
    assert all(p.device.type == "meta" for p in model.parameters())
    if kind == "qwen3_tied":
        # both ends now meta and no longer the same Parameter object
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        # the store holds two detached views of one storage (state_dict() detaches)
        assert store["lm_head.weight"].data_ptr() == store["model.embed_tokens.weight"].data_ptr()


def test_disk_offload_writes_dat_files(tmp_path):
    model, art = apply_layout_with_artifacts(make_model("qwen3_moe"), LayoutSpec("disk_offload"), tmp_path)
    files = set(os.listdir(art.offload_dir))
    assert "index.json" in files
    assert {f"{k}.dat" for k in offloaded_keys(model)} <= files


def test_dispatch_plain_cpu_main_device_keeps_cpu_resident(tmp_path):
    """Why layouts.py passes main_device=torch.device('cpu'): with the string default,
    dispatch_model leaves "cpu" entries resident on a CPU-only host."""
    import accelerate

    model = make_model("llama_untied")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    accelerate.dispatch_model(model, device_map, offload_dir=str(tmp_path))
    assert offloaded_keys(model) == {"lm_head.weight"}


def test_specs_cover_all_methods():
    seen = set()

    @settings(max_examples=80, deadline=None, database=None)
    @given(layout_specs("qwen3_moe"))
    def collect(spec):
        assert hash(spec) == hash(LayoutSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__}))
        assert repr(spec).startswith(f"LayoutSpec(method={spec.method!r}")
        seen.add(spec.method)

    collect()
    assert seen == set(METHODS)
