"""The HTTP API: real captions through the app, the error codes a client can cause, batching, back-pressure."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import serve_process
from fastapi.testclient import TestClient
from PIL import Image

from showtell.result import CaptionResult
from showtell.server import create_app


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    import showtell

    return showtell.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(captioner):
    with TestClient(create_app(captioner)) as c:
        yield c


# an asset loaded from another host: src=/href= or url()/fetch()/import of http(s):// or //host
EXTERNAL = re.compile(r"""(?:(?:src|href)\s*=|url\(|fetch\(|import)\s*["']?(?:https?:)?//""", re.I)


def jpeg(path: Path) -> bytes:
    return path.read_bytes()


class Counting:
    """The real captioner, recording how many images each call got."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def caption_loaded(self, images, loaded, **kwargs):
        self.calls.append(len(images))
        return self.inner.caption_loaded(images, loaded, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Gated:
    """A fake captioner that holds each batch until `release` is set."""

    name, meta, vocab, checkpoint = "gated", {}, [], SimpleNamespace(encoder="none")

    def __init__(self):
        self.busy, self.release = threading.Event(), threading.Event()
        self.loaded: list[bytes] = []

    def load(self, image):
        self.loaded.append(image)
        return image

    def caption_loaded(self, images, loaded, **kwargs):
        self.busy.set()
        assert self.release.wait(30)
        return [CaptionResult("x", caption="a cat", score=-1.0) for _ in images]


def test_caption_multipart_and_raw_body_give_the_same_caption(client, photos, captioner):
    data = jpeg(photos / "chelsea.jpg")
    r = client.post("/v1/caption", files={"file": ("chelsea.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"caption", "score", "alternatives", "tags", "model", "elapsed_ms"}
    assert body["caption"] and body["model"] == "tiny" and body["elapsed_ms"] > 0
    assert body["score"] <= 0
    assert len(body["alternatives"]) == 2  # beam 3: the best plus two more
    assert all(a["score"] <= body["score"] + 1e-4 for a in body["alternatives"])
    expected = captioner.caption(data, num_return=3)[0]
    assert body["caption"] == expected.caption
    assert body["tags"] == [{"label": label, "p": round(p, 4)} for label, p in expected.tags]  # five, best first
    assert len(body["tags"]) == 5 and body["tags"][0]["label"] == "Egyptian cat"

    raw = client.post("/v1/caption", content=data, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200
    assert raw.json()["caption"] == body["caption"]
    assert raw.json()["score"] == pytest.approx(body["score"], abs=1e-3)


def test_several_files_one_bad_does_not_fail_the_rest(client, photos):
    files = [("files", (n, jpeg(photos / n), "image/jpeg")) for n in ("astronaut.jpg", "coffee.jpg")]
    files.insert(1, ("files", ("page.jpg", b"<!doctype html><html>not an image</html>", "image/jpeg")))
    files.append(("files", ("empty.png", b"", "image/png")))
    r = client.post("/v1/captions", files=files)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["file"] for o in out] == ["astronaut.jpg", "page.jpg", "coffee.jpg", "empty.png"]
    assert out[0]["caption"] and out[2]["caption"] and len(out[0]["alternatives"]) == 2
    assert out[2]["tags"][0]["label"] == "espresso" and "tags" not in out[1]
    assert out[1]["status"] == 415 and out[1]["error"].startswith("page.jpg: not an image")
    assert out[3]["status"] == 400 and "empty" in out[3]["error"]


def test_bad_uploads_get_clear_json_errors_and_the_server_keeps_serving(client, photos):
    cases = [
        ({"files": {"file": ("x.jpg", os.urandom(3000), "image/jpeg")}}, 415, "x.jpg: "),
        ({"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty"),
        ({"files": {"file": ("page.jpg", b"<html><body>hi</body></html>", "image/jpeg")}}, 415, "not an image"),
        ({"files": {"file": ("half.jpg", jpeg(photos / "rocket.jpg")[:5000], "image/jpeg")}}, 415, "half.jpg"),
        ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty"),
        ({"content": b'{"path": "/etc/passwd"}', "headers": {"content-type": "application/json"}}, 415, ""),
        ({"data": {"file": "/etc/passwd"}, "files": {"other": ("a", b"b")}}, 400, "must be a file"),
        ({"files": {"photo": ("a.jpg", jpeg(photos / "rocket.jpg"), "image/jpeg")}}, 400, "'file'"),
    ]
    for kwargs, status, text in cases:
        r = client.post("/v1/caption", **kwargs)
        assert r.status_code == status, (kwargs.get("files"), r.text)
        assert text in r.json()["error"]
    assert client.post("/v1/captions", content=b"abc").status_code == 400
    assert client.get("/v1/caption").status_code == 405
    assert "error" in client.get("/nowhere").json()
    r = client.post("/v1/caption", files={"file": ("rocket.jpg", jpeg(photos / "rocket.jpg"), "image/jpeg")})
    assert r.status_code == 200 and r.json()["caption"]


def test_uploads_over_the_limit_get_413(captioner, photos):
    big, small = jpeg(photos / "astronaut.jpg"), jpeg(photos / "chelsea.jpg")  # 68 kB and 35 kB
    with TestClient(create_app(captioner, max_upload_mb=0.04)) as c:
        r = c.post("/v1/caption", files={"file": ("big.jpg", big, "image/jpeg")})
        assert r.status_code == 413 and "too large" in r.json()["error"]
        assert c.post("/v1/caption", content=big, headers={"content-type": "image/jpeg"}).status_code == 413
        # no Content-Length (chunked): refused while reading, once past the limit plus room for multipart framing
        r = c.post("/v1/caption", content=iter([big, big]), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413 and r.json() == {"error": "upload too large (limit 0.04 MiB)"}
        many = c.post("/v1/captions", files=[("files", ("big.jpg", big)), ("files", ("small.jpg", small))])
        assert [o.get("status") for o in many.json()] == [413, None]
        assert c.post("/v1/caption", files={"file": ("small.jpg", small)}).status_code == 200


def test_model_info_health_and_pages(tmp_path, tiny_checkpoint, captioner):
    from showtell.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(tiny_checkpoint)
    path = tmp_path / "scored.safetensors"
    save_checkpoint(path, ck.model, ck.vocab, ck.encoder, ck.preprocess,
                    meta={**ck.meta, "name": "scored", "metrics": {"BLEU-4": 0.213, "CIDEr": 0.55}})
    app = create_app(path)  # loads nothing until start-up
    with TestClient(app) as c:
        info = c.get("/v1/model").json()
        assert info["name"] == "scored" and info["encoder"] == "efficientnet_lite0"
        assert info["vocab_size"] == len(captioner.vocab)
        assert info["metrics"] == {"BLEU-4": 0.213, "CIDEr": 0.55}
        assert c.get("/healthz").json() == {"status": "ok", "model": "scored", "queue": 0}
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for asset in ("/static/app.js", "/static/style.css", "/docs", "/static/docs.js"):
            r = c.get(asset)
            assert r.status_code == 200, asset
            assert not EXTERNAL.search(r.text), asset  # nothing from a CDN: the page works offline
        assert "/v1/caption" in c.get("/openapi.json").json()["paths"]
        assert c.get("/static/../server.py").status_code == 404
    with pytest.raises(Exception, match="missing.safetensors"):
        with TestClient(create_app(tmp_path / "missing.safetensors")):
            pass


def test_concurrent_requests_are_captioned_in_batches(captioner, photos):
    counting = Counting(captioner)
    names = ["astronaut.jpg", "coffee.jpg", "chelsea.jpg", "rocket.jpg"] * 2
    alone = {n: captioner.caption(jpeg(photos / n))[0].caption for n in set(names)}
    with TestClient(create_app(counting, batch_window_ms=50)) as c:
        def post(name: str) -> str:
            r = c.post("/v1/caption", files={"file": (name, jpeg(photos / name), "image/jpeg")})
            assert r.status_code == 200, r.text
            return r.json()["caption"]

        with ThreadPoolExecutor(8) as pool:
            captions = list(pool.map(post, names))
    assert sum(counting.calls) == 8
    assert len(counting.calls) < 8 and max(counting.calls) > 1, counting.calls
    assert captions == [alone[n] for n in names]  # batching does not change any caption


class Slow:
    """A fake captioner that takes a fixed time a batch, recording each batch's size."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, []

    def load(self, image):
        return image

    def caption_loaded(self, images, loaded, **kwargs):
        self.calls.append(len(images))
        time.sleep(self.seconds)
        return [CaptionResult("x", caption="a cat", score=-1.0) for _ in images]


def test_clients_that_wait_for_their_answer_end_up_in_one_batch():
    """Four clients that each send again when answered, two of them late: with the short window alone they stayed
    split in two half batches for good (batches of 2, 2, 2, ...; 16 clients on the server: 8 and 8, or 14 and 2,
    fewer photos/s than batches of 16); under load the next batch waits a share of the last batch's time, so the
    returning clients join it."""
    from showtell import server

    slow = Slow(0.3)
    batcher = server.Batcher(slow, server.ServerOptions(max_batch=4, batch_window_ms=0))
    batcher.start()

    def client(delay: float) -> None:
        time.sleep(delay)
        for _ in range(5):
            (future,) = batcher.submit([b"image"])
            assert future.result(timeout=30).caption == "a cat"

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, [0, 0, 0.1, 0.1]))
    finally:
        batcher.stop()
    assert sum(slow.calls) == 20
    assert 4 in slow.calls[2:], slow.calls  # merged once the late pair queued behind the first batch


