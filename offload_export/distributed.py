"""The same export split over ``torch.distributed`` ranks.

Several processes (``torchrun``; gloo on CPU, NCCL on GPU): :func:`save_clean` with ``group=`` (or with
``torch.distributed`` initialised over several ranks) computes the same plan on every rank, assigns each
safetensors shard to one rank (largest shards first, to the least loaded rank that can read it), and
every rank writes its shards into one temporary directory beside ``out_dir`` that rank 0 created. Rank 0
then writes the index, config, generation config and quantizer state and renames the directory into
place. The files are byte-for-byte those of a single-process export. A failure on any rank makes every
rank raise and leaves no checkpoint; ranks agree through a dedicated gloo group with a timeout, so a
vanished rank is an error after ``timeout``, not a hang.

Two ways to hold the model:

(a) every rank holds the whole model (offloaded or not, e.g. the same ``device_map`` with its GPU part on
    ``cuda:LOCAL_RANK``): every rank can read every shard, and the shards are balanced by bytes;
(b) ranks hold different parts (a pipeline-style ``device_map`` per rank): every rank must build the
    *same module tree*; the parts a rank does not hold are ``meta`` tensors without an offloading hook.
    A shard goes to a rank that can read all of its tensors (and, for folded weights, its quantizer's
    state); a shard that no rank can read is an error naming a tensor. Rank 0 must be able to read the
    quantizer state (it is small: keep quantizers resident on every rank).

Requirements: all ranks see ``out_dir``'s parent on one shared filesystem, and call ``save_clean`` with the
same arguments. The ranks' plans are compared (a fingerprint of shards, dtypes, shapes and folded weights,
and each quantizer's configuration and a digest of its state) and must match. When CUDA is available and ``device`` is not given, each rank folds on
``cuda:$LOCAL_RANK``. A process that exports alone while ``torch.distributed`` is initialised (the
``if rank == 0: save_clean(...)`` pattern) must pass a single-rank group,
``group=dist.new_group([rank], use_local_synchronization=True)``; otherwise it waits for the other ranks
until ``timeout`` and raises.

One process, several GPUs needs none of this: :func:`offload_export.pipeline.run_units` folds each unit
on its own fold device within ``save_clean`` itself.

This module builds on the one-process export (job, pipeline, checkpoint files, atomic staging) and registers
:func:`save_clean_distributed` as the export that ``save_clean(group=...)`` runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import _atomic
from .checkpoint import write_metadata, write_weights
from .export import DEFAULT_TIMEOUT, ExportReport, register_group_export
from .fingerprint import fingerprint, plan_facts
from .job import Job, prepare_job
from .plan import ExportPlan, select_shards
from .resume import Resumer, combined_fingerprint, remove_journals, resume_session

__all__ = ["assign_shards", "save_clean_distributed"]


def assign_shards(sizes: Sequence[int], readable: Sequence[Sequence[bool]]) -> tuple[int, ...]:
    """Give each shard to one rank: largest first, to the least loaded rank that can read it (ties: lowest rank).

    Args:
        sizes: bytes of each shard.
        readable: ``readable[rank][shard]``: whether that rank can read all of the shard's tensors.

    Returns:
        The rank of each shard.

    Raises:
        ValueError: a shard that no rank can read.

    Example:
        >>> assign_shards([5, 3, 3], [[True] * 3, [True] * 3])
        (0, 1, 1)
    """
    load = [0] * len(readable)
    owner = [-1] * len(sizes)
    for shard in sorted(range(len(sizes)), key=lambda s: (-sizes[s], s)):
        candidates = [r for r in range(len(readable)) if readable[r][shard]]
        if not candidates:
            raise ValueError(f"shard {shard} can be read by no rank")
        rank = min(candidates, key=lambda r: (load[r], r))
        owner[shard] = rank
        load[rank] += sizes[shard]
    return tuple(owner)


def _wait(ctl, work) -> None:
    """Wait for an asynchronous collective of group ``ctl``, then raise its error (the group's timeout, a peer gone).

    A blocking wait holds the calling thread inside C++ until the collective returns, so Ctrl-C
    (``KeyboardInterrupt``) would be raised only then. Here a helper thread waits and this one joins it in
    short slices, which a signal interrupts at once. The helper holds the group and the collective until
    the collective ends (their destructors wait for it), so after an interruption nothing in this thread
    waits for it; the process can exit, and the other ranks then fail at once.
    """
    error: list[BaseException] = []

    def wait(group=ctl, pending=work) -> None:
        try:
            pending.wait()
        except BaseException as e:
            error.append(e)

    helper = threading.Thread(target=wait, name="offload-export-collective", daemon=True)
    del ctl, work
    helper.start()
    while helper.is_alive():
        helper.join(0.05)
    if error:
        raise error[0]


def _exchange(ctl, fn: Callable[[], str], outcome: str = "no checkpoint was written") -> list[str]:
    """Run ``fn`` on every rank and gather the strings it returns; if it raised anywhere, raise everywhere.

    Strings travel as uint8 tensors (no object serialization). The failing rank re-raises its own exception (a
    ``KeyboardInterrupt`` or ``SystemExit`` too, after telling the others, so that they need not wait for the
    timeout); the others raise a ``RuntimeError`` naming the failing rank, its error and ``outcome``.
    """
    error = None
    try:
        text = fn()
    except BaseException as e:
        error, text = e, f"{type(e).__name__}: {e}"
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
    world = dist.get_world_size(ctl)
    header = torch.tensor([len(data), error is None], dtype=torch.int64)
    headers = [torch.empty_like(header) for _ in range(world)]
    _wait(ctl, dist.all_gather(headers, header, group=ctl, async_op=True))
    longest = max(1, max(int(h[0]) for h in headers))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = data
    chunks = [torch.empty_like(padded) for _ in range(world)]
    _wait(ctl, dist.all_gather(chunks, padded, group=ctl, async_op=True))
    texts = [c[:int(h[0])].numpy().tobytes().decode() for c, h in zip(chunks, headers)]
    failed = [r for r, h in enumerate(headers) if not h[1]]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"save_clean failed on rank {failed[0]} ({len(failed)} of {world} rank(s) failed); "
                           f"{outcome}:\n  {texts[failed[0]]}")
    return texts


def _needs(job: Job) -> dict[str, set[str]]:
    """``output name -> layout keys`` a rank must be able to read to produce it (quantizer state included)."""
    state = {key: set(q.state_keys) for key, q in job.folds.items()}
    needs = {}
    for unit in job.plan.units:
        for spec in unit.outputs:
            sources = unit.sources if unit.converted else (spec.name,)
            needs[spec.name] = {k for s in sources for k in (s, *state.get(s, ()))}
    return needs


def _missing(job: Job, keys: Iterable[str]) -> str | None:
    """The first of ``keys`` this rank holds no data for (a meta tensor without an offloading hook)."""
    return next((k for k in sorted(keys) if k in job.lay and job.lay[k].kind == "missing"), None)


def _fingerprint(job: Job) -> str:
    shards = [[s.filename, [[t.name, str(t.dtype), list(t.shape)] for t in s.tensors]] for s in job.plan.shards]
    return hashlib.sha256(json.dumps([shards, sorted(job.folds)]).encode()).hexdigest()


def _survey(job: Job, facts: dict) -> dict:
    """This rank's plan fingerprint, its quantizers' configurations and state digests (from ``facts``, its
    :func:`~offload_export.fingerprint.plan_facts`: ``name -> [configuration JSON, state digest or None]``),
    per shard (then the quantizer state) whether it can read it, and its resume fingerprint."""
    needs = _needs(job)
    readable = ["0" if _missing(job, {k for t in s.tensors for k in needs[t.name]}) else "1" for s in job.plan.shards]
    readable.append("0" if _missing(job, {k for q in job.quantizers for k in q.state_keys}) else "1")
    digests = {q["name"]: q for q in facts["quantizers"]}
    quantizers = {q.name: [json.dumps(digests[q.name]["config"], sort_keys=True), digests[q.name]["state"]]
                  for q in job.quantizers}  # in module order: a difference is reported at its first quantizer
    return {"plan": _fingerprint(job), "quantizers": quantizers, "readable": "".join(readable),
            "resume": fingerprint(facts)}


def _check_quantizers(surveys: list[dict]) -> None:
    """Every rank quantized alike: the same configuration of each quantizer, the same state where two ranks
    can read it; raises the same error on every rank."""
    for rank, survey in enumerate(surveys[1:], start=1):
        for name, (config, digest) in surveys[0]["quantizers"].items():
            other_config, other_digest = survey["quantizers"][name]
            if other_config != config:
                what = f"configuration ({other_config} on rank {rank}, {config} on rank 0)"
            elif digest is not None and other_digest is not None and digest != other_digest:
                what = "state (scales, amax, ...: calibrated differently)"
            else:
                continue
            raise RuntimeError(f"the ranks quantized differently: {name}'s {what} differs between rank 0 and "
                               f"rank {rank}; every rank must quantize the same model the same way (or load the "
                               f"same quantized checkpoint) before save_clean")


def _assign(job: Job, surveys: list[dict], rank: int) -> tuple[int, ...]:
    """The owner rank of each shard, identical on every rank; raises the same error on every rank."""
    if len({s["plan"] for s in surveys}) > 1:
        raise RuntimeError("the ranks planned different exports (tensor names, dtypes, shapes or folded weights "
                           "differ): every rank must build the same model, quantize it the same way and call "
                           "save_clean with the same arguments")
    _check_quantizers(surveys)
    if surveys[0]["readable"][-1] != "1":
        key = _missing(job, {k for q in job.quantizers for k in q.state_keys})
        raise RuntimeError(f"rank 0 cannot read the quantizer state it writes (e.g. {key or 'on rank 0'} is on the "
                           f"meta device without an offloading hook); keep quantizers resident on every rank")
    readable = [[c == "1" for c in s["readable"][:-1]] for s in surveys]
    try:
        return assign_shards([s.nbytes for s in job.plan.shards], readable)
    except ValueError:
        needs = _needs(job)
        shard = next(s for i, s in enumerate(job.plan.shards) if not any(r[i] for r in readable))
        key = _missing(job, {k for t in shard.tensors for k in needs[t.name]})
        raise RuntimeError(f"{shard.filename}: no rank can read all of its tensors (on rank {rank}, "
                           f"{key or 'some tensor'} is on the meta device without an offloading hook); every "
                           f"tensor must be held or offloaded by some rank") from None


def _share(plan: ExportPlan, owner: tuple[int, ...], rank: int) -> ExportPlan:
    """The part of ``plan`` one rank writes: its shards, and of each unit only the outputs in them."""
    return select_shards(plan, [s.filename for s, r in zip(plan.shards, owner) if r == rank])


def _rank_device(device) -> torch.device | None:
    if device is not None or not torch.cuda.is_available():
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def save_clean_distributed(model: nn.Module, out_dir: str | os.PathLike, *, format: str = "fake-quant",
                           fold: bool = True,
                           max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                           device: torch.device | str | None = None, overwrite: bool = False, tokenizer=None,
                           progress: bool = False, group=None, timeout: timedelta = DEFAULT_TIMEOUT,
                           resume: bool = False) -> ExportReport:
    """:func:`offload_export.save_clean` with the shards split over the ranks of ``group``; call it on every rank.

    Args:
        model, out_dir, format, fold, max_shard_size, dtype, device, overwrite, tokenizer, progress: as for
            ``save_clean`` (``device`` defaults to ``cuda:$LOCAL_RANK`` when CUDA is available; the
            progress bar is rank 0's).
        group: the process group (default: the whole world). ``torch.distributed`` must be initialised.
        timeout: how long a rank waits for the others at each agreement point (the slowest rank's write
            phase included) before raising.
        resume: as for ``save_clean``: rank 0 picks the earlier staging directory made for the ranks' combined
            plan fingerprint, and each rank keeps those of its own shards that a journal recorded.

    Returns:
        The same :class:`~offload_export.export.ExportReport` on every rank.

    Raises:
        As ``save_clean``, on every rank whenever any rank fails: the failing rank raises its own exception,
        the others a ``RuntimeError`` naming it. No checkpoint is left behind.
        RuntimeError: the ranks planned different exports, or a shard that no rank can read (mode (b)).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("save_clean_distributed needs torch.distributed initialised (torchrun + "
                           "dist.init_process_group); for one process call save_clean")
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group it was given")
    ctl = dist.new_group(dist.get_process_group_ranks(group), timeout=timeout, backend="gloo",
                         use_local_synchronization=True)
    try:
        options = dict(format=format, fold=fold, max_shard_size=max_shard_size, dtype=dtype,
                       device=_rank_device(device), overwrite=overwrite)
        return _export(model, out_dir, options, tokenizer, progress and rank == 0, ctl, rank, resume)
    finally:
        dist.destroy_process_group(ctl)


def _export(model: nn.Module, out_dir, options: dict, tokenizer, progress: bool, ctl, rank: int,
            resume: bool = False) -> ExportReport:
    start = time.perf_counter()
    job: Job | None = None
    facts: dict = {}

    def prepare() -> str:
        nonlocal job, facts
        job = prepare_job(model, out_dir, allow_missing=True, **options)
        facts = plan_facts(job)
        return json.dumps(_survey(job, facts))

    surveys = [json.loads(s) for s in _exchange(ctl, prepare)]
    owner = _assign(job, surveys, rank)
    share = _share(job.plan, owner, rank)
    plan_id = combined_fingerprint([s["resume"] for s in surveys])
    cleanup_notes: list[str] = []
    with ExitStack() as stack:
        def stage() -> str:
            adopt = Resumer(plan_id, facts, cleanup_notes) if resume else None
            return str(stack.enter_context(_atomic.staging(job.out_dir, overwrite=options["overwrite"],
                                                           notes=cleanup_notes, adopt=adopt,
                                                           keep_on_interrupt=resume)))

        tmp = Path(_exchange(ctl, stage if rank == 0 else lambda: "")[0])

        def write() -> str:
            notes: list[str] = []
            with resume_session(job, tmp, share, plan_id=plan_id, facts=facts, resume=resume, notes=notes,
                                rank=rank, owner=rank == 0, commit=False) as session:
                write_weights(job.reader(), session.plan, tmp, progress, on_shard=session.shard_done)
            return json.dumps({"counts": session.counts, "notes": [f"rank {rank}: {n}" for n in notes]})

        written = [json.loads(t) for t in _exchange(ctl, write)]

        committed: ExportReport | None = None

        def finish() -> str:
            nonlocal committed
            if rank != 0:
                return ""
            notes = [_split_note(job.plan, owner, dist.get_world_size(ctl)), *cleanup_notes,
                     *(n for w in written for n in w["notes"])]
            files = write_metadata(job, tmp, tokenizer=tokenizer, notes=notes)
            remove_journals(tmp)
            stack.close()  # fsync and rename into place: the checkpoint is committed
            counts = {k: sum(w["counts"][k] for w in written) for k in written[0]["counts"]}
            committed = ExportReport.of(job, files, time.perf_counter() - start, notes, counts)
            return json.dumps(asdict(committed))

        try:
            texts = _exchange(ctl, finish, outcome=f"rank 0 was committing {job.out_dir}: check it with "
                                                   f"offload_export.verify before using it")
        except Exception as e:
            if committed is None:
                raise
            return _confirmed_alone(committed, e)
    return ExportReport(**json.loads(texts[0]))


def _confirmed_alone(report: ExportReport, error: Exception) -> ExportReport:
    """Rank 0 committed the checkpoint but a peer left before confirming: the export stands, and says so."""
    note = (f"the checkpoint is committed and complete, but another rank left before confirming "
            f"({type(error).__name__}: {error})")
    warnings.warn(f"save_clean: {report.out_dir}: {note}", RuntimeWarning, stacklevel=3)
    report.notes.append(note)
    return report


def _split_note(plan: ExportPlan, owner: tuple[int, ...], ranks: int) -> str:
    per_rank = [sum(s.nbytes for s, r in zip(plan.shards, owner) if r == rank) for rank in range(ranks)]
    return "shards written by rank: " + ", ".join(
        f"{rank}: {owner.count(rank)} ({per_rank[rank] / 1e6:.1f} MB)" for rank in range(ranks))


register_group_export(save_clean_distributed)
