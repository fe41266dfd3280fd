"""Training settings: a frozen dataclass that CLI flags and a TOML file map onto.

Kept free of torch imports, so the CLI can list the flags without loading torch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from showtell.errors import ShowtellError

DEFAULT_ENCODER = "efficientnet_lite2"


def read_toml(path: str | os.PathLike) -> dict:
    """A whole TOML file; a missing or invalid file is a one-line ShowtellError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShowtellError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ShowtellError(f"{path}: invalid TOML ({e})") from None


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting. CLI flags and a TOML file map onto these fields."""

    # data
    dataset: str = "flickr8k"
    root: str = ""
    captions: str | None = None
    images: str | None = None
    split_name: str | None = None
    limit: int | None = None          # first N images of each split (smoke runs)
    min_count: int = 5
    max_words: int = 30               # longer training captions are cut (a handful in Flickr8k)
    # model
    encoder: str = DEFAULT_ENCODER
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5              # on the word embeddings and the LSTM output
    image_dropout: float | None = None  # on the projected image feature (the LSTM's first input); None: = dropout
    batch_norm: bool = False
    init: str | None = None           # start from this checkpoint (model or ensemble; its vocabulary and sizes)
    # optimisation
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    lr_decay: float = 0.9             # multiply the learning rate by this after every epoch
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    flip: bool = True                 # also train on features of horizontally flipped images
    patience: int = 3                 # stop after this many epochs without a better dev CIDEr
    seed: int = 0
    # self-critical stage after cross-entropy (0 = off): reward (CIDEr-D, optionally + BLEU-4) minus a baseline
    scst_epochs: int = 0
    scst_lr: float = 5e-5
    scst_samples: int = 5
    scst_batch_size: int = 50
    scst_max_length: int = 16
    scst_baseline: str = "mean"       # "mean": of the image's other samples; "greedy": its greedy caption's reward
    scst_bleu: float = 0.0            # reward = CIDEr-D + this times the sentence BLEU-4 of the sample
    # dev evaluation after each epoch
    eval_beam_size: int = 1
    eval_max_length: int = 20
    # end to end: images through the encoder every batch (for GPUs), optional fine-tuning
    end_to_end: bool = False
    fine_tune: bool = False
    # where things go
    cache_dir: str | None = None
    device: str = "auto"
    amp: bool = True                  # mixed precision: fp16 on CUDA, bf16 on CPUs that support it
    num_workers: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShowtellError(f"unknown training setting(s): {', '.join(unknown)}")
        config = cls(**d)
        for name in ("dropout", "image_dropout", "label_smoothing"):
            value = getattr(config, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ShowtellError(f"{name} must be in [0, 1), got {value!r}")
        if not config.scst_bleu >= 0:
            raise ShowtellError(f"scst_bleu must be at least 0, got {config.scst_bleu!r}")
        if config.scst_baseline not in ("mean", "greedy"):
            raise ShowtellError(f"scst_baseline must be 'mean' or 'greedy', got {config.scst_baseline!r}")
        if config.scst_samples < (2 if config.scst_baseline == "mean" else 1):
            raise ShowtellError(f"scst_samples must be at least {2 if config.scst_baseline == 'mean' else 1} with "
                                f"the {config.scst_baseline} baseline, got {config.scst_samples}")
        return config

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> dict:
        """The settings in a TOML file (flat, or under a [train] table), as a dict to merge."""
        data = read_toml(path)
        data = data.get("train", data)
        cls.from_dict({**asdict(cls()), **data})  # validate names early
        return data
