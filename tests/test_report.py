"""The HTML gallery written by `showtell caption --html`: one self-contained file."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
import sys

from PIL import Image

from showtell.report import render_gallery, write_gallery
from showtell.result import CaptionResult


def test_caption_cli_writes_a_self_contained_gallery(tiny_checkpoint, photos, tmp_path):
    report = tmp_path / "report.html"
    out = subprocess.run([sys.executable, "-m", "showtell", "caption", str(photos), "--model", str(tiny_checkpoint),
                          "--format", "jsonl", "--html", str(report)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 4
    page = report.read_text(encoding="utf-8")
    images = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(rows)
    for data in images:
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert thumb.format == "JPEG" and max(thumb.size) == 256
    for row in rows:
        assert html.escape(row["caption"]) in page
        assert html.escape(row["image"]) in page
        tag = row["tags"][0]
        assert f"<li>{html.escape(tag['label'])} {tag['p']:.0%}</li>" in page  # the tags as chips
    assert page.count("<li>") == 5 * len(rows)
    assert not re.search(r"https?://|(?:src|href)=[\"']?//", page)  # nothing fetched from anywhere


def test_gallery_escapes_text_shows_errors_and_replaces_atomically(photos, tmp_path):
    results = [CaptionResult(str(photos / "rocket.jpg"), caption="a <b>rocket</b> & smoke", score=-1.25,
                             alternatives=[("a \"tall\" tower", -1.5)]),
               CaptionResult(str(tmp_path / "gone.jpg"), error="gone.jpg: no such file <script>"),
               CaptionResult("tagged.jpg", caption="a cup", score=-0.5, tags=[("espresso", 0.64), ("<cup>", 0.03)],
                             confidence=0.25)]
    page = render_gallery(results)
    assert '<ul class="tags"><li>espresso 64%</li><li>&lt;cup&gt; 3%</li></ul>' in page
    assert page.count('class="tags"') == 1 and "confidence 25%" in page and page.count("confidence") == 1
    assert "a &lt;b&gt;rocket&lt;/b&gt; &amp; smoke" in page and "<b>rocket" not in page
    assert "a &quot;tall&quot; tower" in page and "(-1.25)" in page
    assert "no such file &lt;script&gt;" in page and "<script>" not in page
    assert page.count("<img ") == 1  # no thumbnail for the missing file

    path = tmp_path / "out" / "gallery.html"
    path.parent.mkdir()
    path.write_text("old")
    write_gallery(path, results)
    assert path.read_text(encoding="utf-8") == page
    assert sorted(p.name for p in path.parent.iterdir()) == ["gallery.html"]  # no temporary file left
