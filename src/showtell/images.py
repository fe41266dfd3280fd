"""Image loading: any file a user may have, as an upright RGB PIL image, or one ImageError."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from showtell.errors import ImageError

ImageInput = str | os.PathLike | bytes | Image.Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def describe(src: ImageInput) -> str:
    """A short name for an image input, for messages and results."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    return "<PIL image>"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grey: scale the real range to 8 bits (PIL's convert would clip at 255).
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src: ImageInput) -> Image.Image:
    """Open a path, bytes or PIL image as RGB with EXIF orientation applied.

    Grayscale, 16-bit, palette, CMYK and alpha images are converted; animated images give their
    first frame. Anything unreadable (missing, not an image, truncated, a decompression bomb)
    raises :class:`ImageError` naming the file.
    """
    name = describe(src)
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            if isinstance(src, bytes):
                if not src:
                    raise ImageError(f"{name}: empty upload, not an image")
                fp = io.BytesIO(src)
            else:
                path = Path(src)
                if path.is_dir():
                    raise ImageError(f"{name}: is a directory, not an image")
                if path.stat().st_size == 0:
                    raise ImageError(f"{name}: empty file, not an image")
                fp = path
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                img.seek(0)
                img.load()
        img = ImageOps.exif_transpose(img)
        if img.width < 1 or img.height < 1:
            raise ImageError(f"{name}: image has no pixels")
        return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large ({e})") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from None


def expand_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given; directories expand to the image files in them (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()))
        else:
            out.append(p)
    return out
