"""The I/O fault sweep: every file-system call an export, a verify or a writeback makes fails in turn.

A child process (``fault_sweep.py``, which documents the invariants checked) counts the calls an operation
makes of each function, then fails the k-th call of one function per run. By default a sample (the first,
the middle and the last call of each function, with its first errno) of the tiny model's scenarios;
``-m slow`` runs every call with every errno, a larger model (a 64 MiB embedding), ModelOpt and two gloo ranks.
Each test prints how many (function, call) points it covered.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fault_sweep

HERE = Path(__file__).parent
START_TIMEOUT = 300  # seconds for a child to import, build its model and count (ModelOpt calibrates)
POINT_TIMEOUT = 120  # seconds for one injected run: past it the run counts as a hang

def _reader(stream, out: queue.Queue) -> None:
    for line in stream:
        if line.startswith("{"):
            out.put(json.loads(line))
    out.put(None)


def run_sweep(work: Path, scenarios: dict, point_timeout: float = POINT_TIMEOUT) -> dict[str, dict]:
    """Run ``fault_sweep.main`` in children until every scenario's points are done; a hung point is recorded as a
    violation, its child killed and a new one started at the next point.

    Returns:
        ``{scenario: {"counts": {function: calls}, "points": {(function, k, errno): result}, "seconds": s}}``.
    """
    results = {name: {"counts": None, "points": {}, "seconds": 0.0} for name in scenarios}
    todo, attempt = dict(scenarios), 0
    while todo:
        attempt += 1
        tmpdir = work / f"tmp{attempt}"
        tmpdir.mkdir(parents=True)
        env = {**os.environ, "TMPDIR": str(tmpdir)}
        args = {"work": str(work / f"run{attempt}"), "scenarios": todo}
        with open(work / f"stderr{attempt}", "w") as err:
            proc = subprocess.Popen([sys.executable, str(HERE / "fault_sweep.py"), json.dumps(args)],
                                    stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE, env=env)
            events: queue.Queue = queue.Queue()
            threading.Thread(target=_reader, args=(proc.stdout, events), daemon=True).start()
            current, planned = None, {}
            try:
                while True:
                    try:
                        ev = events.get(timeout=START_TIMEOUT if current is None or "start" not in current
                                        else point_timeout)
                    except queue.Empty:
                        break
                    if ev is None:
                        break
                    name = ev["scenario"]
                    if "counts" in ev and "point" not in ev:
                        assert not ev["violations"], f"{name}: the run without faults failed: {ev}"
                        results[name]["counts"] = ev["counts"]
                        planned[name] = fault_sweep.select(ev["counts"], todo[name])
                    elif "point" in ev:
                        results[name]["points"][tuple(ev["point"])] = ev
                    elif "done" in ev:
                        results[name]["seconds"] += ev["seconds"]
                        del todo[name]
                    current = ev
            finally:
                proc.kill()
                proc.wait()
        if current is None or "start" not in current:
            stderr = (work / f"stderr{attempt}").read_text()
            assert not todo, f"the sweep child died outside an injection: {stderr[-3000:]}"
            break
        name, point = current["scenario"], tuple(current["start"])  # hung (or crashed) in this injection
        results[name]["points"][point] = {"point": point, "violations": [
            f"no result within {point_timeout} s (hang) or the child died: "
            f"{(work / f'stderr{attempt}').read_text()[-2000:]}"]}
        rest = planned[name][planned[name].index(point) + 1:]
        if rest:
            todo[name] = [list(p) for p in rest]
        else:
            del todo[name]
    return results


def judge(scenario: str, result: dict) -> None:
    """Fail on any violation, listing the first ten with the exception raised and its traceback."""
    points = result["points"]
    covered = sorted({(p[0], p[1]) for p in points})
    print(f"\nfault sweep {scenario}: {len(points)} injections at {len(covered)} (function, call) points "
          f"in {result['seconds']:.1f} s; calls per function: {result['counts']}")
    failures = [f"{point}: {v}\n{res.get('raised')}\n{res.get('trace', '')[-1500:]}"
                for point, res in sorted(points.items()) for v in res["violations"]]
    assert not failures, f"{len(failures)} violation(s):\n" + "\n".join(failures[:10])


# the default sample: the first, middle and last call of each function; every call of a writeback; points that
# found defects (verify: the close of a checkpoint file compared with a source file's bytes; the export: the close
# of the staging directory fsynced after the journals are removed, which left the journal's descriptor open)
DEFAULT = {"fake-quant": ["sample", ["close@_fsync_dir", 1, errno.EIO], ["close@_fsync_dir", 2, errno.EIO]],
           "compressed-tensors": "sample", "overwrite": "sample",
           "verify": ["sample", ["close@_same_bytes", 1, errno.EIO], ["close@_same_bytes", 2, errno.EIO]], "writeback": "all"}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """The sample, its scenarios split between two children that run at once (one core each on a 2-core machine)."""
    work = tmp_path_factory.mktemp("sweep")
    halves = [dict(list(DEFAULT.items())[i::2]) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda i: run_sweep(work / f"part{i}", halves[i]), range(2)))
    return {name: result for part in parts for name, result in part.items()}


@pytest.mark.parametrize("scenario", DEFAULT)
def test_a_sample_of_injected_io_faults_leaves_everything_as_it_was(sampled, scenario):
    result = sampled[scenario]
    assert result["counts"] and result["points"]
    if scenario in ("fake-quant", "overwrite"):
        assert {"open", "pwritev", "copy_file_range", "preadv", "fsync", "mkdir", "renameat2"} <= set(result["counts"])
    judge(scenario, result)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ("fake-quant", "compressed-tensors", "modelopt", "overwrite", "verify",
                                      "writeback"))
def test_every_injected_io_fault_leaves_everything_as_it_was(tmp_path, scenario):
    judge(scenario, run_sweep(tmp_path, {scenario: "every-errno"})[scenario])


@pytest.mark.slow
def test_injected_io_faults_in_an_export_with_a_64_mib_tensor(tmp_path):
    judge("large", run_sweep(tmp_path, {"large": "sample"})["large"])


def _gloo_pair(work: Path, point: list | None, timeout: float) -> list[dict]:
    """Both ranks of one gloo run (``fault_sweep.rank_main``) in fresh processes; a rank that gives no result in
    ``timeout`` (a hang) or dies gets a violation."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "tmp").mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(work / "tmp")}
    procs = [subprocess.Popen([sys.executable, str(HERE / "fault_sweep.py"),
                               json.dumps({"work": str(work), "rank": r, "port": port, "point": point})],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE, env=env)
             for r in range(2)]
    results = []
    for rank, p in enumerate(procs):
        try:
            out = p.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out = p.communicate()[0]
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        results.append(events[-1] if events else {"violations": [f"rank {rank}: no result (hang or crash): "
                                                                 f"{out[-2000:]}"]})
    return results


def run_gloo_sweep(work: Path, mode: str, timeout: float = 300) -> dict:
    """The gloo sweep: a counting run, then one run per point of ``mode`` (:func:`fault_sweep.select`) on each
    rank's counts."""
    counted = _gloo_pair(work / "count", None, timeout)
    for rank, res in enumerate(counted):
        assert "counts" in res and not res["violations"], f"rank {rank}: the run without faults failed: {res}"
    result = {"counts": {f"rank {r}": res["counts"] for r, res in enumerate(counted)}, "points": {}, "seconds": 0.0}
    points = [[*p, r] for r, res in enumerate(counted) for p in fault_sweep.select(res["counts"], mode)]
    for i, point in enumerate(points):
        for rank, res in enumerate(_gloo_pair(work / f"p{i}", point, timeout)):
            result["points"][(*point, f"checked on rank {rank}")] = res
    return result


@pytest.mark.slow
def test_injected_io_faults_on_either_rank_of_a_gloo_export(tmp_path):
    judge("gloo", run_gloo_sweep(tmp_path, "last"))
