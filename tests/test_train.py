"""A tiny real training run on shared Flickr8k images: trains, beats the untrained model on dev
CIDEr, writes its files, resumes, and its checkpoint captions and evaluates through the CLI."""

import csv
import json
import subprocess
import sys

import pytest

from showtell.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ARGS = ["--limit", "300", "--encoder", "efficientnet_lite0", "--hidden-dim", "256", "--batch-size", "32",
        "--eval-max-length", "16", "--patience", "5", "--quiet"]


def showtell(*args, check=True):
    return subprocess.run([sys.executable, "-m", "showtell", *map(str, args)], capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def run(flickr8k, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir", tmp / "cache",
             "--epochs", 3, *ARGS)
    return out, tmp


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_run_writes_its_files_and_beats_untrained(run):
    out, _ = run
    for name in ("best.safetensors", "last.safetensors", "metrics.csv", "training.png", "config.json"):
        assert (out / name).is_file(), name
    history = rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    best = load_checkpoint(out / "best.safetensors")
    untrained = best.meta["train_state"]["untrained_dev"]["CIDEr"]
    assert best.meta["metrics"]["dev"]["CIDEr"] > max(2 * untrained, untrained + 0.02)
    assert best.meta["config"]["encoder"] == "efficientnet_lite0"
    assert not best.extra_tensors  # the optimizer state rides only in last.safetensors
    assert load_checkpoint(out / "last.safetensors").tensors("optimizer/")


def test_resume_continues_the_run(run, flickr8k):
    out, tmp = run
    before = rows(out / "metrics.csv")
    showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir", tmp / "cache",
             "--epochs", 4, "--resume", *ARGS)
    after = rows(out / "metrics.csv")
    assert after[:3] == before and int(after[-1]["epoch"]) == 4
    refused = showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir",
                       tmp / "cache", *ARGS, check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr


def test_evaluate_and_caption_with_the_checkpoint(run, flickr8k, tmp_path):
    out, tmp = run
    res = showtell("evaluate", "--model", out / "best.safetensors", "--dataset", "flickr8k", "--root", flickr8k,
                   "--split", "test", "--limit", 40, "--cache-dir", tmp / "cache", "--json", "--quiet",
                   "--results", tmp_path / "results.json")
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0 <= metrics[key] <= 10, key
    assert metrics["BLEU-1"] > 0.3 and metrics["images"] == 40 and metrics["beam_size"] == 3
    assert 0 < metrics["distinct"] <= 1
    assert "SPICE" in res.stdout and "skipped" in res.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 40 and set(results[0]) == {"image_id", "caption"}
