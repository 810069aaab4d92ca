"""Output formats: what one unit's tensors become in the checkpoint, and the files each format adds.

:mod:`.base` holds the protocol and registry; each format is alone in its module and registers itself:
:mod:`.fake_quant` (``"fake-quant"``, the default: weights with fake quantization folded in).
"""

from .base import FORMATS, Format, Reader, Source, get_format, register_format
from .fake_quant import FakeQuant

__all__ = ["FORMATS", "FakeQuant", "Format", "Reader", "Source", "get_format", "register_format"]
