"""The optional toolkits the packed formats call, and the releases of each that this package supports.

``format="modelopt"`` calls ModelOpt's export internals and ``format="compressed-tensors"`` the
compressed-tensors compressors; both change between releases, so each format checks the installed release
against the range tested here before anything is written. The ranges are the extras' in ``setup.cfg``
(a test keeps the two equal). Importing this module imports neither torch nor a toolkit.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass

__all__ = ["TOOLKITS", "Toolkit", "require_toolkit"]


@dataclass(frozen=True)
class Toolkit:
    """An optional dependency: its import name, its distribution on PyPI, the supported releases, its extra."""

    module: str
    distribution: str
    supported: str
    extra: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}{self.supported}"


#: format name -> the toolkit it needs
TOOLKITS = {
    "modelopt": Toolkit("modelopt", "nvidia-modelopt", ">=0.46.1,<0.48", "modelopt"),
    "compressed-tensors": Toolkit("compressed_tensors", "compressed-tensors", ">=0.19,<0.21", "compressed-tensors"),
}


def require_toolkit(format: str) -> None:
    """Check that the toolkit ``format`` needs is installed in a supported release; nothing for other formats.

    Args:
        format: an output format name, e.g. ``"modelopt"``.

    Raises:
        ImportError: the toolkit is missing, or its installed release is outside the supported range; the
            message names both and the ``pip install`` that fixes it.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    toolkit = TOOLKITS.get(format)
    if toolkit is None:
        return
    fix = f'pip install "offload_export[{toolkit.extra}]"'
    try:
        spec = importlib.util.find_spec(toolkit.module)
    except ImportError:  # a finder that refuses it
        spec = None
    if spec is None:
        raise ImportError(f"format={format!r} needs {toolkit.requirement}, which is not installed: {fix}")
    try:
        installed = importlib.metadata.version(toolkit.distribution)
    except importlib.metadata.PackageNotFoundError:
        return  # importable but not installed as a distribution (a source checkout): nothing to compare
    if Version(installed) not in SpecifierSet(toolkit.supported):
        raise ImportError(f"format={format!r} needs {toolkit.requirement}, but {toolkit.distribution} {installed} "
                          f"is installed: {fix}")
