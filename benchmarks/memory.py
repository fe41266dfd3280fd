"""Peak resident memory of showtell's commands, each alone in a fresh process.

    python benchmarks/memory.py [--cache-dir DIR] [--limit N] [--only caption,serve,train]

- caption: ``showtell caption examples/images`` with the built-in model (its default precision on this CPU);
- serve: ``showtell serve`` with the built-in model, from start-up through /healthz, one request with the 8 example
  photos (``POST /v1/captions``) and one request per photo, until it is stopped;
- train: ``showtell train --config configs/flickr8k.toml --epochs 1 --scst-epochs 0`` on Flickr8k (the shipped
  recipe's settings, one cross-entropy epoch, dev scored after it; ``--limit N``: the first N photos of each split),
  its features read from ``--cache-dir`` (default: showtell's own cache) or extracted first where they are not there.

Each figure is the child's own peak RSS (``os.wait4``'s rusage of that process), so nothing else this script loads
counts. The last line is a JSON object with the date, the figures in MB (10^6 bytes) and the settings.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, emit, flickr8k_root

EXAMPLES = REPO / "examples" / "images"


def peak_mb(cmd: list[str], during=None) -> float:
    """Run ``cmd``; ``during(proc)``, if given, runs while it does and then stops it. The child's peak RSS, MB."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        if during is not None:
            try:
                during(proc)
            finally:
                proc.terminate()
        _, status, usage = os.wait4(proc.pid, 0)
        if during is None and status:
            log.seek(0)
            sys.exit(f"{' '.join(cmd)} failed: {log.read().strip()[-500:]}")
    return usage.ru_maxrss * 1024 / 1e6  # Linux reports KiB


def exercise_server(port: int):
    def during(proc: subprocess.Popen) -> None:
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                sys.exit("showtell serve stopped before answering /healthz")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                sys.exit("showtell serve did not answer /healthz within 300 s")
            time.sleep(0.2)
        photos = sorted(EXAMPLES.glob("*.jpg"))
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
        assert httpx.post(url + "/v1/captions", files=files, timeout=300).status_code == 200
        for p in photos:
            assert httpx.post(url + "/v1/caption", files={"file": p.read_bytes()}, timeout=300).status_code == 200
    return during


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="photos of each split for the training run (default all)")
    p.add_argument("--cache-dir", default=None, help="feature cache for the training run (default: showtell's)")
    p.add_argument("--only", default="caption,serve,train", help="which commands, comma-separated")
    args = p.parse_args()
    showtell = [sys.executable, "-m", "showtell"]
    result: dict = {"date": datetime.date.today().isoformat()}
    only = set(args.only.split(","))
    if "caption" in only:
        result["caption_mb"] = round(peak_mb([*showtell, "caption", str(EXAMPLES)]))
    if "serve" in only:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result["serve_mb"] = round(peak_mb([*showtell, "serve", "--port", str(port)], exercise_server(port)))
    if "train" in only:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [*showtell, "train", "--config", str(REPO / "configs" / "flickr8k.toml"), "--root",
                   str(flickr8k_root()), "--epochs", "1", "--scst-epochs", "0", "--out", str(Path(tmp) / "run"),
                   "--quiet"]
            cmd += ["--limit", str(args.limit)] if args.limit else []
            cmd += ["--cache-dir", args.cache_dir] if args.cache_dir else []
            result["train_mb"] = round(peak_mb(cmd))
        result["train_photos"] = args.limit or "all"
    emit(result)


if __name__ == "__main__":
    main()
