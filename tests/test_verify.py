"""verify(): a fresh export verifies on every layout; every kind of damage to a checkpoint is reported."""

from __future__ import annotations

import importlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import MODEL_KINDS, LayoutSpec, apply_layout, draw_offloaded, layout_specs, make_model
from test_faults import leftovers, model_state, same_state
from torch import nn

import offload_export as oe
from offload_export._store import FileSpan, safetensors_header
from offload_export.formats.fake_quant import QUANTIZER_STATE_NAME
from offload_export.job import INDEX_NAME, prepare_job

SHARD = 40_000
MIXED = LayoutSpec("dispatch", (("model.embed_tokens", "resident"), ("model.layers.0", "cpu"),
                                ("model.layers.1", "disk"), ("model.norm", "resident"), ("lm_head", "disk")))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = apply_layout(make_model("llama_untied"), MIXED, tmp_path_factory.mktemp("layout"))
    oe.quantize_weights(model, "int8")
    out = tmp_path_factory.mktemp("export") / "out"
    oe.save_clean(model, out, max_shard_size=SHARD)
    return model, out


@pytest.fixture
def checkpoint(exported, tmp_path) -> Path:
    """A private copy of the export, free to damage."""
    return Path(shutil.copytree(exported[1], tmp_path / "ck"))


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind_spec=st.sampled_from(MODEL_KINDS).flatmap(lambda k: st.tuples(st.just(k), layout_specs(k))),
       dtype=st.sampled_from([None, torch.bfloat16]), quantize=st.booleans())
def test_a_fresh_export_verifies_and_verify_changes_nothing(tmp_path_factory, kind_spec, dtype, quantize):
    kind, spec = kind_spec
    _, model = draw_offloaded(kind, spec, tmp_path_factory.mktemp("layout"))
    if quantize:
        oe.quantize_weights(model, "int8")
    out = tmp_path_factory.mktemp("export") / "out"
    oe.save_clean(model, out, max_shard_size=SHARD, dtype=dtype)
    before = model_state(model)
    report = oe.verify(model, out, dtype=dtype)
    assert report.ok, report
    assert report.tensors == len(json.loads((out / INDEX_NAME).read_text())["weight_map"])
    assert same_state(model_state(model), before)


def _shards(ck: Path) -> list[Path]:
    return sorted(ck.glob("model-*.safetensors"))


