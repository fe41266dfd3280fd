from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def flickr8k_root() -> Path:
    return Path(os.environ.get("SHOWTELL_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The shared Flickr8k folder. Missing data fails the test in CI and skips it elsewhere."""
    root = flickr8k_root()
    if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
        msg = f"Flickr8k not found at {root} (set SHOWTELL_FLICKR8K)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root
