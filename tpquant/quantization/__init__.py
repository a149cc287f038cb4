"""Quantization math: QuantMode, the schemes, SmoothQuant. Pure torch; knows nothing of ranks."""

from tpquant.quantization.mode import QuantMode

__all__ = ["QuantMode"]
