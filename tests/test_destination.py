"""What a destination may be: ``overwrite`` replaces only a checkpoint; ``""`` and the current directory are
refused; the model's own stores stay refused inside ``materialized`` and in every entry point (compressed-
tensors' disk cache included); a mount point is refused before anything is written; a read-only replaced
checkpoint is removed; a staging directory is live before it exists.

Cases that need their own process (a tmpfs mounted in a private mount namespace, a process without the right
to ignore file permissions) run this file as a script in a child (``python test_destination.py <mode> <json>``).
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_atomic import dat_model, leftovers, linear, pretrained_model, runs_or_skip, tree_hash  # noqa: F401 (fixtures)
from torch import nn

import offload_export as oe
from offload_export import _atomic
from offload_export._destination import CHECKPOINT_FILES, foreign_entries

HERE = Path(__file__).parent


def run_child(mode: str, args: dict, prefix: list[str] = (), preexec_fn=None) -> dict:
    proc = subprocess.run([*prefix, sys.executable, __file__, mode, json.dumps(args)], capture_output=True,
                          text=True, timeout=300, cwd=HERE, preexec_fn=preexec_fn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    return result


# ----------------------------------------------------------------------- 1: "", ".", and only a checkpoint


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_empty_destination_string_is_refused(tmp_path, monkeypatch, overwrite):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match="out_dir is empty"):
        oe.save_clean(linear(0), "", overwrite=overwrite)
    with pytest.raises(ValueError, match="out_dir is empty"):
        with _atomic.staging("", overwrite=overwrite):
            pass
    assert tree_hash(tmp_path) == before and leftovers(tmp_path.parent) == []


@pytest.mark.parametrize("spelling", [".", "absolute", "parent"])
def test_the_current_directory_is_refused_even_when_it_holds_a_checkpoint(tmp_path, monkeypatch, spelling):
    work = tmp_path / "ckpt"
    oe.save_clean(linear(1), work)
    monkeypatch.chdir(work)
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match="current working directory"):
        oe.save_clean(linear(0), {".": ".", "absolute": str(work), "parent": str(tmp_path)}[spelling],
                      overwrite=True)
    assert tree_hash(tmp_path) == before and Path.cwd() == work and leftovers(tmp_path) == []


CHECKPOINT = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
              "config.json", "generation_config.json", "tokenizer.json")


@pytest.mark.parametrize("extra, lost", [
    (("notes.txt",), "notes.txt"),
    (("runs/log.txt",), "runs/"),
    (("setup.py", "README.md", "pkg/__init__.py"), "pkg/, setup.py"),
    ((".bashrc", ".ssh/id_ed25519", "Documents/a"), ".bashrc, .ssh/, Documents/"),
    (("index.json", "model.embed.weight.dat"), "index.json, model.embed.weight.dat"),  # an accelerate offload folder
    (tuple(f"f{i:02d}" for i in range(25)), ", ".join(f"f{i:02d}" for i in range(10)) + " and 15 more"),
], ids=["unknown file", "subdirectory", "source tree", "home directory", "offload folder", "many files"])
def test_overwrite_refuses_a_directory_holding_more_than_a_checkpoint(tmp_path, extra, lost):
    dest = tmp_path / "out"
    for name in CHECKPOINT + extra:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(name)
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match="these would be lost") as info:
        oe.save_clean(linear(0), dest, overwrite=True)
    assert f"would be lost: {lost};" in str(info.value)
    assert tree_hash(tmp_path) == before and leftovers(tmp_path) == []


def test_overwrite_replaces_a_save_pretrained_checkpoint_with_tokenizer_and_model_card(tmp_path):
    import layouts as lt

    dest = tmp_path / "out"
    lt.make_model("llama_untied").save_pretrained(dest, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "README.md", ".gitattributes", "hf_quant_config.json", "recipe.yaml"):
        (dest / name).write_text("{}")
    (dest / "tokenizer.model").symlink_to(tmp_path / "elsewhere")  # a Hub snapshot's links: only the link goes
    assert len(list(dest.glob("model-*.safetensors"))) > 1 and foreign_entries(dest) == []
    model = linear(0)
    report = oe.save_clean(model, dest, overwrite=True)
    assert sorted(os.listdir(dest)) == report.files == ["model.safetensors"] and oe.verify(model, dest).ok
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_previous_export_with_its_tokenizer_is_replaced(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")),
                                        unk_token="<unk>")
    tokenizer.chat_template = "{{ messages }}"
    first = oe.save_clean(linear(1), tmp_path / "out", tokenizer=tokenizer)
    assert len(first.files) > 2  # the tokenizer's files too
    second = oe.save_clean(linear(0), tmp_path / "out", tokenizer=tokenizer, overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == second.files == first.files
    assert oe.verify(linear(0), tmp_path / "out").ok


def test_every_file_an_export_writes_is_a_checkpoint_file():
    from offload_export.formats.fake_quant import QUANTIZER_STATE_NAME
    from offload_export.formats.modelopt import HF_QUANT_CONFIG_NAME
    from offload_export.job import INDEX_NAME
    from offload_export.vllm_fq import VLLM_FQ_STATE_NAME

    for name in (QUANTIZER_STATE_NAME, HF_QUANT_CONFIG_NAME, INDEX_NAME, VLLM_FQ_STATE_NAME, "config.json",
                 "generation_config.json", "model.safetensors", "model-00003-of-00012.safetensors"):
        assert any(fnmatch.fnmatchcase(name, p) for p in CHECKPOINT_FILES), name


def test_a_file_put_into_the_destination_while_exporting_is_never_replaced(tmp_path):
    dest = tmp_path / "out"
    oe.save_clean(linear(1), dest)
    with pytest.raises(ValueError, match=r"would be lost: notes.txt;"):
        with _atomic.staging(dest, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            (dest / "notes.txt").write_text("mine")
    assert sorted(os.listdir(dest)) == ["model.safetensors", "notes.txt"] and leftovers(tmp_path) == []


# ----------------------------------------------------------------------- 2: the model's own files, everywhere


@pytest.mark.parametrize("where", ["offload folder", "its parent"])
def test_inside_materialized_the_offload_folder_is_still_refused(dat_model, where):
    model, work, offload = dat_model
    x = torch.randn(2, 16)
    expected = model(x)
    before = tree_hash(work)
    with oe.materialized(model):
        assert str(offload) in oe.layout(model).source_paths()  # (with other models' compressed-tensors caches)
        with pytest.raises(ValueError, match=f"{offload}, which the model reads its offloaded weights from"):
            oe.save_clean(model, offload if where == "offload folder" else work, overwrite=True)
    assert tree_hash(work) == before and torch.equal(model(x), expected)


def test_inside_materialized_the_source_checkpoint_of_from_pretrained_is_still_refused(pretrained_model):
    model, art = pretrained_model
    before = tree_hash(art.workdir)
    with oe.materialized(model):
        assert {str(art.offload_dir), str(art.source_file)} <= set(oe.layout(model).source_paths())
        with pytest.raises(ValueError, match="which the model reads its offloaded weights from"):
            oe.save_clean(model, art.source_dir, overwrite=True)
    assert tree_hash(art.workdir) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_distributed_export_refuses_the_models_own_files_inside_materialized(dat_model):
    model, work, offload = dat_model
    before = tree_hash(work)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with oe.materialized(model), pytest.raises(ValueError, match="reads its offloaded weights from"):
            oe.save_clean(model, offload, overwrite=True, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    assert tree_hash(work) == before


# ----------------------------------------------------------------------- 3: compressed-tensors' DiskCache


@pytest.fixture(scope="module")
def ct_disk_model(tmp_path_factory):
    """Two Linears offloaded by compressed-tensors itself to ``DiskCache`` files in ``work/cache``."""
    offload = pytest.importorskip("compressed_tensors.offload")
    work = tmp_path_factory.mktemp("ct")
    (work / "cache").mkdir()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    for module in model:
        offload.offload_module(module, torch.device("cpu"), "disk", offload_dir=str(work / "cache"))
    return model, work


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside materialized"])
@pytest.mark.parametrize("where", ["cache folder", "its parent"])
def test_overwrite_refuses_compressed_tensors_disk_cache_folder(ct_disk_model, inside, where):
    model, work = ct_disk_model
    cache = work / "cache"
    assert any(p.name.startswith("ct_disk_cache") for p in cache.iterdir())
    before = tree_hash(work)
    with oe.materialized(model) if inside else nullcontext():
        assert str(cache) in oe.layout(model).source_paths()
        with pytest.raises(ValueError, match="reads its offloaded weights from"):
            oe.save_clean(model, cache if where == "cache folder" else work, overwrite=True)
    assert tree_hash(work) == before


def test_overwrite_refuses_the_checkpoint_compressed_tensors_disk_cache_links_to(tmp_path):
    """load_offloaded_model: the DiskCache folder holds symlinks to the source checkpoint's files."""
    import layouts as lt
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    lt.make_model("llama_untied").save_pretrained(tmp_path / "src")
    with lt.quiet_libraries(), load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "src"), device_map="disk",
                                                     offload_folder=str(tmp_path / "cache"))
    assert all(p.is_symlink() for p in (tmp_path / "cache").iterdir())
    paths = oe.layout(model).source_paths()  # with any other DiskCache of this process
    assert str(tmp_path / "cache") in paths and str(tmp_path / "src" / "model.safetensors") in paths
    before = tree_hash(tmp_path / "src")
    with oe.materialized(model.model.norm):
        with pytest.raises(ValueError, match=f"it contains {tmp_path / 'src' / 'model.safetensors'}, which the"):
            oe.save_clean(model, tmp_path / "src", overwrite=True)
    assert tree_hash(tmp_path / "src") == before


