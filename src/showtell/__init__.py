"""showtell: Show-and-Tell image captioning (frozen CNN encoder + LSTM decoder)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path_or_name=None, device: str = "auto", ground: bool = True, precision: str | None = None):
    """Load a captioner from a checkpoint file, or the built-in model when no argument is given (``device``: auto =
    CUDA when there is a GPU, else the CPU; cpu; cuda; cuda:N; mps. ``ground``, ``precision``: see
    :func:`showtell.captioner.load`)."""
    from showtell.captioner import load as _load

    return _load(path_or_name, device=device, ground=ground, precision=precision)
