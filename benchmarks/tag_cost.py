"""What tags add to captioning time: the same captioning call with and without tags, side by side in one run.

    python benchmarks/tag_cost.py [--model FILE] [--n 64] [--rounds 5]

``--n`` photos (examples/images repeated), beam 3, the captioner's default batch size, with ``tags=5`` and with
``tags=0``, alternating, the first of each round alternating too; each is the best of ``--rounds``, in wall time and
in this process's CPU time. On a shared, busy machine (2 cores, load 8) wall times of the same call varied by 50%
from round to round, so trust ``cpu_overhead`` and ``tagger_share`` there. ``tagger_only`` times the tagger alone on
the same number of feature rows: its whole cost, free of the noise of the rest. The last line is a JSON object:
``overhead`` = time with tags / time without - 1 (``cpu_overhead`` the same in CPU time), ``tagger_share`` = tagger
alone / time without tags.
"""

from __future__ import annotations

import argparse
import time

from _common import REPO, cli_environment, emit


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


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
    feats = torch.randn(args.n, captioner.encoder.feature_dim)
    runs = {"tags": lambda: captioner.caption(paths, beam_size=3, tags=5),
            "none": lambda: captioner.caption(paths, beam_size=3, tags=0),
            "tagger_only": lambda: captioner.tag_features(feats, 5)}
    wall, cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
    for i in range(args.rounds):
        for name in ("tags", "none", "tagger_only") if i % 2 else ("none", "tags", "tagger_only"):
            w, c = timed(runs[name])
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    emit({"benchmark": "tag_cost", "model": captioner.name, "photos": args.n, "rounds": args.rounds,
          "overhead": round(wall["tags"] / wall["none"] - 1, 4),
          "cpu_overhead": round(cpu["tags"] / cpu["none"] - 1, 4),
          "tagger_share": round(wall["tagger_only"] / wall["none"], 4),
          **{f"{k}_s": round(v, 3) for k, v in wall.items()}, **{f"{k}_cpu_s": round(v, 3) for k, v in cpu.items()}})


if __name__ == "__main__":
    main()
