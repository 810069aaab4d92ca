"""save_clean over torch.distributed ranks (gloo on CPU, real spawned processes) and over per-device lanes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from accelerate import disk_offload
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from hypothesis import given, settings
from hypothesis import strategies as st

import offload_export as oe
from offload_export import distributed, pipeline
from offload_export.adapters.builtin import FakeQuantizer, quantize_weights

SHARD = 60_000  # bytes: the tiny model below makes about ten shards
_PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "accelerate", "hypothesis",
            "offload_export", "offload_export.adapters.builtin"]
JOIN_TIMEOUT = 60  # seconds for all ranks of one scenario; a hang fails the test instead of blocking it


# packed scenarios: the format written, and how the tiny model is quantized for it
PACKED = {"compressed-tensors": "compressed-tensors", "modelopt": "modelopt", "modelopt-moe": "modelopt"}


def _tiny_model(*, offload_dir: Path | None, explode: str | None = None, fault: type | None = None,
                quantized_by: str = "builtin"):
    """A tiny quantized Llama, the same in every process; quantizers under ``explode`` fail to fold.

    ``quantized_by``: ``"builtin"`` (int8), ``"modelopt"`` (ModelOpt FP8, calibrated on fixed ids on CPU) or
    ``"modelopt-moe"`` (the same on a Qwen3-MoE of 8 fused experts a layer, in place of the Llama).
    """
    torch.manual_seed(0)
    if quantized_by == "modelopt-moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            tie_word_embeddings=False)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=False)).eval()
    if quantized_by.startswith("modelopt"):
        import modelopt.torch.quantization as mtq

        model.config.architectures = [type(model).__name__]
        ids = torch.arange(32).reshape(2, 16)
        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids, use_cache=False))
    else:
        quantize_weights(model, "int8")
    for name, module in model.named_modules():
        if explode is not None and type(module) is FakeQuantizer and name.startswith(explode):
            module.__class__ = fault or _Exploding  # before offloading: accelerate's hook wraps the forward it finds
    if offload_dir is not None:
        model = disk_offload(model, str(offload_dir), execution_device=torch.device("cpu"))
    return model


class _Exploding(FakeQuantizer):
    """A fake quantizer whose fold fails where ``armed`` (one rank): every rank has the same quantizer classes,
    as the cross-rank check requires, and only one of them fails."""

    error: type[BaseException] = RuntimeError
    armed = False

    def forward(self, *args, **kwargs):
        if type(self).armed:
            raise self.error("injected fault in a quantizer kernel")
        return super().forward(*args, **kwargs)


class _Interrupted(_Exploding):
    error = KeyboardInterrupt


class _Exiting(_Exploding):
    error = SystemExit


class _Held(FakeQuantizer):
    """A fold that waits (up to HOLD seconds) until the test creates ``release`` in ``work``: a slow rank."""

    work: Path | None = None

    def forward(self, *args, **kwargs):
        deadline = time.monotonic() + HOLD
        while type(self).work is not None and not (type(self).work / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        type(self).work = None
        return super().forward(*args, **kwargs)


HOLD = 120  # seconds a held rank waits at most


def _rank_model(scenario: str, rank: int, work: Path):
    if scenario == "sigint":  # rank 1 is slow in its write phase; rank 0 waits for it in a collective
        _Held.work = work if rank else None
        return _tiny_model(offload_dir=work / f"offload-{rank}", explode="model.layers.0.self_attn.q_proj", fault=_Held)
    if scenario == "partial" and rank == 1:  # holds layers 2.. and the head; the rest is meta without hooks
        model = _tiny_model(offload_dir=None)
        model.model.embed_tokens.to("meta")
        for layer in model.model.layers[:2]:
            layer.to("meta")
        return model
    if scenario == "unreadable":  # no rank holds layer 0
        model = _tiny_model(offload_dir=None)
        model.model.layers[0].input_layernorm.to("meta")
        return model
    if scenario in PACKED:
        return _tiny_model(offload_dir=work / f"offload-{rank}", quantized_by=_quantized_by(scenario))
    faults = {"fault": _Exploding, "interrupt": _Interrupted, "exit": _Exiting}
    explode = "model." if scenario in faults else None
    faults.get(scenario, _Exploding).armed = rank == 1
    return _tiny_model(offload_dir=work / f"offload-{rank}", explode=explode, fault=faults.get(scenario, _Exploding))


def _leave_before_confirming(rank: int) -> None:
    """Rank 1 exits as rank 0 commits: the last agreement never hears from it."""
    exchange, calls = distributed._exchange, []

    def leaving(ctl, fn, *args, **kwargs):
        calls.append(fn)
        if rank == 1 and len(calls) == 4:  # prepare, stage, write, finish
            os._exit(3)
        return exchange(ctl, fn, *args, **kwargs)

    distributed._exchange = leaving


def _mark_waiting(work: Path) -> None:
    """Rank 0 creates ``waiting`` once its write phase is done: it then waits for the others in a collective."""
    exchange, calls = distributed._exchange, []

    def marking(ctl, fn, *args, **kwargs):
        calls.append(fn)

        def marked():
            text = fn()
            if len(calls) == 3:  # prepare, stage, write
                (work / "waiting").touch()
            return text

        return exchange(ctl, marked, *args, **kwargs)

    distributed._exchange = marking


def _rank_main(rank: int, world: int, port: int, work: str, scenario: str) -> None:
    import torch.distributed as dist

    work = Path(work)
    result: dict = {}
    # Ctrl-C raises KeyboardInterrupt here even when the test runs in a background job, whose processes inherit
    # SIGINT ignored (the forkserver's python then leaves it so)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=JOIN_TIMEOUT))
        model = _rank_model(scenario, rank, work)
        if scenario == "leave":
            _leave_before_confirming(rank)
        if scenario == "sigint" and rank == 0:
            _mark_waiting(work)
        report = oe.save_clean(model, work / "out", max_shard_size=SHARD, timeout=timedelta(hours=1),
                               format=PACKED.get(scenario, "fake-quant"))
        result = {"ok": True, "report": asdict(report)}
    except BaseException as e:  # KeyboardInterrupt and SystemExit too: the scenario injects them
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    finally:
        (work / f"result-{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(world: int, work: Path, scenario, target=None) -> list:
    """``world`` processes running ``target(rank, world, port, work, scenario)`` (by default this module's ranks)."""
    ctx = mp.get_context("forkserver")  # a clean process per rank, without importing torch and transformers each time
    ctx.set_forkserver_preload(_PRELOAD)  # (python 3.11's forkserver ignores sys.path: this test module can't be preloaded)
    port = _free_port()
    procs = [ctx.Process(target=target or _rank_main, args=(r, world, port, str(work), scenario)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _join_ranks(procs: list, work: Path) -> list[dict]:
    for p in procs:
        p.join(JOIN_TIMEOUT)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT} s"
    return [json.loads(f.read_text()) if (f := work / f"result-{r}.json").exists() else {"exited": p.exitcode}
            for r, p in enumerate(procs)]


def _run_ranks(world: int, work: Path, scenario, target=None) -> list[dict]:
    return _join_ranks(_start_ranks(world, work, scenario, target), work)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _quantized_by(scenario: str) -> str:
    return scenario if scenario.startswith("modelopt") else "builtin"


def _reference(work: Path, scenario: str = "whole") -> dict[str, bytes]:
    oe.save_clean(_tiny_model(offload_dir=work / "offload-ref", quantized_by=_quantized_by(scenario)), work / "ref",
                  max_shard_size=SHARD, format=PACKED.get(scenario, "fake-quant"))
    return _files(work / "ref")


@pytest.mark.parametrize("world, scenario", [(2, "partial"), (3, "whole"), (2, "compressed-tensors"),
                                             (2, "modelopt"),
                                             pytest.param(2, "modelopt-moe", marks=pytest.mark.slow)])
def test_ranks_write_the_single_process_checkpoint_byte_for_byte(world, scenario):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = _run_ranks(world, work, scenario)
        assert all(r["ok"] for r in results), [r.get("trace") for r in results]
        expected = _reference(work, scenario)
        assert len([n for n in expected if n.startswith("model-")]) >= world
        assert _files(work / "out") == expected
        reports = [r["report"] for r in results]
        assert all(rep == reports[0] for rep in reports)
        assert reports[0]["files"] == sorted(expected) and reports[0]["out_dir"] == str(work / "out")
        per_rank = dict(re.findall(r"(\d+): (\d+) \(", " ".join(reports[0]["notes"])))
        assert len(per_rank) == world and all(int(n) >= 1 for n in per_rank.values())
        assert not [p for p in work.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("scenario, message", [("fault", "injected fault"), ("unreadable", "no rank can read"),
                                               ("interrupt", "KeyboardInterrupt"), ("exit", "SystemExit")])
def test_a_failure_on_any_rank_raises_on_every_rank_and_leaves_nothing(scenario, message):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = _run_ranks(2, work, scenario)
        assert not any(r["ok"] for r in results)
        assert all(message in r["error"] for r in results), [r["error"] for r in results]
        assert not (work / "out").exists()
        assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_ctrl_c_on_a_rank_waiting_in_a_collective_raises_at_once_and_the_others_fail_too():
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        procs = _start_ranks(2, work, "sigint")
        try:
            deadline = time.monotonic() + JOIN_TIMEOUT
            while not (work / "waiting").exists() and procs[0].is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (work / "waiting").exists(), "rank 0 never reached its wait for rank 1"
            time.sleep(0.5)  # inside the collective
            os.kill(procs[0].pid, signal.SIGINT)
            procs[0].join(JOIN_TIMEOUT)  # rank 1 is held meanwhile: rank 0 must not wait for the collective
            assert not procs[0].is_alive(), "Ctrl-C was not raised while rank 0 waited for rank 1"
        finally:
            (work / "release").touch()
        results = _join_ranks(procs, work)
        assert results[0]["error"].startswith("KeyboardInterrupt"), results[0]
        assert not results[1]["ok"], results[1]
        assert not (work / "out").exists()
        assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_a_rank_that_leaves_after_the_commit_does_not_fail_the_committed_export():
    # rank 0 must neither raise nor wait out the hour-long timeout for a checkpoint it committed whole
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = _run_ranks(2, work, "leave")
        assert results[1] == {"exited": 3}
        assert results[0]["ok"], results[0].get("trace")
        assert any("another rank left before confirming" in n for n in results[0]["report"]["notes"])
        assert _files(work / "out") == _reference(work)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=30), st.integers(1, 5), st.data())
def test_assign_shards_gives_each_shard_to_a_rank_that_can_read_it(sizes, ranks, data):
    readable = [[data.draw(st.booleans()) for _ in sizes] for _ in range(ranks)]
    for s in range(len(sizes)):
        readable[data.draw(st.integers(0, ranks - 1))][s] = True
    owner = distributed.assign_shards(sizes, readable)
    assert all(readable[r][s] for s, r in enumerate(owner))
    assert distributed.assign_shards(sizes, readable) == owner


@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=30), st.integers(1, 5))
def test_assign_shards_balances_bytes_when_every_rank_reads_everything(sizes, ranks):
    owner = distributed.assign_shards(sizes, [[True] * len(sizes)] * ranks)
    load = [sum(n for n, r in zip(sizes, owner) if r == rank) for rank in range(ranks)]
    assert max(load) - min(load) <= max(sizes)  # greedy largest-first: within one shard of even


