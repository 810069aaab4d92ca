"""The quantizer adapters that ship with the package, each alone in its module; importing this registers them.

- :mod:`.modelopt`: NVIDIA ModelOpt ``TensorQuantizer`` / ``SequentialQuantizer`` (duck-typed, no import);
- :mod:`.compressed_tensors`: compressed-tensors / llm-compressor quantization schemes;
- :mod:`.builtin`: the built-in reference fake quantizers (int8, fp8, int4-g128, nvfp4) and ``quantize_weights``.
"""

from .builtin import SCHEMES, FakeQuantizer, quantize_weights
from .compressed_tensors import CompressedTensorsAdapter
from .modelopt import ModelOptAdapter

__all__ = ["CompressedTensorsAdapter", "FakeQuantizer", "ModelOptAdapter", "SCHEMES", "quantize_weights"]
