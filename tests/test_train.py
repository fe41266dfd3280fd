"""A tiny real training run on shared Flickr8k images: trains, beats the untrained model on dev
CIDEr, writes its files, resumes, and its checkpoint captions and evaluates through the CLI."""

import csv
import json
import subprocess
import sys

import pytest

from showtell.checkpoint import load_checkpoint
from showtell.model import Ensemble

pytestmark = pytest.mark.slow

ARGS = ["--limit", "300", "--encoder", "efficientnet_lite0", "--hidden-dim", "256", "--batch-size", "32",
        "--eval-max-length", "16", "--patience", "5", "--quiet"]


def showtell(*args, check=True):
    return subprocess.run([sys.executable, "-m", "showtell", *map(str, args)], capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def run(flickr8k, tmp_path_factory, feature_cache):
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir", feature_cache,
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


def test_resume_continues_the_run(run, flickr8k, feature_cache):
    out, tmp = run
    before = rows(out / "metrics.csv")
    showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir", feature_cache,
             "--epochs", 4, "--resume", *ARGS)
    after = rows(out / "metrics.csv")
    assert after[:3] == before and int(after[-1]["epoch"]) == 4
    refused = showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir",
                       feature_cache, *ARGS, check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr


def test_evaluate_and_caption_with_the_checkpoint(run, flickr8k, tmp_path, feature_cache):
    out, tmp = run
    res = showtell("evaluate", "--model", out / "best.safetensors", "--dataset", "flickr8k", "--root", flickr8k,
                   "--split", "test", "--limit", 40, "--cache-dir", feature_cache, "--json", "--quiet",
                   "--results", tmp_path / "results.json")
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0 <= metrics[key] <= 10, key
    assert metrics["BLEU-1"] > 0.3 and metrics["images"] == 40 and metrics["beam_size"] == 3
    assert 0 < metrics["distinct"] <= 1
    assert "SPICE" in res.stdout and "skipped" in res.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 40 and set(results[0]) == {"image_id", "caption"}


def test_killed_run_resumes_to_the_same_metrics(flickr8k, tmp_path, feature_cache):
    """SIGKILL in the middle of epoch 2, --resume, and the run ends exactly where an uninterrupted one does."""
    import os
    import signal
    import time

    args = ["train", "--dataset", "flickr8k", "--root", flickr8k, "--cache-dir", feature_cache, "--epochs", 3,
            *ARGS, "--batch-size", 8]
    showtell(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "showtell", *map(str, args), "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # into epoch 2 (about 190 batches of 8)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(rows(killed / "metrics.csv")) == 1
    showtell(*args, "--out", killed, "--resume")
    straight, resumed = rows(tmp_path / "straight" / "metrics.csv"), rows(killed / "metrics.csv")
    assert len(resumed) == len(straight) == 3
    for a, b in zip(straight, resumed):
        for key in ("train_loss", "BLEU-4", "CIDEr", "dev_distinct"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9), key


def test_end_to_end_fine_tuning_writes_a_checkpoint_that_captions(flickr8k, tmp_path, photos):
    """Images through the encoder every batch (random crop/flip), last stage fine-tuned: same checkpoint format."""
    import showtell as api

    out = tmp_path / "e2e"
    showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir", tmp_path / "c",
             "--end-to-end", "--fine-tune", "--limit", 12, "--encoder", "efficientnet_lite0", "--epochs", 1,
             "--batch-size", 16, "--hidden-dim", 64, "--eval-max-length", 8, "--quiet")
    ckpt = load_checkpoint(out / "best.safetensors")
    tuned = ckpt.tensors("encoder/")
    assert tuned and any("conv_head" in k for k in tuned)
    assert not (tmp_path / "c").exists()  # no feature cache on this path
    result = api.load(out / "best.safetensors").caption(photos / "chelsea.jpg")[0]
    assert result.ok and result.caption


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_self_critical_stage_after_cross_entropy(run, flickr8k, feature_cache, tmp_path, baseline):
    import shutil

    out = tmp_path / "scst"
    shutil.copytree(run[0], out)
    epochs = len(rows(out / "metrics.csv"))
    showtell("train", "--dataset", "flickr8k", "--root", flickr8k, "--out", out, "--cache-dir", feature_cache,
             "--epochs", epochs, "--resume", "--scst-epochs", 1, "--scst-baseline", baseline, *ARGS)
    history = rows(out / "metrics.csv")
    assert [r["stage"] for r in history] == ["xe"] * epochs + ["scst"]
    assert 0 < float(history[-1]["train_loss"]) < 10  # the mean CIDEr-D reward of the samples
    assert float(history[-1]["CIDEr"]) > 0
    assert load_checkpoint(out / "last.safetensors").meta["config"]["scst_baseline"] == baseline


