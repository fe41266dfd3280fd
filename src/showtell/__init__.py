"""showtell: Show-and-Tell image captioning (frozen CNN encoder + LSTM decoder)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
