"""r3mes: serve 1.58-bit (ternary) BitNet models with routed DoRA experts and retrieval."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("r3mes")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
