"""Encoder speed and agreement by precision: the shipped int8 encoder (showtell.quantize) against torch fp32.

    python benchmarks/encoder_precision.py [--n 32] [--rounds 2] [--threads 2]

Preprocessed Flickr8k dev photos (decoding and resizing are not timed) go through the efficientnet_lite0+2
encoder at batch 1, 4 and 16, the two precisions alternating in one process; ``ratio_bN`` = int8 images/s / fp32
images/s. ``cosine_min``/``cosine_mean``: of each photo's int8 features with its fp32 features.

How the int8 route was chosen (2026-12, this project's shared 2-core CPU with AVX512-VNNI and AMX, 2 threads, 64
calibration photos, side by side in one process; images/s at batch 1 / 4 / 16 and the ratio to torch fp32):

    torch fp32                                      8.6 / 5.8 / 5.8
    onnxruntime fp32                                11.3 / 9.4 / 14.4       1.3x / 1.6x / 2.5x
    onnxruntime int8 QDQ, uint8 activations         20.9 / 18.6 / 35.4      2.4x / 3.2x / 6.1x   cosine min 0.970
    torchao PT2E + X86InductorQuantizer, compiled   19.0 / 16.6 / 9.4       2.2x / 2.9x / 1.6x   cosine min 0.979

On a quieter day the shipped int8 encoder (300 calibration photos) ran 93.5 / 126.8 / 136.2 images/s, 8.1x / 6.6x /
7.4x fp32, cosine min 0.971, mean 0.992 (this script). onnxruntime int8 with int8 activations ran 0.9-1.7x fp32
(uint8 x int8 is the fast VNNI path); before timm's TF-"same" padding was made constant it ran 1.6-2.5x, an fp32 Pad
between int8 ops taking half its time. The PT2E route needs torchao and torch.compile (a C++ compiler on the user's
machine): 90 s of compiling at first use and 20 s more for each new batch size. torch's FX graph mode quantization
(deprecated) cannot trace the same-padding convolutions. Calibration ranges (100 photos, 48 others): percentile
(99.999) instead of min/max raised the cosine's mean by 0.001 (min 0.970 -> 0.978) at 3x the build time, entropy
changed nothing; leaving the stem or head convolutions in fp32 lowered it (min 0.90).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import cli_environment, corpus, emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="photos (default 32)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds, best of (default 2)")
    ap.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's own)")
    args = ap.parse_args()
    cli_environment()
    if args.threads:
        torch.set_num_threads(args.threads)

    from showtell.encoders import create_encoder
    from showtell.images import load_image
    from showtell.quantize import Int8Encoder, int8_path

    fp32 = create_encoder("efficientnet_lite0+2")
    int8 = Int8Encoder(int8_path(fp32.name), fp32)
    transform = fp32.preprocess.transform()
    images = torch.stack([transform(load_image(r.image)) for r in corpus().split("dev")[: args.n]])
    encoders = {"fp32": fp32, "int8": int8}
    sizes = (1, 4, 16)
    best = {(k, b): float("inf") for k in encoders for b in sizes}
    with torch.inference_mode():
        feats = {k: torch.cat([e(c) for c in images.split(16)]) for k, e in encoders.items()}  # also a warm-up
        for _ in range(args.rounds):
            for b in sizes:
                for k, e in encoders.items():
                    start = time.perf_counter()
                    for chunk in images.split(b):
                        e(chunk)
                    best[k, b] = min(best[k, b], time.perf_counter() - start)
    cosine = torch.nn.functional.cosine_similarity(feats["int8"], feats["fp32"])
    record = {"benchmark": "encoder_precision", "encoder": fp32.name, "images": args.n,
              "threads": torch.get_num_threads(), "cosine_min": round(float(cosine.min()), 4),
              "cosine_mean": round(float(cosine.mean()), 4)}
    for b in sizes:
        record[f"fp32_images_per_s_b{b}"] = round(args.n / best["fp32", b], 1)
        record[f"int8_images_per_s_b{b}"] = round(args.n / best["int8", b], 1)
        record[f"ratio_b{b}"] = round(best["fp32", b] / best["int8", b], 2)
    emit(record)


if __name__ == "__main__":
    main()