# ----------------------------------------------------------------------- 4: a mount point


def _mount_namespace(tmp_path: Path) -> list[str]:
    """A command prefix running a child in a private mount namespace where ``tmp_path/mnt`` is a fresh tmpfs."""
    cmd = ["unshare", "-m" if os.geteuid() == 0 else "-rm", "--propagation", "private", "sh", "-c",
           'mount -t tmpfs tmpfs "$0" && exec "$@"', str(tmp_path / "mnt")]
    (tmp_path / "mnt").mkdir()
    return runs_or_skip(cmd, "cannot mount a tmpfs in a private mount namespace here")


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path):
    prefix = _mount_namespace(tmp_path)
    mnt = tmp_path / "mnt"
    results = run_child("mount", {"dest": str(mnt)}, prefix)
    for content in ("empty", "a checkpoint"):
        result = results[content]
        assert result["error"] == "ValueError" and "is a mount point" in result["message"], result
        assert f"e.g. {mnt / 'checkpoint'}" in result["message"]
        assert result["inside"] == ([] if content == "empty" else ["config.json"])
        assert result["beside"] == ["mnt"]  # nothing staged on the parent file system either
    assert results["inner"] == ["model.safetensors"]  # the folder the message suggests works


def child_mount(args: dict) -> None:
    dest, results = Path(args["dest"]), {}
    assert os.path.ismount(dest)
    for content in ("empty", "a checkpoint"):
        if content == "a checkpoint":
            (dest / "config.json").write_text("{}")
        try:
            oe.save_clean(linear(0), dest, overwrite=content != "empty")
            error, message = None, ""
        except Exception as e:  # noqa: BLE001 - reported to the test
            error, message = type(e).__name__, str(e)
        results[content] = {"error": error, "message": message, "inside": sorted(os.listdir(dest)),
                            "beside": sorted(os.listdir(dest.parent))}
    results["inner"] = oe.save_clean(linear(0), dest / "checkpoint").files
    print(json.dumps(results))


