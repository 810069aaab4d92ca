"""A bound, not a timing: save_clean of a disk-offloaded model holds about one tensor, never the model.

Measured in a child process with the kernel's own peak (VmHWM, reset through /proc/self/clear_refs right
before the call), which counts mmap'ed file pages too (tests/memory_child.py).
"""

from __future__ import annotations

import pytest
import torch
from memory_child import measure


def test_peak_memory_of_a_disk_offloaded_export_stays_near_one_tensor(tmp_path):
    result = measure(tmp_path, export={"max_shard_size": "100MB"})
    assert len(result["folded"]) == 12 * 7
    assert result["bytes"] > 300 * 2**20
    # 2 x the largest tensor + 64 MiB is the design bound; 16 MiB more for the interpreter's own churn
    assert result["peak_extra"] <= 2 * result["largest"] + 80 * 2**20, result
    assert result["peak_extra"] < result["bytes"] / 2, result


@pytest.mark.parametrize("cast", ["cast", pytest.param("nocast", marks=pytest.mark.slow)])
def test_a_dominant_tensor_folded_and_cast_is_held_at_most_twice(tmp_path, cast):
    """Read-ahead, the unit being folded and the one written behind share one budget: with the largest
    tensor 6 x everything else, a fold (and a cast on top) still holds about two of it, not three or four."""
    # embed_tokens and lm_head (untied) are 188 MiB each, everything else 33 MiB: the largest tensor dominates
    result = measure(tmp_path, vocab=96000, layers=2,
                     quantize={"scheme": "int8", "skip": []},  # lm_head folded too: read, folded, written
                     export={"dtype": "float16"} if cast == "cast" else {})
    assert "lm_head.weight" in result["folded"]
    assert result["peak_extra"] <= 2 * result["largest"] + 64 * 2**20, result


@pytest.mark.slow
def test_tensors_copied_file_to_file_do_not_size_the_read_ahead(tmp_path):
    """Read-ahead is sized by what a unit holds in memory: the untied 188 MiB embedding and lm_head pass
    through file to file (not read), so an int8 export of 1-5.5 MiB Linears peaks far below one of them
    (72 MiB measured; 151 MiB when the read-ahead was sized by the largest tensor)."""
    result = measure(tmp_path, vocab=96000, layers=6)
    assert "lm_head.weight" not in result["folded"] and result["largest_source"] >= 180 * 2**20
    # 64 MiB of read-ahead + the unit being folded (source, output, scratch) + interpreter churn
    assert result["peak_extra"] <= 112 * 2**20, result


def test_a_resident_embedding_written_as_it_is_takes_no_memory_while_the_next_units_are_folded(tmp_path):
    """A model held in host memory: its dominant embedding is written from the model's own memory (no copy), so it
    takes none of the read-ahead budget and the lm_head (as large) is folded while it is written. That fold works on
    a copy of the model's weight (a quantizer may work in place) beside its output, two of the largest tensor; the
    embedding's write adds nothing to them."""
    result = measure(tmp_path, vocab=96000, layers=2, place="cpu",
                     quantize={"scheme": "int8", "skip": ["model.embed_tokens"]})
    assert "lm_head.weight" in result["folded"] and "model.embed_tokens.weight" not in result["folded"]
    assert result["peak_extra"] <= 2 * result["largest"] + 64 * 2**20, result


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload"])
def test_only_sources_read_into_new_memory_size_the_read_ahead(kind, tmp_path):
    """A unit's folded sources count toward the read-ahead budget when reading them allocates: disk-offloaded
    ones their bytes, CPU-offloaded ones nothing (they come as the model's own tensors; the fold's copy of them is
    the size of the unit's outputs, which count). A CPU-offloaded unit written as it is holds nothing: its outputs
    are the model's own memory."""
    from layouts import LayoutSpec, apply_layout, make_model

    import offload_export as oe
    from offload_export.job import prepare_job

    model = make_model("llama_untied", dtype=torch.bfloat16)
    oe.quantize_weights(model, "int8")
    model = apply_layout(model, LayoutSpec(kind), tmp_path / "layout")
    with_folds = 0
    job = prepare_job(model, tmp_path / "out")
    reader = job.reader()
    for unit in job.plan.units:
        folded = [k for k in unit.sources if k in job.folds]
        with_folds += bool(folded)
        read = sum(job.lay[k].nbytes for k in unit.sources if k not in reader.spans(unit))
        assert reader.read_bytes(unit) == (0 if kind == "cpu_offload" else read), unit
        if kind == "cpu_offload" and not folded:
            assert reader.held_bytes(unit) == 0, unit
        else:
            assert reader.held_bytes(unit) >= sum(spec.nbytes for spec in unit.outputs
                                                  if spec.name not in reader.spans(unit)), unit
    assert with_folds >= 7
