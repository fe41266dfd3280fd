"""Captioning speed of two checkpoints side by side (e.g. Show and Tell against Show, Attend and Tell).

    python benchmarks/decoder_speed.py A.safetensors B.safetensors [--n 48] [--rounds 3] [--beam-size 3]

Each model captions the first ``--n`` Flickr8k test photos through the Python API as users get it
(``showtell.load(model, precision="fp32").caption(paths, beam_size=3, tags=0)``: loading, preprocessing, the fp32
encoder, batched beam search; an attention model also computes its per-word maps). fp32 for both, because the int8
encoder gives pooled features only. Each measurement is the best of ``--rounds``, the two alternating in one process,
so other load on the machine hits both alike: read the ratio. The last line is JSON; ``ratio`` = B images/s /
A images/s.
"""

from __future__ import annotations

import argparse
import time

from _common import cli_environment, corpus, emit


def main() -> None:
    cli_environment()
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=3)
    args = p.parse_args()

    import showtell

    paths = [r.image for r in corpus().split("test")[: args.n]]
    captioners = {name: showtell.load(path, device="cpu", precision="fp32", ground=False)
                  for name, path in (("a", args.a), ("b", args.b))}
    for c in captioners.values():  # warm up: first-call allocations and lazy imports
        c.caption(paths[:4], beam_size=args.beam_size, tags=0)
    best = dict.fromkeys(captioners, float("inf"))
    for _ in range(args.rounds):
        for name, c in captioners.items():
            t0 = time.perf_counter()
            c.caption(paths, beam_size=args.beam_size, tags=0)
            best[name] = min(best[name], time.perf_counter() - t0)
    rates = {name: len(paths) / seconds for name, seconds in best.items()}
    for name, path in (("a", args.a), ("b", args.b)):
        print(f"{name}: {path} ({captioners[name].model.config.decoder}): {rates[name]:.1f} images/s")
    emit({"images": len(paths), "beam_size": args.beam_size, "a_images_s": round(rates["a"], 2),
          "b_images_s": round(rates["b"], 2), "ratio": round(rates["b"] / rates["a"], 3)})


if __name__ == "__main__":
    main()
