"""Ranks that quantized differently (another scheme, another calibration) are refused on every rank before
anything is written: the cross-rank plan check covers each quantizer's configuration and state."""

from __future__ import annotations

import json
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from test_distributed import JOIN_TIMEOUT, SHARD, _run_ranks, _tiny_model

import offload_export as oe
from offload_export.adapters.builtin import quantize_weights


def _rank_model(scenario: str, rank: int):
    model = _tiny_model(offload_dir=None)
    if rank == 1 and scenario == "scheme":
        quantize_weights(model, "fp8")  # rank 0 stays int8
    if rank == 1 and scenario == "calibration":
        q = model.model.layers[2].mlp.down_proj.weight_quantizer
        with torch.no_grad():
            next(iter(q.buffers())).mul_(2)
    return model


def _rank_main(rank: int, world: int, port: int, work: str, scenario: str) -> None:
    import torch.distributed as dist

    work, result = Path(work), {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=JOIN_TIMEOUT))
        oe.save_clean(_rank_model(scenario, rank), work / "out", max_shard_size=SHARD, timeout=timedelta(hours=1))
        result = {"ok": True}
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    finally:
        (work / f"result-{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("scenario, message", [
    ("scheme", "model.layers.0.self_attn.q_proj.weight_quantizer's configuration"),
    ("calibration", "model.layers.2.mlp.down_proj.weight_quantizer's state"),
])
def test_ranks_that_quantized_differently_are_refused_on_every_rank(scenario, message):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = _run_ranks(2, work, scenario, _rank_main)
        assert not any(r["ok"] for r in results), results
        assert all("the ranks quantized differently" in r["error"] and message in r["error"] for r in results), \
            [r.get("error") for r in results]
        if scenario == "scheme":  # the two configurations themselves, not digests of them
            assert all('"fp8"' in r["error"] and '"int8"' in r["error"] for r in results), [r["error"] for r in results]
        assert not (work / "out").exists()
