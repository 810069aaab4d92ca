"""The streaming writer's files are byte-identical to safetensors' ``save`` of the same tensors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from offload_export._store import SAFETENSORS_DTYPES
from offload_export.writer import ShardWriter, TensorSpec

DTYPES = sorted(set(SAFETENSORS_DTYPES.values()), key=str)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size(),),
                         dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcAB._0123", min_size=1, max_size=6),
                       st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=3)),
                       min_size=1, max_size=8),
       st.booleans(), st.integers(0, 2**16))
def test_the_file_is_what_safetensors_save_writes(entries, with_metadata, seed):
    tensors = {name: _tensor(dtype, tuple(shape), seed + i) for i, (name, (dtype, shape)) in enumerate(entries.items())}
    metadata = {"format": "pt"} if with_metadata else None  # (safetensors orders a longer map at random)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        writer = ShardWriter(str(path), [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata)
        for name in reversed(list(tensors)):  # any arrival order
            writer.write(name, tensors[name])
        writer.close()
        assert path.read_bytes() == save(tensors, metadata=metadata)
