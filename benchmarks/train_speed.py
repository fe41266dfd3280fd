"""Training throughput in captions/s: showtell's training loop against the classic tutorial loop, in one run.

    python benchmarks/train_speed.py [--quick] [--no-amp] [--limit 1000] [--rounds 3] [--ref-steps 3] [--cache-dir DIR]

showtell: the real ``CrossEntropyStage.epoch`` of ``showtell train`` (cached fp16 features, a random view of each
image, the real LengthBucketSampler batches of 64, ``CaptionModel.loss`` through the DDP-ready loss module, Adam
with the run's learning rate schedule, gradient clipping; mixed precision as in a real run: bf16 where the CPU runs
it natively, ``--no-amp`` for fp32) over the captions of the first ``--limit`` Flickr8k training images, with the
vocabulary of the whole training split. Features come from ``--cache-dir`` when it holds (or may build) the training
split's flip cache, otherwise they are random fp16 vectors of the real shape: the cost of a step does not depend on
their values.

reference: ``benchmarks/reference.py``'s CVND training step on the same images and vocabulary size: 64 captions of
one length, JPEG decoding + the classic transform, a frozen ResNet-50 forward, LSTM forward/backward, Adam, in fp32
as the tutorials run. Both sides' precision is in the output (``showtell_precision``, ``reference_precision``): with
bf16 on, part of the ratio is bf16's; ``--no-amp`` gives the ratio with showtell in fp32 too.

The two alternate (a reference slice, then a showtell epoch, ``--rounds`` times) after one warm-up each, so
load from other processes hits both alike. The last line is a JSON object; ``ratio`` = showtell / reference.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _common import cli_environment, corpus, emit, flickr8k_root, peak_rss_mb
from reference import Reference


def make_stage(train_records, limit: int, cache_dir: str | None, amp: bool = True):
    """showtell's cross-entropy stage over the captions of the first ``limit`` training images, with the vocabulary
    and the fresh model of a real run on the whole training split."""
    from showtell.encoders import encoder_info
    from showtell.features import extract_features
    from showtell.runs import new_model
    from showtell.train import CrossEntropyStage, TrainConfig
    from showtell.vocab import Vocabulary

    config = TrainConfig(root=str(flickr8k_root()), encoder="efficientnet_lite2", batch_size=64, device="cpu",
                         cache_dir=cache_dir, amp=amp)
    feature_dim = encoder_info(config.encoder)["feature_dim"]
    if cache_dir:
        cache = extract_features([r.image for r in train_records], config.encoder, cache_dir, flip=True)
        rows = [cache.row(r.image.resolve()) for r in train_records[:limit]]
        features = torch.from_numpy(np.ascontiguousarray(cache.features[rows]))
        source = "cache"
    else:
        gen = torch.Generator().manual_seed(0)
        features = torch.randn(len(train_records), 2, feature_dim, generator=gen).half()[:limit]
        source = "random"
    vocab = Vocabulary.build([c for r in train_records for c in r.captions], min_count=config.min_count)
    model = new_model(config, len(vocab), feature_dim)
    stage = CrossEntropyStage(config, model, vocab, train_records[:limit], features, torch.device("cpu"), quiet=True)
    return stage, vocab, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller run, under 2 minutes")
    ap.add_argument("--limit", type=int, help="showtell trains on the captions of the first N images "
                                              "(default 1000, quick 300)")
    ap.add_argument("--rounds", type=int, help="timed rounds (default 3, quick 2)")
    ap.add_argument("--ref-steps", type=int, help="reference steps per round (default 3, quick 1)")
    ap.add_argument("--cache-dir", help="feature cache holding the training split's flip features")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                    help="showtell's mixed precision (bf16 on a CPU that supports it); --no-amp: fp32 like the "
                         "reference (default on, as showtell trains)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads for both (default: torch's own)")
    args = ap.parse_args()
    cli_environment()
    limit = args.limit or (300 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 3)
    ref_steps = args.ref_steps or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    train = corpus().split("train")
    stage, vocab, source = make_stage(train, limit, args.cache_dir, amp=args.amp)
    items = [(r.image, vocab.encode(c)) for r in train[:limit] for c in r.captions]
    ref = Reference(len(vocab), items, batch_size=64, end_id=vocab.special.end)

    ref.train_step()  # warm-up: first-call allocations and kernel selection
    stage.epoch(1)
    ref_time = st_time = 0.0
    ref_caps = st_caps = 0
    st_losses = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for _ in range(ref_steps):
            ref_caps += ref.train_step()[1]
        ref_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        st_losses.append(stage.epoch(r + 2))
        st_time += time.perf_counter() - t0
        st_caps += len(stage.items)

    st_speed, ref_speed = st_caps / st_time, ref_caps / ref_time
    from showtell.devices import mixed_precision

    use_amp, amp_dtype = mixed_precision(args.amp, torch.device("cpu"))
    precision = str(amp_dtype).removeprefix("torch.").replace("bfloat16", "bf16") if use_amp else "fp32"
    threads = torch.get_num_threads()
    print(f"showtell: threads {threads}, batch 64, precision {precision} (cached features)\n"
          f"reference: threads {threads}, batch 64, precision fp32 (JPEG + ResNet-50 every step)\n"
          f"captions/s: showtell {st_speed:.1f}, reference {ref_speed:.2f}, ratio {st_speed / ref_speed:.1f}")
    emit({"benchmark": "train_speed", "ratio": round(st_speed / ref_speed, 1),
          "showtell_captions_per_s": round(st_speed, 1), "reference_captions_per_s": round(ref_speed, 2),
          "showtell_captions": st_caps, "showtell_seconds": round(st_time, 2),
          "reference_captions": ref_caps, "reference_seconds": round(ref_time, 2),
          "batch_size": 64, "showtell_precision": precision, "reference_precision": "fp32",
          "limit_images": limit, "vocab_size": len(vocab), "features": source,
          "showtell_loss_per_epoch": [round(x, 3) for x in st_losses], "threads": threads,
          "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "peak_rss_mb": round(peak_rss_mb(), 1)})


if __name__ == "__main__":
    main()
