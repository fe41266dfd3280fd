"""How each stage from raw photos to a trained model grows with the number of images (a timing, not a quality run).

    python benchmarks/scaling.py [--sizes 1000,2000,4000,8000] [--quick]

For each size n, the first n of Flickr8k's 8,000 split photos (train, dev and test pooled, by file name) become
the training set of a CSV data set, and the 91 captioned photos that are in no split file become a small, fixed dev
set. Each stage runs as a user runs it, in a fresh process through the CLI, into an empty feature cache:

  features  ``showtell features --splits train,dev`` (n + 91 photos, no mirrored views)
  epoch     one cross-entropy epoch over the 5n captions, from the cached features (``seconds`` in metrics.csv)
  train     the whole ``showtell train --epochs 1`` process: reading the data, the vocabulary, loading the cache,
            the epoch, dev decoding and scoring, writing checkpoints

The last line is a JSON object with the seconds of every stage per size and each stage's growth from the
smallest size to the largest, next to the growth of n.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import corpus, emit, flickr8k_root


def _run(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "showtell", *args, "--quiet"], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"showtell {args[0]} failed: {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,2000,4000,8000")
    ap.add_argument("--quick", action="store_true", help="sizes 250,500 (a smoke run)")
    args = ap.parse_args()
    sizes = [250, 500] if args.quick else [int(s) for s in args.sizes.split(",")]

    data = corpus()
    images = flickr8k_root() / "Flicker8k_Dataset"
    in_splits = sorted((r for r in data.records if r.split in ("train", "dev", "test")), key=lambda r: r.image.name)
    unassigned = sorted((r for r in data.records if r.split not in ("train", "dev", "test")),
                        key=lambda r: r.image.name)
    if max(sizes) > len(in_splits) or not unassigned:
        sys.exit(f"need {max(sizes)} photos in splits and some outside them; have {len(in_splits)}, "
                 f"{len(unassigned)}")
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = Path(tmp) / str(n)
            folder.mkdir()
            with open(folder / "captions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image", "caption", "split"])
                for split, records in (("train", in_splits[:n]), ("dev", unassigned)):
                    w.writerows([r.image.name, c, split] for r in records for c in r.captions)
            data_args = ["--dataset", "csv", "--root", str(folder), "--images", str(images),
                         "--cache-dir", str(folder / "cache")]
            features = _run(["features", *data_args, "--splits", "train,dev"], env)
            train = _run(["train", *data_args, "--out", str(folder / "run"), "--epochs", "1", "--no-flip",
                          "--batch-norm"], env)
            with open(folder / "run" / "metrics.csv") as f:
                epoch = float(next(csv.DictReader(f))["seconds"])
            row = {"images": n, "captions": 5 * n, "features_s": round(features, 1), "epoch_s": round(epoch, 1),
                   "train_process_s": round(train, 1)}
            print(row, flush=True)
            rows.append(row)
    first, last = rows[0], rows[-1]
    growth = {k: round(last[k] / first[k], 2) for k in ("features_s", "epoch_s", "train_process_s")}
    emit({"sizes": rows, "growth": growth, "images_growth": last["images"] / first["images"]})


if __name__ == "__main__":
    main()
