"""save_clean(resume=True): a killed or interrupted export continues from its completed shards.

SIGKILL tests run a driver interpreter (this file as a script) that imports once and forks one child per
export: the reference, then for each kill point a child that SIGKILLs itself at the k-th write, shard fsync or
journal append, and a child that resumes; every resumed checkpoint must equal the reference byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import offload_export as oe
from offload_export import resume as resume_mod
from offload_export.adapters.builtin import FakeQuantizer
from offload_export.fingerprint import fingerprint, plan_facts
from offload_export.job import prepare_job

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import JOIN_TIMEOUT, SHARD, _files, _run_ranks, _tiny_model  # noqa: E402

KINDS = ("write", "finish", "journal", "recorded")  # kill inside a write / after a shard's fsync / inside and
# after a journal append


# ----------------------------------------------------------------------------------------- in-process helpers


def _interrupt_after(monkeypatch, shards: int) -> None:
    """Raise KeyboardInterrupt (a Ctrl-C) right after the ``shards``-th shard is complete."""
    done = resume_mod.ResumeSession.shard_done
    count = [0]

    def shard_done(self, path, crc32):
        done(self, path, crc32)
        count[0] += 1
        if count[0] == shards:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume_mod.ResumeSession, "shard_done", shard_done)


def _interrupted(monkeypatch, model, out: Path, shards: int = 5) -> Path:
    """Export ``model`` into ``out``, interrupted after ``shards`` shards; the staging directory left behind."""
    with monkeypatch.context() as m:
        _interrupt_after(m, shards)
        with pytest.raises(KeyboardInterrupt):
            oe.save_clean(model, out, max_shard_size=SHARD, resume=True)
    (staged,) = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.offload-export-")]
    return staged


def _recorded(staged: Path) -> list[str]:
    """The shards the journals in ``staged`` recorded (at least those completed before the interrupt)."""
    names = set()
    for journal in (p for p in staged.iterdir() if resume_mod.is_journal(p.name)):
        names |= {r["file"] for r in map(json.loads, journal.read_text().splitlines()) if "file" in r}
    return sorted(names)


@pytest.fixture
def work():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


# ----------------------------------------------------------------------------------------- in-process tests


def test_an_interrupted_export_resumes_from_its_completed_shards(work, monkeypatch):
    model = _tiny_model(offload_dir=work / "offload")
    oe.save_clean(model, work / "ref", max_shard_size=SHARD)
    staged = _interrupted(monkeypatch, model, work / "out")
    recorded = len(_recorded(staged))
    assert recorded >= 5  # the writer may complete one more before the interrupt reaches it
    report = oe.save_clean(model, work / "out", max_shard_size=SHARD, resume=True)
    assert _files(work / "out") == _files(work / "ref")
    assert report.reused_shards == recorded and report.written_shards == report.shards - recorded
    assert report.reused_bytes + report.written_bytes == sum((work / "ref" / n).stat().st_size
                                                             for n in report.files if n.startswith("model-"))
    assert f"resumed: {recorded} shard(s)" in repr(report)
    assert sorted(p.name for p in work.iterdir()) == ["offload", "out", "ref"]  # staging gone, no journal kept


def _memory_records(staged: Path) -> list[str]:
    journal = next(p for p in staged.iterdir() if resume_mod.is_journal(p.name))
    return [r["memory"] for r in map(json.loads, journal.read_text().splitlines()) if r.get("memory")]


def test_the_memory_digest_is_deferred_yet_an_interrupted_export_records_it_and_resumes(work, monkeypatch):
    monkeypatch.setattr(resume_mod, "DIGEST_DEFER_RATE", 1e-3)  # due in years: only the failure path digests
    model = _tiny_model(offload_dir=None)  # held in memory
    digests = []
    real = resume_mod.memory_digest
    monkeypatch.setattr(resume_mod, "memory_digest", lambda *a, **k: digests.append(1) or real(*a, **k))
    start = time.monotonic()
    oe.save_clean(model, work / "ref", max_shard_size=SHARD)
    assert not digests  # the export ended first: it neither waited for the digest nor computed it
    staged = _interrupted(monkeypatch, model, work / "out")
    assert len(_memory_records(staged)) == 1 and len(digests) == 1
    report = oe.save_clean(model, work / "out", max_shard_size=SHARD, resume=True)
    assert report.reused_shards >= 5 and _files(work / "out") == _files(work / "ref")
    assert time.monotonic() - start < 120


def _journals_at_commit(monkeypatch) -> list[list[dict]]:
    """The records of every journal in each staging directory as its export removes them before the commit, one list
    per export, filled as exports commit."""
    journals, remove = [], resume_mod.remove_journals

    def kept(folder):
        journals.append([json.loads(line) for p in folder.iterdir() if resume_mod.is_journal(p.name)
                         for line in p.read_text().splitlines()])
        remove(folder)

    monkeypatch.setattr(resume_mod, "remove_journals", kept)
    return journals


@pytest.mark.parametrize("beside", [True, False])
def test_an_export_without_resume_works_out_its_journal_header_in_the_journals_thread_after_its_first_byte(
        work, monkeypatch, beside):
    """Without resume=True the plan facts are worked out in the journal's thread, never before the first byte: with
    quantizer state of FACTS_BESIDE_WRITES bytes or more at once, beside the first writes; else once the first shard
    is complete (these shards are small) or every unit is made. Either way the header is the one an export with
    resume=True records, and it comes before every shard's record."""
    monkeypatch.setattr(resume_mod, "FACTS_BESIDE_WRITES", 0 if beside else 1 << 40)
    model = _tiny_model(offload_dir=work / "offload")
    journals, calls = _journals_at_commit(monkeypatch), []
    facts = resume_mod.plan_facts

    def spy(job):
        written = [p for p in work.glob(".deferred*/*.safetensors") if p.stat().st_size]
        calls.append((threading.current_thread().name, len(written)))
        return facts(job)

    monkeypatch.setattr(resume_mod, "plan_facts", spy)
    oe.save_clean(model, work / "deferred", max_shard_size=SHARD)
    assert len(calls) == 1 and calls[0][0].startswith("offload-export-journal")
    assert beside or calls[0][1] >= 1  # a shard was complete before the header was worked out
    oe.save_clean(model, work / "eager", max_shard_size=SHARD, resume=True)
    deferred, eager = journals
    assert deferred[0]["journal"] == 1 and deferred[0]["fingerprint"] == eager[0]["fingerprint"]
    assert deferred[0]["facts"] == eager[0]["facts"]
    shards = [r["file"] for r in deferred if "file" in r]
    assert shards and shards == [r["file"] for r in eager if "file" in r]


