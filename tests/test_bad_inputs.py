"""Bad input: one clear exception naming the tensor or module and what to do, and nothing written."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_faults import leftovers
from torch import nn

import offload_export as oe


def two_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


def assert_nothing_written(parent: Path, dest: Path) -> None:
    assert not dest.exists() and leftovers(parent) == []


def test_a_meta_tensor_that_no_hook_can_supply(tmp_path):
    model = two_linears()
    model[1].weight = nn.Parameter(torch.empty(8, 8, device="meta"))
    with pytest.raises(RuntimeError, match=r"(?s)^1\.weight is on the meta device and no accelerate hook .*device_map"):
        oe.save_clean(model, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


class CudaKernelQuantizer(nn.Module):
    """Fails on CPU input the way a CUDA-only extension kernel does."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not w.is_cuda:
            raise RuntimeError("quantize_kernel: expected a CUDA tensor, got a CPU one")
        return w


oe.register_quantizer(CudaKernelQuantizer)


def test_a_quantizer_kernel_that_needs_cuda(tmp_path):
    model = two_linears()
    model[1].weight_quantizer = CudaKernelQuantizer()
    with pytest.raises(RuntimeError) as info:
        oe.save_clean(model, tmp_path / "out")
    assert str(info.value) == "quantize_kernel: expected a CUDA tensor, got a CPU one"  # the kernel's own exception
    note = "\n".join(info.value.__notes__)
    assert "1.weight_quantizer" in note and "1.weight" in note and "device='cuda'" in note
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_the_destination_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(FileExistsError, match="exists and is not a directory; choose another destination"):
        oe.save_clean(two_linears(), tmp_path / "out")
    assert (tmp_path / "out").read_text() == "not a directory"


def test_a_non_empty_destination_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        oe.save_clean(two_linears(), tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    with pytest.raises(ValueError, match="would be lost: keep.txt;"):  # overwrite replaces only a checkpoint
        oe.save_clean(two_linears(), tmp_path / "out", overwrite=True)
    (tmp_path / "out" / "keep.txt").rename(tmp_path / "out" / "config.json")
    oe.save_clean(two_linears(), tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]


def test_an_empty_destination_directory_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    assert oe.save_clean(two_linears(), tmp_path / "out").files == ["model.safetensors"]


@contextmanager
def unprivileged():
    """Run as 'nobody' when we are root (a read-only mode bit does not stop root); restored on exit."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unwritable_destination():
    root = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp dirs are closed to other users
    parent = root / "readonly"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    root.chmod(0o755)
    try:
        with unprivileged():
            if os.access(parent, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
                pytest.skip("the mode bits do not stop this user from writing")
            with pytest.raises(PermissionError, match=re.escape(f"cannot write into {parent}: permission denied")):
                oe.save_clean(two_linears(), parent / "out")
        assert os.listdir(parent) == []
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("dtype", ["float17", "Tensor", "torch.nope", 3])
def test_an_unknown_dtype(tmp_path, dtype):
    with pytest.raises(ValueError, match=re.escape(f"dtype={dtype!r} is not a torch dtype")):
        oe.save_clean(two_linears(), tmp_path / "out", dtype=dtype)
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("size", ["5XB", "GB", "-1GB", 0, -5, "1.5.GB", True, 2.5, None])
def test_a_malformed_max_shard_size(tmp_path, size):
    with pytest.raises(ValueError, match=re.escape(f"max_shard_size={size!r}")):
        oe.save_clean(two_linears(), tmp_path / "out", max_shard_size=size)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_plain_module_gets_its_weights_and_a_note_instead_of_a_config(tmp_path):
    model = two_linears()
    report = oe.save_clean(model, tmp_path / "out")
    assert report.files == ["model.safetensors"] and report.tensors == 4
    assert any("not a transformers model" in n and "config.json skipped" in n for n in report.notes)
    assert "config.json skipped" in repr(report)
    assert oe.verify(model, tmp_path / "out").ok


def test_resident_parameters_sharing_one_buffer_without_a_tie(tmp_path):
    model = two_linears()
    base = torch.randn(2, 8, 8)
    model[0].weight, model[1].weight = nn.Parameter(base[0]), nn.Parameter(base[1])
    with pytest.raises(ValueError, match=r"^0\.weight and 1\.weight share memory but are neither the same tensor "
                                         r"nor a declared tie;(.|\n)*clone"):
        oe.save_clean(model, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_one_parameter_in_two_places_is_a_tie_not_an_error(tmp_path):
    model = two_linears()
    model[1].weight = model[0].weight
    report = oe.save_clean(model, tmp_path / "out")
    assert report.tensors == 3 and report.dropped == {"1.weight": "tied to 0.weight"}


def test_a_torch_compile_wrapper(tmp_path):
    compiled = torch.compile(two_linears())
    assert type(compiled).__name__ == "OptimizedModule"  # what the check recognises
    for call in (lambda: oe.save_clean(compiled, tmp_path / "out"), lambda: oe.verify(compiled, tmp_path)):
        with pytest.raises(ValueError, match=r"torch\.compile wrapper at 'model'.*pass the original module \(model\._orig_mod\)"):
            call()
    assert_nothing_written(tmp_path, tmp_path / "out")
    assert oe.save_clean(compiled._orig_mod, tmp_path / "out").tensors == 4


def test_a_compiled_submodule_is_refused_like_a_compiled_model(tmp_path):
    model = two_linears()
    model[1] = torch.compile(model[1])  # its keys would be written as 1._orig_mod.weight
    for call in (lambda: oe.save_clean(model, tmp_path / "out"), lambda: oe.verify(model, tmp_path)):
        with pytest.raises(ValueError, match=r"torch\.compile wrapper at 'model\.1'.*\(model\.1\._orig_mod\)"):
            call()
    assert_nothing_written(tmp_path, tmp_path / "out")
