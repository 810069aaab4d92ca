"""Process-wide settings of an export: no full pass of the collector, older objects frozen, the process left as it
was."""

from __future__ import annotations

import gc
import importlib
import threading
import weakref

import pytest
from layouts import make_model

import offload_export as oe
from offload_export._process import no_full_collections


@pytest.fixture(autouse=True)
def nothing_frozen():
    if gc.get_freeze_count():
        pytest.skip("this process froze objects before the test")
    yield
    assert gc.get_freeze_count() == 0


class _Cycle:
    def __init__(self):
        self.me = self


def test_objects_older_than_the_call_are_frozen_new_cycles_still_collected():
    old = _Cycle()
    inside = {}

    @no_full_collections
    def export():
        new = _Cycle()
        gone = weakref.ref(new)
        del new
        gc.collect()
        inside.update(frozen=gc.get_freeze_count(), old_tracked=any(o is old for o in gc.get_objects()),
                      new_collected=gone() is None)
        return "done"

    assert export() == "done"
    assert inside["frozen"] > 0 and not inside["old_tracked"] and inside["new_collected"]
    assert any(o is old for o in gc.get_objects())  # back where the collector looks


def test_the_objects_are_unfrozen_however_the_call_ends():
    @no_full_collections
    def fails():
        assert gc.get_freeze_count() > 0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fails()
    assert gc.get_freeze_count() == 0


def test_objects_the_process_froze_itself_stay_frozen_and_are_not_unfrozen():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        counts = []
        no_full_collections(lambda: counts.append(gc.get_freeze_count()))()
        # nothing more frozen, nothing unfrozen (a frozen object may still be freed meanwhile)
        assert 0 < counts[0] <= before and 0 < gc.get_freeze_count() <= before
    finally:
        gc.unfreeze()


def _full_passes(fn) -> int:
    """The full passes the collector starts by itself while ``fn`` allocates (at low thresholds)."""
    passes = []
    callback = lambda phase, info: passes.append(info["generation"]) if phase == "start" else None  # noqa: E731
    saved = gc.get_threshold()
    gc.collect()
    gc.callbacks.append(callback)
    gc.set_threshold(100, 2, 2)
    try:
        fn()
    finally:
        gc.set_threshold(*saved)
        gc.callbacks.remove(callback)
    return passes.count(2)


@pytest.mark.parametrize("frozen_before", [False, True], ids=["nothing-frozen", "process-froze-some"])
def test_no_full_pass_runs_inside_even_when_the_process_froze_objects_itself(frozen_before):
    """The allocations that start full passes outside start none inside, also in a process that froze a few objects
    at start-up (the freeze is then left alone, so it cannot keep the passes short)."""
    n = len(gc.get_objects()) // 2  # more than a quarter of the long-lived objects

    def allocate():
        kept = [[] for _ in range(n)]
        return len(kept)

    if frozen_before:
        gc.freeze()
    try:
        assert _full_passes(allocate) > 0
        thresholds = []
        assert _full_passes(no_full_collections(lambda: thresholds.append(gc.get_threshold()) or allocate())) == 0
        assert thresholds == [(100, 2, 1 << 30)]
    finally:
        gc.unfreeze()


def test_the_thresholds_are_restored_however_the_call_ends():
    saved = gc.get_threshold()

    @no_full_collections
    def fails():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fails()
    assert gc.get_threshold() == saved


def test_overlapping_calls_in_threads_unfreeze_once_the_last_ends():
    first_in, second_done = threading.Event(), threading.Event()
    seen = {}

    @no_full_collections
    def first():
        first_in.set()
        second_done.wait(10)
        seen["after the second ended"] = gc.get_freeze_count()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    no_full_collections(lambda: None)()
    second_done.set()
    thread.join(10)
    assert seen["after the second ended"] > 0 and gc.get_freeze_count() == 0


def test_save_clean_and_verify_run_with_the_older_objects_frozen(tmp_path, monkeypatch):
    model = make_model("llama_untied")
    counts = []
    real = oe.export.prepare_job

    def prepare_job(*args, **kwargs):
        counts.append(gc.get_freeze_count())
        return real(*args, **kwargs)

    monkeypatch.setattr(oe.export, "prepare_job", prepare_job)
    monkeypatch.setattr(importlib.import_module("offload_export.verify"), "prepare_job", prepare_job)
    oe.save_clean(model, tmp_path / "out")
    assert oe.verify(model, tmp_path / "out").ok
    assert len(counts) == 2 and all(counts)
