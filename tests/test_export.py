"""ONNX export: checked graphs, preprocessing and beam search that match torch, captions without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import numpy_model
from PIL import Image

import showtell
from showtell.checkpoint import load_checkpoint, save_checkpoint
from showtell.decoding import DecodingOptions, decode
from showtell.encoders import Preprocess, encoder_info
from showtell.export import CONFIG_NAME, FILES, TAGGER_FILE, TOLERANCE, export_onnx
from showtell.images import load_image
from showtell.model import CaptionModel, Ensemble, ModelConfig
from showtell.onnx_runtime import beam_search, load_onnx, preprocess

pytest.importorskip("onnxruntime")


def showtell_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "showtell", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported through the CLI."""
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    run = showtell_cli("export", "--format", "onnx", "--model", tiny_checkpoint, "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    assert "max abs diff vs torch: encoder" in run.stdout
    return out


def _sharp(checkpoint: Path, seed: int) -> CaptionModel:
    """The checkpoint's model with larger random weights: captions that differ per photo, some short, some empty."""
    model = load_checkpoint(checkpoint).model
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 3.0 / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def random_models(tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Checkpoints with larger random weights and their ONNX exports: "sharp", one model, and "ensemble", two such
    models folded into one."""
    ckpt = load_checkpoint(tiny_checkpoint)
    models = {"sharp": _sharp(tiny_checkpoint, 1),
              "ensemble": Ensemble.of([_sharp(tiny_checkpoint, 1), _sharp(tiny_checkpoint, 2)])}
    made = {}
    for name, model in models.items():
        path = tmp_path_factory.mktemp("ckpt") / f"{name}.safetensors"
        save_checkpoint(path, model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, meta={"name": name})
        assert type(load_checkpoint(path).model) is type(model)
        folder = tmp_path_factory.mktemp("onnx") / name
        export_onnx(path, folder, quiet=True)
        made[name] = (path, folder)
    return made


def test_export_folder_has_checked_graphs_and_a_complete_config(tiny_export, tiny_checkpoint):
    import onnx

    config = json.loads((tiny_export / CONFIG_NAME).read_text())
    ckpt = load_checkpoint(tiny_checkpoint)
    for name in [*FILES.values(), TAGGER_FILE]:
        onnx.checker.check_model(onnx.load(str(tiny_export / name)), full_check=True)
    assert config["files"] == {**FILES, "tagger": TAGGER_FILE}
    assert config["tags"]["rule"] == "mean_prob" and config["tags"]["heads"] == ["lite0"]
    assert len(config["tags"]["lemmas"]) == 1000 and config["tags"]["lemmas"][281] == ["tabby", "tabby cat"]
    assert config["vocab"]["tokens"] == ckpt.vocab.itos
    assert config["special_ids"] == {"pad": 0, "start": 1, "end": 2, "unk": 3}
    assert config["preprocess"] == ckpt.preprocess == encoder_info("efficientnet_lite0")["preprocess"]
    assert config["encoder"] == "efficientnet_lite0" and config["name"] == "tiny"
    assert config["model"] == ckpt.model.config.to_dict()
    for name, diff in config["parity"].items():
        assert 0 <= diff <= TOLERANCE[name]
    # the batch dimension is dynamic (exported with 2 rows)
    captioner = load_onnx(tiny_export)
    images = np.random.default_rng(0).standard_normal((5, 3, 224, 224)).astype(np.float32)
    assert captioner.features(images).shape == (5, 1280)


@pytest.mark.parametrize("pre", [encoder_info("efficientnet_lite0")["preprocess"],
                                 encoder_info("resnet50")["preprocess"]], ids=["bicubic", "bilinear-crop"])
def test_numpy_preprocessing_matches_torchvision(pre, photos):
    transform = Preprocess.from_dict(pre).transform(train=False)
    rng = np.random.default_rng(0)
    odd = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           [(224, 224), (301, 97), (13, 700), (255, 256), (1, 1)]]
    images = [load_image(p) for p in sorted(photos.iterdir())] + odd + [odd[1].convert("L")]
    for img in images:
        expected = transform(img).numpy()
        got = preprocess(img, **pre)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() == 0.0


def test_numpy_beam_search_follows_the_torch_rules_bit_for_bit():
    """Same model outputs in, same hypotheses out: tokens, log-probabilities, scores, finished flags."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcomes = set()
        for seed in range(4):
            torch.manual_seed(seed)
            model = CaptionModel(ModelConfig(vocab_size=12, feature_dim=6, embed_dim=8, hidden_dim=16, dropout=0.0))
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(4.0)
            model.eval()
            features = torch.randn(7, 6)
            init, step = numpy_model(model)
            for beam, max_length, alpha in [(1, 6, None), (2, 3, None), (3, 8, None), (4, 8, 0.7), (5, 1, None)]:
                options = DecodingOptions(beam_size=beam, max_length=max_length, length_penalty=alpha,
                                          num_return=beam)
                expected = decode(model, features, options)
                got = beam_search(init, step, features.numpy(), beam_size=beam, max_length=max_length,
                                  length_penalty=alpha, num_return=beam)
                assert [[(h.tokens, h.logprob, h.score, h.finished) for h in hs] for hs in got] == [
                    [(h.tokens, h.logprob, h.score, h.finished) for h in hs] for hs in expected]
                outcomes |= {(h.finished, len(h.tokens) == max_length) for hs in got for h in hs}
        assert outcomes == {(True, False), (True, True), (False, True)}  # short, ended at the limit, cut off
    finally:
        torch.set_num_threads(threads)


def test_numpy_beam_search_breaks_ties_to_the_lower_token_id():
    """With every word equally likely, <end> (id 2, the lowest allowed id) wins."""
    vocab = 9

    def init(features):
        return np.zeros((1, len(features), 4), np.float32), np.zeros((1, len(features), 4), np.float32)

    def step(tokens, state):
        return np.full((len(tokens), vocab), -np.log(vocab), np.float32), state

    for beam in (1, 3):
        hyps = beam_search(init, step, np.zeros((2, 3), np.float32), beam_size=beam, num_return=beam)
        assert all(hs[0].tokens == [] and hs[0].finished for hs in hyps)
        assert {t for hs in hyps for h in hs for t in h.tokens} <= {4}  # the lowest word id (3 is <unk>)
        assert len(hyps[0]) == beam


@pytest.mark.parametrize("which", ["tiny", "sharp", "ensemble"])
@pytest.mark.parametrize("beam", [1, 3])
def test_onnx_captions_equal_torch_captions(which, beam, request, photos):
    if which == "tiny":
        checkpoint, folder = request.getfixturevalue("tiny_checkpoint"), request.getfixturevalue("tiny_export")
    else:
        checkpoint, folder = request.getfixturevalue("random_models")[which]
    images = sorted(photos.iterdir())
    expected = showtell.load(checkpoint, precision="fp32").caption(images, beam_size=beam, num_return=beam)
    got = load_onnx(folder).caption(images, beam_size=beam, num_return=beam)
    assert [r.caption for r in got] == [r.caption for r in expected]
    assert [[c for c, _ in r.alternatives] for r in got] == [[c for c, _ in r.alternatives] for r in expected]
    assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=1e-4)
    if which != "tiny":  # the captions depend on the photo
        assert len({r.caption for r in expected}) >= 3


@pytest.mark.parametrize("which", ["tiny", pytest.param("pair", marks=pytest.mark.slow)])
def test_onnx_tags_equal_torch_tags(which, request, photos, tmp_path_factory):
    """The tagger graph of a one-network encoder, and of the paired one (two heads, mean_prob)."""
    if which == "tiny":
        checkpoint, folder = request.getfixturevalue("tiny_checkpoint"), request.getfixturevalue("tiny_export")
    else:
        ckpt, info = load_checkpoint(request.getfixturevalue("tiny_checkpoint")), encoder_info("efficientnet_lite0+2")
        torch.manual_seed(0)
        model = CaptionModel(ModelConfig(vocab_size=len(ckpt.vocab), feature_dim=2560, embed_dim=32, hidden_dim=64))
        checkpoint = tmp_path_factory.mktemp("ckpt") / "pair.safetensors"
        save_checkpoint(checkpoint, model.eval(), ckpt.vocab, info["name"], info["preprocess"], meta={"name": "pair"})
        folder = tmp_path_factory.mktemp("onnx") / "pair"
        assert export_onnx(checkpoint, folder, quiet=True)["tags"]["heads"] == ["lite0", "lite2"]
    images = sorted(photos.iterdir())
    expected = showtell.load(checkpoint, precision="fp32").caption(images, beam_size=1)
    got = load_onnx(folder).caption(images, beam_size=1)
    for g, e in zip(got, expected, strict=True):
        assert len(e.tags) == 5 and [label for label, _ in g.tags] == [label for label, _ in e.tags]
        assert [p for _, p in g.tags] == pytest.approx([p for _, p in e.tags], abs=1e-3)
    assert {r.tags[0][0] for r in got} >= {"Egyptian cat", "espresso"}


def test_onnx_export_without_a_tagger_says_why(tiny_export, photos, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(tiny_export, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["files"]["tagger"], config["tags"]  # as exported before tags, or from a fine-tuned encoder
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    result = load_onnx(folder).caption(photos / "coffee.jpg")[0]
    assert result.caption and result.tags == [] and result.tags_note == "no tags: this export has no tagger.onnx"
    config["tags_note"] = "no tags: encoder efficientnet_lite0 was fine-tuned with this model, so ..."
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert load_onnx(folder).caption(photos / "coffee.jpg")[0].tags_note == config["tags_note"]

    config = json.loads((tiny_export / CONFIG_NAME).read_text())
    for bad in ({"lemmas": "tabby"}, {"lemmas": [["tabby"]] * 999}, {"lemmas": [[1]] * 1000}, []):
        (folder / CONFIG_NAME).write_text(json.dumps({**config, "tags": bad}))
        run = showtell_cli("caption", photos / "coffee.jpg", "--runtime", "onnx", "--model", folder)
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert run.stderr.startswith(f"showtell: error: {folder / CONFIG_NAME}: "), run.stderr
        assert "tags: lemmas must be a list" in run.stderr or "tags names 999 classes" in run.stderr, run.stderr


def test_onnx_caption_cli_runs_without_torch(tiny_export, tiny_checkpoint, photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    images = [*sorted(photos.iterdir()), bad]
    code = ("import sys; sys.modules['torch'] = None; from showtell.cli import main; "
            "code = main(sys.argv[1:]); "
            "assert not [m for m, v in sys.modules.items() if v and m.startswith(('torch', 'timm'))]; sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", code, "caption", *images, "--runtime", "onnx", "--model", tiny_export,
                          "--format", "jsonl", "--beam-size", "3"], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr  # one unreadable image
    assert run.stderr.strip() == f"showtell: error: {bad}: not an image file (unrecognised format)"
    *rows, failed = [json.loads(line) for line in run.stdout.splitlines()]  # a row for every input
    expected = showtell.load(tiny_checkpoint).caption(images[:-1], beam_size=3)
    assert [(r["image"], r["caption"]) for r in rows] == [(r.image, r.caption) for r in expected]
    assert failed == {"image": str(bad), "caption": None, "score": None,
                      "error": f"{bad}: not an image file (unrecognised format)"}


def test_onnx_runtime_errors_are_one_line(tiny_checkpoint, photos, tmp_path):
    for model, message in [(tiny_checkpoint, "not an ONNX export folder"), (None, "needs --model DIR")]:
        args = ["caption", photos / "coffee.jpg", "--runtime", "onnx"] + (["--model", model] if model else [])
        run = showtell_cli(*args)
        assert run.returncode == 1 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1
