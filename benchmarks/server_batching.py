"""The server's batching under load, side by side: the short window alone against waiting longer under load.

    python benchmarks/server_batching.py [--n 320] [--clients 16] [--rounds 2]

Two apps of ``showtell.server.create_app`` on the built-in model, each served by uvicorn in this process on a free
port: ``short_window_only`` (``loaded_window=0``: every batch takes what arrived within ``batch_window_ms``) and
``default`` (under load the next batch waits up to ``loaded_window`` of the last batch's time for more). In turns,
``--rounds`` times: ``--clients`` clients post the first ``--n`` Flickr8k dev photos one at a time, each sending
again as soon as it is answered (photos/s, p50/p99 latency, the sizes of the batches formed), then one client posts
40 photos one at a time (p50/p99). The clients are threads of this process, alike for both apps, so read the
ratios; ``speedup`` is that of the median photos/s. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from _common import cli_environment, emit, flickr8k_root

import showtell
from showtell.server import bind, create_app

SINGLE = 40  # photos the lone client posts


class Counting:
    """The captioner, recording the size of each batch it captions."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, collections.Counter()

    def caption_loaded(self, images, loaded, **kwargs):
        self.sizes[len(images)] += 1
        return self.inner.caption_loaded(images, loaded, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def start(app) -> str:
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            time.sleep(0.2)


def post_all(url: str, photos: list[bytes]) -> list[float]:
    """Milliseconds of each request, posted one after another."""
    ms = []
    with httpx.Client(timeout=300) as client:
        for data in photos:
            t = time.perf_counter()
            client.post(url + "/v1/caption", files={"file": ("photo.jpg", data, "image/jpeg")}).raise_for_status()
            ms.append((time.perf_counter() - t) * 1000)
    return ms


def quantiles(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": round(q[49]), "p99_ms": round(q[98])}


def main() -> None:
    cli_environment()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=320, help="Flickr8k dev photos the clients post in a round")
    p.add_argument("--clients", type=int, default=16, help="clients posting at once")
    p.add_argument("--rounds", type=int, default=2, help="turns of each app")
    args = p.parse_args()
    root = flickr8k_root()
    names = (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()[: args.n]
    photos = [(root / "Flicker8k_Dataset" / name).read_bytes() for name in names]
    captioner = showtell.load(device="cpu")
    apps = {name: Counting(captioner) for name in ("short_window_only", "default")}
    urls = {name: start(create_app(c, **({"loaded_window": 0.0} if name == "short_window_only" else {})))
            for name, c in apps.items()}
    for url in urls.values():
        post_all(url, photos[:3])  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in apps}
    for _ in range(args.rounds):
        for name, url in urls.items():
            apps[name].sizes.clear()
            start_s = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                shares = [photos[i::args.clients] for i in range(args.clients)]
                ms = [m for share in pool.map(post_all, [url] * args.clients, shares) for m in share]
            seconds = time.perf_counter() - start_s
            runs[name].append({"photos_per_s": round(len(photos) / seconds, 1), **quantiles(ms),
                               "batches": dict(sorted(apps[name].sizes.items())),
                               "one_client": quantiles(post_all(url, photos[:SINGLE]))})
    rate = {name: statistics.median(r["photos_per_s"] for r in rs) for name, rs in runs.items()}
    emit({"photos": len(photos), "clients": args.clients, "rounds": runs,
          "speedup": round(rate["default"] / rate["short_window_only"], 2)})


if __name__ == "__main__":
    main()
