"""The format protocol and registry. Output formats: what one unit's tensors become in the checkpoint, and the files each format adds.

A format is the seam between the export's data path (read, onload, stream, write) and what a checkpoint
holds. :class:`FakeQuant` (``"fake-quant"``, the default) writes the weights with fake quantization folded
in; packed formats write what a toolkit's own exporter writes. A format is built once per export from a
:class:`Source` and checks it in ``__init__``, before anything is written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import nn

from ..layout import Layout
from ..plan import Unit
from ..quantizers import Quantizer

__all__ = ["FORMATS", "Format", "Reader", "Source", "get_format", "register_format"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Source:
    """What a format is given about the model being exported.

    Attributes:
        model: the model.
        lay: its layout.
        quantizers: every quantizer found in it.
        folds: ``weight key -> enabled weight quantizer`` whose quantization the export applies.
        convert: transformers' save-time weight conversion (fused experts -> per expert), or None.
        dtype: cast floating-point weights to this dtype, or None.
    """

    model: nn.Module
    lay: Layout
    quantizers: list[Quantizer]
    folds: dict[str, Quantizer]
    convert: Callable[[StateDict], StateDict] | None
    dtype: torch.dtype | None


class Reader(Protocol):
    """What a format may ask of the export's reader (:class:`offload_export.pipeline.UnitReader`) in ``finish``."""

    def fold_device(self, key: str) -> torch.device:
        """Where the quantizer of weight ``key`` runs."""

    def onloaded_quantizers(self, key: str) -> AbstractContextManager[torch.device]:
        """A block in which the module owning weight ``key`` has its quantizer state real on the fold device."""

    def fold(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` passed through its enabled quantizer (the fake-quantized value)."""


class Format(ABC):
    """One output format. Subclass it, set ``name``, and pass the class to :func:`register_format`.

    Args:
        source: the model being exported.

    Raises:
        ValueError: the model cannot be written in this format (raised before anything is written).
    """

    name: ClassVar[str]
    #: config.json keys this format removes (the export adds its own where it has any)
    dropped_config_keys: ClassVar[tuple[str, ...]] = ("auto_map", "quantization_config")

    def __init__(self, source: Source):
        self.source = source

    @abstractmethod
    def outputs(self, meta: StateDict) -> StateDict:
        """Plan time: one unit's source tensors (``meta``, already cast) -> its output tensors (``meta``)."""

    @abstractmethod
    def finish(self, reader: Reader, unit: Unit, values: StateDict) -> StateDict:
        """Run time: one unit's source tensors (real, raw) -> its output tensors, as planned.

        ``values`` is the pipeline's own dict: pop each source from it when done with it, so that a large
        source is freed before the next output is made (memory stays near two tensors, not three).
        """

    def devices(self, reader: Reader, unit: Unit) -> dict[str, torch.device]:
        """Where ``finish`` computes with the unit's sources: ``key -> device`` for those it moves to a device.

        The read-ahead thread moves such a CPU tensor to its GPU first (one held in a file as it is, it reads there
        from the file), while the previous unit is finished, when that GPU has room. Default: none.
        """
        return {}

    def casts(self, key: str) -> bool:
        """Whether the export's ``dtype`` changes source ``key``'s dtype (a floating-point tensor of another dtype)."""
        dtype, info = self.source.dtype, self.source.lay[key]
        return dtype is not None and info.dtype.is_floating_point and info.dtype != dtype

    def unchanged(self, unit: Unit, key: str) -> bool:
        """True when ``finish`` returns the unit's source ``key`` as it is (same name, dtype and bytes).

        The pipeline then leaves such a tensor out of ``finish`` and, when it is stored in a file, has the
        writer copy its bytes file to file (``copy_file_range``) without reading them. Default: False.
        """
        return False

    def config_updates(self) -> dict:
        """Keys this format sets in config.json (e.g. a packed format's ``quantization_config``)."""
        return {}

    def write_files(self, tmp: Path) -> list[str]:
        """Write the format's own files (besides weights and config) into ``tmp``; return their names."""
        return []


FORMATS: dict[str, type[Format]] = {}


def register_format(cls: type[Format]) -> type[Format]:
    """Make ``cls`` available as ``save_clean(format=cls.name)``; usable as a class decorator."""
    FORMATS[cls.name] = cls
    return cls


def get_format(name: str) -> type[Format]:
    """The format class registered as ``name``.

    Raises:
        ValueError: an unknown format name.
    """
    if name not in FORMATS:
        raise ValueError(f"format={name!r} is not a known output format; expected one of "
                         f"{', '.join(repr(n) for n in FORMATS)}")
    return FORMATS[name]


