"""Image loading: any image a user may have, as an upright RGB PIL image of bounded size, or one ImageError."""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from showtell.errors import ImageError

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
"""What :func:`load_image` takes: a path, encoded file contents (bytes-like), a PIL image, or a numpy array
(HxW, HxWx1, HxWx3 RGB or HxWx4 RGBA; uint8 0-255 or float 0-1)."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "QOI", "DDS", "PCX", "SGI")
"""The Pillow formats read: raster formats Pillow decodes itself (JPEG includes MPO, as cameras write it). Not EPS
(Pillow runs Ghostscript on it, a program that should never see an untrusted upload), nor formats rarely met."""

MAX_ASPECT = 4
"""A longer side more than this many times the shorter one is center-cropped to this ratio."""
MAX_SIDE = 65535
"""The longest side of an image file that is decoded (JPEG's limit): PIL keeps 8 bytes a row besides the pixels, so
a 1-pixel-wide PNG within the pixel limit would cost 1 GB to decode."""

_INPUT_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)
_BOMB_WARNING_LOCK = threading.Lock()  # warnings.catch_warnings changes process-wide state
T = TypeVar("T")


def is_image_input(src: object) -> bool:
    """Whether ``src`` is of a type :func:`load_image` takes (its contents may still be unreadable)."""
    return isinstance(src, _INPUT_TYPES)


def check_image_input(src: object) -> None:
    """Raise TypeError, naming the accepted types, unless ``src`` is of a type :func:`load_image` takes."""
    if is_image_input(src):
        return
    kind = f"{type(src).__module__}.{type(src).__qualname__}".removeprefix("builtins.")
    hint = ("; convert a tensor with torchvision.transforms.functional.to_pil_image (its layout and scale are "
            "ambiguous, so it is not taken as is)") if kind.startswith("torch.") else ""
    raise TypeError(f"an image must be a path, bytes, bytearray, memoryview, PIL image or numpy array "
                    f"(HxW or HxWx1/3/4, uint8 or float in [0, 1]), not {kind}{hint}")


def describe(src: ImageInput) -> str:
    """A short name for an image input, for messages and results."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{memoryview(src).nbytes} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {'x'.join(map(str, src.shape))} {src.dtype}>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return f"<{type(src).__name__}>"


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError("expected an array of shape HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)")
    if arr.size == 0:
        raise ImageError("image has no pixels")
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(arr.min()), float(arr.max())
        if not 0.0 <= lo <= hi <= 1.0:  # also false for NaN
            raise ImageError(f"float array values must lie in [0, 1], found [{lo:g}, {hi:g}]")
        arr = (arr * 255 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError("expected an array of dtype uint8 (0-255) or float (0-1)")
    return Image.fromarray(arr)  # L, RGB or RGBA by shape


def _bounded(img: Image.Image) -> Image.Image:
    """Center-crop the longer side to at most MAX_ASPECT times the shorter one."""
    w, h = img.size
    if w > MAX_ASPECT * h:
        left = (w - MAX_ASPECT * h) // 2
        return img.crop((left, 0, left + MAX_ASPECT * h, h))
    if h > MAX_ASPECT * w:
        top = (h - MAX_ASPECT * w) // 2
        return img.crop((0, top, w, top + MAX_ASPECT * w))
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit grey as 8-bit grey, the image's real range scaled to 0-255 (PIL's convert would clip at
    255), computed by PIL in place of a float copy."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    lo, hi = img.getextrema()
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return img.point(lambda v: v * scale - lo * scale).convert("L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)  # an RGBA mask means its alpha band
        return out
    return img.convert("RGB")


def _decode(src: ImageInput) -> Image.Image:
    """The first frame of an encoded image (path or bytes-like), decoded, with no file left open."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if not memoryview(src).nbytes:
            raise ImageError("empty upload, not an image")
        fp = io.BytesIO(src)
    else:
        path = Path(src)
        if path.is_dir():
            raise ImageError("is a directory, not an image")
        if path.stat().st_size == 0:
            raise ImageError("empty file, not an image")
        fp = path.open("rb")
    with fp:
        with _BOMB_WARNING_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.init()  # registers every plugin once, so that each of FORMATS is known
            img = Image.open(fp, formats=FORMATS)
        if max(img.size) > MAX_SIDE:
            raise ImageError(f"image too large ({img.width}x{img.height} pixels, a side over {MAX_SIDE})")
        img.seek(0)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # may read metadata from the file
    return img


def load_image(src: ImageInput) -> Image.Image:
    """Open an image as RGB with EXIF orientation applied, of bounded size.

    ``src`` is a path, the bytes of an image file (``bytes``, ``bytearray`` or ``memoryview``), a PIL image,
    or a numpy array: HxW or HxWx1 grey, HxWx3 RGB, HxWx4 RGBA; uint8 (0-255) or float (0-1). Any other type
    (a torch tensor, say) raises TypeError. Grayscale, 16-bit, palette, CMYK and alpha images are converted
    (alpha over white); animated images give their first frame.

    Size is bounded before any resizing: image files over PIL's ``MAX_IMAGE_PIXELS`` (89M pixels) or with a side
    over ``MAX_SIDE`` (65535) pixels are refused before decoding, and an image whose longer side is more than
    ``MAX_ASPECT`` (4) times its shorter side is center-cropped to 4:1. The eval transform sees only a center
    square, so its output is unchanged for any photo up to 4:1.

    Anything unreadable (missing, not an image, truncated, corrupt in any way that makes the decoder fail,
    a decompression bomb) raises :class:`ImageError` naming the image.
    """
    check_image_input(src)
    name = describe(src)
    try:
        if isinstance(src, np.ndarray):
            img = _from_array(src)
        elif isinstance(src, Image.Image):
            src.load()
            img = ImageOps.exif_transpose(src)  # a copy: the caller's image is left as it was
        else:
            img = _decode(src)
        if img.width < 1 or img.height < 1:
            raise ImageError("image has no pixels")
        img = _bounded(img)
        img = _to_8bit(img)
        return _to_rgb(img)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large ({e})") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (unrecognised format)") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image") from None
    except Exception as e:  # a corrupt file makes decoders raise almost anything (struct.error, IndexError, ...)
        detail = str(e) or type(e).__name__
        raise ImageError(f"{name}: cannot decode image ({' '.join(detail.split())[:200]})") from None


def prepare(src: ImageInput, transform: Callable[[Image.Image], T]) -> T | str:
    """``transform(load_image(src))``, or the message of what went wrong with this image (a bad image is its
    own error, never its neighbours'). Raises TypeError for an input of a type :func:`load_image` does not take."""
    check_image_input(src)
    try:
        return transform(load_image(src))
    except ImageError as e:
        return str(e)
    except Exception as e:  # the image loaded but the transform failed on it
        return f"{describe(src)}: cannot prepare image ({type(e).__name__}: {e})"


def expand_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given; directories expand to the image files in them (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()))
        else:
            out.append(p)
    return out
