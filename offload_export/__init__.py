"""Export fake-quantized, accelerate-offloaded models into clean, streaming, atomic safetensors checkpoints."""

from .export import ExportReport, save_clean
from .fakequant import SCHEMES, FakeQuantizer, quantize_weights
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
from . import compressed_tensors as _compressed_tensors  # registers the compressed-tensors adapter

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
