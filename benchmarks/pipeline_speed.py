"""Captioning speed of the whole pipeline (JPEG decoding, resizing, model, writing) next to the model alone; the server.

    python benchmarks/pipeline_speed.py [--quick] [--n 1000] [--batch-size 32] [--workers 1,2,4] [--no-server]

Photos: the first ``--n`` (default all 1,000; ``--quick`` 96) Flickr8k test photos (Flickr_8k.testImages.txt),
linked into a temporary folder. Everything runs the built-in model with the CLI's defaults (beam 3, 5 tags).

- cli: ``showtell caption DIR --format jsonl --output FILE`` in a subprocess, wall clock: start-up and model loading
  included; ``cli_startup_s`` is the same command on one photo, ``cli_after_startup`` the rate without it.
- api: ``showtell.load().caption(paths, batch_size=B)`` in this process: photos decode in the loader's threads a batch
  ahead of the model (showtell.loader); ``api_no_overlap`` with ``ahead=0``: each batch decoded, then captioned,
  as before the overlap. ``--workers`` also times other numbers of decoding threads.
- model_only: the same batches through ``caption_loaded`` (encoders, decoders, tags, grounding) on image tensors
  decoded and resized beforehand, untimed. ``load_only``: decoding and resizing alone, in the loader's threads.
- server: ``showtell serve`` in a subprocess on a free port; one client posting one photo at a time (p50/p99
  latency), then 16 clients posting at once (photos/s, and their p50/p99).

The in-process contenders take turns, eight batches of photos at a time, so that other load on the machine hits
them alike; even so, read the ratios of one run (``pipeline_vs_model``, ``overlap_speedup``), not the bare rates.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import cli_environment, emit, flickr8k_root, peak_rss_mb

CLIENTS = 16
CHUNK_BATCHES = 8  # the in-process contenders take turns on this many batches of photos


def flickr8k_test_photos(n: int) -> list[Path]:
    root = flickr8k_root()
    names = (root / "Flickr8k_text" / "Flickr_8k.testImages.txt").read_text().split()
    return [root / "Flicker8k_Dataset" / name for name in names[:n]]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def model_only(captioner, paths: list[Path], batch_size: int) -> float:
    """Seconds in ``caption_loaded`` alone, each batch's tensors made beforehand."""
    from showtell.loader import load_ahead

    total = 0.0
    for batch, loaded in load_ahead(chunks(paths, batch_size), captioner.load, ahead=0):
        total += timed(lambda batch=batch, loaded=loaded: captioner.caption_loaded(batch, loaded))
    return total


def load_only(captioner, paths: list[Path], batch_size: int) -> None:
    from showtell.loader import load_ahead

    for _ in load_ahead(chunks(paths, batch_size), captioner.load):
        pass


def cli(folder: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "showtell", "caption", str(folder), "--format", "jsonl", "--output", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1)}


