"""What tags add to captioning time: the same captioning call with and without tags, side by side in one run.

    python benchmarks/tag_cost.py [--model FILE] [--n 64] [--rounds 5]

``--n`` photos (examples/images repeated), beam 3, the captioner's default batch size, with ``tags=5`` and with
``tags=0``, alternating; each is the best of ``--rounds``. ``tagger_only`` times the tagger alone on the same
number of feature rows (its whole cost, free of the noise of the rest). The last line is a JSON object:
``overhead`` = time with tags / time without - 1.
"""

from __future__ import annotations

import argparse
import time

from _common import REPO, cli_environment, emit


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the built-in model)")
    ap.add_argument("--n", type=int, default=64, help="photos (default 64)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds, best of (default 5)")
    args = ap.parse_args()
    cli_environment()

    import torch

    import showtell

    photos = sorted(str(p) for p in (REPO / "examples" / "images").glob("*.jpg"))
    paths = (photos * (args.n // len(photos) + 1))[: args.n]
    captioner = showtell.load(args.model)
    captioner.caption(paths[:4], beam_size=3)  # warm-up
    best = {"tags": float("inf"), "none": float("inf"), "tagger_only": float("inf")}
    feats = torch.randn(args.n, captioner.encoder.feature_dim)
    for _ in range(args.rounds):
        best["tags"] = min(best["tags"], timed(lambda: captioner.caption(paths, beam_size=3, tags=5)))
        best["none"] = min(best["none"], timed(lambda: captioner.caption(paths, beam_size=3, tags=0)))
        best["tagger_only"] = min(best["tagger_only"], timed(lambda: captioner.tag_features(feats, 5)))
    emit({"benchmark": "tag_cost", "model": captioner.name, "photos": args.n, "rounds": args.rounds,
          "overhead": round(best["tags"] / best["none"] - 1, 4),
          "tagger_share": round(best["tagger_only"] / best["none"], 4),
          **{f"{k}_s": round(v, 3) for k, v in best.items()}})


if __name__ == "__main__":
    main()