def _flip_last_byte(ck: Path) -> None:
    shard = _shards(ck)[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x40
    shard.write_bytes(bytes(data))


def _edit_index(ck: Path, edit) -> None:
    index = json.loads((ck / INDEX_NAME).read_text())
    edit(index)
    (ck / INDEX_NAME).write_text(json.dumps(index))


def _move_tensor_in_index(index: dict) -> None:
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = _other_file(index, index["weight_map"][name])


def _sharing(index: dict) -> str:
    """A tensor whose shard holds other tensors too."""
    files = list(index["weight_map"].values())
    return next(n for n, f in index["weight_map"].items() if files.count(f) > 1)


def _other_file(index: dict, file: str) -> str:
    return next(f for f in sorted(set(index["weight_map"].values())) if f != file)


def _add_auto_map(ck: Path) -> None:
    config = json.loads((ck / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (ck / "config.json").write_text(json.dumps(config))


def _edit_quantizer_metadata(ck: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = ck / QUANTIZER_STATE_NAME
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, path, metadata={**metadata, "quantizers": metadata["quantizers"].replace('"int8"', '"int4"')})


def _edit_shard_header(ck: Path, edit) -> None:
    """Rewrite the first shard's header JSON through ``edit`` (the tensor bytes stay as they are)."""
    shard = _shards(ck)[0]
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])


def _edit_json(ck: Path, name: str, key: str, value) -> None:
    data = json.loads((ck / name).read_text())
    data[key] = value
    (ck / name).write_text(json.dumps(data))


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def _shape_as_strings(header: dict) -> None:
    entry = _first_tensor(header)
    entry["shape"] = [str(d) for d in entry["shape"]]


def _float_offsets(header: dict) -> None:
    entry = _first_tensor(header)
    entry["data_offsets"] = [float(o) for o in entry["data_offsets"]]


def _nest_in_first_shard(ck: Path, depth: int = 5000) -> None:
    """An entry of the first shard gets an unknown key holding ``depth`` nested arrays (safetensors parses it)."""
    shard = _shards(ck)[0]
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    raw = data[8:8 + length].decode().rstrip()
    raw = raw[:-2] + ',"extra":' + "[" * depth + "]" * depth + "}}"  # inside the last entry's object
    raw += " " * (-len(raw) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw.encode() + data[8 + length:])


DAMAGE = {
    "flipped byte": (_flip_last_byte, "elements differ in model-00002"),
    "deleted shard": (lambda ck: _shards(ck)[0].unlink(), "missing file: model-00001"),
    "wrong total_size": (lambda ck: _edit_index(ck, lambda i: i["metadata"].update(total_size=1)),
                         "metadata.total_size is 1"),
    "tensor mapped to another shard": (lambda ck: _edit_index(ck, _move_tensor_in_index), "whose header does not have it"),
    "tensor missing from index": (lambda ck: _edit_index(ck, lambda i: i["weight_map"].pop(_sharing(i))),
                                  "does not list it"),
    "pickle file": (lambda ck: (ck / "pytorch_model.bin").write_bytes(b"x"), "pytorch_model.bin (only safetensors weights"),
    "unreferenced shard": (lambda ck: shutil.copy(_shards(ck)[0], ck / "model-extra.safetensors"),
                           "model-extra.safetensors (a weight file that the index does not reference)"),
    "no quantizer state": (lambda ck: (ck / QUANTIZER_STATE_NAME).unlink(), f"missing file: {QUANTIZER_STATE_NAME}"),
    "auto_map in config": (_add_auto_map, "config.json: has 'auto_map'"),
    "edited quantizer metadata": (_edit_quantizer_metadata, f"{QUANTIZER_STATE_NAME}: its metadata differs"),
    "non-string shard metadata": (lambda ck: _edit_shard_header(ck, lambda h: h.update(__metadata__={"format": 1})),
                                  "model-00001-of-00012.safetensors: not a valid safetensors file: __metadata__ is not a {string: string}"),
    "truncated shard": (lambda ck: _shards(ck)[2].write_bytes(_shards(ck)[2].read_bytes()[:-10]), "truncated"),
    "garbage header": (lambda ck: _shards(ck)[0].write_bytes(b"\xff" * 64), "not a valid safetensors file"),
    "leftover directory": (lambda ck: (ck / ".out.offload-export-0-0-0-0").mkdir(), "unexpected directory"),
    "no config": (lambda ck: (ck / "config.json").unlink(), "missing file: config.json"),
    "edited num_hidden_layers": (lambda ck: _edit_json(ck, "config.json", "num_hidden_layers", 1),
                                 "config.json: 'num_hidden_layers' is 1 (int), the model gives"),
    "edited rms_norm_eps": (lambda ck: _edit_json(ck, "config.json", "rms_norm_eps", 0.5),
                            "config.json: 'rms_norm_eps' is 0.5 (float), the model gives"),
    "edited hidden_act": (lambda ck: _edit_json(ck, "config.json", "hidden_act", "gelu"),
                          "config.json: 'hidden_act' is 'gelu' (str), the model gives"),
    "edited generation config": (lambda ck: _edit_json(ck, "generation_config.json", "eos_token_id", 12345),
                                 "generation_config.json: 'eos_token_id' is 12345 (int)"),
    # JSON types, not only values: transformers refuses a config with 1 for true or 64.0 for 64
    "bool written as int": (lambda ck: _edit_json(ck, "config.json", "tie_word_embeddings", 0),
                            "config.json: 'tie_word_embeddings' is 0 (int), the model gives False (bool)"),
    "int written as float": (lambda ck: _edit_json(ck, "config.json", "hidden_size", 64.0),
                             "config.json: 'hidden_size' is 64.0 (float), the model gives 64 (int)"),
    "generation int as float": (lambda ck: _edit_json(ck, "generation_config.json", "bos_token_id", 1.0),
                                "generation_config.json: 'bos_token_id' is 1.0 (float)"),
    "deeply nested config": (lambda ck: (ck / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                             "config.json: unreadable (RecursionError"),
    "shard metadata np": (lambda ck: _edit_shard_header(ck, lambda h: h.update(__metadata__={"format": "np"})),
                          "model-00001-of-00012.safetensors: __metadata__ is {'format': 'np'}, the export writes"),
    "extra key in the index": (lambda ck: _edit_index(ck, lambda i: i.update(extra={"a": 1})),
                               f"{INDEX_NAME}: has 'extra', which the export does not write"),
    "extra key in the index metadata": (lambda ck: _edit_index(ck, lambda i: i["metadata"].update(format="x")),
                                        f"{INDEX_NAME}: metadata has 'format'"),
    "a python file beside the weights": (lambda ck: (ck / "modeling_evil.py").write_text("import os\n"),
                                         "unexpected file: modeling_evil.py (the export does not write it)"),
    "garbage vllm state": (lambda ck: (ck / "vllm_fq_modelopt_state.pth").write_bytes(b"garbage"),
                           "vllm_fq_modelopt_state.pth: the export does not write it for this model"),
    # headers that safetensors itself refuses
    "shape entries as strings": (lambda ck: _edit_shard_header(ck, _shape_as_strings), "is not a list of non-negative"),
    "float offsets": (lambda ck: _edit_shard_header(ck, _float_offsets), "is not [begin, end]"),
    "deeply nested header": (_nest_in_first_shard, "deeper than safetensors' limit"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_kind_of_damage_is_reported(exported, checkpoint, damage):
    do, expected = DAMAGE[damage]
    do(checkpoint)
    report = oe.verify(exported[0], checkpoint)
    assert not report.ok
    assert any(expected in m for m in report.mismatches), report


def test_every_mismatch_is_reported_not_just_the_first(exported, checkpoint):
    for damage in ("flipped byte", "pickle file", "auto_map in config", "wrong total_size"):
        DAMAGE[damage][0](checkpoint)
    report = oe.verify(exported[0], checkpoint)
    assert len(report.mismatches) == 4, report
    text = repr(report)
    assert "4 mismatch(es)" in text and all(m in text for m in report.mismatches)


def test_a_wrong_quantizer_state_value_is_reported(exported, checkpoint):
    model = exported[0]
    q = next(q for q in oe.find_quantizers(model) if q.handle.state_dict())
    key, value = next(iter(q.handle.state_dict().items()))
    with torch.no_grad():
        value.mul_(2)
    try:
        report = oe.verify(model, checkpoint)
    finally:
        with torch.no_grad():
            value.div_(2)
    assert any(m.startswith(f"{QUANTIZER_STATE_NAME}: {q.name}.{key}: ") for m in report.mismatches), report


def test_verifying_with_another_dtype_names_each_tensor(exported):
    model, out = exported
    report = oe.verify(model, out, dtype="bfloat16")
    assert not report.ok and report.tensors == 0
    assert any(m.startswith("model.norm.weight: expected torch.bfloat16") for m in report.mismatches)


def _where(ck: Path, name: str) -> tuple[Path, int, int]:
    """``(shard, first byte, end)`` of tensor ``name``'s data in checkpoint ``ck``."""
    for shard in sorted(ck.glob("*.safetensors")):
        start, header = safetensors_header(str(shard))
        if name in header:
            begin, end = header[name]["data_offsets"]
            return shard, start + begin, start + end
    raise AssertionError(f"{name} is in no shard of {ck}")


def _flip_byte_of(ck: Path, name: str) -> None:
    """Flip one bit of the byte in the middle of ``name``'s data."""
    shard, begin, end = _where(ck, name)
    data = bytearray(shard.read_bytes())
    data[(begin + end) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _passed_through(model: nn.Module, out: Path, name: str, **kwargs) -> bool:
    """Whether the export's reader hands ``name`` over as file bytes (a :class:`FileSpan`), not as a tensor
    (and ``spans()``, which verify prefetches from, says the same)."""
    job = prepare_job(model, out, max_shard_size=2**62, overwrite=True, check_out=False, **kwargs)
    unit = next(u for u in job.plan.units if any(s.name == name for s in u.outputs))
    reader = job.reader()
    raw = reader.read(unit)
    assert reader.spans(unit) == {k: v for k, v in raw.items() if isinstance(v, FileSpan)}
    return isinstance(raw.get(name), FileSpan)


@pytest.fixture
def small_chunks(monkeypatch):
    """Compare 256 bytes at a time, so that the tiny tensors here span many chunks."""
    monkeypatch.setattr(importlib.import_module("offload_export.verify"), "_CHUNK", 256)


# (tensor, passed through from its store's file?) in the MIXED layout, int8 on every Linear but lm_head
FLIPPED = {"lm_head.weight": True,  # a .dat store, not quantized: compared file to file
           "model.layers.1.input_layernorm.weight": True,
           "model.layers.1.self_attn.q_proj.weight": False,  # a .dat store, folded
           "model.layers.0.mlp.down_proj.weight": False,  # a cpu store, folded
           "model.norm.weight": False}  # resident


@pytest.mark.parametrize("name", sorted(FLIPPED))
def test_a_flipped_byte_is_reported_naming_the_tensor(exported, checkpoint, small_chunks, name):
    model, out = exported
    assert _passed_through(model, out, name) is FLIPPED[name]
    _flip_byte_of(checkpoint, name)
    report = oe.verify(model, checkpoint)
    assert report.mismatches[0].startswith(f"{name}: 1 of ") and "elements differ in" in report.mismatches[0], report
    # the second opinion (the quantizer's own forward) names it too when it samples that weight
    assert all(m.startswith(f"{name}: 1 of ") for m in report.mismatches[1:]) and len(report.mismatches) <= 2, report


@pytest.mark.parametrize("name", ["lm_head.weight", "model.layers.0.mlp.down_proj.weight"])
def test_a_shard_cut_inside_a_tensor_names_it(exported, checkpoint, name):
    shard, begin, end = _where(checkpoint, name)
    with open(shard, "r+b") as f:
        f.truncate((begin + end) // 2)
    report = oe.verify(exported[0], checkpoint)
    assert any(m.startswith(f"{shard.name}: file is ") and "truncated" in m for m in report.mismatches), report
    assert any(m.startswith(f"{name}: cannot read its bytes from {shard.name}") for m in report.mismatches), report
    assert not any(m.startswith("missing tensor") for m in report.mismatches), report


def test_a_flipped_byte_in_a_tensor_of_the_users_safetensors_is_reported(tmp_path, small_chunks):
    """from_pretrained(device_map=disk): the unquantized weights pass through from the user's own file."""
    spec = LayoutSpec("from_pretrained", (("model.embed_tokens", "disk"), ("model.layers.0", "disk"),
                                          ("model.layers.1", "resident"), ("model.norm", "disk"),
                                          ("lm_head", "disk")))
    model = apply_layout(make_model("llama_untied"), spec, tmp_path / "layout")
    oe.quantize_weights(model, "int8")
    oe.save_clean(model, tmp_path / "out")
    assert oe.verify(model, tmp_path / "out").ok
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert _passed_through(model, tmp_path / "out", name) is (name == "model.embed_tokens.weight")
        _flip_byte_of(tmp_path / "out", name)
    report = oe.verify(model, tmp_path / "out")
    assert sorted(m.split(":")[0] for m in report.mismatches) == ["model.embed_tokens.weight",
                                                                  "model.layers.0.self_attn.k_proj.weight"], report


def test_a_flipped_byte_in_a_modelopt_packed_tensor_is_reported(tmp_path, small_chunks):
    packed = pytest.importorskip("test_format_modelopt")
    model = packed.quantize(packed.tiny_qwen3(), "FP8_DEFAULT_CFG")
    model = apply_layout(model, packed.MIXED, tmp_path / "layout")
    oe.save_clean(model, tmp_path / "out", format="modelopt")
    assert oe.verify(model, tmp_path / "out", format="modelopt").ok
    name = "model.layers.0.mlp.down_proj.weight"  # disk; packed to float8 with its weight_scale
    shard, _, _ = _where(tmp_path / "out", name)
    assert safetensors_header(str(shard))[1][name]["dtype"] == "F8_E4M3"
    _flip_byte_of(tmp_path / "out", name)
    report = oe.verify(model, tmp_path / "out", format="modelopt")
    assert len(report.mismatches) == 1 and report.mismatches[0].startswith(f"{name}: 1 of "), report


def test_a_flipped_byte_in_a_compressed_tensors_packed_tensor_is_reported(tmp_path, small_chunks):
    from accelerate import disk_offload
    packed = pytest.importorskip("test_format_compressed_tensors")
    model = disk_offload(packed.ct_model("w4a16_g128"), str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    oe.save_clean(model, tmp_path / "out", format=packed.CT)
    assert oe.verify(model, tmp_path / "out", format=packed.CT).ok
    name = "model.layers.0.mlp.up_proj.weight_packed"  # int4 packed into int32
    _flip_byte_of(tmp_path / "out", name)
    report = oe.verify(model, tmp_path / "out", format=packed.CT)
    assert len(report.mismatches) == 1 and report.mismatches[0].startswith(f"{name}: 1 of "), report


def test_verify_leaves_no_thread_behind(exported, checkpoint):
    _flip_byte_of(checkpoint, "lm_head.weight")
    assert oe.verify(exported[0], exported[1]).ok and not oe.verify(exported[0], checkpoint).ok
    assert [t.name for t in threading.enumerate() if t.name.startswith("offload-export")] == []


def test_verify_reads_the_files_without_mapping_them(exported):
    model, out = exported
    assert oe.verify(model, out).ok
    assert str(out) not in Path("/proc/self/maps").read_text()


class NoisyQuantizer(nn.Module):
    """A fold that differs on every call: what verify=True exists to catch."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + torch.randn_like(w)


oe.register_quantizer(NoisyQuantizer)


def test_save_clean_verify_true_commits_a_verified_export(exported, tmp_path):
    report = oe.save_clean(exported[0], tmp_path / "out", max_shard_size=SHARD, verify=True)
    assert report.files == sorted(p.name for p in (tmp_path / "out").iterdir())


def test_save_clean_verify_true_commits_nothing_on_a_mismatch(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight_quantizer = NoisyQuantizer()
    with pytest.raises(RuntimeError, match=r"verify found 2 mismatch\(es\).*\n  - 1\.weight: 64 of 64 elements differ in model"):
        oe.save_clean(model, tmp_path / "out", verify=True)
    assert list(tmp_path.iterdir()) == [] and leftovers(tmp_path) == []
