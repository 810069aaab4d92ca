"""``save_clean()``: plan a job, stream it one module at a time (read, fold or pack, write), commit atomically.

An export over several ``torch.distributed`` ranks is run by :mod:`offload_export.distributed`, which builds
on this module and registers itself with :func:`register_group_export`; this module never imports it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import _atomic
from ._hooks import offloaded_tensors
from ._process import no_full_collections
from .checkpoint import write_metadata, write_weights
from .fingerprint import fingerprint, plan_facts
from .job import Job, prepare_job
from .materialize import waits_for_blocks
from .resume import Resumer, resume_session
from .verify import check_staged
from .vllm_fq import write_vllm_fq_state

__all__ = ["DEFAULT_TIMEOUT", "ExportReport", "default_group", "register_group_export", "save_clean"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass
class ExportReport:
    """What :func:`save_clean` wrote.

    Attributes:
        out_dir: the checkpoint directory.
        files: file names written, sorted.
        format: the output format (``"fake-quant"``, ``"modelopt"``, ...).
        tensors: number of weight tensors; bytes: their total size.
        shards: number of safetensors weight files.
        folded: weights written as their fake-quantized value.
        dropped: state-dict keys left out of the weights, with the reason.
        largest_tensor: bytes of the largest weight tensor.
        seconds: wall time of the export.
        notes: what the export wants you to know (cleanup, dropped config keys, what a resume kept or why not).
        reused_shards, reused_bytes: shards kept from an earlier, interrupted export (``resume=True``).
        written_shards, written_bytes: shards this export wrote (all of them unless it resumed).
    """

    out_dir: str
    files: list[str]
    format: str
    tensors: int
    bytes: int
    shards: int
    folded: list[str]
    dropped: dict[str, str]
    largest_tensor: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    reused_shards: int = 0
    reused_bytes: int = 0
    written_shards: int = 0
    written_bytes: int = 0

    def __repr__(self) -> str:
        lines = [f"ExportReport({self.out_dir}, format={self.format})",
                 f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.shards} shard(s), "
                 f"{self.seconds:.2f} s ({self.bytes / 1e6 / max(self.seconds, 1e-9):.0f} MB/s)",
                 f"  folded: {len(self.folded)} weight(s); dropped: {len(self.dropped)} key(s) "
                 f"({_count_reasons(self.dropped)})",
                 f"  files: {', '.join(self.files)}"]
        if self.reused_shards:
            lines.append(f"  resumed: {self.reused_shards} shard(s) ({self.reused_bytes / 1e6:.1f} MB) kept, "
                         f"{self.written_shards} ({self.written_bytes / 1e6:.1f} MB) written")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    @classmethod
    def of(cls, job: Job, files: list[str], seconds: float, notes: list[str],
           counts: dict[str, int] | None = None) -> ExportReport:
        """The report of ``job`` once ``files`` were written (the planned shards are added).

        ``counts``: the shards reused and written (:attr:`offload_export.resume.ResumeSession.counts`).
        """
        plan = job.plan
        files = sorted(set(files) | {s.filename for s in plan.shards})
        return cls(str(job.out_dir), files, job.format.name, sum(len(s.tensors) for s in plan.shards),
                   plan.total_size, len(plan.shards), sorted(job.folds), dict(plan.dropped), plan.largest_tensor,
                   seconds, notes, **(counts or {}))


def _count_reasons(dropped: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in dropped.values():
        reason = "tied" if reason.startswith("tied") else reason
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in counts.items()) or "none"


@no_full_collections  # a full pass would walk the model's objects mid-plan
@waits_for_blocks  # another thread's materialized() block would change tensors mid-read
def save_clean(model: nn.Module, out_dir: str | os.PathLike, *, format: str = "fake-quant", fold: bool = True,
               max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, overwrite: bool = False, tokenizer=None,
               progress: bool = False, group=None, timeout: timedelta = DEFAULT_TIMEOUT, verify: bool = False,
               vllm_fq_state: bool = False, resume: bool = False) -> ExportReport:
    """Export ``model`` (offloaded or not, fake-quantized or not) as a clean Hugging Face checkpoint.

    One module at a time: its tensors are read from wherever they live (GPU, CPU offload, ``.dat``
    files, the user's safetensors), enabled weight quantizers are folded into their weights on the
    quantizer's device, and the bytes are written into pre-planned safetensors shards. Everything is
    written into a temporary directory beside ``out_dir`` and renamed into place at the end; the model
    is never changed.

    Args:
        model: the model; a ``transformers`` model gets ``config.json`` (without ``auto_map``) and
            ``generation_config.json`` too.
        out_dir: the destination directory; must be absent or empty unless ``overwrite``. Never ``""``, the
            current directory, a mount point (use a folder inside it) or a folder the model's offloaded weights
            are read from.
        format: ``"fake-quant"`` (default): the weights as the fake-quantized model computes with them.
            ``"modelopt"``: the packed checkpoint ModelOpt's ``export_hf_checkpoint`` writes for the model kept
            resident (packed weights and scales, fused MoE experts per expert, ``hf_quant_config.json``, its
            ``quantization_config``), for ModelOpt-quantized models.
            ``"compressed-tensors"``: the packed checkpoint llm-compressor writes (``pack-quantized``,
            ``float-quantized``, ``int-quantized``, ``nvfp4-pack-quantized`` with ``quantization_config``), for
            compressed-tensors schemes and the built-in ones (:func:`offload_export.quantize_weights`).
        fold: write enabled weight quantizers' fake-quantized values instead of the raw weights.
        max_shard_size: bytes per shard, an int or a string like ``"5GB"``.
        dtype: cast floating-point weights to this dtype.
        device: fold on this device instead of the quantizer's / the module's execution device.
        overwrite: replace an ``out_dir`` that holds a checkpoint and nothing else (weights, configs, tokenizer
            files: ``offload_export._destination.CHECKPOINT_FILES``), only once the new checkpoint is complete.
        tokenizer: saved with ``save_pretrained`` into the checkpoint when given.
        progress: show a progress bar over bytes written.
        group: a ``torch.distributed`` process group whose ranks share the work (see
            :mod:`offload_export.distributed`); when ``None`` and ``torch.distributed`` is initialised
            with several ranks, the default group. Every rank of the group must call ``save_clean``.
        timeout: with ``group``, how long a rank waits for the others at each agreement point.
        verify: before committing, check the written files against the model with
            :func:`offload_export.verify` (a second pass over the model); any mismatch aborts the export.
        vllm_fq_state: also write ``vllm_fq_modelopt_state.pth`` for ModelOpt's vLLM fake-quant worker
            (ModelOpt models only; tensors and plain types, loadable with ``torch.load(weights_only=True)``).
        resume: continue an earlier export into ``out_dir`` that was killed or interrupted: when its staging
            directory is left, its process is gone and it was made for the same plan (same tensors, shards,
            format, quantizer configuration and state, same files read, same tensors in memory), keep every
            shard whose recorded size and CRC-32 still match and write only the rest; otherwise export afresh
            (``notes`` say why). Also keeps the staging directory on ``KeyboardInterrupt``. A staging
            directory of another machine or PID namespace is continued only with ``resume=True``.

    Returns:
        An :class:`ExportReport`.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false, or is a file.
        ValueError: a bad argument (shard size, dtype), a model that cannot be exported as is, or a destination
            that must not be written (see ``out_dir``; with ``overwrite``, one holding files that are not part
            of a checkpoint: they are listed).
        RuntimeError: a weight that cannot be read or folded (the message names it), or ``verify`` found
            mismatches (they are listed; nothing was committed).

    Example:
        >>> report = offload_export.save_clean(model, "out/", max_shard_size="2GB")  # doctest: +SKIP
    """
    options = dict(format=format, fold=fold, max_shard_size=max_shard_size, dtype=dtype, device=device,
                   overwrite=overwrite)
    if group is not None or default_group() is not None:
        if verify or vllm_fq_state:
            raise ValueError("verify=True and vllm_fq_state=True are not supported for a distributed export; "
                             "call offload_export.verify(model, out_dir) after it, or export from one process")
        if _group_export is None:
            raise RuntimeError("the distributed export is not available (import offload_export.distributed)")
        return _group_export(model, out_dir, tokenizer=tokenizer, progress=progress, group=group, timeout=timeout,
                             resume=resume, **options)
    start = time.perf_counter()
    job = prepare_job(model, out_dir, **options)
    notes: list[str] = []
    facts = plan_facts(job) if resume else None  # else the journal's thread works them out when due
    plan_id = fingerprint(facts) if resume else None
    adopt = Resumer(plan_id, facts, notes) if resume else None
    with _atomic.staging(job.out_dir, overwrite=overwrite, notes=notes, adopt=adopt, keep_on_interrupt=resume) as tmp:
        with resume_session(job, tmp, job.plan, plan_id=plan_id, facts=facts, resume=resume,
                            notes=notes) as session:  # its journal is gone once the block ends
            files = write_weights(job.reader(), session.plan, tmp, progress, on_shard=session.shard_done,
                                  on_made=session.header_due)
            files += write_metadata(job, tmp, tokenizer=tokenizer, notes=notes)
            if vllm_fq_state:
                files.append(write_vllm_fq_state(model, job.quantizers, offloaded_tensors(model), set(job.folds),
                                                 tmp))
        if verify:
            check_staged(job, tmp)
    return ExportReport.of(job, files, time.perf_counter() - start, notes, session.counts)


def default_group():
    """The default process group when ``torch.distributed`` is initialised with more than one rank, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


_group_export: Callable[..., ExportReport] | None = None


def register_group_export(fn: Callable[..., ExportReport]) -> None:
    """Route ``save_clean(group=...)`` (or an initialised multi-rank default group) to ``fn``.

    :mod:`offload_export.distributed` registers its export here when it is imported (the package imports
    it); ``fn`` takes ``save_clean``'s arguments.
    """
    global _group_export
    _group_export = fn
