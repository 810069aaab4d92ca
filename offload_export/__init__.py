"""Export fake-quantized, accelerate-offloaded models into clean, streaming, atomic safetensors checkpoints.

The public names below are imported on first use, so that ``import offload_export`` (and the command line's
``--help``) does not import torch and transformers.
"""

import sys
import types

__version__ = "0.1.0"

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


_loading = False


def __getattr__(name: str):
    """The first use of a public name imports the public API (and with it the submodules, as an eager import did).

    Private names and the import system's ``hasattr`` checks made while that import runs (``from . import x``)
    are plain misses, so that the submodule gets imported.
    """
    global _loading
    if name.startswith("_") or _loading:
        raise AttributeError(f"module 'offload_export' has no attribute {name!r}")
    _loading = True
    try:
        _import_api()
    finally:
        _loading = False
    if name not in globals():
        raise AttributeError(f"module 'offload_export' has no attribute {name!r}")
    return globals()[name]


def _import_api() -> None:
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
    from . import distributed  # noqa: F401  (registers the export over torch.distributed ranks: save_clean(group=))

    globals().update({n: v for n, v in locals().items() if n in __all__})


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps the public functions ``layout`` and ``verify`` from being replaced by their submodules.

    Importing a submodule binds it to the package's attribute of the same name; eagerly, the function
    imported after it won. Lazily, ``import offload_export.verify`` may come first, and would leave
    ``offload_export.verify`` the module.
    """

    def __setattr__(self, name: str, value) -> None:
        if not (name in __all__ and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