def test_a_one_shard_export_works_out_its_journal_header_once_every_unit_is_made(work, monkeypatch):
    """With one shard, complete only at the end, the header is worked out once the last unit is made and staged (not
    before the first byte, nor after the last write when the shard's completion would ask for it)."""
    monkeypatch.setattr(resume_mod, "FACTS_BESIDE_WRITES", 1 << 40)
    model = _tiny_model(offload_dir=work / "offload")
    journals, order = _journals_at_commit(monkeypatch), []
    facts, due, done = resume_mod.plan_facts, resume_mod.ResumeSession.header_due, resume_mod.ResumeSession.shard_done

    monkeypatch.setattr(resume_mod.ResumeSession, "header_due", lambda self: order.append("due") or due(self))

    def shard(self, *args):
        order.append("shard")
        time.sleep(0.5)  # the export's end, which skips a header not yet begun, comes after the header's start
        done(self, *args)

    monkeypatch.setattr(resume_mod.ResumeSession, "shard_done", shard)
    monkeypatch.setattr(resume_mod, "plan_facts", lambda job: order.append("facts") or facts(job))
    oe.save_clean(model, work / "out")
    assert order[:2] == ["due", "facts"] or order[:3] == ["due", "shard", "facts"]
    assert order.count("shard") == 1 and order.count("facts") == 1
    header, *records = journals[0]  # the header first: a record before it would void the journal
    assert header["journal"] == 1 and header["facts"] and not any("journal" in r for r in records)


def test_a_rank_that_ends_before_its_memory_digest_is_due_neither_waits_nor_records_it(work, monkeypatch):
    monkeypatch.setattr(resume_mod, "DIGEST_DEFER_RATE", 1e-3)
    job = prepare_job(_tiny_model(offload_dir=None), work / "out")
    (work / "tmp").mkdir()
    with resume_mod.resume_session(job, work / "tmp", job.plan, plan_id="f", facts={}, resume=False,
                                   notes=[], commit=False):
        pass
    assert not _memory_records(work / "tmp")


def test_resume_false_deletes_the_staging_directory_of_a_dead_export(work, monkeypatch):
    model = _tiny_model(offload_dir=work / "offload")
    _interrupted(monkeypatch, model, work / "out")
    report = oe.save_clean(model, work / "out", max_shard_size=SHARD)
    assert report.reused_shards == 0 and report.written_shards == report.shards
    assert sorted(p.name for p in work.iterdir()) == ["offload", "out"]


def _edit_weight(model, work):
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    return "in memory differ"


