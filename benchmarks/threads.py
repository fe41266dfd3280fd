"""OpenMP waiting, before and after: torch's default (waiting threads spin) against OMP_WAIT_POLICY=PASSIVE (what
the showtell CLI sets unless the environment says otherwise), and one intra-op thread, in one run.

    python benchmarks/threads.py [--quick] [--rounds 2] [--variants default,passive,one-thread]

OpenMP reads its settings when torch loads, so each measurement is a fresh child process; the variants alternate,
round after round, so the load from other processes hits them alike; each figure is the best of the rounds.
Workloads: ``train``, showtell's ``CrossEntropyStage.epoch`` on the captions of 200 Flickr8k training images (random
fp16 features, the full vocabulary); ``caption``, ``showtell.load(model).caption`` of 16 Flickr8k test images
(beam 3). The result depends on what else runs on the machine: spinning wins on an idle machine and loses badly
when another process wants the cores. The last line is a JSON object; ``ratio`` = passive / default for training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def child(workload: str, model: str | None) -> None:
    import torch
    from _common import TRAINED_CHECKPOINT, corpus, random_checkpoint, train_vocab

    records = corpus()
    if workload == "train":
        from train_speed import make_stage

        stage, _, _ = make_stage(records.split("train"), 200, None)
        stage.epoch(1)
        start = time.perf_counter()
        stage.epoch(2)
        value = len(stage.items) / (time.perf_counter() - start)
    else:
        import showtell

        paths = [str(r.image) for r in records.split("test")[:16]]
        with tempfile.TemporaryDirectory() as tmp:
            if model is None and TRAINED_CHECKPOINT.is_file():
                model = str(TRAINED_CHECKPOINT)
            if model is None:
                model = random_checkpoint(Path(tmp) / "random.safetensors", train_vocab(records.split("train")))
            captioner = showtell.load(model)
            captioner.caption(paths[:4], beam_size=3)
            start = time.perf_counter()
            captioner.caption(paths, beam_size=3)
            value = len(paths) / (time.perf_counter() - start)
    print(json.dumps({"value": value, "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round of default vs passive, under 2 minutes")
    ap.add_argument("--rounds", type=int, help="rounds (default 2, quick 1)")
    ap.add_argument("--variants", help="comma-separated, of " + ", ".join(VARIANTS) +
                    " (default all; quick: default,passive)")
    ap.add_argument("--workloads", default="train,caption")
    ap.add_argument("--model", help="checkpoint for the caption workload (default runs/xe1/best.safetensors, "
                                    "else random weights)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model)
        return
    rounds = args.rounds or (1 if args.quick else 2)
    variants = (args.variants or ("default,passive" if args.quick else ",".join(VARIANTS))).split(",")
    workloads = args.workloads.split(",")
    best: dict[str, dict[str, float]] = {w: {} for w in workloads}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    for _ in range(rounds):
        for workload in workloads:
            for variant in variants:
                cmd = [sys.executable, __file__, "--child", workload] + (["--model", args.model] if args.model else [])
                out = subprocess.run(cmd, env={**base, **VARIANTS[variant]}, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1]
                value = json.loads(out)["value"]
                best[workload][variant] = max(best[workload].get(variant, 0.0), value)
    units = {"train": "captions_per_s", "caption": "images_per_s"}
    record: dict = {"benchmark": "threads", "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    for workload in workloads:
        for variant, value in best[workload].items():
            record[f"{workload}_{variant}_{units[workload]}"] = round(value, 1)
        if "default" in best[workload]:
            for variant, value in best[workload].items():
                if variant != "default":
                    record[f"{workload}_{variant}_vs_default"] = round(value / best[workload]["default"], 2)
    key = "train" if "train" in workloads else workloads[0]
    record["ratio"] = record.get(f"{key}_passive_vs_default")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
