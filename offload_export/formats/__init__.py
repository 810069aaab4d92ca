"""Output formats: what one unit's tensors become in the checkpoint, and the files each format adds.

:mod:`.base` holds the protocol and registry; each format is alone in its module and registers itself:
:mod:`.fake_quant` (``"fake-quant"``, the default: weights with fake quantization folded in),
:mod:`.modelopt` (``"modelopt"``: the packed checkpoint ModelOpt's ``export_hf_checkpoint`` writes),
:mod:`.compressed_tensors` (``"compressed-tensors"``: the packed checkpoint llm-compressor writes).
"""

from .base import FORMATS, Format, Reader, Source, get_format, register_format
from .fake_quant import FakeQuant  # registered first: the default leads every list of formats
from .modelopt import ModelOpt
from .compressed_tensors import CompressedTensors  # noqa: I001

__all__ = ["FORMATS", "CompressedTensors", "FakeQuant", "Format", "ModelOpt", "Reader", "Source", "get_format",
           "register_format"]
