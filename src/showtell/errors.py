"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class ShowtellError(Exception):
    """A problem with the user's input (file, data, checkpoint, option), not a bug."""


class DataError(ShowtellError):
    """A caption or split file that cannot be read as the format it claims to be."""


class ImageError(ShowtellError):
    """An image file that cannot be opened or decoded."""


class CheckpointError(ShowtellError):
    """A file that is not a readable showtell checkpoint."""
