"""Upper bounds on what a checkpoint, an ONNX export or a decoding request may declare, in one torch-free place.

A checkpoint is untrusted input: its JSON says how large a model to build and how to resize images, so a few
edited numbers could ask for terabytes before any weight is read. Loading checks every declared size against
these bounds and against the tensors actually stored, and only then builds anything. The bounds are far above
any real Show-and-Tell model (the built-in one: vocabulary 2,540, hidden 512, 1 layer, 4 members, 260 px) and
far below what exhausts a machine.
"""

from __future__ import annotations

import math
import reprlib

from showtell.errors import ShowtellError

MAX_HEADER_BYTES = 16 * 1024 * 1024  # JSON metadata of a checkpoint, or an export's config file (built-in: 50 KB)
MAX_VOCAB_SIZE = 500_000  # tokens (Flickr8k ~2.5k words, COCO ~10k, min_count 1 on COCO ~30k)
MAX_DIM = 16_384  # feature_dim, embed_dim, hidden_dim (encoders give 1280-2560; Show and Tell used 512)
MAX_LAYERS = 16  # LSTM layers (captioning models use 1-3)
MAX_MEMBERS = 32  # models in an ensemble (gains flatten after 5-10)
MAX_IMAGE_SIZE = 1024  # the encoder's square input, in pixels (registered encoders: 224 and 260)
MIN_CROP_PCT = 0.5  # eval resize is size / crop_pct; timm's encoders use 0.75-1.0, a tiny one blows up the resize
MAX_BEAM_SIZE = 32  # beams per image: beyond ~10 captions get no better (often worse), only slower
MAX_LENGTH = 100  # words per caption (Flickr8k/COCO captions: ~11 on average, 99.9% under 40)
INTERPOLATIONS = ("bicubic", "bilinear")
PREPROCESS_KEYS = ("size", "interpolation", "mean", "std", "crop_pct")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite int or float (not a bool, not a string that looks like a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(what: str, value: object, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ShowtellError(f"{what} must be an integer from {low} to {high}, got {_show(value)}")
    return value


def check_preprocess(record: object) -> dict:
    """A preprocessing record (size, interpolation, mean, std, crop_pct) checked and normalised: mean and std as
    tuples of 3 floats, crop_pct a float (1.0 when absent). Raises ShowtellError naming the first bad field."""
    if not isinstance(record, dict):
        raise ShowtellError(f"preprocessing must be a mapping, got {type(record).__name__}")
    unknown = sorted(set(record) - set(PREPROCESS_KEYS), key=str)
    missing = [k for k in PREPROCESS_KEYS[:4] if k not in record]
    if unknown or missing:
        raise ShowtellError(f"preprocessing: {'unknown' if unknown else 'missing'} key(s) "
                            f"{', '.join(map(str, unknown or missing))}")
    size = check_int("preprocessing: size", record["size"], 1, MAX_IMAGE_SIZE)
    interpolation = record["interpolation"]
    if interpolation not in INTERPOLATIONS or not isinstance(interpolation, str):
        raise ShowtellError(f"preprocessing: unknown interpolation {_show(interpolation)}; "
                            f"use one of {', '.join(INTERPOLATIONS)}")
    channels = {}
    for name in ("mean", "std"):
        value = record[name]
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(is_real(v) for v in value):
            raise ShowtellError(f"preprocessing: {name} must be 3 finite numbers (R, G, B), got {_show(value)}")
        channels[name] = tuple(float(v) for v in value)
    if not all(v > 0 for v in channels["std"]):
        raise ShowtellError(f"preprocessing: std must be > 0 in every channel, got {_show(record['std'])}")
    crop_pct = record.get("crop_pct", 1.0)
    if not is_real(crop_pct) or not MIN_CROP_PCT <= crop_pct <= 1.0:
        raise ShowtellError(f"preprocessing: crop_pct must be a number from {MIN_CROP_PCT} to 1, got {_show(crop_pct)}")
    return {"size": size, "interpolation": interpolation, **channels, "crop_pct": float(crop_pct)}


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 40, 40


def _show(value: object) -> str:
    """A value for an error message, cut short (it may be a huge or deeply nested list from a hostile file)."""
    return _REPR.repr(value)
