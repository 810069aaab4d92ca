"""Export fake-quantized, accelerate-offloaded models into clean, streaming, atomic safetensors checkpoints."""

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

__all__ = [
    "ExportReport",
    "Layout",
    "Quantizer",
    "QuantizerAdapter",
    "TensorInfo",
    "find_quantizers",
    "layout",
    "materialized",
    "quantizers_disabled",
    "register_adapter",
    "register_quantizer",
    "save_clean",
]
__version__ = "0.1.0"
