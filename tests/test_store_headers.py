"""Offload stores are validated before anything is written: a corrupt safetensors file (or ``.dat``) is a
ValueError naming the file and the tensor, raised by ``save_clean`` while it prepares the export."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from layouts import LayoutSpec, apply_layout_with_artifacts, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import offload_export as oe
from offload_export._store import safetensors_header
MAX_HEADER_BYTES = 100_000_000

_PLACE = (("model.embed_tokens", "disk"), ("model.layers.0", "disk"), ("model.layers.1", "resident"),
          ("model.norm", "resident"), ("lm_head", "disk"))


def _replace(path: Path, data: bytes) -> None:
    """Write a new file over ``path`` (a new inode: resident weights that transformers mmapped keep the old bytes)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict | list | str, data: bytes, *, length: int | None = None) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _neighbours(header: dict) -> tuple[str, str]:
    """Two layer-0 tensors of one shape whose data are next to each other."""
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    for (a_off, a), (b_off, b) in zip(spans, spans[1:]):
        if "layers.0" in a and header[a]["shape"] == header[b]["shape"]:
            return a, b
    raise AssertionError("no neighbouring tensors of one shape")


def _offsets_of_neighbour(path: Path) -> str:
    """The issue's case: an entry pointing at its neighbour's bytes (shape x dtype fit; the spans overlap)."""
    header, data = _split(path)
    a, b = _neighbours(header)
    header[a]["data_offsets"] = header[b]["data_offsets"]
    _replace(path, _join(header, data))
    return a


def _offsets_not_matching_shape(path: Path) -> str:
    header, data = _split(path)
    a, _ = _neighbours(header)
    begin, end = header[a]["data_offsets"]
    header[a]["data_offsets"] = [begin, end + (end - begin)]  # twice its size: it would read its neighbour too
    _replace(path, _join(header, data))
    return a