# ----------------------------------------------------------------------- 5: a read-only previous checkpoint


def _without_permission_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the bounding set,
    so that even root must respect file permissions (no-op for other users, who lack them anyway)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def test_overwrite_removes_a_read_only_previous_checkpoint(tmp_path):
    result = run_child("read_only", {"dest": str(tmp_path / "out")}, preexec_fn=_without_permission_override)
    if result["could_delete"]:
        pytest.skip("this process cannot give up the right to ignore file permissions")
    assert result["beside"] == ["out"] and not any("could not remove" in n for n in result["notes"])
    assert oe.verify(linear(0), tmp_path / "out").ok


def child_read_only(args: dict) -> None:
    dest = Path(args["dest"])
    probe = dest.parent / "probe"  # can this process delete from a read-only directory?
    probe.mkdir(parents=True)
    (probe / "file").write_text("x")
    probe.chmod(0o555)
    try:
        (probe / "file").unlink()
        could_delete = True
    except PermissionError:
        could_delete = False
    probe.chmod(0o755)
    shutil.rmtree(probe)
    oe.save_clean(linear(1), dest)
    for f in dest.iterdir():
        f.chmod(0o444)
    dest.chmod(0o555)
    notes = oe.save_clean(linear(0), dest, overwrite=True).notes
    print(json.dumps({"could_delete": could_delete, "beside": sorted(os.listdir(dest.parent)), "notes": notes}))


def test_a_replaced_checkpoint_that_cannot_be_removed_is_named_in_the_notes(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    oe.save_clean(linear(1), dest)

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(_atomic, "_remove_tree", refuse)
    notes = oe.save_clean(linear(0), dest, overwrite=True).notes
    monkeypatch.undo()
    (left,) = leftovers(tmp_path)
    assert [n for n in notes if "remove" in n] == [
        f"could not remove {tmp_path / left} ([Errno 13] Permission denied: '{tmp_path / left}'): it holds the "
        f"checkpoint {dest} held before; delete it by hand"]
    assert oe.verify(linear(0), dest).ok


# ----------------------------------------------------------------------- 13: live before it exists


def test_another_exports_cleanup_never_deletes_a_staging_directory_being_created(tmp_path, monkeypatch):
    second: dict = {}

    class Registry(set):
        """The live set; registering the first export's staging directory runs a second export meanwhile."""

        def add(self, name):
            if Path(name).name.startswith(".first") and not second:
                thread = threading.Thread(target=lambda: second.update(report=oe.save_clean(linear(1),
                                                                                            tmp_path / "second")))
                thread.start()
                thread.join()
            super().add(name)

    monkeypatch.setattr(_atomic, "_active", Registry())
    oe.save_clean(linear(0), tmp_path / "first")
    assert second["report"].files == ["model.safetensors"]
    assert oe.verify(linear(0), tmp_path / "first").ok and oe.verify(linear(1), tmp_path / "second").ok
    assert sorted(os.listdir(tmp_path)) == ["first", "second"]


if __name__ == "__main__":
    {"mount": child_mount, "read_only": child_read_only}[sys.argv[1]](json.loads(sys.argv[2]))
