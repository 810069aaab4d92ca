"""The streaming loop's resources are leases released on every path: a failure never hangs, leaks or changes the model."""

from __future__ import annotations

import errno
import importlib
import os
import threading
from pathlib import Path

import accelerate
import pytest
import torch
from torch import nn

import offload_export as oe

BOUND = 60  # seconds a failing call may take before it counts as a hang
verify_module = importlib.import_module("offload_export.verify")  # the package exports the function
BIG_CALL = 512 << 10  # the writer's largest pwrite: only the embedding's data is written in calls this big


def _big_model(work: Path) -> nn.Module:
    """A 64 MB embedding (the unit holding the whole read-ahead budget) and two small Linears, disk-offloaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16384, 1024), nn.Linear(1024, 8), nn.Linear(8, 8))
    return accelerate.disk_offload(model, str(work / "offload"), execution_device="cpu")


def _bounded(fn):
    """``fn()``'s exception (or None), raising AssertionError when it has not returned within BOUND seconds."""
    outcome: list = []

    def call():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"still running after {BOUND} s: a hang"
    return outcome[0]


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    work = tmp_path_factory.mktemp("big")
    return _big_model(work), work


def test_a_disk_full_write_of_the_unit_holding_the_budget_raises_instead_of_hanging(big, tmp_path, monkeypatch):
    model, _ = big
    pwrite = os.pwrite

    def full(fd, data, offset):
        if len(data) >= BIG_CALL:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    threads, fds = threading.active_count(), _fds()
    error = _bounded(lambda: oe.save_clean(model, tmp_path / "out", dtype=torch.float16, max_shard_size="1MB"))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, error
    assert os.listdir(tmp_path) == []
    assert threading.active_count() == threads
    assert _fds() <= fds


def test_a_failing_comparison_of_the_unit_holding_the_budget_raises_instead_of_hanging(big, tmp_path, monkeypatch):
    model, _ = big
    oe.save_clean(model, tmp_path / "out", dtype=torch.float16, max_shard_size="1MB")
    same_bytes = verify_module._same_bytes

    def failing(expected, path, offset, nbytes, bufs):
        if nbytes >= 32 << 20:
            raise MemoryError("injected")
        return same_bytes(expected, path, offset, nbytes, bufs)

    monkeypatch.setattr(verify_module, "_same_bytes", failing)
    threads = threading.active_count()
    error = _bounded(lambda: oe.verify(model, tmp_path / "out", dtype=torch.float16))
    assert isinstance(error, MemoryError), error
    assert threading.active_count() == threads
