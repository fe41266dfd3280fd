"""Rebuild the shipped default model in one command:

    python scripts/build_default_model.py [--root ../shared/data/flickr8k] [--out runs/flickr8k] [--jobs 2]

Reads configs/flickr8k.toml: the [train] settings of one model and the [ensemble] seeds. Extracts and caches the
features once, trains one model per seed with cross-entropy (``showtell train``, ``--jobs`` at a time, one thread
each), folds the members' best dev checkpoints into one ensemble checkpoint, trains that with the self-critical
stage (``showtell train --init ... --epochs 0``, its best epoch picked by dev CIDEr with beam 3), stores its
weights as int8 (``--weights``), evaluates that on the dev split with beam 1/3/5 (and each member alone with beam 3),
then, once and last, on the test split (and the first member alone, the single cross-entropy model the papers'
figures compare with), and writes it with that record (command, data, metrics) to
src/showtell/weights/flickr8k.safetensors. Every choice is made on dev; test is printed at the end and chooses
nothing.
``--resume`` continues interrupted runs and skips finished ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEAM = 3  # the beam showtell captions, evaluates and serves with by default: the self-critical epoch is picked by it
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def seeds_of(config_file: str) -> list[int]:
    from showtell.config import read_toml

    seeds = read_toml(config_file).get("ensemble", {}).get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        sys.exit(f"{config_file}: [ensemble] seeds must be a list of distinct integers")
    return seeds


def train_members(args: argparse.Namespace, seeds: list[int], cache_dir: str | None) -> list[Path]:
    """Run ``showtell train`` once per seed, ``args.jobs`` at a time (one thread each when several run at once);
    the members' best checkpoints. When one fails, the others are stopped (``--resume`` continues them all)."""
    jobs = min(args.jobs, len(seeds))
    env = dict(os.environ, OMP_NUM_THREADS="1") if jobs > 1 else dict(os.environ)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    waiting, running = list(seeds), {}
    try:
        _schedule(args, out, waiting, running, jobs, env, cache_dir)
    finally:
        for proc, log in running.values():  # a failure or Ctrl-C: no member keeps writing behind our back
            proc.terminate()
            proc.wait()
            log.close()
    return [out / f"seed-{seed}" / "best.safetensors" for seed in seeds]


def _train_command(args: argparse.Namespace, run: Path, cache_dir: str | None, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "showtell", "train", "--config", args.config, "--root", args.root,
           "--out", str(run), "--quiet", *extra]
    cmd += ["--cache-dir", cache_dir] if cache_dir else []
    return cmd + (["--resume"] if args.resume and (run / "last.safetensors").is_file() else [])


