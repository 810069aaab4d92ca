"""The files of a checkpoint: weight shards written from the stream, then index, format files, config, tokenizer.

Used by ``save_clean`` and its distributed form to write, and by ``verify`` to know what should be there.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .job import INDEX_NAME, Job
from .pipeline import UnitReader, run_units, usable_cores
from .plan import ExportPlan, Unit
from .writer import Descriptors, ShardWriter

__all__ = ["SHARD_METADATA", "write_metadata", "write_model_files", "write_order", "write_weights"]

#: the ``__metadata__`` of every weight shard (what ``save_pretrained`` writes)
SHARD_METADATA = {"format": "pt"}


def write_weights(reader: UnitReader, plan: ExportPlan, tmp: Path, progress: bool,
                  on_shard: Callable[[str, int], None] | None = None,
                  on_made: Callable[[], None] | None = None) -> list[str]:
    """Stream every unit of ``plan`` into its shards in ``tmp`` (:func:`run_units`), in :func:`write_order`; one unit
    is written while the next is staged (:meth:`ShardWriter.stage`) and the one after it made. On any failure every
    shard file is closed before the exception propagates.

    ``on_shard(path, crc32)`` is called (on the I/O thread) as soon as a shard is complete and fsync-ed, with
    the CRC-32 of the bytes written into it (computed beside the writes: :class:`ShardWriter`). ``on_made()`` is
    called once every unit is made and staged, before the last unit's writes (work that can wait runs beside them).

    Returns:
        The shard file names.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.total_size, unit="B", unit_scale=True, desc="offload-export")
    # files open at their first tensor and close (fsync-ed) at their last; at most a few at once
    descriptors = Descriptors()
    # the shards' CRC-32 beside the writes on a quarter of the cores, 1-4 (one core's zlib runs at 2-3 GB/s, about
    # a disk's write rate; the folds and the I/O threads keep the other cores)
    checksums = (ThreadPoolExecutor(max(1, min(4, usable_cores() // 4)), thread_name_prefix="offload-export-crc")
                 if on_shard is not None else None)
    writers = {s.filename: ShardWriter(str(tmp / s.filename), s.tensors, SHARD_METADATA, descriptors=descriptors,
                                       checksums=checksums, layout=s.layout(SHARD_METADATA)) for s in plan.shards}
    shard_of = plan.weight_map
    # the system calls of one unit's writes run in this thread while the consumer stages the next unit's
    io = ThreadPoolExecutor(1, thread_name_prefix="offload-export-io")
    failed = threading.Event()
    units = write_order(plan.units, reader)
    last = units[-1] if units else None

    def write(unit, outputs) -> Future:
        by_shard: dict[str, list] = {}
        for spec in unit.outputs:
            by_shard.setdefault(shard_of[spec.name], []).append((spec.name, outputs.pop(spec.name)))
        staged = [(writers[filename], writers[filename].stage(items)) for filename, items in by_shard.items()]
        if on_made is not None and unit is last:
            on_made()

        def run() -> None:
            try:
                if failed.is_set():  # a unit before failed: the export stops, nothing more is written
                    return
                for writer, writes in staged:
                    writes()
                    if on_shard is not None and writer.complete:
                        on_shard(writer.path, writer.crc32)
                if bar is not None:
                    bar.update(sum(spec.nbytes for spec in unit.outputs))
            except BaseException:
                failed.set()
                raise
            finally:
                staged.clear()  # the unit's memory is freed before its leases are released

        return io.submit(run)

    # units are written behind, in order, by the loop's consumer and I/O threads while the next ones are folded:
    # the disk and the CPU/GPU work at once, within the loop's byte budget
    try:
        run_units(reader, units, write, read_ahead_bytes=reader.read_ahead_bytes(units))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        io.shutdown()
        if checksums is not None:
            checksums.shutdown()
        if bar is not None:
            bar.close()
    return list(writers)


def write_order(units: Sequence[Unit], reader: UnitReader) -> list[Unit]:
    """``units`` in the order they are written: the plan's, but for the units at its end that are written as read
    (:meth:`UnitReader.written_as_read`: an untied lm_head, the norms after the last quantized module), which come
    second. At the end, their writes would follow every fold and pack, the disk alone working while the rest waits
    (an lm_head of 0.6 GB: a quarter of a second at 2.5 GB/s); second, they are written while the first units are
    made."""
    end = len(units)
    while end > 1 and reader.written_as_read(units[end - 1]):
        end -= 1
    return [*units[:1], *units[end:], *units[1:end]]


def _write_config(job: Job, tmp: Path, notes: list[str]) -> list[str]:
    model = job.model
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        notes.append("not a transformers model: weights written, config.json skipped")
        return []
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    if job.source.dtype is not None:
        config.dtype = job.source.dtype
    dropped = job.format.dropped_config_keys
    for key in dropped:
        if hasattr(config, key):
            delattr(config, key)
            notes.append(f"config.json: dropped {key}")
    config.save_pretrained(tmp)
    data = json.loads((tmp / "config.json").read_text())
    for key in dropped:
        data.pop(key, None)
    data.update(job.format.config_updates())
    (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    written = ["config.json"]
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(tmp)
        written.append("generation_config.json")
    return written


def write_model_files(job: Job, tmp: Path, notes: list[str]) -> list[str]:
    """The files that follow from the model alone: the format's own, config.json, generation_config.json.

    ``verify`` writes them again to compare; everything here is deterministic (sorted keys, planned bytes).
    """
    return job.format.write_files(tmp) + _write_config(job, tmp, notes)


def write_metadata(job: Job, tmp: Path, *, tokenizer=None, notes: list[str] | None = None) -> list[str]:
    """Everything but the weight shards: index, the format's own files, config, generation config, tokenizer.

    Args:
        job: the export.
        tmp: the (staging) directory.
        tokenizer: saved with ``save_pretrained`` when given.
        notes: receives what the report should say (keys dropped from config.json, ...).

    Returns:
        The file names written.
    """
    notes = notes if notes is not None else []
    files = []
    if len(job.plan.shards) > 1:
        index = {"metadata": {"total_size": job.plan.total_size},
                 "weight_map": dict(sorted(job.plan.weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        files.append(INDEX_NAME)
    files += write_model_files(job, tmp, notes)
    if tokenizer is not None:
        files += [os.path.basename(f) for f in tokenizer.save_pretrained(tmp)]
    return files
