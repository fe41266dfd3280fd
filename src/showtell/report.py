"""A self-contained HTML gallery of captioned photos: one file, thumbnails embedded, no external URLs. A result of
an attention decoder also shows, for each word, the photo with that word's attention map over it."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable
from html import escape
from typing import Any

from showtell.errors import ImageError
from showtell.fileio import atomic_write_text, display_name
from showtell.images import ImageInput, load_image

THUMBNAIL_PX = 256
# In every gallery's head: `showtell caption --html` replaces an existing file only when it carries this line.
GENERATOR = '<meta name="generator" content="showtell">'

_STYLE = """
body { margin: 2rem; font: 16px/1.45 system-ui, sans-serif; color: #1d1d1f; background: #f6f6f8; }
h1 { font-size: 1.4rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 1rem; }
figure { margin: 0; padding: .75rem; background: #fff; border: 1px solid #d9d9de; border-radius: 10px; }
figure img { display: block; max-width: 100%; margin: 0 auto .5rem; border-radius: 6px; }
.name { color: #6b6b73; font-size: .8rem; word-break: break-all; }
.caption { font-weight: 600; }
.score, ol { color: #6b6b73; font-size: .85rem; }
.error { color: #b42318; font-weight: 600; }
.tags { display: flex; flex-wrap: wrap; gap: .3rem; margin: .3rem 0; padding: 0; list-style: none; }
.words { display: flex; flex-wrap: wrap; gap: .25rem; margin: .4rem 0; }
.words figure { padding: 0; border: 0; text-align: center; font-size: .75rem; color: #3d3d44; }
.words img { width: 72px; height: 72px; margin: 0 auto .1rem; border-radius: 4px; }
.tags li { padding: 0 .45rem; border: 1px solid #d9d9de; border-radius: 999px; background: #f1f3f7;
           color: #6b6b73; font-size: .75rem; }
"""


def thumbnail_data_uri(src: ImageInput, size: int = THUMBNAIL_PX) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail (longest side ``size``), or None if the image is unreadable."""
    try:
        img = load_image(src)
    except ImageError:
        return None
    img.thumbnail((size, size))
    return _jpeg_uri(img)


def _jpeg_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _words(result: Any, crop_pct: float) -> str:
    """Each word of the caption over the photo, lit where the attention decoder looked for it."""
    from showtell.overlay import word_overlays

    try:
        tiles = word_overlays(result.image, result.attention, size=144, crop_pct=crop_pct)
    except ImageError:
        return ""
    figures = "".join(f'<figure><img src="{_jpeg_uri(img)}" alt="where it looked for {escape(word)}">'
                      f"{escape(word)}</figure>" for word, img in tiles)
    return f'<div class="words">{figures}</div>'


def _figure(result: Any, crop_pct: float = 1.0) -> str:
    name = escape(display_name(str(result.image)))  # a file name that is not UTF-8 shows its odd bytes as \xNN
    parts = ["<figure>"]
    uri = thumbnail_data_uri(result.image) if isinstance(result.image, (str, os.PathLike)) else None
    if uri:
        parts.append(f'<img src="{uri}" alt="{name}">')
    parts.append(f'<figcaption><div class="name">{name}</div>')
    if result.error:
        parts.append(f'<div class="error">{escape(display_name(result.error))}</div>')
    else:
        confidence = getattr(result, "confidence", None)
        parts.append(f'<div class="caption">{escape(result.caption or "")}'
                     f' <span class="score">({result.score:.2f})</span>'
                     + ("" if confidence is None else f' <span class="score">confidence {confidence:.0%}</span>')
                     + "</div>")
        if getattr(result, "attention", None) and isinstance(result.image, (str, os.PathLike)):
            parts.append(_words(result, crop_pct))
        if getattr(result, "model_caption", None):  # a sure tag overruled the model's own caption
            parts.append(f'<div class="score">the model\'s own caption: {escape(result.model_caption)}</div>')
        tags = getattr(result, "tags", None)
        if tags:
            chips = "".join(f"<li>{escape(label)} {p:.0%}</li>" for label, p in tags)
            parts.append(f'<ul class="tags">{chips}</ul>')
        if result.alternatives:
            alts = "".join(f'<li>{escape(c)} <span class="score">({s:.2f})</span></li>'
                           for c, s in result.alternatives)
            parts.append(f"<ol>{alts}</ol>")
    parts.append("</figcaption></figure>")
    return "".join(parts)


def render_gallery(results: Iterable[Any], title: str = "showtell captions", crop_pct: float = 1.0) -> str:
    """The gallery page as a string (results are CaptionResult-like: image, caption, score, alternatives, error, and
    optionally tags, confidence and attention maps, drawn on the square the encoder saw: ``crop_pct`` of the
    shorter side)."""
    figures = "\n".join(_figure(r, crop_pct) for r in results)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{GENERATOR}'
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head>\n"
            f'<body><h1>{escape(title)}</h1>\n<div class="grid">\n{figures}\n</div></body></html>\n')


def write_gallery(path: str | os.PathLike, results: Iterable[Any], title: str = "showtell captions",
                  crop_pct: float = 1.0) -> None:
    """Write the gallery to ``path`` atomically (a reader never sees half a file)."""
    atomic_write_text(path, render_gallery(results, title, crop_pct))


def is_gallery(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a gallery this module wrote (its head carries ``GENERATOR``)."""
    with open(path, "rb") as f:
        return GENERATOR.encode() in f.read(1024)