def _schedule(args, out: Path, waiting: list[int], running: dict, jobs: int, env: dict, cache_dir: str | None) -> None:
    while waiting or running:
        while waiting and len(running) < jobs:
            seed = waiting.pop(0)
            run = out / f"seed-{seed}"
            cmd = _train_command(args, run, cache_dir, "--seed", str(seed), "--scst-epochs", "0")
            log = open(out / f"seed-{seed}.log", "a")
            running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            print(f"member seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        time.sleep(5)
        for seed, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[seed]
            if proc.returncode:
                sys.exit(f"member seed {seed} failed; see {out / f'seed-{seed}.log'}")
            print(f"member seed {seed} done", file=sys.stderr, flush=True)


def main() -> int:
    from showtell.captioner import WEIGHTS_DIR, Captioner
    from showtell.checkpoint import WEIGHTS, fold_checkpoints, load_checkpoint, save_checkpoint
    from showtell.datasets import load_corpus
    from showtell.decoding import DecodingOptions
    from showtell.errors import ShowtellError
    from showtell.evaluate import evaluate_records, most_common_captions
    from showtell.features import extract_features
    from showtell.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.environ.get("SHOWTELL_FLICKR8K", str(REPO.parent / "shared/data/flickr8k")))
    p.add_argument("--config", default=str(REPO / "configs" / "flickr8k.toml"))
    p.add_argument("--out", default=str(REPO / "runs" / "flickr8k"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--dest", default=str(WEIGHTS_DIR / "flickr8k.safetensors"))
    p.add_argument("--jobs", type=int, default=2, help="members trained at once (default 2: one per core)")
    p.add_argument("--weights", choices=WEIGHTS, default="int8",
                   help="how the shipped file stores its weights (default int8: the smallest; evaluated as stored)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if args.jobs < 1:
        p.error("--jobs must be at least 1")

    try:  # the config is checked before any work; its errors are one line
        config = TrainConfig.from_dict({**asdict(TrainConfig()), **TrainConfig.from_toml(args.config),
                                        "root": args.root})
    except ShowtellError as e:
        sys.exit(f"build_default_model: error: {e}")
    seeds = seeds_of(args.config)
    cache_dir = args.cache_dir or config.cache_dir
    t0 = time.time()
    corpus = load_corpus("flickr8k", args.root)
    for split, flip in (("train", config.flip), ("dev", False), ("test", False)):  # once, before the members
        extract_features([r.image for r in corpus.split(split)], config.encoder, cache_dir, flip=flip)
    feature_seconds = time.time() - t0
    members = train_members(args, seeds, cache_dir)

    out = Path(args.out)
    start = members[0]
    if len(members) > 1:
        start = out / "ensemble.safetensors"
        fold_checkpoints(members, start)
    model_file = start
    if config.scst_epochs:  # the self-critical stage, on the folded ensemble as one model
        cmd = _train_command(args, out / "scst", cache_dir, "--init", str(start), "--epochs", "0",
                             "--eval-beam-size", str(BEAM))
        print(f"self-critical stage: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        with open(out / "scst.log", "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"the self-critical stage failed; see {out / 'scst.log'}")
        model_file = out / "scst" / "best.safetensors"
    train_seconds = time.time() - t0 - feature_seconds
    packed = out / f"packed-{args.weights}.safetensors"  # the model as shipped: what the metrics below are of
    ckpt = load_checkpoint(model_file)
    save_checkpoint(packed, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, meta=ckpt.meta,
                    weights=args.weights)
    shipped = load_checkpoint(packed)
    # scored as the model card's metrics table says: the fp32 encoder, the model's own captions
    captioner = Captioner(shipped, precision="fp32", ground=False)
    metrics: dict[str, dict] = {}
    samples: dict[str, list] = {}
    t1 = time.time()

    def score(split: str, beam: int, model: Captioner = captioner) -> tuple[dict, list, list]:
        scores, summary, records, captions = evaluate_records(
            model, corpus.split(split), DecodingOptions(beam_size=beam, max_length=20), cache_dir)
        return {**scores.values, **summary}, records, captions

    def show(label: str, values: dict) -> None:
        figures = "  ".join(f"{k} {values[k]:.3f}" for k in METRICS)
        print(f"{label}: {figures}  distinct {values['distinct']:.1%}", file=sys.stderr)

    def alone(member: Path) -> Captioner:
        return Captioner(load_checkpoint(member), precision="fp32", ground=False)

    # dev first: everything above was chosen on it. Test is scored once, at the end, and chooses nothing.
    for beam in (1, 3, 5):
        metrics[f"dev_beam{beam}"] = score("dev", beam)[0]
        show(f"dev beam {beam}", metrics[f"dev_beam{beam}"])
    members_alone = list(zip(seeds, members)) if len(members) > 1 else []
    for seed, member in members_alone:  # each member alone, on dev: what folding them together adds
        metrics[f"dev_beam3_member_seed{seed}"] = score("dev", 3, alone(member))[0]
        show(f"member seed {seed} (cross-entropy, alone) dev beam 3", metrics[f"dev_beam3_member_seed{seed}"])
    for beam in (1, 3, 5):
        metrics[f"test_beam{beam}"], records, captions = score("test", beam)
        if beam == 3:
            samples = {"most_common": most_common_captions(captions, 10),
                       "first": [(r.image.name, c) for r, c in zip(records[:20], captions[:20])]}
    if members_alone:  # one cross-entropy member alone, the model the papers' single-model figures compare with
        seed, member = members_alone[0]
        metrics[f"test_beam3_member_seed{seed}"] = score("test", 3, alone(member))[0]
    for key in [k for k in metrics if k.startswith("test_")]:
        show(key.replace("_", " "), metrics[key])
    eval_seconds = time.time() - t1
    epoch_seconds = 0.0  # every training epoch (members, self-critical stage), also of runs continued with --resume
    for member in members + ([model_file] if model_file != start else []):
        with open(member.parent / "metrics.csv") as f:
            epoch_seconds += sum(float(row["seconds"]) for row in csv.DictReader(f))

    meta = dict(shipped.meta)
    meta["name"] = "flickr8k"
    meta["metrics"] = {**metrics, "scored_with": "showtell evaluate (pycocoevalcap scorers, PTB tokenizer)"}
    meta["training"] = {**meta.get("training", {}), "command": "python scripts/build_default_model.py",
                        "config_file": "configs/flickr8k.toml", "seeds": seeds, "weights": args.weights,
                        "data": "Flickr8k (Hodosh et al. 2013), standard 6000/1000/1000 split",
                        "feature_seconds": round(feature_seconds), "train_seconds": round(train_seconds),
                        "epoch_seconds": round(epoch_seconds),
                        "eval_seconds": round(eval_seconds)}
    meta["samples"] = samples
    meta.pop("train_state", None)
    save_checkpoint(args.dest, shipped.model, shipped.vocab, shipped.encoder, shipped.preprocess, meta=meta,
                    weights=args.weights)
    print(json.dumps({"dest": args.dest, "size_mb": round(Path(args.dest).stat().st_size / 1e6, 2),
                      "seconds": {"features": round(feature_seconds), "training": round(train_seconds),
                                  "epochs": round(epoch_seconds),
                                  "evaluation": round(eval_seconds), "total": round(time.time() - t0)},
                      "test_beam3": metrics["test_beam3"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
