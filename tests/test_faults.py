"""Fault injection: a failed export changes nothing — not the model, not its stores, not the destination.

Faults that need their own process (a file-size limit, SIGKILL, two racing exports) run this file as a
script in a child (``python test_faults.py <mode> <json args>``); the child prints one JSON object per line.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import offload_export as oe
from offload_export import _atomic
from offload_export._atomic import is_staging_dir
from offload_export._hooks import align_hooks
from offload_export._store import safetensors_header

SHARD = 40_000  # bytes: the tiny llama exports into 8 shards


class StepQuantizer(nn.Module):
    """Rounds a weight to a grid of ``step``; the class-level ``trap`` springs a fault at its k-th call."""

    trap: dict = {}
    calls = 0

    def __init__(self, step: float):
        super().__init__()
        self.enabled = True
        self.register_buffer("step", torch.tensor(step))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        cls = type(self)
        cls.calls += 1
        if cls.calls == cls.trap.get("at"):
            _spring(**cls.trap)
        return torch.round(w / self.step) * self.step


oe.register_quantizer(StepQuantizer)


def _spring(action: str, at: int, barrier: str | None = None, **_) -> None:
    if action == "raise":
        raise ValueError(f"injected failure at fold {at}")
    if action == "interrupt":
        raise KeyboardInterrupt
    if action == "announce_and_sleep":
        print(json.dumps({"event": "started"}), flush=True)
        time.sleep(120)
    if action == "barrier":  # both racers have passed the destination check before either commits
        Path(barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)


@contextmanager
def trapped(action: str, at: int, **kw):
    StepQuantizer.calls, StepQuantizer.trap = 0, dict(action=action, at=at, **kw)
    try:
        yield
    finally:
        StepQuantizer.trap = {}


def _layouts():
    import layouts  # transformers and hypothesis: only where a transformers model is built

    return layouts


SPECS = {  # LayoutSpec arguments
    # resident, CPU-offloaded (.state_dict of the loader) and .dat disk-offloaded units in one model
    "mixed": ("dispatch", (("model.embed_tokens", "resident"), ("model.layers.0", "cpu"),
                                     ("model.layers.1", "disk"), ("model.norm", "resident"), ("lm_head", "disk"))),
    # transformers' own loading: disk entries read straight from the user's source checkpoint
    "source": ("from_pretrained", (("model.embed_tokens", "disk"), ("model.layers.0", "resident"),
                                             ("model.layers.1", "disk"), ("model.norm", "resident"),
                                             ("lm_head", "disk"))),
}


def build(name: str, work: Path, *, builtin: bool = False) -> tuple[nn.Module, Path]:
    """A tiny llama laid out per ``SPECS[name]`` with a StepQuantizer on every Linear but lm_head (the built-in
    int8 quantizer with ``builtin``: what a packed format can describe)."""
    lt = _layouts()
    model, art = lt.apply_layout_with_artifacts(lt.make_model("llama_untied"), lt.LayoutSpec(*SPECS[name]), work)
    if builtin:
        oe.quantize_weights(model, "int8")
        return model, art.workdir
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module_name != "lm_head":
            module.weight_quantizer = StepQuantizer(0.01)
    return model, art.workdir


def build_plain(work: Path) -> nn.Module:
    """Six disk-offloaded Linears with StepQuantizers: a light model for the child processes."""
    import accelerate

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(6)))
    for linear in model:
        linear.weight_quantizer = StepQuantizer(0.01)
    return accelerate.disk_offload(model, str(work / "offload"), execution_device="cpu")


def forward(model: nn.Module) -> torch.Tensor:
    if hasattr(model, "config"):
        return _layouts().forward_logits(model)
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 128).reshape(2, 64))


def n_folds(model: nn.Module) -> int:
    return sum(isinstance(m, StepQuantizer) for m in model.modules())


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def model_state(model: nn.Module) -> tuple:
    """Everything a failed export must leave as it was (without running a forward, which renews Parameters)."""
    lay = oe.layout(model)
    return ([(k, i.kind, str(i.device), i.shape, i.dtype, i.tied_to, id(i.tensor)) for k, i in lay.items()],
            [(q.name, q.enabled, {k: v.clone() for k, v in q.handle.state_dict().items()})
             for q in oe.find_quantizers(model)],
            [(n, h.offload) for n, m in model.named_modules() for h in align_hooks(m)])


def same_state(a: tuple, b: tuple) -> bool:
    quantizers_same = all(na == nb and ea == eb and all(torch.equal(sa[k], sb[k]) for k in sa)
                          for (na, ea, sa), (nb, eb, sb) in zip(a[1], b[1]))
    return a[0] == b[0] and a[2] == b[2] and len(a[1]) == len(b[1]) and quantizers_same


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if is_staging_dir(p))


# ----------------------------------------------------------------------------------------- in-process faults


@pytest.fixture(scope="module", params=sorted(SPECS))
def laid_out(request, tmp_path_factory):
    model, work = build(request.param, tmp_path_factory.mktemp(request.param))
    return model, work, forward(model)


@pytest.mark.parametrize("action, error, at, overwrite", [
    ("raise", ValueError, "first", False), ("raise", ValueError, "middle", True),
    ("raise", ValueError, "last", False), ("interrupt", KeyboardInterrupt, "middle", False),
    ("interrupt", KeyboardInterrupt, "last", True)])
def test_failure_part_way_leaves_model_stores_and_destination_as_they_were(laid_out, tmp_path, action, error, at,
                                                                           overwrite):
    model, work, logits = laid_out
    k = {"first": 1, "middle": n_folds(model) // 2, "last": n_folds(model)}[at]
    dest = tmp_path / "out"
    if overwrite:
        oe.save_clean(model, dest, max_shard_size=SHARD)
    before = (model_state(model), tree_hash(work), tree_hash(tmp_path))
    with trapped(action, k), pytest.raises(error) as info:
        oe.save_clean(model, dest, max_shard_size=SHARD, overwrite=overwrite)
    assert StepQuantizer.calls == k
    if action == "raise":  # the quantizer's own exception, our context as a note
        assert type(info.value) is ValueError and str(info.value).startswith("injected failure")
        assert "weight_quantizer" in "\n".join(info.value.__notes__)
    assert same_state(model_state(model), before[0])
    assert tree_hash(work) == before[1]
    assert tree_hash(tmp_path) == before[2] and leftovers(tmp_path) == []  # nothing at or beside dest
    assert bitwise_equal(forward(model), logits)
    if overwrite:
        assert oe.verify(model, dest, fold=True).ok


# ----------------------------------------------------------------------------------------- the atomic commit


@pytest.fixture(params=["renameat2", "fallback"])
def commit_path(request, monkeypatch):
    """Run a test through the Linux renameat2 commit and through the portable check-then-rename one."""
    if request.param == "fallback":
        monkeypatch.setattr(_atomic, "_renameat2_fn", lambda: None)
    elif _atomic._renameat2_fn() is None:
        pytest.skip("no renameat2 here")
    return request.param


def test_commit_never_replaces_a_destination_that_appeared_meanwhile(tmp_path, commit_path):
    dest = tmp_path / "out"
    with pytest.raises(FileExistsError, match="another export into the same destination won the race"):
        with _atomic.staging(dest, overwrite=False) as tmp:
            (tmp / "new").write_text("new")
            dest.mkdir()
            (dest / "winner").write_text("winner")
    assert os.listdir(dest) == ["winner"] and os.listdir(tmp_path) == ["out"]


def test_overwrite_swaps_in_the_complete_checkpoint_and_removes_the_old_one(tmp_path, commit_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "config.json").write_text("old")  # overwrite replaces only a checkpoint's files
    with _atomic.staging(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        assert os.listdir(dest) == ["config.json"]  # untouched until the new one is complete
    assert os.listdir(dest) == ["new"] and os.listdir(tmp_path) == ["out"]


def run_child(mode: str, args: dict, timeout: float = 120) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, mode, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


DISK_FULL_CASES = ("nothing", "first header only", "mid first tensor", "first shard exactly",
                   "last byte of the largest shard", "every file fits")


def _limits(dest: Path, sweep: bool) -> dict[str, int]:
    """Byte limits that cut the export at shard and tensor boundaries, mid-tensor, or let it finish."""
    shards = []
    for shard in sorted(dest.glob("model*.safetensors")):
        start, header = safetensors_header(str(shard))
        shards.append((start, sorted(start + e["data_offsets"][1] for e in header.values()), shard.stat().st_size))
    if sweep:  # every tensor end and shard end, and one byte either side
        cuts = {c + d for start, ends, size in shards for c in (start, *ends, size) for d in (-1, 0, 1)}
        return {f"{c} bytes": c for c in sorted(cuts)}
    (start, ends, size), largest = shards[0], max(s[2] for s in shards)
    limits = (0, start, (start + ends[0]) // 2, size, largest - 1, max(p.stat().st_size for p in dest.iterdir()))
    return dict(zip(DISK_FULL_CASES, limits))


def child_disk_full(args: dict) -> None:
    """Export under several RLIMIT_FSIZE limits; report per limit what happened and what was left."""
    fmt = args.get("format", "fake-quant")
    model, work = build(args["spec"], Path(args["work"]), builtin=fmt != "fake-quant")
    root = Path(args["work"]) / "exports"
    reference = oe.save_clean(model, root / "reference", max_shard_size=SHARD, format=fmt)
    logits, sources = forward(model), tree_hash(work)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for case, limit in _limits(Path(reference.out_dir), args["sweep"]).items():
        parent = root / f"limit-{limit}"
        parent.mkdir()
        state = model_state(model)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            oe.save_clean(model, parent / "out", max_shard_size=SHARD, format=fmt)
            outcome = "ok"
        except OSError as e:
            outcome = "EFBIG" if e.errno == 27 else f"{type(e).__name__}: {e}"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        print(json.dumps({
            "case": case, "limit": limit, "outcome": outcome,
            "left": sorted(p.name for p in parent.iterdir()),
            "verified": outcome == "ok" and oe.verify(model, parent / "out", format=fmt).ok,
            "model_same": same_state(model_state(model), state) and bitwise_equal(forward(model), logits),
            "sources_same": tree_hash(work) == sources}), flush=True)


@pytest.fixture(scope="module", params=["fake-quant", pytest.param("compressed-tensors", marks=pytest.mark.slow)])
def disk_full_results(tmp_path_factory, request):
    work = tmp_path_factory.mktemp("disk_full")
    args = {"spec": "source", "work": str(work), "sweep": False, "format": request.param}
    return {r["case"]: r for r in run_child("disk_full", args)}


def check_disk_full(result: dict) -> None:
    assert result["model_same"] and result["sources_same"], result
    if result["outcome"] == "ok":  # the limit was above every file: a complete, verified checkpoint
        assert result["left"] == ["out"] and result["verified"], result
    else:
        assert result["outcome"] == "EFBIG" and result["left"] == [], result


@pytest.mark.parametrize("case", DISK_FULL_CASES)
def test_disk_full_at_shard_boundaries_and_mid_tensor_leaves_nothing(disk_full_results, case):
    result = disk_full_results[case]
    check_disk_full(result)
    assert result["outcome"] == ("ok" if case == "every file fits" else "EFBIG"), result


@pytest.mark.slow
def test_disk_full_exhaustive_sweep_over_every_shard_and_tensor_boundary(tmp_path):
    results = run_child("disk_full", {"spec": "mixed", "work": str(tmp_path), "sweep": True}, timeout=600)
    assert len(results) > 50
    for result in results:
        check_disk_full(result)


def next_event(proc: subprocess.Popen) -> dict:
    """The child's next JSON line (other output, e.g. library warnings, is skipped)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"child exited with {proc.wait()} before reporting")


