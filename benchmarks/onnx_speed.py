"""Captioning speed, PyTorch vs the ONNX export, side by side on the same photos in one run.

    python benchmarks/onnx_speed.py --model run/best.safetensors [--images DIR_OR_FILES...] [--beam-size 3]

Exports the checkpoint to a temporary folder (or uses --export DIR), checks that both runtimes give the same
captions, then times full captioning (load, preprocess, encode, beam search) with each runtime, alternating,
best of --repeats. Prints one JSON line: images/s of both and their ratio (onnx / torch).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import showtell
from showtell.export import export_onnx
from showtell.images import expand_paths
from showtell.onnx_runtime import load_onnx

DEFAULT_FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def default_images(n: int) -> list[Path]:
    root = Path(os.environ.get("SHOWTELL_FLICKR8K", DEFAULT_FLICKR8K))
    names = (root / "Flickr8k_text" / "Flickr_8k.testImages.txt").read_text().split()[:n]
    folder = next(d for d in ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images") if (root / d).is_dir())
    return [root / folder / name for name in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint file (default: the built-in model)")
    ap.add_argument("--export", help="an existing export folder of --model (default: export to a temp folder)")
    ap.add_argument("--images", nargs="*", help="photos or folders (default: the first --n Flickr8k test images)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="intra-op threads of both runtimes (default: each library's own)")
    args = ap.parse_args()

    images = [str(p) for p in (expand_paths(args.images) if args.images else default_images(args.n))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.export
        if folder is None:
            export_onnx(args.model, tmp, quiet=True)
            folder = tmp
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        runtimes = {"torch": showtell.load(args.model), "onnx": load_onnx(folder, threads=args.threads)}
        kwargs = {"beam_size": args.beam_size, "batch_size": args.batch_size}
        captions = {k: [r.caption for r in c.caption(images, **kwargs)] for k, c in runtimes.items()}  # warm-up
        best = dict.fromkeys(runtimes, float("inf"))
        for _ in range(args.repeats):
            for name, captioner in runtimes.items():
                start = time.perf_counter()
                captioner.caption(images, **kwargs)
                best[name] = min(best[name], time.perf_counter() - start)
    speed = {k: len(images) / v for k, v in best.items()}
    print(json.dumps({"images": len(images), "beam_size": args.beam_size, "batch_size": args.batch_size,
                      "threads": args.threads or "default",
                      "torch_images_per_s": round(speed["torch"], 2), "onnx_images_per_s": round(speed["onnx"], 2),
                      "onnx_vs_torch": round(speed["onnx"] / speed["torch"], 3),
                      "same_captions": captions["torch"] == captions["onnx"]}))


if __name__ == "__main__":
    main()
