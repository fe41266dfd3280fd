"""Rebuild the shipped default model in one command:

    python scripts/build_default_model.py [--root ../shared/data/flickr8k] [--out runs/flickr8k]

Trains with configs/flickr8k.toml (features are extracted and cached first), evaluates the best
dev checkpoint on the dev and test splits with beam 1/3/5, and writes an fp16 copy with that
record (command, data, metrics) to src/showtell/weights/flickr8k.safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    from showtell.captioner import WEIGHTS_DIR, Captioner
    from showtell.checkpoint import load_checkpoint, save_checkpoint
    from showtell.datasets import load_corpus
    from showtell.decoding import DecodingOptions
    from showtell.evaluate import evaluate_records, most_common_captions
    from showtell.train import TrainConfig, Trainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.environ.get("SHOWTELL_FLICKR8K", str(REPO.parent / "shared/data/flickr8k")))
    p.add_argument("--config", default=str(REPO / "configs" / "flickr8k.toml"))
    p.add_argument("--out", default=str(REPO / "runs" / "flickr8k"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--dest", default=str(WEIGHTS_DIR / "flickr8k.safetensors"))
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    values = {**asdict(TrainConfig()), **TrainConfig.from_toml(args.config), "root": args.root,
              "cache_dir": args.cache_dir}
    config = TrainConfig.from_dict(values)
    t0 = time.time()
    state = Trainer(config, args.out, resume=args.resume).run()
    train_seconds = time.time() - t0

    best = Path(args.out) / "best.safetensors"
    captioner = Captioner(load_checkpoint(best))
    corpus = load_corpus("flickr8k", args.root)
    metrics: dict[str, dict] = {}
    samples: dict[str, list] = {}
    t1 = time.time()
    for split in ("dev", "test"):
        for beam in (1, 3, 5):
            scores, summary, records, captions = evaluate_records(
                captioner, corpus.split(split), DecodingOptions(beam_size=beam, max_length=20), args.cache_dir)
            metrics[f"{split}_beam{beam}"] = {**scores.values, **summary}
            print(f"{split} beam {beam}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.values.items())
                  + f"  distinct {summary['distinct']:.1%}", file=sys.stderr)
            if split == "test" and beam == 3:
                samples = {"most_common": most_common_captions(captions, 10),
                           "first": [(r.image.name, c) for r, c in zip(records[:20], captions[:20])]}
    eval_seconds = time.time() - t1
    ckpt = load_checkpoint(best)
    meta = dict(ckpt.meta)
    meta["name"] = "flickr8k"
    meta["metrics"] = {**metrics, "scored_with": "showtell evaluate (pycocoevalcap scorers, PTB tokenizer)"}
    meta["training"] = {**meta.get("training", {}), "command": "python scripts/build_default_model.py",
                        "config_file": "configs/flickr8k.toml", "data": "Flickr8k (Hodosh et al. 2013), "
                        "standard 6000/1000/1000 split", "train_seconds": round(state["train_seconds"]),
                        "eval_seconds": round(eval_seconds), "best_epoch": state["best_epoch"]}
    meta["samples"] = samples
    meta.pop("train_state", None)
    save_checkpoint(args.dest, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, meta=meta, half=True)
    print(json.dumps({"dest": args.dest, "size_mb": round(Path(args.dest).stat().st_size / 1e6, 2),
                      "this_run_seconds": round(train_seconds), "epoch_seconds": round(state["train_seconds"]),
                      "eval_seconds": round(eval_seconds),
                      "test_beam3": metrics["test_beam3"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
