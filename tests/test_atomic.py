"""The destination and the commit: source folders refused, symlinks followed, crash-safe overwrite without
renameat2, stale cleanup that never judges a process it cannot see.

Faults that need their own process (SIGKILL mid-commit, another PID namespace) run this file as a script in a
child (``python test_atomic.py <mode> <json args>``); the child prints one JSON object per line.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import offload_export as oe
from offload_export import _atomic
from offload_export._atomic import check_destination, is_staging_dir

HERE = Path(__file__).parent


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if is_staging_dir(p))


def linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(8, 8)


def disk_offloaded(work: Path) -> tuple[nn.Module, Path]:
    """Three Linears offloaded to .dat memmaps in ``work/offload`` by accelerate's ``disk_offload``."""
    import accelerate

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(3)))
    return accelerate.disk_offload(model, str(work / "offload"), execution_device="cpu"), work / "offload"


# ----------------------------------------------------------------------- 5: never replace what the model reads


@pytest.fixture(scope="module")
def dat_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("dat")
    model, offload = disk_offloaded(work)
    return model, work, offload


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory):
    """transformers' from_pretrained(device_map=..., offload_folder=...): disk entries read from src/model.safetensors."""
    import layouts as lt

    spec = lt.LayoutSpec("from_pretrained", (("model.embed_tokens", "disk"), ("model.layers.0", "resident"),
                                             ("model.layers.1", "disk"), ("model.norm", "resident"),
                                             ("lm_head", "disk")))
    model, art = lt.apply_layout_with_artifacts(lt.make_model("llama_untied"), spec, tmp_path_factory.mktemp("fp"))
    return model, art


def test_layout_source_paths_name_the_offload_folder_and_the_source_checkpoint(dat_model, pretrained_model):
    model, _, offload = dat_model
    assert oe.layout(model).source_paths() == [str(offload)]
    model, art = pretrained_model
    assert oe.layout(model).source_paths() == sorted([str(art.offload_dir), str(art.source_file)])
    assert oe.layout(linear(0)).source_paths() == []


@pytest.mark.parametrize("where", ["offload folder", "its parent", "a symlink to it"])
def test_overwrite_refuses_the_dat_offload_folder_or_a_folder_containing_it(dat_model, tmp_path, where):
    model, work, offload = dat_model
    dest = {"offload folder": offload, "its parent": work, "a symlink to it": tmp_path / "link"}[where]
    if where == "a symlink to it":
        dest.symlink_to(offload)
    before = tree_hash(work)
    with pytest.raises(ValueError, match=f"cannot export into {dest}.*{offload}") as info:
        oe.save_clean(model, dest, overwrite=True)
    assert "choose a destination that does not contain it" in str(info.value)
    assert tree_hash(work) == before and leftovers(work) == [] and leftovers(work.parent) == []


@pytest.mark.parametrize("where", ["source checkpoint", "its parent", "offload folder (empty)"])
def test_overwrite_refuses_the_checkpoint_from_pretrained_reads_and_its_offload_folder(pretrained_model, where):
    model, art = pretrained_model
    dest = {"source checkpoint": art.source_dir, "its parent": art.workdir,
            "offload folder (empty)": art.offload_dir}[where]
    before = tree_hash(art.workdir)
    with pytest.raises(ValueError, match="which the model reads its offloaded weights from"):
        oe.save_clean(model, dest, overwrite=True)
    assert tree_hash(art.workdir) == before and art.offload_dir.is_dir()


def test_a_new_folder_inside_the_offload_folder_is_fine(dat_model):
    model, work, offload = dat_model
    before = tree_hash(offload)
    report = oe.save_clean(model, offload / "export")
    assert report.files == ["model.safetensors"] and oe.verify(model, offload / "export").ok
    assert {k: v for k, v in tree_hash(offload).items() if not k.startswith("export/")} == before


def test_check_destination_compares_paths_not_string_prefixes(tmp_path):
    (tmp_path / "offload").mkdir()
    assert check_destination(tmp_path / "off", overwrite=True, protected=[tmp_path / "offload"]) == tmp_path / "off"
    assert check_destination(tmp_path / "offload" / "x", overwrite=True, protected=[tmp_path / "offload"])
    with pytest.raises(ValueError, match="it contains"):
        check_destination(tmp_path, overwrite=True, protected=[tmp_path / "offload" / "model.safetensors"])


# ----------------------------------------------------------------------- 6: a symlinked destination


