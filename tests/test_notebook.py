"""examples/quickstart.ipynb runs top to bottom on a small slice of Flickr8k."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_quickstart_notebook_runs(flickr8k, builtin_model, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SHOWTELL_FLICKR8K", str(flickr8k))
    monkeypatch.setenv("SHOWTELL_NOTEBOOK_LIMIT", "30")
    monkeypatch.setenv("SHOWTELL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}},
                   ).execute()
    seconds = time.perf_counter() - start
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "train" in text and "6,000" in text  # the Flickr8k split table
    assert "epoch 2: loss" in text and "best.safetensors" in text
    assert "CIDEr" in text and "distinct captions" in text
    assert seconds < 180, f"the notebook took {seconds:.0f} s"