def _shape_not_matching_offsets(path: Path) -> str:
    header, data = _split(path)
    a, _ = _neighbours(header)
    header[a]["shape"] = [header[a]["shape"][0] // 2, *header[a]["shape"][1:]]
    _replace(path, _join(header, data))
    return a


def _wrong_dtype(path: Path) -> str:
    header, data = _split(path)
    a, _ = _neighbours(header)
    header[a]["dtype"] = "F16" if header[a]["dtype"] != "F16" else "F32"
    _replace(path, _join(header, data))
    return a


def _rewrite(path: Path, data: bytes) -> str:
    """Replace the file (a file-level corruption: no tensor to name)."""
    _replace(path, data)
    return ""


CORRUPTIONS = {
    "offsets of its neighbour": (_offsets_of_neighbour, "gap or an overlap"),
    "offsets not matching shape x dtype": (_offsets_not_matching_shape, "needs"),
    "shape not matching offsets": (_shape_not_matching_offsets, "needs"),
    "dtype not matching offsets": (_wrong_dtype, "needs"),
    "truncated data": (lambda p: _rewrite(p, p.read_bytes()[:-100]), "truncated or trailing data"),
    "trailing data": (lambda p: _rewrite(p, p.read_bytes() + b"\0" * 8), "truncated or trailing data"),
    "header length over 100 MB": (lambda p: _rewrite(p, _join(*_split(p), length=MAX_HEADER_BYTES + 1)),
                                  "exceeds safetensors' limit"),
    "header length past the end": (lambda p: _rewrite(p, _join(_split(p)[0], b"", length=10**6)),
                                   "runs past the end"),
    "header not an object": (lambda p: _rewrite(p, _join(list(_split(p)[0]), _split(p)[1])),
                             "JSON list, not an object"),
    "header not JSON": (lambda p: _rewrite(p, _join("{not json", _split(p)[1])), "not JSON"),
    "too short": (lambda p: _rewrite(p, b"\1\2\3"), "too short"),
}


@pytest.fixture
def offloaded(tmp_path):
    """A model loaded with from_pretrained(device_map, offload_folder): disk weights read from its source file."""
    model, art = apply_layout_with_artifacts(make_model("llama_untied"), LayoutSpec("from_pretrained", _PLACE),
                                             tmp_path / "layout")
    assert oe.layout(model).summary().get("safetensors")
    return model, art.source_file


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_source_file_fails_before_anything_is_written(offloaded, corruption, tmp_path):
    model, source = offloaded
    corrupt, message = CORRUPTIONS[corruption]
    tensor = corrupt(source)
    with pytest.raises(Exception):  # the safetensors library rejects the file too
        with safe_open(source, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(ValueError, match=message) as info:
        oe.save_clean(model, tmp_path / "out")
    assert str(source) in str(info.value) and (not tensor or f"tensor '{tensor}'" in str(info.value))
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout"]  # no staging directory left either
    with pytest.raises(ValueError, match=message):  # and at the first read outside an export
        with oe.materialized(model):
            pass


def test_the_issue_case_no_longer_exports_the_neighbours_bytes(offloaded, tmp_path):
    model, source = offloaded
    _offsets_of_neighbour(source)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\S+'.*\n.*corrupt"):
        oe.save_clean(model, tmp_path / "out")


def test_a_source_file_changed_after_loading_is_reparsed(offloaded, tmp_path):
    """Headers are cached per (path, mtime, size): an intact rewrite exports, a later corruption is seen."""
    model, source = offloaded
    oe.save_clean(model, tmp_path / "first")
    header, data = _split(source)
    _replace(source, _join(header, data))  # the same tensors, another header length: still valid
    oe.save_clean(model, tmp_path / "second")
    assert (tmp_path / "second" / "model.safetensors").read_bytes() == (tmp_path / "first" / "model.safetensors").read_bytes()
    _wrong_dtype(source)
    with pytest.raises(ValueError, match="needs"):
        oe.save_clean(model, tmp_path / "third")


def test_a_missing_tensor_and_a_changed_shape_are_named(offloaded, tmp_path):
    model, source = offloaded
    header, data = _split(source)
    name = "model.layers.0.mlp.down_proj.weight"
    entry = header[name]
    begin, end = entry["data_offsets"]
    header[name] = {**entry, "shape": [end - begin], "dtype": "U8"}  # valid file, another shape
    _replace(source, _join(header, data))
    with pytest.raises(ValueError, match=f"'{name}' has shape \\[{end - begin}\\]"):
        oe.save_clean(model, tmp_path / "out")
    header[name.replace("down", "other")] = header.pop(name)
    _replace(source, _join(header, data))
    with pytest.raises(ValueError, match=f"has no tensor '{name}'"):
        oe.save_clean(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_dat_file_fails_before_anything_is_written(tmp_path):
    model, art = apply_layout_with_artifacts(make_model("llama_untied"), LayoutSpec("disk_offload"), tmp_path / "layout")
    dat = sorted(art.offload_dir.glob("*.dat"))[0]
    _replace(dat, dat.read_bytes()[:-4])
    with pytest.raises(ValueError, match=f"{dat.name}.*bytes"):
        oe.save_clean(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.bool])
def test_valid_files_parse_as_safetensors_writes_them(dtype, tmp_path):
    from safetensors.torch import save_file
    tensors = {"a": torch.ones(3, 5).to(dtype), "b": torch.zeros(0, 4).to(dtype), "c": torch.ones(()).to(dtype)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    start, header = safetensors_header(str(tmp_path / "x.safetensors"))
    assert sorted(header) == ["a", "b", "c"] and start > 8


def _int_in_place_of_float(path: Path) -> str:
    """A float32 tensor re-labelled I32: same size, same shape, the file valid; its bits would read as integers."""
    header, data = _split(path)
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and "layers.0" in k)
    header[name]["dtype"] = "I32"
    _replace(path, _join(header, data))
    return name


def test_a_float_relabelled_as_int_is_refused_before_writing(offloaded, tmp_path):
    model, source = offloaded
    name = _int_in_place_of_float(source)
    with pytest.raises(ValueError, match=f"tensor '{name}' is stored as I32, the module holds .* as torch.float32"):
        oe.save_clean(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_header_changed_after_the_plan_is_refused_at_read_time(offloaded, tmp_path):
    """The store is checked when the export is planned and again when each tensor is read."""
    from offload_export.checkpoint import write_weights
    from offload_export.job import prepare_job

    model, source = offloaded
    job = prepare_job(model, tmp_path / "out")
    name = _int_in_place_of_float(source)
    (tmp_path / "tmp").mkdir()
    with pytest.raises(ValueError, match=f"tensor '{name}' is stored as I32"):
        write_weights(job.reader(), job.plan, tmp_path / "tmp", False)


def test_a_deeply_nested_header_is_the_documented_value_error(offloaded, tmp_path):
    model, source = offloaded
    header, data = _split(source)
    text = json.dumps(header)
    text = text[:-2] + ',"extra":' + "[" * 100_000 + "]" * 100_000 + "}}"
    _replace(source, _join(text, data))
    with pytest.raises(ValueError, match="deeper than safetensors' limit of 127"):
        oe.save_clean(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# one header reader, as strict as safetensors: mutate a valid header and both must agree on every result
_VALID = {"__metadata__": {"format": "pt"},
          "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
          "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
          "c": {"dtype": "U8", "shape": [0], "data_offsets": [32, 32]}}
_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats(allow_nan=False)
                            | st.text(max_size=4),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                          max_size=3), max_leaves=6)


def _mutations() -> st.SearchStrategy:
    keys = st.sampled_from(["a", "b", "c", "__metadata__"])
    fields = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])
    values = (_JSON_VALUES | st.sampled_from(["F16", "I32", "F4", "I4", "F8_E8M0", "BOOL", "C64"])
              | st.lists(st.integers(0, 40), max_size=3) | st.lists(st.floats(0, 40), min_size=2, max_size=2)
              | st.lists(st.text("0123456789", min_size=1, max_size=2), max_size=2))
    return st.lists(st.tuples(keys, fields, values), min_size=1, max_size=3)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(mutations=_mutations(), extra_bytes=st.integers(-4, 4), depth=st.sampled_from([0, 0, 0, 124, 125, 126, 200]))