def test_assign_shards_rejects_a_shard_no_rank_can_read():
    with pytest.raises(ValueError, match="shard 1"):
        distributed.assign_shards([1, 2], [[True, False], [True, False]])


def _lane_by_layer(reader, unit):
    match = re.search(r"layers\.(\d+)", unit.module)
    return int(match.group(1)) % 3 if match else "other"


def test_lanes_write_the_same_bytes_as_one_lane(monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        expected = _reference(work)
        monkeypatch.setattr(pipeline, "_fold_lane", _lane_by_layer)
        threads = threading.active_count()
        oe.save_clean(_tiny_model(offload_dir=work / "offload"), work / "out", max_shard_size=SHARD)
        assert _files(work / "out") == expected
        assert threading.active_count() == threads


def test_a_failing_lane_fails_the_export_and_stops_every_lane(monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = _tiny_model(offload_dir=work / "offload", explode="model.layers.2.mlp.down_proj")
        monkeypatch.setattr(_Exploding, "armed", True)
        monkeypatch.setattr(pipeline, "_fold_lane", _lane_by_layer)
        threads = threading.active_count()
        with pytest.raises(RuntimeError, match="injected fault"):
            oe.save_clean(model, work / "out", max_shard_size=SHARD)
        assert threading.active_count() == threads
        assert sorted(os.listdir(work)) == ["offload"]