def _recalibrate(model, work):
    q = next(m for m in model.modules() if isinstance(m, FakeQuantizer))
    with torch.no_grad():
        next(b for b in q.buffers() if b.is_floating_point()).mul_(1.5)
    return "quantizer configuration or state"


def _touch_store(model, work):
    dat = sorted((work / "offload").glob("*.dat"))[3]
    os.utime(dat, ns=(dat.stat().st_atime_ns, dat.stat().st_mtime_ns + 10**9))
    return dat.name


def _other_shard_size(model, work):
    return "planned shards"


@pytest.mark.parametrize("change", [_edit_weight, _recalibrate, _touch_store, _other_shard_size])
def test_a_changed_model_is_exported_afresh_and_the_notes_say_why(work, monkeypatch, change):
    resident = change is _edit_weight
    model = _tiny_model(offload_dir=None if resident else work / "offload")
    _interrupted(monkeypatch, model, work / "out")
    reason = change(model, work)
    shard = SHARD // 2 if change is _other_shard_size else SHARD
    report = oe.save_clean(model, work / "out", max_shard_size=shard, resume=True)
    oe.save_clean(model, work / "ref", max_shard_size=shard)
    assert report.reused_shards == 0 and report.written_shards == report.shards
    assert any(reason in n for n in report.notes), report.notes
    assert _files(work / "out") == _files(work / "ref")


def test_torn_and_corrupted_shards_are_written_again(work, monkeypatch):
    model = _tiny_model(offload_dir=work / "offload")
    oe.save_clean(model, work / "ref", max_shard_size=SHARD)
    staged = _interrupted(monkeypatch, model, work / "out")
    recorded = _recorded(staged)
    first, second = recorded[:2]
    with open(staged / first, "r+b") as f:  # torn: the tail is missing
        f.truncate(f.seek(0, os.SEEK_END) - 100)
    with open(staged / second, "r+b") as f:  # same size, one byte differs
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    (staged / "stray.txt").write_text("left by the earlier export")
    report = oe.save_clean(model, work / "out", max_shard_size=SHARD, resume=True)
    assert report.reused_shards == len(recorded) - 2
    assert _files(work / "out") == _files(work / "ref")


