"""Process-wide settings of an export: the collector's passes kept off older objects, the process left as it was."""

from __future__ import annotations

import gc
import importlib
import threading
import weakref

import pytest
from layouts import make_model

import offload_export as oe
from offload_export._process import old_objects_frozen


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

    @old_objects_frozen
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
    @old_objects_frozen
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
        old_objects_frozen(lambda: counts.append(gc.get_freeze_count()))()
        assert counts == [before] and gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def test_overlapping_calls_in_threads_unfreeze_once_the_last_ends():
    first_in, second_done = threading.Event(), threading.Event()
    seen = {}

    @old_objects_frozen
    def first():
        first_in.set()
        second_done.wait(10)
        seen["after the second ended"] = gc.get_freeze_count()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    old_objects_frozen(lambda: None)()
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