@pytest.mark.parametrize("target_state", ["absent", "empty", "previous checkpoint", "dangling parent"])
def test_symlinked_destination_receives_the_checkpoint_at_its_target_and_the_link_stays(tmp_path, target_state):
    scratch = tmp_path / "scratch"
    target = scratch / "ckpt"
    if target_state != "dangling parent":
        scratch.mkdir()
    if target_state in ("empty", "previous checkpoint"):
        target.mkdir()
    if target_state == "previous checkpoint":
        oe.save_clean(linear(1), target, overwrite=True)
    link = tmp_path / "work" / "out"
    link.parent.mkdir()
    link.symlink_to(target)
    model = linear(0)
    report = oe.save_clean(model, link, overwrite=target_state == "previous checkpoint")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert report.files == ["model.safetensors"] and oe.verify(model, target).ok
    assert leftovers(link.parent) == [] and leftovers(scratch) == []


def test_check_destination_returns_the_symlinks_target(tmp_path):
    (tmp_path / "scratch").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "scratch" / "ckpt")
    assert check_destination(tmp_path / "out", overwrite=False) == tmp_path / "scratch" / "ckpt"


def test_symlink_to_a_file_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "out").symlink_to(tmp_path / "file")
    with pytest.raises(FileExistsError, match=r"out \(-> .*file\) exists and is not a directory"):
        oe.save_clean(linear(0), tmp_path / "out")


# ----------------------------------------------------------------------- 7: overwrite without renameat2