def child_killed(args: dict) -> None:
    model = build_plain(Path(args["work"]))
    print(json.dumps({"event": "built", "hash": tree_hash(Path(args["work"]))}), flush=True)
    with trapped("announce_and_sleep", 3):
        oe.save_clean(model, args["dest"], max_shard_size=SHARD, overwrite=args["overwrite"])


@pytest.mark.parametrize("overwrite", [False, True])
def test_sigkill_mid_write_then_the_next_export_cleans_the_stale_temp_dir(tmp_path, overwrite):
    parent, work = tmp_path / "exports", tmp_path / "work"
    dest = parent / "out"
    if overwrite:
        dest.mkdir(parents=True)
        (dest / "model.safetensors").write_bytes(b"previous checkpoint")
    before = tree_hash(parent) if overwrite else {}
    proc = subprocess.Popen([sys.executable, __file__, "killed", json.dumps(
        {"work": str(work), "dest": str(dest), "overwrite": overwrite})], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parent)
    try:
        built = next_event(proc)
        assert next_event(proc) == {"event": "started"}
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    stale = leftovers(parent)
    assert len(stale) == 1 and tree_hash(work) == built["hash"]
    assert {k: v for k, v in tree_hash(parent).items() if not k.startswith(stale[0])} == before
    assert dest.exists() == overwrite
    report = oe.save_clean(nn.Linear(4, 4), parent / "next")  # any later export into the same parent
    assert leftovers(parent) == [] and "model.safetensors" in report.files


