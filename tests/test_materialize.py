"""materialized(): nesting, overlap, threads, held references, replaced Parameters, writeback faults and
compressed-tensors' OffloadCache -- on real accelerate / compressed-tensors layouts, no mocked hooks."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import LayoutSpec, draw_offloaded, forward_logits
from torch import nn

import offload_export as oe
from offload_export._hooks import align_hooks

KIND = "llama_untied"
_UNITS = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head")


def _spec(method: str, layer0: str, rest: str = "resident") -> LayoutSpec:
    places = {"model.layers.0": layer0, "model.layers.1": rest, "lm_head": rest}
    return LayoutSpec(method, tuple((u, places.get(u, "resident")) for u in _UNITS))


# model.layers.0 is offloaded in every one of them
LAYOUTS = {
    "cpu_offload": LayoutSpec("cpu_offload"),
    "disk_offload": LayoutSpec("disk_offload"),
    "dispatch": _spec("dispatch", "cpu", "disk"),
    "dispatch_disk": _spec("dispatch", "disk", "cpu"),
    "from_pretrained_disk": _spec("from_pretrained", "disk", "disk"),
    "from_pretrained_cpu": _spec("from_pretrained", "cpu", "cpu"),
    "place_submodules": _spec("place_submodules", "disk", "cpu"),
}
FEW = ("cpu_offload", "disk_offload", "from_pretrained_disk")


class ToolkitError(Exception):
    """A user / toolkit exception class materialized() must let through as itself."""


def _build(name, tmp_path):
    return draw_offloaded(KIND, LAYOUTS[name], tmp_path)


def _state(model):
    """What materialized() must restore: which tensors are meta, devices, dtypes, shapes, hook flags."""
    tensors = {k: (v.device, v.dtype, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()}
    hooks = {n: [h.offload for h in align_hooks(m)] for n, m in model.named_modules()}
    return tensors, hooks


def _ids(model):
    return {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}


def _ids_of(ids, prefix):
    return {k.removeprefix(prefix): v for k, v in ids.items() if k.startswith(prefix)}


def _is_meta(module, name):
    return module.get_parameter(name).device.type == "meta"


def _read(module, name):
    with oe.materialized(module):
        return module.get_parameter(name).detach().clone()


def _assert_restored(model, before, reference=None, expected_logits=None):
    assert _state(model) == before
    if expected_logits is None and reference is not None:
        expected_logits = forward_logits(reference)
    if expected_logits is not None:
        assert torch.equal(forward_logits(model), expected_logits)
    assert _state(model) == before  # the forward re-offloaded everything


# --- 1. nested writeback -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inner_writeback_persists_when_the_inner_block_exits(layout, tmp_path):
    reference, model = _build(layout, tmp_path)
    layer, before, ids = model.model.layers[0], _state(model), _ids(model)
    with pytest.raises(ToolkitError):
        with oe.materialized(layer):
            with oe.materialized(layer.mlp, writeback=True):
                layer.mlp.down_proj.weight.data.zero_()
            assert not _is_meta(layer, "mlp.down_proj.weight")  # the outer block still holds it
            layer.mlp.up_proj.weight.data.zero_()  # the outer block has no writeback: discarded
            raise ToolkitError("the outer block fails after the inner one wrote back")
    assert _state(model) == before and _ids(model) == ids
    assert torch.equal(_read(layer, "mlp.down_proj.weight"), torch.zeros_like(reference.model.layers[0].mlp.down_proj.weight))
    assert torch.equal(_read(layer, "mlp.up_proj.weight"), reference.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        reference.model.layers[0].mlp.down_proj.weight.zero_()
    _assert_restored(model, before, reference)


# --- 2. overlapping blocks and threads ------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_overlapping_blocks_restore_when_the_last_one_leaves(layout, tmp_path):
    reference, model = _build(layout, tmp_path)
    l0, before, ids = model.model.layers[0], _state(model), _ids(model)
    a, b = oe.materialized(l0), oe.materialized(l0, writeback=True)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert all(v.device.type != "meta" for v in l0.state_dict().values())  # b is still open
    assert torch.equal(forward_logits(model), forward_logits(reference))  # a forward does not re-offload either
    assert all(v.device.type != "meta" for v in l0.state_dict().values())
    l0.mlp.gate_proj.weight.data.mul_(2)
    b.__exit__(None, None, None)
    assert _ids(l0) == _ids_of(ids, "model.layers.0.")  # (the forward gave other layers new Parameters)
    with torch.no_grad():
        reference.model.layers[0].mlp.gate_proj.weight.mul_(2)
    _assert_restored(model, before, reference)


@pytest.mark.parametrize("layout", ["cpu_offload", "disk_offload", "place_submodules"])
def test_two_threads_materializing_one_layer(layout, tmp_path):
    reference, model = _build(layout, tmp_path)
    l0, before = model.model.layers[0], _state(model)
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    expected = reference.model.layers[0].mlp(x)
    start, errors = threading.Barrier(2), []

    def work():
        try:
            start.wait()
            for _ in range(25):
                with oe.materialized(l0):  # grad enabled: autograd graphs hold the weights for a while
                    assert torch.allclose(l0.mlp(x), expected)
                    l0.mlp.up_proj.weight.sum().item()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # a graph may outlive the other thread's block
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    _assert_restored(model, before, reference)


# --- 3. tensors still referenced at exit -----------------------------------------------------------------


@pytest.mark.parametrize("layout", FEW)
@pytest.mark.parametrize("holder", ["view", "graph"])
@pytest.mark.parametrize("writeback", [False, True])
def test_tensor_still_referenced_after_the_block(layout, holder, writeback, tmp_path):
    reference, model = _build(layout, tmp_path)
    layer, before = model.model.layers[0], _state(model)
    with pytest.warns(ResourceWarning, match=r"mlp\.up_proj\.weight is still referenced.*(view|autograd)"):
        with oe.materialized(layer, writeback=writeback):
            layer.mlp.up_proj.weight.data.mul_(3)
            kept = layer.mlp.up_proj.weight[0] if holder == "view" else layer.mlp.up_proj.weight.abs().max()
    assert kept.device.type == "cpu"  # the reference still reads its own data
    if writeback:
        with torch.no_grad():
            reference.model.layers[0].mlp.up_proj.weight.mul_(3)
    _assert_restored(model, before, reference)  # on meta, hooks working, identity lost for that one only
    with oe.materialized(layer):
        assert torch.equal(layer.mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)


def test_a_result_computed_without_grad_holds_no_reference(tmp_path):
    reference, model = _build("disk_offload", tmp_path)
    layer, before, ids = model.model.layers[0], _state(model), _ids(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with oe.materialized(layer), torch.no_grad():
            kept = layer.mlp.up_proj.weight.abs().max()
    assert kept.device.type == "cpu" and _ids(model) == ids
    _assert_restored(model, before, reference)


# --- 4. replaced Parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_replaced_parameter_is_written_back(layout, tmp_path):
    reference, model = _build(layout, tmp_path)
    mlp, before, ids = model.model.layers[0].mlp, _state(model), _ids(model)
    new = torch.full_like(reference.model.layers[0].mlp.up_proj.weight, 0.5)
    with oe.materialized(model.model.layers[0]):  # without writeback the replacement is discarded
        mlp.up_proj.weight = nn.Parameter(torch.zeros_like(new))
    assert _ids(model) == ids
    with oe.materialized(model.model.layers[0]):
        with oe.materialized(mlp, writeback=True):
            mlp.up_proj.weight = nn.Parameter(new.clone())
    assert _ids(model) == ids  # the module's own Parameter object is back in its slot
    with torch.no_grad():
        reference.model.layers[0].mlp.up_proj.weight.copy_(new)
    _assert_restored(model, before, reference)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_replacement_of_another_shape_or_dtype_is_a_clear_error(bad, tmp_path):
    reference, model = _build("disk_offload", tmp_path)
    mlp, before = model.model.layers[0].mlp, _state(model)
    w = reference.model.layers[0].mlp.up_proj.weight
    wrong = torch.zeros(3, 4) if bad == "shape" else torch.zeros_like(w, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"(?s)up_proj\.weight.*expected: torch.float32, shape \(96, 64\)") as info:
        with oe.materialized(mlp, writeback=True):
            mlp.down_proj.weight.data.mul_(2)
            mlp.up_proj.weight = nn.Parameter(wrong)
    assert any("up_proj.weight" in n and "nothing was written back" in n for n in info.value.__notes__)
    _assert_restored(model, before, reference)  # checked before any write: down_proj's change is not written


# --- 6. errors keep their type ---------------------------------------------------------------------------


def _raising_parameter(error: type[BaseException]):
    """A Parameter subclass whose detach() (as in any writeback) raises ``error``: user code failing there."""

    class Raising(nn.Parameter):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.detach:
                raise error("raised by the user's tensor during writeback")
            return super().__torch_function__(func, types, args, kwargs or {})

    return Raising


@pytest.mark.parametrize("layout", FEW)
@pytest.mark.parametrize("error", [ToolkitError, torch.OutOfMemoryError])
def test_errors_inside_the_block_keep_their_type(layout, error, tmp_path):
    reference, model = _build(layout, tmp_path)
    layer, before, ids = model.model.layers[0], _state(model), _ids(model)
    with pytest.raises(error) as info:
        with oe.materialized(layer, writeback=True):
            layer.mlp.up_proj.weight.data.zero_()
            raise error("raised by the user inside the block")
    assert type(info.value) is error
    assert any("materialized(LlamaDecoderLayer)" in n for n in info.value.__notes__)
    assert _ids(model) == ids
    _assert_restored(model, before, reference)  # nothing was written back


@pytest.mark.parametrize("layout", FEW)
@pytest.mark.parametrize("error", [ToolkitError, torch.OutOfMemoryError])
def test_errors_during_writeback_keep_their_type(layout, error, tmp_path):
    reference, model = _build(layout, tmp_path)
    layer, before, ids = model.model.layers[0], _state(model), _ids(model)
    with pytest.raises(error) as info:
        with oe.materialized(layer, writeback=True):
            layer.mlp.down_proj.weight.data.mul_(2)
            layer.mlp.up_proj.weight = _raising_parameter(error)(layer.mlp.up_proj.weight.detach().clone())
    assert type(info.value) is error
    note = "\n".join(info.value.__notes__)
    assert "while writing back mlp.up_proj.weight" in note and "nothing was written back" in note
    assert _ids(model) == ids
    _assert_restored(model, before, reference)  # every value is checked before the first write


@pytest.mark.parametrize("layout", FEW)
def test_keyboard_interrupt_during_writeback_restores_every_tensor(layout, tmp_path):
    reference, model = _build(layout, tmp_path)
    layer, before, ids = model.model.layers[0], _state(model), _ids(model)
    with pytest.raises(KeyboardInterrupt):
        with oe.materialized(layer, writeback=True):
            for p in layer.parameters():
                p.data.mul_(2)
            q = layer.self_attn.q_proj  # the first tensor written back
            q.weight = _raising_parameter(KeyboardInterrupt)(q.weight.detach().clone())
    assert _ids(model) == ids
    _assert_restored(model, before, reference)  # stopped at once: nothing after q_proj was written


def test_a_failing_store_write_keeps_its_type(tmp_path):
    reference, model = _build("disk_offload", tmp_path)
    layer, before = model.model.layers[0], _state(model)
    store = oe.layout(model)["model.layers.0.mlp.up_proj.weight"].ref.store
    assert store.kind == "disk"
    with pytest.raises(FileNotFoundError) as info:
        with oe.materialized(layer, writeback=True):
            layer.mlp.up_proj.weight.data.zero_()
            layer.mlp.down_proj.weight.data.zero_()
            os.replace(store.path, store.path + ".moved")  # the .dat is gone: reading it fails
    assert "while writing back mlp.up_proj.weight" in "\n".join(info.value.__notes__)
    assert _state(model) == before
    os.replace(store.path + ".moved", store.path)
    _assert_restored(model, before, reference)  # reading the store failed before anything was written


# --- 5. compressed-tensors' own OffloadCache ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_writeback_through_compressed_tensors_offload_cache(where, tmp_path):
    ctt = pytest.importorskip("test_compressed_tensors")
    from compressed_tensors.offload import OffloadCache, disable_offloading
    reference = ctt.make_quantized("fp8_w8a8", "qwen3")
    model = ctt._ct_offload(ctt.make_quantized("fp8_w8a8", "qwen3"), where, tmp_path / "ct")
    layer = model.model.layers[0]
    proj, ref_proj = layer.mlp.up_proj, reference.model.layers[0].mlp.up_proj
    caches = {n: (m._parameters, m._buffers) for n, m in model.named_modules()}
    with oe.materialized(layer):
        with oe.materialized(proj, writeback=True):
            assert proj.weight is proj.weight  # one real tensor for the block, not a fresh copy per access
            proj.weight.data.mul_(2)
            proj.weight_scale = nn.Parameter(proj.weight_scale.detach() * 2, requires_grad=False)
        layer.mlp.down_proj.weight.data.zero_()  # no writeback for this one
        assert torch.equal(proj.weight, ref_proj.weight * 2)
    assert {n: (m._parameters, m._buffers) for n, m in model.named_modules()} == caches
    assert all(isinstance(c, OffloadCache) for pair in caches.values() for c in pair if c)
    assert torch.equal(proj.weight, ref_proj.weight * 2)  # read through compressed-tensors' own cache
    assert torch.equal(proj.weight_scale, ref_proj.weight_scale * 2)
    assert torch.equal(layer.mlp.down_proj.weight, reference.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():
        ref_proj.weight.mul_(2)
        ref_proj.weight_scale.mul_(2)
    with disable_offloading():
        assert torch.equal(ctt._logits(model), ctt._logits(reference))
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.weight"):
        with oe.materialized(layer, writeback=True):
            proj.weight = nn.Parameter(proj.weight.detach().half(), requires_grad=False)
    assert proj._parameters is caches["model.layers.0.mlp.up_proj"][0]
    assert torch.equal(proj.weight, ref_proj.weight)


# --- any interleaving ----------------------------------------------------------------------------------------

BLOCK_MODULES = ("", "model.layers.0", "model.layers.0.mlp", "model.layers.0.self_attn", "model.layers.1")
OPS = st.lists(st.tuples(st.sampled_from(["open", "close", "edit", "forward"]), st.integers(0, 99), st.booleans()),
               max_size=14)


def _covered(offloaded: list[str], prefix: str) -> set[str]:
    return {k for k in offloaded if not prefix or k.startswith(prefix + ".")}


class _Interleaving:
    """Blocks opened and closed in a drawn order, with the expected store and onloaded values alongside."""

    def __init__(self, model, reference):
        self.model, self.blocks, self.live = model, [], {}
        self.stored = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        self.offloaded = [k for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"]

    def open_names(self) -> set[str]:
        return set().union(*(_covered(self.offloaded, p) for _, p, _ in self.blocks))

    def step(self, op: str, n: int, writeback: bool) -> None:
        if op == "open":
            prefix = BLOCK_MODULES[n % len(BLOCK_MODULES)]
            block = oe.materialized(self.model.get_submodule(prefix), writeback=writeback)
            block.__enter__()
            self.blocks.append((block, prefix, writeback))
            for k in _covered(self.offloaded, prefix):
                self.live.setdefault(k, self.stored[k].clone())
        elif op == "close" and self.blocks:
            self.close(n % len(self.blocks))
        elif op == "edit" and self.open_names():
            key = sorted(self.open_names())[n % len(self.open_names())]
            self.model.state_dict(keep_vars=True)[key].data.add_(1.0)
            self.live[key] += 1.0
        elif op == "forward":
            forward_logits(self.model)

    def close(self, i: int) -> None:
        block, prefix, writeback = self.blocks.pop(i)
        block.__exit__(None, None, None)
        if writeback:
            self.stored.update({k: self.live[k].clone() for k in _covered(self.offloaded, prefix)})
        self.live = {k: v for k, v in self.live.items() if k in self.open_names()}

    def check(self) -> None:
        held = self.open_names()
        for key, value in self.model.state_dict(keep_vars=True).items():
            if key in self.offloaded:
                assert (value.device.type != "meta") == (key in held), key
                assert key not in held or torch.equal(value, self.live[key]), key


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layout=st.sampled_from([k for k in LAYOUTS if k != "place_submodules"]), ops=OPS, order=st.randoms())
def test_any_interleaving_of_blocks_restores_and_keeps_every_writeback(layout, ops, order, tmp_path):
    reference, model = _build(layout, tmp_path)
    before, run = _state(model), _Interleaving(model, reference)
    for op in ops:
        run.step(*op)
        run.check()
    while run.blocks:
        run.close(order.randrange(len(run.blocks)))
        run.check()
    assert _state(model) == before
    reference.load_state_dict(run.stored)
    _assert_restored(model, before, reference)


# --- tied weights ------------------------------------------------------------------------------------------

_TIED_LAYOUTS = {
    "cpu_offload": LayoutSpec("cpu_offload"),
    "disk_offload": LayoutSpec("disk_offload"),
    "from_pretrained_disk": LayoutSpec("from_pretrained", (("model.embed_tokens", "disk"), ("model.layers.0", "resident"),
                                                           ("model.layers.1", "resident"), ("model.norm", "resident"),
                                                           ("lm_head", "disk"))),
    "place_submodules_resident_head": LayoutSpec("place_submodules", (
        ("model.embed_tokens", "cpu"), ("model.layers.0", "resident"), ("model.layers.1", "resident"),
        ("model.norm", "resident"), ("lm_head", "resident"))),  # the other side resident: updated in place
}


@pytest.mark.parametrize("side", ["model.embed_tokens", pytest.param("lm_head", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", sorted(_TIED_LAYOUTS))
def test_writeback_to_one_side_of_a_tie_updates_both_stores(layout, side, tmp_path):
    from transformers import AutoModelForCausalLM

    if layout == "place_submodules_resident_head" and side == "lm_head":
        pytest.skip("lm_head is resident there: an edit of it is no writeback (the export's tie check's job)")
    reference, model = draw_offloaded("qwen3_tied", _TIED_LAYOUTS[layout], tmp_path)
    with oe.materialized(model.get_submodule(side), writeback=True), torch.no_grad():
        model.get_submodule(side).weight.mul_(2)
    with torch.no_grad():
        reference.model.embed_tokens.weight.mul_(2)  # one tensor in the resident twin
    expected = forward_logits(reference)
    assert torch.equal(forward_logits(model), expected)
    oe.save_clean(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(forward_logits(reloaded), expected)


def test_tied_sides_changed_to_different_values_are_refused(tmp_path):
    reference, model = draw_offloaded("qwen3_tied", LayoutSpec("cpu_offload"), tmp_path)
    with pytest.raises(ValueError, match="one tied tensor"):
        with oe.materialized(model, writeback=True), torch.no_grad():
            model.model.embed_tokens.weight.mul_(2)
            model.lm_head.weight.mul_(3)
    assert torch.equal(forward_logits(model), forward_logits(reference))  # nothing was written


def test_nested_writeback_over_the_source_safetensors_persists_the_outer_value(tmp_path):
    """The inner block repoints the entry from the source file to a .dat; the outer block compares against that."""
    reference, model = _build("from_pretrained_disk", tmp_path)
    layer = model.model.layers[0]
    assert oe.layout(model)["model.layers.0.mlp.up_proj.weight"].kind == "safetensors"
    with oe.materialized(layer, writeback=True), torch.no_grad():
        with oe.materialized(layer.mlp, writeback=True):
            layer.mlp.up_proj.weight.mul_(2)
        layer.mlp.up_proj.weight.div_(2)  # back to the source's value: must be persisted too
        layer.mlp.down_proj.weight.mul_(3)
    with torch.no_grad():
        reference.model.layers[0].mlp.down_proj.weight.mul_(3)
    assert torch.equal(forward_logits(model), forward_logits(reference))


@pytest.mark.parametrize("layout", ["disk_offload", *(pytest.param(n, marks=pytest.mark.slow)
                                                     for n in ("cpu_offload", "from_pretrained_disk"))])
def test_writeback_of_a_sign_of_zero_only(layout, tmp_path):
    _, model = _build(layout, tmp_path)
    layer = model.model.layers[0]
    for value in (0.0, -0.0, 0.0):
        with oe.materialized(layer, writeback=True), torch.no_grad():
            layer.mlp.up_proj.weight[0, 0] = value
        with oe.materialized(layer):
            assert bool(torch.signbit(layer.mlp.up_proj.weight[0, 0])) == (str(value) == "-0.0")


@pytest.mark.parametrize("fail_at", ["pwrite", *(pytest.param(n, marks=pytest.mark.slow) for n in ("fsync", "replace"))])
def test_a_dat_writeback_failing_part_way_leaves_the_old_file(fail_at, tmp_path, monkeypatch):
    import errno

    reference, model = _build("disk_offload", tmp_path)
    layer = model.model.layers[0]
    store = oe.layout(model)["model.layers.0.mlp.up_proj.weight"].ref.store
    old, files = open(store.path, "rb").read(), sorted(os.listdir(os.path.dirname(store.path)))
    real = getattr(os, fail_at)

    def failing(*args):
        if fail_at == "pwrite" and len(args[1]) == len(old):  # write half of the new bytes, then the disk is full
            return real(args[0], args[1][: len(old) // 2], args[2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    with pytest.raises(OSError, match="injected"):
        with oe.materialized(layer, writeback=True), torch.no_grad():
            layer.mlp.up_proj.weight.mul_(2)
            monkeypatch.setattr(os, fail_at, failing)
    monkeypatch.undo()
    assert open(store.path, "rb").read() == old
    assert sorted(os.listdir(os.path.dirname(store.path))) == files  # no temporary file left
    assert torch.equal(forward_logits(model), forward_logits(reference))


@pytest.mark.parametrize("reader", ["save_clean", pytest.param("verify", marks=pytest.mark.slow)])
def test_export_waits_for_another_threads_writeback_block(reader, tmp_path):
    from transformers import AutoModelForCausalLM

    reference, model = _build("disk_offload", tmp_path)
    layer = model.model.layers[0]
    if reader == "verify":
        oe.save_clean(model, tmp_path / "out")
    inside, release, results = threading.Event(), threading.Event(), {}

    def edit():
        with oe.materialized(layer, writeback=True), torch.no_grad():
            layer.mlp.up_proj.weight.mul_(2)
            inside.set()
            release.wait()

    def read():
        try:
            results["value"] = getattr(oe, reader)(model, tmp_path / "out")
        except BaseException as e:  # noqa: B036 - reported below
            results["error"] = e

    editor = threading.Thread(target=edit)
    editor.start()
    inside.wait()
    exporter = threading.Thread(target=read)
    exporter.start()
    exporter.join(1.0)
    assert exporter.is_alive() and not results  # waiting for the block, not reading half-onloaded tensors
    release.set()
    editor.join()
    exporter.join()
    assert "error" not in results, results.get("error")
    with torch.no_grad():
        reference.model.layers[0].mlp.up_proj.weight.mul_(2)
    if reader == "verify":
        assert not results["value"].ok  # the checkpoint was written before the edit: verify sees the edit
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
        assert torch.equal(forward_logits(reloaded), forward_logits(reference))


def test_a_block_in_another_thread_waits_for_a_running_export(tmp_path):
    from offload_export.materialize import no_other_blocks

    _, model = _build("cpu_offload", tmp_path)
    entered = threading.Event()

    def block():
        with oe.materialized(model.model.layers[0]):
            entered.set()

    with no_other_blocks(model):  # what save_clean / verify hold while they read
        other = threading.Thread(target=block)
        other.start()
        assert not entered.wait(1.0)
        with oe.materialized(model.model.layers[0]):  # the exporting thread's own blocks do not wait
            pass
    other.join()
    assert entered.is_set()
