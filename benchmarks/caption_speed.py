"""Captioning speed in images/s: showtell against the classic per-image loop, side by side in one run.

    python benchmarks/caption_speed.py [--quick] [--model FILE] [--precision fp32|int8] [--n 64]
                                       [--batch-sizes 1,4,8,16,32]

showtell: ``showtell.load(model, precision=...).caption(paths, beam_size=3, batch_size=B)`` with the model users get,
the built-in one (``--model`` for another): image loading, preprocessing, the checkpoint's encoder (int8 where this
CPU runs it, see showtell.quantize; ``--precision`` picks) and batched beam search (with int8, the decoder in bf16
where the CPU computes bf16 natively). The default batch size is the
captioner's own. ``--batch-sizes`` also times each of several batch sizes (captioning and encoder only).
The encoder runs in chunks of ``captioner.encoder_batch`` images; ``unchunked`` times the same call with
the whole batch in one forward pass, ``chunking_speedup`` is their ratio (not in ``--quick``).

encoder only: the same call with the decoder replaced by a stub (loading, preprocessing and the encoder), so
``decoder_share`` = captioning time / encoder-only time says what the decoder costs on top.

reference: ``benchmarks/reference.py``'s CVND inference, one image at a time, fp32: ResNet-50 (random weights),
then greedy ``sample()`` with a ``.item()`` per step. Its decoder is untrained, and an untrained decoder rarely emits
<end>, so it would run all 20 steps for every image where a trained one stops after the caption: each image's
``sample()`` therefore runs as many steps as showtell's caption of it has words, plus the one that emits <end>.
Neither side is handicapped by the length of its captions.

Images are the first ``--n`` Flickr8k test images. Each measurement is the best of ``--rounds``, the contenders
alternating, in one process (other load on the machine hits both alike: read the ratio, not the bare times).
Both sides' settings are printed with the result; the last line is a JSON object, ``ratio`` = showtell images/s /
reference images/s.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import cli_environment, corpus, emit, peak_rss_mb
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
    ap.add_argument("--quick", action="store_true", help="a smaller run, about a minute")
    ap.add_argument("--model", help="checkpoint (default: the built-in model)")
    ap.add_argument("--precision", choices=("fp32", "int8"), help="showtell's encoder (default: showtell's choice)")
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
    from showtell.captioner import Captioner, resolve_model

    paths = [str(r.image) for r in corpus().split("test")[:n]]
    default_bs = inspect.signature(Captioner.iter_caption).parameters["batch_size"].default
    batch_size = args.batch_size or default_bs
    sweep = sorted({int(b) for b in args.batch_sizes.split(",")}) if args.batch_sizes else []

    model = resolve_model(args.model)
    captioner = showtell.load(model, precision=args.precision)
    vocab = captioner.vocab
    ref = Reference(len(vocab), end_id=vocab.special.end)

    kwargs = {"beam_size": args.beam_size}
    results = captioner.caption(paths, batch_size=batch_size, **kwargs)  # warm-up, and the caption lengths
    steps = [len(r.caption.split()) + 1 if r.ok else 20 for r in results]  # the words, then <end>
    ref.caption(paths[0], max_len=steps[0])
    timers = {
        "reference": lambda: [ref.caption(p, max_len=s) for p, s in zip(paths, steps)],
        "showtell": lambda: results.__setitem__(slice(None), captioner.caption(paths, batch_size=batch_size,
                                                                               **kwargs)),
        "encoder": lambda: encoder_only(captioner, paths, batch_size),
    }
    best = dict.fromkeys(timers, float("inf"))
    if not args.quick:
        best["unchunked"] = float("inf")
    best_sweep = {b: [float("inf"), float("inf")] for b in sweep}
    for _ in range(rounds):
        for name, fn in timers.items():
            best[name] = min(best[name], timed(fn))
        if "unchunked" in best:
            chunk, captioner.encoder_batch = captioner.encoder_batch, 1 << 30  # the whole batch in one pass
            try:
                best["unchunked"] = min(best["unchunked"], timed(timers["showtell"]))
            finally:
                captioner.encoder_batch = chunk
        for b in sweep:
            best_sweep[b][0] = min(best_sweep[b][0], timed(lambda b=b: captioner.caption(paths, batch_size=b,
                                                                                            **kwargs)))
            best_sweep[b][1] = min(best_sweep[b][1], timed(lambda b=b: encoder_only(captioner, paths, b)))

    speed = {k: n / v for k, v in best.items()}
    words = [len(r.caption.split()) for r in results if r.ok]
    threads = torch.get_num_threads()
    settings = {
        "showtell": {"threads": threads, "batch_size": batch_size, "precision": captioner.precision,
                     "decoder_dtype": str(next(captioner.decoder.parameters()).dtype).removeprefix("torch."),
                     "beam_size": args.beam_size, "encoder": captioner.checkpoint.encoder, "model": str(model)},
        "reference": {"threads": threads, "batch_size": 1, "precision": "fp32", "beam_size": 1,
                      "encoder": "resnet50", "decoder_steps": "showtell's caption words + 1"},
    }
    for side, s in settings.items():
        print(f"{side:>9}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    print(f"images/s: showtell {speed['showtell']:.2f}, reference {speed['reference']:.2f}, "
          f"ratio {speed['showtell'] / speed['reference']:.2f} ({n} Flickr8k test images, best of {rounds})")
    record = {"benchmark": "caption_speed", "ratio": round(speed["showtell"] / speed["reference"], 2),
              "showtell_images_per_s": round(speed["showtell"], 2),
              "reference_images_per_s": round(speed["reference"], 2),
              "encoder_only_images_per_s": round(speed["encoder"], 2),
              "decoder_share": round(best["showtell"] / best["encoder"], 3), "encoder_batch": captioner.encoder_batch,
              "images": n, "rounds": rounds, "mean_words": round(sum(words) / max(len(words), 1), 1),
              "reference_mean_steps": round(sum(steps) / len(steps), 1), **settings,
              "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "peak_rss_mb": round(peak_rss_mb(), 1)}
    if "unchunked" in best:
        record["unchunked_images_per_s"] = round(speed["unchunked"], 2)
        record["chunking_speedup"] = round(best["unchunked"] / best["showtell"], 2)
    if sweep:
        record["by_batch_size"] = {b: {"caption_images_per_s": round(n / c, 2), "encoder_images_per_s": round(n / e, 2)}
                                   for b, (c, e) in best_sweep.items()}
    emit(record)


if __name__ == "__main__":
    main()
