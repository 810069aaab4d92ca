"""Export fake-quantized, accelerate-offloaded models into clean, streaming, atomic safetensors checkpoints."""

from .adapters import SCHEMES, FakeQuantizer, quantize_weights  # registers the adapters that ship
from .export import ExportReport, save_clean
from .layout import Layout, TensorInfo, layout
from .materialize import materialized
from .quantizers import (
    Quantizer,
    QuantizerAdapter,
    find_quantizers,
    quantizers_disabled,
    register_adapter,
    register_quantizer,
)
from .verify import VerifyReport, verify
from . import distributed  # noqa: F401  (registers the export over torch.distributed ranks behind save_clean(group=...))

__all__ = [
    "ExportReport",
    "FakeQuantizer",
    "Layout",
    "Quantizer",
    "QuantizerAdapter",
    "SCHEMES",
    "TensorInfo",
    "VerifyReport",
    "find_quantizers",
    "layout",
    "materialized",
    "quantize_weights",
    "quantizers_disabled",
    "register_adapter",
    "register_quantizer",
    "save_clean",
    "verify",
]
__version__ = "0.1.0"