def server(photos: list[bytes], single: int, concurrent: int) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "showtell", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("showtell serve did not start")
            time.sleep(0.5)

        def post(client: httpx.Client, data: bytes) -> float:
            start = time.perf_counter()
            r = client.post(url + "/v1/caption", files={"file": ("photo.jpg", data, "image/jpeg")})
            r.raise_for_status()
            return (time.perf_counter() - start) * 1000

        with httpx.Client(timeout=120) as client:
            for data in photos[:3]:  # warm-up
                post(client, data)
            alone = [post(client, photos[i % len(photos)]) for i in range(single)]

        lock, todo, loaded = threading.Lock(), iter(range(concurrent)), []

        def worker() -> None:
            with httpx.Client(timeout=120) as client:
                while True:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    ms = post(client, photos[i % len(photos)])
                    with lock:
                        loaded.append(ms)

        threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
    return {"one_client": {**percentiles(alone), "requests": single},
            f"clients_{CLIENTS}": {"photos_per_s": round(len(loaded) / wall, 2), **percentiles(loaded),
                                   "requests": len(loaded)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="96 photos, fewer requests: a few minutes")
    ap.add_argument("--n", type=int, help="photos (default 1000, quick 96)")
    ap.add_argument("--batch-size", type=int, help="the API's batch size (default: the API's and the CLI's, 32)")
    ap.add_argument("--workers", help="also time the API with these numbers of decoding threads, e.g. 1,2,4")
    ap.add_argument("--no-server", action="store_true", help="skip the server")
    args = ap.parse_args()
    cli_environment()
    n = args.n or (96 if args.quick else 1000)
    paths = flickr8k_test_photos(n)

    import inspect

    import showtell
    from showtell.loader import default_workers
    from showtell.result import BatchCaptioning

    bs = args.batch_size or inspect.signature(BatchCaptioning.iter_caption).parameters["batch_size"].default

    captioner = showtell.load()
    for p in paths:
        p.read_bytes()  # every photo in the page cache before anything is timed
    captioner.caption(paths[:bs], batch_size=bs)  # warm-up
    contenders = {"api": lambda part: timed(lambda: captioner.caption(part, batch_size=bs)),
                  "api_no_overlap": lambda part: timed(lambda: captioner.caption(part, batch_size=bs, ahead=0)),
                  "model_only": lambda part: model_only(captioner, part, bs),
                  "load_only": lambda part: timed(lambda: load_only(captioner, part, bs))}
    for w in sorted({int(w) for w in args.workers.split(",")}) if args.workers else []:
        contenders[f"api_workers_{w}"] = lambda part, w=w: timed(lambda: captioner.caption(part, batch_size=bs,
                                                                                         workers=w))
    seconds = dict.fromkeys(contenders, 0.0)
    for i, part in enumerate(chunks(paths, CHUNK_BATCHES * bs)):  # side by side, a part at a time, order rotating
        names = list(contenders)
        for name in names[i % len(names):] + names[:i % len(names)]:
            seconds[name] += contenders[name](part)
    with tempfile.TemporaryDirectory() as tmp:
        folder, one = Path(tmp) / "photos", Path(tmp) / "one"
        folder.mkdir()
        one.mkdir()
        for p in paths:
            (folder / p.name).symlink_to(p)
        (one / paths[0].name).symlink_to(paths[0])
        startup = cli(one, Path(tmp) / "one.jsonl")
        seconds["cli"] = cli(folder, Path(tmp) / "out.jsonl")
        lines = (Path(tmp) / "out.jsonl").read_text().splitlines()
        assert len(lines) == n, f"{len(lines)} lines for {n} photos"
    rate = {k: round(n / v, 2) for k, v in seconds.items()}
    rate["cli_after_startup"] = round(n / (seconds["cli"] - startup), 2)
    record = {"benchmark": "pipeline_speed", "photos": n, "batch_size": bs, "beam_size": 3, "tags": 5,
              "torch_threads": torch.get_num_threads(), "decoding_threads": default_workers(),
              "precision": captioner.precision, **{f"{k}_photos_per_s": v for k, v in rate.items()},
              "cli_startup_s": round(startup, 1),
              "pipeline_vs_model": round(seconds["model_only"] / seconds["api"], 3),
              "cli_vs_model": round(seconds["model_only"] / (seconds["cli"] - startup), 3),
              "overlap_speedup": round(seconds["api_no_overlap"] / seconds["api"], 3)}
    print(f"photos/s ({n} Flickr8k test photos, batch {bs}, {record['torch_threads']} torch threads, "
          f"{record['decoding_threads']} decoding threads): "
          + ", ".join(f"{k} {v}" for k, v in rate.items()))
    if not args.no_server:
        data = [p.read_bytes() for p in paths[:64]]
        record["server"] = server(data, single=20 if args.quick else 100, concurrent=64 if args.quick else 320)
        print(f"server: {record['server']}")
    record["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    record["peak_rss_mb"] = round(peak_rss_mb(), 1)
    emit(record)


if __name__ == "__main__":
    main()