def child_kill_commit(args: dict) -> None:
    """Export with the portable commit forced; SIGKILL ourselves before the ``at``-th rename (4: after the 3rd)."""
    _atomic._renameat2_fn = lambda: None  # as on NFS / CIFS / overlayfs (EINVAL) or without glibc 2.28
    real, count = os.rename, [0]

    def rename(src, dst, *a, **kw):
        if _atomic._TAG not in os.fspath(src) + os.fspath(dst):
            return real(src, dst, *a, **kw)
        count[0] += 1
        if count[0] == args["at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *a, **kw)
        if count[0] == 3 and args["at"] == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename
    oe.save_clean(linear(1), args["dest"], overwrite=True)
    print(json.dumps({"renames": count[0]}), flush=True)


def run_child(mode: str, args: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, mode, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("checkpoints")
    for name, seed in (("old", 0), ("new", 1)):
        oe.save_clean(linear(seed), root / name)
    return {name: tree_hash(root / name) for name in ("old", "new")}


@pytest.mark.parametrize("at", [1, 2, 3, 4], ids=["before-first-rename", "after-old-moved-aside",
                                                  "after-new-moved-in", "after-old-renamed-for-removal"])
def test_sigkill_at_each_step_of_the_portable_overwrite_loses_neither_checkpoint(tmp_path, checkpoints, at):
    parent = tmp_path / "exports"
    dest = parent / "out"
    oe.save_clean(linear(0), dest)
    proc = run_child("kill_commit", {"dest": str(dest), "at": at})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if dest.exists():  # at every instant: the old or the new checkpoint at dest, or the old one beside it
        assert tree_hash(dest) in (checkpoints["old"], checkpoints["new"])
    else:
        assert checkpoints["old"] in [tree_hash(p) for p in parent.iterdir() if is_staging_dir(p)]
    report = oe.save_clean(linear(2), parent / "next")  # any later export into the same parent
    assert tree_hash(dest) == checkpoints["old" if at <= 2 else "new"]
    assert leftovers(parent) == [] and sorted(os.listdir(parent)) == ["next", "out"]
    assert any("restored" in n for n in report.notes) == (at == 2), report.notes


def test_interrupt_between_the_two_renames_puts_the_old_checkpoint_back(tmp_path, monkeypatch, checkpoints):
    dest = tmp_path / "out"
    oe.save_clean(linear(0), dest)
    monkeypatch.setattr(_atomic, "_renameat2_fn", lambda: None)
    real, count = os.rename, [0]

    def rename(src, dst, *a, **kw):
        count[0] += _atomic._TAG in os.fspath(src) + os.fspath(dst)
        if count[0] == 2:
            raise KeyboardInterrupt
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        oe.save_clean(linear(1), dest, overwrite=True)
    monkeypatch.undo()
    assert tree_hash(dest) == checkpoints["old"] and leftovers(tmp_path) == []


def test_a_dead_overwrites_backup_is_dropped_once_the_new_checkpoint_is_in_place(tmp_path):
    dest = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = f".out{_atomic._TAG}{_atomic._identity()}-{int(dead.stdout)}-1-0000000a"
    (tmp_path / (name + _atomic._BACKUP)).mkdir()
    (tmp_path / (name + _atomic._BACKUP) / "old").write_text("old")
    dest.mkdir()
    (dest / "new").write_text("new")
    report = oe.save_clean(linear(0), tmp_path / "next")
    assert sorted(os.listdir(tmp_path)) == ["next", "out"] and os.listdir(dest) == ["new"]
    assert not any("restored" in n or "kept" in n for n in report.notes), report.notes


# ----------------------------------------------------------------------- 8: owners across PID namespaces


def child_hold(args: dict) -> None:
    """Stage an export into ``dest`` and stay alive inside it (as a live, slow export would)."""
    with _atomic.staging(Path(args["dest"]), overwrite=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        print(json.dumps({"pid": os.getpid(), "tmp": str(tmp)}), flush=True)
        time.sleep(120)


def child_export(args: dict) -> None:
    """One export into ``dest``; report its notes."""
    report = oe.save_clean(linear(0), args["dest"])
    print(json.dumps({"pid": os.getpid(), "notes": report.notes}), flush=True)


def runs_or_skip(cmd: list[str], why: str) -> list[str]:
    """``cmd`` (a command prefix) when ``cmd true`` succeeds here; else the test is skipped with ``why``."""
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip(why)
    return cmd


def _unshare() -> list[str]:
    return runs_or_skip(["unshare", "-Urpf", "--mount-proc", "--kill-child"],
                        "unshare -Urpf --mount-proc is not allowed here")


def hold(parent: Path, prefix: list[str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([*prefix, sys.executable, __file__, "hold", json.dumps({"dest": str(parent / "held")})],
                            stdout=subprocess.PIPE, text=True, cwd=HERE)
    for line in proc.stdout:
        if line.startswith("{"):
            return proc, json.loads(line)
    raise AssertionError(f"holder exited with {proc.wait()} before staging")


@pytest.mark.parametrize("holder_ns, exporter_ns", [("new", "ours"), ("ours", "new")],
                         ids=["pid-1-in-a-container", "seen-from-a-container"])
def test_a_live_export_in_another_pid_namespace_is_kept_and_noted(tmp_path, holder_ns, exporter_ns):
    unshare = _unshare()
    proc, held = hold(tmp_path, unshare if holder_ns == "new" else [])
    try:
        assert (held["pid"] == 1) == (holder_ns == "new")
        if exporter_ns == "ours":
            notes = oe.save_clean(linear(0), tmp_path / "next").notes
        else:
            child = subprocess.run([*unshare, sys.executable, __file__, "export",
                                    json.dumps({"dest": str(tmp_path / "next")})],
                                   capture_output=True, text=True, timeout=120, cwd=HERE)
            assert child.returncode == 0, child.stderr[-3000:]
            (result,) = [json.loads(s) for s in child.stdout.splitlines() if s.startswith("{")]
            assert result["pid"] == 1
            notes = result["notes"]
        assert Path(held["tmp"]).is_dir(), "a live export's staging directory was deleted"
        assert any(held["tmp"] in n and "PID namespace" in n for n in notes), notes
    finally:
        proc.kill()
        proc.wait()


def test_only_staging_dirs_of_dead_exports_in_our_namespace_are_removed(tmp_path):
    ident, parent = _atomic._identity(), os.getppid()  # the parent: a live process that is not us
    started = _atomic._proc_stat(parent)[1]
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    other = "0" * 16 if ident != "0" * 16 else "1" * 16
    names = {
        "dead": f".out{_atomic._TAG}{ident}-{dead}-1-0000000a",
        "pid reused": f".out{_atomic._TAG}{ident}-{parent}-{int(started) + 1}-0000000b",
        "ours, abandoned": f".out{_atomic._TAG}{ident}-{os.getpid()}-{_atomic._own_start()}-0000000e",
        "alive": f".out{_atomic._TAG}{ident}-{parent}-{started}-0000000c",
        "other namespace, same pid as ours": f".out{_atomic._TAG}{other}-{os.getpid()}-1-0000000d",
        "older version": f".out{_atomic._TAG}{'0' * 8}-{dead}-1-0000000f-old",
        "not ours": ".out.offload-export-whatever",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    notes: list[str] = []
    with _atomic.staging(tmp_path / "next", overwrite=False, notes=notes):
        pass
    left = {p.name for p in tmp_path.iterdir()}
    kept = ("alive", "other namespace, same pid as ours", "older version", "not ours")
    assert left == {"next", *(names[k] for k in kept)}
    assert sorted(n.split(":")[0] for n in notes) == sorted(
        f"kept {tmp_path / names[k]}" for k in ("other namespace, same pid as ours", "older version"))


if __name__ == "__main__":
    {"kill_commit": child_kill_commit, "hold": child_hold, "export": child_export}[sys.argv[1]](
        json.loads(sys.argv[2]))