def child_race(args: dict) -> None:
    """Race the other child once per round (a shared barrier each), reporting each round's outcome."""
    model = build_plain(Path(args["work"]))
    for round_ in args["rounds"]:
        try:
            with trapped("barrier", 1, barrier=round_["barrier"]):
                oe.save_clean(model, round_["dest"], max_shard_size=SHARD, overwrite=round_["overwrite"])
            result = {"outcome": "ok", "verified": oe.verify(model, round_["dest"]).ok}
        except FileExistsError as e:
            result = {"outcome": "FileExistsError", "message": str(e)}
        print(json.dumps({"overwrite": round_["overwrite"], **result}), flush=True)


@pytest.fixture(scope="module")
def race_results(tmp_path_factory) -> dict[bool, tuple[Path, list[dict]]]:
    """Two children export the same model into one destination, first fresh, then over a previous one."""
    tmp = tmp_path_factory.mktemp("race")
    rounds = []
    for overwrite in (False, True):
        dest, barrier = tmp / f"exports-{overwrite}" / "out", tmp / f"barrier-{overwrite}"
        barrier.mkdir()
        if overwrite:
            dest.mkdir(parents=True)
            (dest / "stale.safetensors").write_text("previous checkpoint")  # a checkpoint file: replaceable
        rounds.append({"dest": str(dest), "barrier": str(barrier), "overwrite": overwrite})
    procs = [subprocess.Popen([sys.executable, __file__, "race", json.dumps({"work": str(tmp / f"work{i}"),
                                                                          "rounds": rounds})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith("{")]
    return {r["overwrite"]: (Path(r["dest"]), sorted((x for x in results if x["overwrite"] == r["overwrite"]),
                                                       key=lambda x: x["outcome"])) for r in rounds}


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_racing_exports_into_one_destination(race_results, tmp_path, overwrite):
    dest, results = race_results[overwrite]
    if overwrite:  # both replace the previous checkpoint in turn; the last one wins whole
        assert [r["outcome"] for r in results] == ["ok", "ok"]
    else:
        assert [r["outcome"] for r in results] == ["FileExistsError", "ok"] and results[1]["verified"]
        assert "another export" in results[0]["message"]
    assert leftovers(dest.parent) == [] and not (dest / "stale.safetensors").exists()
    assert oe.verify(build_plain(tmp_path), dest).ok  # one complete checkpoint, as exported
    assert all(load_file(f) for f in dest.glob("model*.safetensors"))


if __name__ == "__main__":
    # run the children from the module pytest imports: their quantizers' adapter is then test_faults.StepQuantizer,
    # not __main__.StepQuantizer, and quantizer_state.safetensors' metadata matches what the parent's verify expects
    import test_faults
    {"disk_full": test_faults.child_disk_full, "killed": test_faults.child_killed,
     "race": test_faults.child_race}[sys.argv[1]](json.loads(sys.argv[2]))
