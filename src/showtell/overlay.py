"""Where an attention decoder looked: each word's map over the photo (numpy and PIL only, no torch).

The maps are over the encoder's input, the photo's center crop (``Preprocess``: the shorter side resized, then a
square of ``crop_pct`` of it), so they are drawn on that square: bright where the word looked, dimmed elsewhere.

    from showtell.overlay import attention_figure
    attention_figure("photo.jpg", result.attention).save("where.png")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from showtell.images import ImageInput, load_image

DIM = 0.25  # brightness where the word did not look at all


def center_crop(img: Image.Image, crop_pct: float = 1.0) -> Image.Image:
    """The square the encoder sees: ``crop_pct`` of the shorter side, centred."""
    w, h = img.size
    side = max(1, round(min(w, h) * crop_pct))
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def overlay(square: Image.Image, grid: np.ndarray, size: int) -> Image.Image:
    """``square`` resized to ``size`` px, lit by ``grid`` (one map [g, g]) scaled to its largest value."""
    photo = np.asarray(square.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    grid = np.asarray(grid, dtype=np.float32)
    peak = float(grid.max()) if grid.size else 0.0
    light = Image.fromarray(grid / peak if peak > 0 else np.zeros_like(grid), mode="F")
    light = np.asarray(light.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32).clip(0, 1)
    lit = photo * (DIM + (1 - DIM) * light[..., None])
    return Image.fromarray(lit.round().clip(0, 255).astype(np.uint8))


def word_overlays(src: ImageInput, attention: Sequence[tuple[str, np.ndarray]], size: int = 112,
                  crop_pct: float = 1.0) -> list[tuple[str, Image.Image]]:
    """For each (word, map) of a caption, the photo's center crop with that word's map over it."""
    square = center_crop(load_image(src), crop_pct)
    return [(word, overlay(square, grid, size)) for word, grid in attention]


def attention_figure(src: ImageInput, attention: Sequence[tuple[str, np.ndarray]], size: int = 160,
                     crop_pct: float = 1.0, per_row: int = 5) -> Image.Image:
    """One picture: the photo's center crop, then each word over its map, ``per_row`` to a row, captioned."""
    square = center_crop(load_image(src), crop_pct).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    tiles = [("", square), *word_overlays(src, attention, size, crop_pct)]
    label, pad = 22, 6
    rows = -(-len(tiles) // per_row)
    cols = min(per_row, len(tiles))
    sheet = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + label + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (word, tile) in enumerate(tiles):
        x, y = pad + (i % per_row) * (size + pad), pad + (i // per_row) * (size + label + pad)
        sheet.paste(tile, (x, y))
        draw.text((x + 4, y + size + 4), word or "(photo)", fill="black")
    return sheet