def test_self_critical_stage_of_a_folded_ensemble(run, flickr8k, feature_cache, tmp_path):
    """--init starts from a checkpoint: two checkpoints folded into one ensemble get one self-critical epoch as
    one model; the starting model is the one to beat and its record is kept; a changed starting file, a missing
    one and cross-entropy on an ensemble are refused in one line, before any work."""
    out, _ = run
    folded = tmp_path / "ensemble.safetensors"
    showtell("ensemble", out / "best.safetensors", out / "last.safetensors", "--out", folded)
    args = ["train", "--dataset", "flickr8k", "--root", flickr8k, "--cache-dir", feature_cache, *ARGS]
    showtell(*args, "--init", folded, "--out", tmp_path / "scst", "--epochs", 0, "--scst-epochs", 1)
    history = rows(tmp_path / "scst" / "metrics.csv")
    assert [r["stage"] for r in history] == ["scst"]
    best = load_checkpoint(tmp_path / "scst" / "best.safetensors")
    assert isinstance(best.model, Ensemble) and len(best.model.members) == 2
    assert [m["file"] for m in best.meta["init"]["members"]] == ["best.safetensors", "last.safetensors"]
    state = best.meta["train_state"]
    assert state["best_cider"] == pytest.approx(max(state["init_dev"]["CIDEr"], float(history[0]["CIDEr"])), abs=1e-5)

    showtell("ensemble", out / "last.safetensors", out / "best.safetensors", "--out", folded)  # another file now
    changed = showtell(*args, "--init", folded, "--out", tmp_path / "scst", "--epochs", 0, "--scst-epochs", 2,
                       "--resume", check=False)
    assert changed.returncode == 1 and "changed since" in changed.stderr
    for bad, message in ((folded, "--epochs 0"), (tmp_path / "missing.safetensors", "missing.safetensors")):
        refused = showtell(*args, "--init", bad, "--out", tmp_path / "xe", "--epochs", 1, check=False)
        assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "xe").exists()


def test_end_to_end_unreadable_photo_is_one_line(tmp_path, photos):
    """Photos are decoded in loader workers end to end; a bad one still stops the run with one line, no traceback."""
    import shutil

    (tmp_path / "img").mkdir()
    rows = []
    for name in ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]:
        shutil.copyfile(photos / name, tmp_path / "img" / name)
        split = "dev" if name == "rocket.jpg" else "train"
        rows += [f"{name},a photo of a thing number {j},{split}" for j in range(3)]
    (tmp_path / "img" / "coffee.jpg").write_bytes((photos / "coffee.jpg").read_bytes()[:300])  # truncated JPEG
    (tmp_path / "captions.txt").write_text("image,caption,split\n" + "\n".join(rows) + "\n")
    r = showtell("train", "--dataset", "csv", "--root", tmp_path, "--images", tmp_path / "img", "--out",
                 tmp_path / "run", "--end-to-end", "--encoder", "efficientnet_lite0", "--epochs", 1, "--min-count", 1,
                 "--batch-size", 4, "--hidden-dim", 32, "--num-workers", 2, "--quiet", check=False)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("showtell: error: ") and "coffee.jpg" in r.stderr, r.stderr