def test_full_queue_gives_503_and_slow_work_gives_504():
    gated = Gated()
    image = {"file": ("a.jpg", b"not read by the fake", "image/jpeg")}
    app = create_app(gated, queue_size=1, max_batch=1, batch_window_ms=0)
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/caption", files=image)
        assert gated.busy.wait(10)                     # the worker is busy with the first
        second = pool.submit(c.post, "/v1/caption", files=image)
        deadline = time.monotonic() + 5
        while c.get("/healthz").json()["queue"] < 1:  # the second waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        while len(gated.loaded) < 2:  # the second is decoded while the first is still being captioned
            assert time.monotonic() < deadline
            time.sleep(0.01)
        third = c.post("/v1/caption", files=image)
        assert third.status_code == 503 and "busy" in third.json()["error"]
        assert third.headers["retry-after"] == "1"
        gated.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert c.post("/v1/caption", files=image).json()["caption"] == "a cat"

    gated = Gated()
    with TestClient(create_app(gated, timeout_s=0.2)) as c:
        r = c.post("/v1/caption", files=image)
        assert r.status_code == 504 and "longer than" in r.json()["error"]
        gated.release.set()
        assert c.post("/v1/caption", files=image).json()["caption"] == "a cat"


def test_showtell_serve_answers_on_localhost(tiny_checkpoint, photos):
    with serve_process(tiny_checkpoint, timeout=60) as (url, proc):
        buf = io.BytesIO()
        Image.open(photos / "coffee.jpg").save(buf, "PNG")
        r = httpx.post(url + "/v1/caption", files={"file": ("coffee.png", buf.getvalue(), "image/png")}, timeout=30)
        assert r.status_code == 200 and r.json()["caption"]
        assert "<title>showtell</title>" in httpx.get(url + "/").text
    assert f"{url}/" in proc.output


def test_serve_with_a_missing_model_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "showtell", "serve", "--model", str(tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("showtell: error:") and "nope.safetensors" in out.stderr
    assert "Traceback" not in out.stderr