def test_the_header_reader_agrees_with_safetensors(tmp_path_factory, mutations, extra_bytes, depth):
    header = json.loads(json.dumps(_VALID))
    for key, field, value in mutations:
        if key == "__metadata__":
            header[key] = value if field == "extra" else {field: value}
        elif isinstance(header.get(key), dict):
            header[key][field] = value
    text = json.dumps(header)
    if depth:  # an unknown key nested `depth` deep inside tensor a's entry (3 levels down with it)
        text = text.replace('"a": {', '"a": {"deep": ' + "[" * depth + "]" * depth + ", ", 1)
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(_join(text, b"\0" * max(0, 32 + extra_bytes)))
    try:
        with safe_open(str(path), "pt"):
            pass
        theirs = None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        theirs = str(e)
    try:
        safetensors_header(str(path))
        ours = None
    except ValueError as e:
        ours = str(e)
    assert (ours is None) == (theirs is None), (ours, theirs, text[:300])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(specs=st.lists(st.tuples(st.text("abc.", min_size=1, max_size=4),
                                st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.bool,
                                                 torch.float8_e4m3fn]),
                                st.lists(st.integers(0, 3), max_size=3)), max_size=5, unique_by=lambda s: s[0]))
def test_the_writers_headers_are_read_by_both_readers(tmp_path_factory, specs):
    """The writer lays the format out itself; what it writes, the one reader and safetensors both accept alike."""
    from offload_export.writer import ShardWriter, TensorSpec

    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, dtype, shape in specs}
    writer = ShardWriter(str(path), [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    start, header = safetensors_header(str(path))
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(header) == sorted(tensors) and f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert f.get_tensor(name).dtype == t.dtype and list(header[name]["shape"]) == list(t.shape)
