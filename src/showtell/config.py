"""Training settings: a frozen dataclass that CLI flags and a TOML file map onto.

Kept free of torch imports, so the CLI can list the flags without loading torch.
"""

from __future__ import annotations

import functools
import math
import os
import re
import reprlib
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from showtell.errors import ShowtellError
from showtell.limits import MAX_BEAM_SIZE, MAX_LENGTH

DEFAULT_ENCODER = "efficientnet_lite2"
# Show and Tell (showtell.model.CaptionModel: the pooled image is the LSTM's first input), or Show, Attend and Tell
# (showtell.attention.AttentionModel: soft attention over the encoder's last feature map at every word)
DECODERS = ("show-and-tell", "attention")


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


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def check_device_name(name: str) -> str:
    """``name`` if it is a device name showtell takes (auto, cpu, cuda, cuda:N, mps), else a one-line ShowtellError;
    whether the device is present is showtell.devices.resolve_device's concern."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ShowtellError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return name


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
    decoder: str = DECODERS[0]        # "attention": Show, Attend and Tell over the encoder's feature map
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

    def __post_init__(self) -> None:
        _check_values(asdict(self))
        if self.scst_samples < (2 if self.scst_baseline == "mean" else 1):
            raise ShowtellError(f"scst_samples must be at least {2 if self.scst_baseline == 'mean' else 1} with "
                                f"the {self.scst_baseline} baseline, got {self.scst_samples}")
        if self.epochs == 0 and not self.init:
            raise ShowtellError(("the self-critical stage (scst_epochs) needs a trained model to start from: "
                                 if self.scst_epochs else "nothing to train: ")
                                + "epochs is 0 and no init checkpoint is given (--epochs N, or --init FILE)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Settings by name; an unknown name, a value of the wrong type or out of range is one ShowtellError."""
        _check_names(d)
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> dict:
        """The settings in a TOML file (flat, or under a [train] table), as a dict to merge; names, types and
        ranges are checked here (the error names the file), combinations once merged (``from_dict``)."""
        data = read_toml(path)
        data = data.get("train", data)
        try:
            if not isinstance(data, dict):
                raise ShowtellError(f"[train] must be a table of settings, got {reprlib.repr(data)}")
            _check_names(data)
            _check_values(data)
        except ShowtellError as e:
            raise ShowtellError(f"{path}: {e}") from None
        return data


# Range checks, by setting (type checks come from field_types()). The decoding bounds (showtell.limits, which
# DecodingOptions also enforces) also bound the CLI's --beam-size and --max-length, before torch loads.
_AT_LEAST = {"limit": 1, "min_count": 1, "max_words": 1, "embed_dim": 1, "hidden_dim": 1, "num_layers": 1,
             "epochs": 0, "batch_size": 1, "patience": 1, "seed": 0, "scst_epochs": 0, "scst_samples": 1,
             "scst_batch_size": 1, "scst_max_length": 1, "eval_beam_size": 1, "eval_max_length": 1, "num_workers": 0}
_AT_MOST = {"eval_beam_size": MAX_BEAM_SIZE, "eval_max_length": MAX_LENGTH, "scst_max_length": MAX_LENGTH}
_POSITIVE = ("lr", "scst_lr", "lr_decay", "grad_clip")      # finite and > 0
_NOT_NEGATIVE = ("weight_decay", "scst_bleu")               # finite and >= 0
_FRACTION = ("dropout", "image_dropout", "label_smoothing")  # in [0, 1)
_CHOICES = {"scst_baseline": ("mean", "greedy"), "decoder": DECODERS}
_KINDS = {int: (int, "a whole number"), float: ((int, float), "a number"), str: (str, "a string"),
          bool: (bool, "true or false")}


@functools.cache
def field_types() -> dict[str, tuple[type, bool]]:
    """Each TrainConfig field's type (int, float, str or bool) and whether it may be None, from its annotation."""
    kinds = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint) or (hint,)
        kinds[name] = (next(t for t in args if t is not type(None)), type(None) in args)
    return kinds


def _check_names(d: dict) -> None:
    unknown = sorted(set(d) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ShowtellError(f"unknown training setting(s): {', '.join(map(str, unknown))}")


def _check_values(d: dict) -> None:
    """Each setting in ``d`` has its field's type and a sensible value, or one ShowtellError names it."""
    for name, value in d.items():
        kind, optional = field_types()[name]
        if value is None and optional:
            continue
        cls, words = _KINDS[kind]
        if not isinstance(value, cls) or (isinstance(value, bool) and kind is not bool):
            raise ShowtellError(f"{name} must be {words}{' or unset' if optional else ''}, "
                                f"got {reprlib.repr(value)}")
        if name in _AT_LEAST and value < _AT_LEAST[name] or name in _AT_MOST and value > _AT_MOST[name]:
            top = f" to {_AT_MOST[name]}" if name in _AT_MOST else " or more"
            raise ShowtellError(f"{name} must be {_AT_LEAST[name]}{top}, got {value}")
        if name in _POSITIVE and not (math.isfinite(value) and value > 0):
            raise ShowtellError(f"{name} must be a number above 0, got {value}")
        if name in _NOT_NEGATIVE and not (math.isfinite(value) and value >= 0):
            raise ShowtellError(f"{name} must be at least 0, got {value}")
        if name in _FRACTION and not 0 <= value < 1:
            raise ShowtellError(f"{name} must be in [0, 1), got {value}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ShowtellError(f"{name} must be {' or '.join(map(repr, _CHOICES[name]))}, got {value!r}")
        if name == "device":
            check_device_name(value)
