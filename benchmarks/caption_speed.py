"""Captioning speed in images/s: showtell against the classic per-image loop, side by side in one run.

    python benchmarks/caption_speed.py [--quick] [--model FILE] [--n 64] [--batch-sizes 1,4,8,16,32]

showtell: ``showtell.load(model).caption(paths, beam_size=3, batch_size=B)``: image loading, preprocessing,
the checkpoint's encoder (efficientnet_lite2 by default) and batched beam search; the default batch size is
the captioner's own. ``--batch-sizes`` also times each of several batch sizes (captioning and encoder only).
The encoder runs in chunks of ``showtell.features.ENCODER_BATCH`` images; ``unchunked`` times the same call with
the whole batch in one forward pass (the code before chunking), ``chunking_speedup`` is their ratio.

encoder only: the same call with the decoder replaced by a stub (loading, preprocessing and the encoder), so
``decoder_share`` = captioning time / encoder-only time says what the decoder costs on top.

reference: ``benchmarks/reference.py``'s CVND inference, one image at a time: ResNet-50 (random weights),
then greedy ``sample()`` (max length 20, a ``.item()`` per step).

The model is ``--model``, else the trained ``runs/xe1/best.safetensors`` when it exists, else a full-size
checkpoint with random LSTM weights (vocabulary of the Flickr8k training split, hidden 512): random weights
rarely emit <end>, so every caption then runs to max length, an upper bound on decoding cost (``finished``
in the output says how many captions ended). Images are the first ``--n`` Flickr8k test images. Each
measurement is the best of ``--rounds``, with the contenders alternating. The last line is a JSON object;
``ratio`` = showtell images/s / reference images/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import TRAINED_CHECKPOINT, cli_environment, corpus, emit, peak_rss_mb, random_checkpoint, train_vocab
from reference import Reference


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def encoder_only(captioner, paths: list[str], batch_size: int) -> None:
    """The captioning call with decoding stubbed out: the same loading, batching and encoder."""
    captioner.caption_features = lambda feats, options: [[("", 0.0)] for _ in range(len(feats))]
    try:
        captioner.caption(paths, beam_size=3, batch_size=batch_size)
    finally:
        del captioner.caption_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller run, under 2 minutes")
    ap.add_argument("--model", help="checkpoint (default: runs/xe1/best.safetensors if present, else random)")
    ap.add_argument("--n", type=int, help="images (default 64, quick 16)")
    ap.add_argument("--rounds", type=int, help="timed rounds, best of (default 3, quick 2)")
    ap.add_argument("--batch-size", type=int, help="showtell's batch size (default: the captioner's default)")
    ap.add_argument("--batch-sizes", help="also time these batch sizes, e.g. 1,4,8,16,32")
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch intra-op threads for both (default: torch's own)")
    args = ap.parse_args()
    cli_environment()
    n = args.n or (16 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    import inspect

    import showtell
    from showtell import features
    from showtell.captioner import Captioner

    chunk = features.ENCODER_BATCH

    records = corpus()
    paths = [str(r.image) for r in records.split("test")[:n]]
    default_bs = inspect.signature(Captioner.iter_caption).parameters["batch_size"].default
    batch_size = args.batch_size or default_bs
    sweep = sorted({int(b) for b in args.batch_sizes.split(",")}) if args.batch_sizes else []

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (TRAINED_CHECKPOINT if TRAINED_CHECKPOINT.is_file() else None)
        vocab = train_vocab(records.split("train")) if model is None else None
        model = model or random_checkpoint(Path(tmp) / "random.safetensors", vocab)
        captioner = showtell.load(model)
        vocab = captioner.vocab
        ref = Reference(len(vocab), end_id=vocab.end_id)

        kwargs = {"beam_size": args.beam_size}
        results = captioner.caption(paths[:4], batch_size=batch_size, **kwargs)  # warm-up
        ref.caption(paths[0])
        best = {"showtell": float("inf"), "encoder": float("inf"), "reference": float("inf"), "unchunked": float("inf")}
        best_sweep = {b: [float("inf"), float("inf")] for b in sweep}
        for _ in range(rounds):
            best["reference"] = min(best["reference"], timed(lambda: [ref.caption(p) for p in paths]))
            best["showtell"] = min(best["showtell"], timed(
                lambda: results.__setitem__(slice(None), captioner.caption(paths, batch_size=batch_size, **kwargs))))
            best["encoder"] = min(best["encoder"], timed(lambda: encoder_only(captioner, paths, batch_size)))
            features.ENCODER_BATCH = 1 << 30  # before: the whole batch through the encoder at once
            try:
                best["unchunked"] = min(best["unchunked"], timed(
                    lambda: captioner.caption(paths, batch_size=batch_size, **kwargs)))
            finally:
                features.ENCODER_BATCH = chunk
            for b in sweep:
                best_sweep[b][0] = min(best_sweep[b][0], timed(
                    lambda b=b: captioner.caption(paths, batch_size=b, **kwargs)))
                best_sweep[b][1] = min(best_sweep[b][1], timed(lambda b=b: encoder_only(captioner, paths, b)))

    speed = {k: n / v for k, v in best.items()}
    words = [len(r.caption.split()) for r in results if r.ok]
    record = {"benchmark": "caption_speed", "ratio": round(speed["showtell"] / speed["reference"], 2),
              "showtell_images_per_s": round(speed["showtell"], 2),
              "reference_images_per_s": round(speed["reference"], 2),
              "encoder_only_images_per_s": round(speed["encoder"], 2),
              "decoder_share": round(best["showtell"] / best["encoder"], 3),
              "unchunked_images_per_s": round(speed["unchunked"], 2),
              "chunking_speedup": round(best["unchunked"] / best["showtell"], 2), "encoder_batch": chunk,
              "images": n, "batch_size": batch_size, "beam_size": args.beam_size,
              "encoder": captioner.checkpoint.encoder,
              "model": str(model), "mean_words": round(sum(words) / max(len(words), 1), 1),
              "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "peak_rss_mb": round(peak_rss_mb(), 1)}
    if sweep:
        record["by_batch_size"] = {b: {"caption_images_per_s": round(n / c, 2), "encoder_images_per_s": round(n / e, 2)}
                                   for b, (c, e) in best_sweep.items()}
    emit(record)


if __name__ == "__main__":
    main()
