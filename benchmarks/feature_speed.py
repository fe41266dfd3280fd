"""Feature extraction speed in images/s, before and after encoder chunking, and by batch size and loader workers.

    python benchmarks/feature_speed.py [--quick] [--n 32] [--encoder efficientnet_lite2] [--rounds 2]

Times ``showtell.features.iter_features`` (what ``showtell features`` and training run: JPEG decoding in a
DataLoader, preprocessing, the frozen encoder, with the flipped view as in training) on the first ``--n``
Flickr8k test images, under these settings, alternating, best of ``--rounds``:

- before: batch 32, 1 loader worker, the whole batch (64 views) in one encoder pass (the code before chunking);
- after: the same with the encoder in chunks of ``showtell.encoders.ENCODER_BATCH`` (the code now);
- batch 8 / 32 / 64 with chunking, and 0 or 1 loader workers.

Also reports the user and system CPU seconds of each (this process and its loader workers): large batches spend
much more system time (page faults of big activation buffers). The last line is a JSON object; ``ratio`` =
after / before images/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
from _common import cli_environment, corpus, emit


def cpu_seconds() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer settings, under 2 minutes")
    ap.add_argument("--n", type=int, default=32, help="images (default 32)")
    ap.add_argument("--encoder", default="efficientnet_lite2")
    ap.add_argument("--rounds", type=int, help="rounds, best of (default 2, quick 1)")
    args = ap.parse_args()
    cli_environment()
    rounds = args.rounds or (1 if args.quick else 2)

    from showtell import features
    from showtell.encoders import ENCODER_BATCH, create_encoder

    chunk = ENCODER_BATCH
    paths = [r.image for r in corpus().split("test")[: args.n]]
    encoder = create_encoder(args.encoder)
    # name: (batch size, loader workers, encoder chunk)
    settings = {"before": (32, 1, 1 << 30), "after": (32, 1, chunk)}
    if not args.quick:
        settings |= {"batch8": (8, 1, chunk), "batch64": (64, 1, chunk), "batch32_workers0": (32, 0, chunk)}
    list(features.iter_features(encoder, paths[:4], list(range(4)), flip=True, batch_size=4, num_workers=0))
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(rounds):
        for name, (batch, workers, encoder_batch) in settings.items():
            (u0, s0), t0 = cpu_seconds(), time.perf_counter()
            for _ in features.iter_features(encoder, paths, list(range(len(paths))), flip=True, batch_size=batch,
                                            num_workers=workers, encoder_batch=encoder_batch):
                pass
            seconds, (u1, s1) = time.perf_counter() - t0, cpu_seconds()
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, u1 - u0, s1 - s0)
    record = {"benchmark": "feature_speed", "ratio": round(best["before"][0] / best["after"][0], 2),
              "images": len(paths), "views": 2, "encoder": args.encoder, "encoder_batch": chunk,
              "threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    for name, (seconds, user, system) in best.items():
        record[name] = {"images_per_s": round(len(paths) / seconds, 2), "user_s": round(user, 2),
                        "sys_s": round(system, 2)}
    emit(record)


if __name__ == "__main__":
    main()
