"""Shared by the benchmark scripts: where Flickr8k is, its records, its vocabulary, a checkpoint to time."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
TRAINED_CHECKPOINT = REPO / "runs" / "xe1" / "best.safetensors"


def cli_environment() -> None:
    """Run under the OpenMP setting the showtell CLI uses (waiting threads sleep), unless the environment names one.

    OpenMP reads it when torch loads, so the script restarts itself once with it set. Reference and showtell
    then run under the same setting; ``OMP_WAIT_POLICY=ACTIVE python benchmarks/...`` times torch's default.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def flickr8k_root() -> Path:
    root = Path(os.environ.get("SHOWTELL_FLICKR8K", DEFAULT_FLICKR8K))
    if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
        sys.exit(f"Flickr8k not found at {root} (set SHOWTELL_FLICKR8K)")
    return root


def corpus():
    from showtell.datasets import load_corpus

    return load_corpus("flickr8k", flickr8k_root())


def train_vocab(records):
    """The vocabulary showtell would build from these records (min count 5)."""
    from showtell.vocab import Vocabulary

    return Vocabulary.build([c for r in records for c in r.captions], min_count=5)


def random_checkpoint(path: Path, vocab, encoder: str = "efficientnet_lite2", hidden_dim: int = 512,
                      seed: int = 0) -> Path:
    """A full-size checkpoint with random LSTM weights (the decoding cost of a real one, if not its captions)."""
    import torch

    from showtell.checkpoint import save_checkpoint
    from showtell.encoders import encoder_info
    from showtell.model import CaptionModel, ModelConfig

    info = encoder_info(encoder)
    torch.manual_seed(seed)
    model = CaptionModel(ModelConfig(vocab_size=len(vocab), feature_dim=info["feature_dim"], hidden_dim=hidden_dim))
    save_checkpoint(path, model.eval(), vocab, encoder, info["preprocess"], meta={"name": "random"})
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(record: dict) -> None:
    """The result, as the last line of output."""
    print(json.dumps(record), flush=True)