def test_journal_records_each_shard_by_size_and_crc32_and_ignores_records_of_another_digest(work, monkeypatch):
    model = _tiny_model(offload_dir=work / "offload")
    oe.save_clean(model, work / "ref", max_shard_size=SHARD)
    staged = _interrupted(monkeypatch, model, work / "out")
    (journal,) = [p for p in staged.iterdir() if resume_mod.is_journal(p.name)]
    lines = journal.read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "file" in r]
    assert records
    for r in records:
        data = (staged / r["file"]).read_bytes()
        assert r == {"file": r["file"], "size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    # an earlier version's records (another digest) never vouch for a shard: every shard is written again
    journal.write_text("".join(line.replace('"crc32":', '"sha256":') + "\n" for line in lines))
    report = oe.save_clean(model, work / "out", max_shard_size=SHARD, resume=True)
    assert report.reused_shards == 0 and report.written_shards == report.shards
    assert _files(work / "out") == _files(work / "ref")


def test_a_staging_directory_whose_journal_is_held_is_never_resumed(work, monkeypatch):
    model = _tiny_model(offload_dir=work / "offload")
    staged = _interrupted(monkeypatch, model, work / "out")
    (journal,) = [p for p in staged.iterdir() if resume_mod.is_journal(p.name)]
    import fcntl

    with open(journal, "rb+") as held:  # a live export (e.g. in another PID namespace) holds its journal
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        report = oe.save_clean(model, work / "out", max_shard_size=SHARD, resume=True)
    assert report.reused_shards == 0
    assert any("still holds its journal" in n for n in report.notes)


def test_a_staging_directory_of_another_pid_namespace_is_resumed_only_with_resume_true(work, monkeypatch):
    model = _tiny_model(offload_dir=work / "offload")
    staged = _interrupted(monkeypatch, model, work / "out")
    foreign = staged.with_name(staged.name.replace(staged.name.split("-")[2], "0" * 16, 1))
    recorded = len(_recorded(staged))
    staged.rename(foreign)  # owner hash of another machine / PID namespace: its process cannot be judged
    report = oe.save_clean(model, work / "elsewhere", max_shard_size=SHARD)
    assert foreign.is_dir()  # never deleted by an export that cannot judge its owner
    report = oe.save_clean(model, work / "out", max_shard_size=SHARD, resume=True)
    assert report.reused_shards == recorded and not foreign.exists()
    assert any("because resume=True" in n for n in report.notes), report.notes


def test_cli_export_resume_continues_an_interrupted_export(work, monkeypatch, capsys):
    from offload_export.cli import main
    from offload_export.demo import build_checkpoint

    build_checkpoint(work / "src", "tiny")
    args = ["export", str(work / "src"), str(work / "out"), "--scheme", "int8", "--max-shard-size", "30000",
            "--offload-folder", str(work / "offload"), "--resume"]
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        assert main(args) == 130  # Ctrl-C: with --resume the staging directory stays
    assert main(args) == 0
    assert "resumed: " in capsys.readouterr().out
    assert main(["export", str(work / "src"), str(work / "ref"), "--scheme", "int8", "--max-shard-size", "30000",
                 "--quiet"]) == 0
    assert _files(work / "out") == _files(work / "ref")


def test_fingerprint_covers_shards_quantizers_and_sources(work):
    model = _tiny_model(offload_dir=work / "offload")
    facts = plan_facts(prepare_job(model, work / "x", max_shard_size=SHARD))
    assert set(facts) == {"version", "format", "device", "shards", "folds", "quantizers", "sources"}
    assert all(len(s[1]) == 64 for s in facts["shards"])  # each shard's header bytes digested
    assert facts["sources"] and all(v[0] > 0 for v in facts["sources"].values())
    again = plan_facts(prepare_job(model, work / "x", max_shard_size=SHARD))
    assert fingerprint(facts) == fingerprint(again)
    assert resume_mod.combined_fingerprint(["a", "a"]) == "a"
    assert resume_mod.combined_fingerprint(["a", "b"]) == resume_mod.combined_fingerprint(["b", "a"]) != "a"


@pytest.mark.parametrize("parallel", [1 << 20, 64], ids=["at-once", "in-threads"])
def test_quantizer_digests_read_offloaded_state_and_see_one_changed_scale(work, monkeypatch, parallel):
    """The state digests of a disk-offloaded model (its scales read from the offload folder) are its resident twin's,
    whether each tensor is digested at once or in the threads; one changed scale changes its quantizer's alone."""
    from offload_export import fingerprint as fingerprint_mod

    monkeypatch.setattr(fingerprint_mod, "_PARALLEL", parallel)  # 64 bytes: every per-channel scale in threads
    resident, offloaded = _tiny_model(offload_dir=None), _tiny_model(offload_dir=work / "offload")
    digests = [plan_facts(prepare_job(m, work / "x"))["quantizers"] for m in (resident, offloaded)]
    assert digests[0] == digests[1] and all(q["state"] for q in digests[0])
    q = next(m for m in resident.modules() if isinstance(m, FakeQuantizer))
    with torch.no_grad():
        next(b for b in q.buffers() if b.numel() > 1).view(-1)[-1] += 1
    changed = plan_facts(prepare_job(resident, work / "x"))["quantizers"]
    assert [a["name"] for a, b in zip(digests[0], changed) if a != b] == [
        next(name for name, m in resident.named_modules() if m is q)]


# ----------------------------------------------------------------------------------------- SIGKILL at many points


def _arm(kind: str, k: int, counts: dict) -> None:
    """Count writes, shard fsyncs and journal appends in this child; SIGKILL it at the ``k``-th of ``kind``."""
    from offload_export import writer

    def hit(what: str) -> bool:
        counts[what] = counts.get(what, 0) + 1
        return what == kind and counts[what] == k

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    pwrite, copy, finish, append = (writer._write_calls, writer._copy_range, writer.ShardWriter._finish,
                                    resume_mod._append)

    def pwrite_(fd, calls):
        if hit("write"):
            at, buffers = calls[0]
            pwrite(fd, calls[:len(calls) // 2] or [(at, writer._byte_range(buffers, 0, sum(map(len, buffers)) // 2))])
            die()
        pwrite(fd, calls)

    def copy_(src, src_offset, dst, dst_offset, nbytes):
        if hit("write"):
            copy(src, src_offset, dst, dst_offset, nbytes // 2)
            die()
        copy(src, src_offset, dst, dst_offset, nbytes)

    def finish_(self):
        finish(self)
        if hit("finish"):
            die()

    def append_(fd, data):
        if hit("journal"):
            os.write(fd, data[:len(data) // 2])
            die()
        append(fd, data)
        if kind == "recorded" and counts["journal"] == k:
            die()

    writer._write_calls, writer._copy_range, writer.ShardWriter._finish, resume_mod._append = (
        pwrite_, copy_, finish_, append_)


def _forked(fn) -> int:
    """Run ``fn`` in a forked child; its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def _drive(spec: dict) -> list[dict]:
    """The driver: reference export, then kill + resume at each point; never computes with torch itself."""
    work = Path(spec["work"])
    counts: dict = {}

    def export(out: str, kind: str | None = None, k: int = 0, resume: bool = False) -> None:
        if kind is not None:
            _arm(kind, k, counts)
        report = oe.save_clean(_tiny_model(offload_dir=work / "offload"), work / out, max_shard_size=SHARD,
                               resume=resume)
        (work / f"{out}.json").write_text(json.dumps({"report": asdict(report), "counts": counts}))

    assert _forked(lambda: export("ref", "none")) == 0
    total = json.loads((work / "ref.json").read_text())["counts"]
    points = spec["points"] or [[kind, k] for kind in KINDS for k in range(1, total.get(kind, 0) + 1)]
    reference = _files(work / "ref")
    results = []
    for i, (kind, k) in enumerate(points):
        out = f"out{i}"
        status = _forked(lambda: export(out, kind, k))
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        resumed = _forked(lambda: export(out, resume=True)) if killed else status
        report = json.loads((work / f"{out}.json").read_text())["report"] if resumed == 0 else {}
        results.append({"kind": kind, "k": k, "killed": killed, "resumed": resumed,
                        "identical": resumed == 0 and _files(work / out) == reference,
                        "reused": report.get("reused_shards", 0),
                        "leftovers": [p.name for p in work.iterdir() if p.name.startswith(f".{out}.")]})
    results.append({"total": total})
    return results


def _run_driver(points: list | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                           os.environ.get("PYTHONPATH", "")]))
        run = subprocess.run([sys.executable, __file__, json.dumps({"work": tmp, "points": points})],
                             capture_output=True, text=True, timeout=1800, env=env)
        assert run.returncode == 0, run.stderr[-4000:]
        return json.loads(run.stdout.strip().splitlines()[-1])


def _check(results: list[dict]) -> None:
    *points, total = results
    for r in points:
        assert r["identical"] and not r["leftovers"], (r, total)
    assert sum(r["killed"] for r in points) >= len(points) - 1  # a late journal point may come after the commit
    assert any(r["reused"] for r in points)


def test_sigkill_at_a_handful_of_points_then_resume_is_byte_identical():
    _check(_run_driver([["write", 1], ["write", 12], ["finish", 7], ["journal", 1], ["journal", 5],
                        ["recorded", 8]]))


@pytest.mark.slow
def test_sigkill_at_every_write_fsync_and_journal_append_then_resume_is_byte_identical():
    results = _run_driver(None)
    total = results[-1]["total"]
    assert len(results) - 1 == sum(total.get(kind, 0) for kind in KINDS)
    _check(results)


# ----------------------------------------------------------------------------------------- distributed


def _rank_main(rank: int, world: int, port: int, work: str, resume: bool) -> None:
    import torch.distributed as dist

    work = Path(work)
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=JOIN_TIMEOUT))
        model = _tiny_model(offload_dir=work / f"offload-{rank}")
        if not resume and rank == 0:  # rank 0 is interrupted after its second shard; rank 1 completes its own
            done, count = resume_mod.ResumeSession.shard_done, [0]

            def shard_done(self, path, crc32):
                done(self, path, crc32)
                count[0] += 1
                if count[0] == 2:
                    raise KeyboardInterrupt

            resume_mod.ResumeSession.shard_done = shard_done
        report = oe.save_clean(model, work / "out", max_shard_size=SHARD, timeout=timedelta(hours=1), resume=True)
        result = {"ok": True, "report": asdict(report)}
    except BaseException as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        (work / f"result-{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()


def _ranks(work: Path, resume: bool) -> list[dict]:
    return _run_ranks(2, work, resume, _rank_main)


def test_two_ranks_resume_each_their_own_shards(work):
    first = _ranks(work, resume=False)
    assert not first[0]["ok"] and "KeyboardInterrupt" in first[0]["error"], first
    second = _ranks(work, resume=True)
    assert all(r["ok"] for r in second), second
    report = second[0]["report"]
    oe.save_clean(_tiny_model(offload_dir=work / "offload-0"), work / "ref", max_shard_size=SHARD)
    assert _files(work / "out") == _files(work / "ref")
    assert report["reused_shards"] >= 3 and report["reused_shards"] + report["written_shards"] == report["shards"]
    assert any(n.startswith("rank 1: resume: kept") for n in report["notes"]), report["notes"]
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


if __name__ == "__main__":
    print(json.dumps(_drive(json.loads(sys.argv[1]))))
