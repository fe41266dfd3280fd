"""A catalogue of awkward and broken image files, written by the tests themselves.

``make_catalogue(folder)`` returns {name: (path, expected)} where expected is "ok" (must caption)
or "error" (must give one clear error naming the file).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(size=(96, 64)) -> Image.Image:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    arr = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width=40000, height=40000) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def make_catalogue(folder: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    out: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, expected: str) -> None:
        (folder / name).write_bytes(data)
        out[name] = (folder / name, expected)

    def save(name: str, img: Image.Image, expected: str = "ok", **kw) -> None:
        img.save(folder / name, **kw)
        out[name] = (folder / name, expected)

    put("zero_bytes.jpg", b"", "error")
    put("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "error")
    put("random_bytes.jpg", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "error")
    put("page.jpg", b"<!doctype html><html><body>not an image</body></html>", "error")
    put("bomb.png", bomb_png(), "error")
    save("one_pixel.png", Image.new("RGB", (1, 1), "blue"))
    save("sixteen_bit.png", Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)))
    save("cmyk.jpg", photo.convert("CMYK"), format="JPEG")
    save("grayscale.jpg", photo.convert("L"), format="JPEG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    save("palette.gif", photo.convert("P", palette=Image.Palette.ADAPTIVE))
    frames = [photo, photo.rotate(90), photo.rotate(180)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("animated.webp", frames[0], save_all=True, append_images=frames[1:], duration=100, format="WEBP")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    save("exif_rotated.jpg", photo, format="JPEG", exif=exif.tobytes())
    (folder / "folder.jpg").mkdir(exist_ok=True)
    out["folder.jpg"] = (folder / "folder.jpg", "error")
    save("no_permission.jpg", photo, "error", format="JPEG")
    os.chmod(folder / "no_permission.jpg", 0)
    return out
