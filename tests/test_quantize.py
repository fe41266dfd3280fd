"""The int8 encoder (showtell.quantize): it agrees with fp32 where captions are concerned, it is the default on a CPU
that runs it well, and everywhere else captioning falls back to fp32 saying why in one line."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

import showtell
from showtell import quantize
from showtell.errors import ShowtellError
from showtell.images import load_image

EXAMPLES = sorted((REPO / "examples" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def pair():
    """The shipped model loaded once in fp32; its int8 encoder built from the same fp32 encoder."""
    captioner = showtell.load(precision="fp32")
    int8 = quantize.Int8Encoder(quantize.int8_path(captioner.encoder.name), captioner.encoder)
    return captioner, int8


def test_shipped_int8_graph_is_small_and_built_from_the_shipped_encoder(pair):
    captioner, _ = pair
    path = quantize.int8_path("efficientnet_lite0+2")
    assert path.stat().st_size < 12e6  # the weights folder stays under 40 MB
    meta = quantize._graph_metadata(path)
    assert meta[quantize.SOURCE_KEY] == quantize.weights_sha256(captioner.encoder)
    assert "Flickr8k train" in meta[quantize.CALIBRATION_KEY]


def test_int8_features_and_captions_agree_with_fp32(pair):
    captioner, int8 = pair
    images = torch.stack([captioner.preprocess.transform()(load_image(p)) for p in EXAMPLES])
    with torch.inference_mode():
        fp32 = captioner.encoder(images)
        q = int8(images)
    assert q.shape == fp32.shape == (8, 2560) and q.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(q, fp32)
    assert cosine.min() > 0.975 and cosine.mean() > 0.985, cosine  # measured: min 0.981, mean 0.989
    fp32_captions = [c[0][0] for c in captioner.caption_features(fp32, captioner._options(3, 20, 1, {}))]
    int8_captions = [c[0][0] for c in captioner.caption_features(q, captioner._options(3, 20, 1, {}))]
    same = sum(a == b for a, b in zip(fp32_captions, int8_captions))
    assert same >= 4, list(zip(fp32_captions, int8_captions))  # measured 4 of 8; the rest differ in a few words
    shared = [len(set(a.split()) & set(b.split())) / len(set(a.split())) for a, b in zip(fp32_captions, int8_captions)]
    assert min(shared) >= 0.5, list(zip(fp32_captions, int8_captions))


def test_int8_is_the_default_where_the_cpu_runs_it(pair, monkeypatch, capsys):
    captioner, _ = pair
    monkeypatch.setattr(quantize, "cpu_lacks_int8", lambda: None)
    precision, encoder = quantize.feature_encoder(captioner.encoder)
    assert precision == "int8" and isinstance(encoder, quantize.Int8Encoder)
    assert (encoder.name, encoder.feature_dim, encoder.preprocess) == ("efficientnet_lite0+2", 2560,
                                                                       captioner.encoder.preprocess)
    assert quantize.feature_encoder(captioner.encoder, "fp32") == ("fp32", captioner.encoder)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("precision", [None, "int8"])
def test_a_cpu_without_vnni_captions_in_fp32_with_one_note(pair, monkeypatch, capsys, precision):
    captioner, _ = pair
    monkeypatch.setattr(quantize, "cpu_lacks_int8", lambda: "this CPU lacks VNNI int8 instructions")
    assert quantize.feature_encoder(captioner.encoder, precision) == ("fp32", captioner.encoder)
    err = capsys.readouterr().err
    assert err == "showtell: note: this CPU lacks VNNI int8 instructions; the encoder runs in fp32\n"


def test_without_onnxruntime_captioning_runs_in_fp32_with_one_note(pair, monkeypatch, capsys):
    captioner, _ = pair
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert quantize.feature_encoder(captioner.encoder) == ("fp32", captioner.encoder)
    assert capsys.readouterr().err.splitlines() == [
        "showtell: note: onnxruntime is not installed (pip install onnxruntime); the encoder runs in fp32"]


def test_cpu_check_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_vnni": False}, raising=False)
    monkeypatch.setattr(quantize.platform, "machine", lambda: "x86_64")
    assert quantize.cpu_lacks_int8() == "this CPU lacks VNNI int8 instructions"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx_vnni": True}, raising=False)
    assert quantize.cpu_lacks_int8() is None
    monkeypatch.setattr(quantize.platform, "machine", lambda: "arm64")
    assert "arm64" in quantize.cpu_lacks_int8()


def test_other_weights_keep_fp32_and_say_so_only_when_int8_was_asked(pair, monkeypatch, capsys):
    captioner, _ = pair
    monkeypatch.setattr(quantize, "cpu_lacks_int8", lambda: None)
    tuned = quantize.copy.deepcopy(captioner.encoder)
    with torch.no_grad():
        tuned.parts[1].model.conv_head.weight.mul_(1.01)  # as a fine-tuned last stage would be
    assert quantize.feature_encoder(tuned) == ("fp32", tuned)
    assert capsys.readouterr().err == ""
    assert quantize.feature_encoder(tuned, "int8") == ("fp32", tuned)
    assert "no int8 build of encoder efficientnet_lite0+2 with these weights" in capsys.readouterr().err
    assert quantize.feature_encoder(captioner.encoder, "int8", device="cuda")[0] == "fp32"
    assert "CPU only" in capsys.readouterr().err


def test_int8_features_have_a_cache_of_their_own(pair, tmp_path):
    from showtell.features import extract_features

    captioner, int8 = pair
    images = EXAMPLES[:2]
    fp32 = extract_features(images, "efficientnet_lite0+2", tmp_path, quiet=True, encoder=captioner.encoder)
    q = extract_features(images, "efficientnet_lite0+2", tmp_path, quiet=True, encoder=int8)
    assert fp32.path != q.path and "-int8-" in q.path.name
    assert (fp32.manifest["precision"], q.manifest["precision"]) == ("fp32", "int8")
    assert not (fp32.features == q.features).all()
    again = extract_features(images, "efficientnet_lite0+2", tmp_path, quiet=True, encoder=int8)
    assert again.path == q.path and (again.features == q.features).all()


def test_unknown_precision_is_one_clear_error(tmp_path):
    with pytest.raises(ShowtellError, match="unknown precision 'int4'; use one of fp32, int8"):
        showtell.load(precision="int4")


def test_cli_precision_flag(capsys):
    from showtell.cli import main

    assert main(["caption", str(EXAMPLES[0]), "--precision", "int4"]) == 2
    assert "invalid choice: 'int4' (choose from 'fp32', 'int8')" in capsys.readouterr().err
    assert main(["caption", str(EXAMPLES[0]), "--runtime", "onnx", "--precision", "int8"]) == 1
    assert "--precision is for --runtime torch" in capsys.readouterr().err


def test_build_int8_writes_a_graph_that_runs(tmp_path):
    """The builder on a small encoder and a few photos: the graph records its source and gives close features."""
    pytest.importorskip("onnx")
    from showtell.encoders import create_encoder

    encoder = create_encoder("efficientnet_lite0")
    images = torch.stack([encoder.preprocess.transform()(load_image(p)) for p in EXAMPLES])
    out = quantize.build_int8(encoder, iter(images.split(4)), tmp_path / "lite0.int8.onnx", calibration="test")
    assert quantize._graph_metadata(Path(out))[quantize.SOURCE_KEY] == quantize.weights_sha256(encoder)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(quantize.Int8Encoder(out, encoder)(images), encoder(images))
    assert cosine.min() > 0.95, cosine


@pytest.mark.slow
def test_with_int8_the_decoder_runs_in_bf16_where_the_cpu_computes_it(pair, monkeypatch):
    captioner, int8 = pair
    monkeypatch.setattr(quantize, "cpu_has_bf16", lambda: True)
    decoder = quantize.decoder_for(captioner.model, "int8")
    assert isinstance(decoder, quantize.Bf16Decoder) and next(decoder.parameters()).dtype == torch.bfloat16
    assert quantize.decoder_for(captioner.model, "fp32") is captioner.model
    assert quantize.decoder_for(captioner.model, "int8", device="cuda") is captioner.model
    monkeypatch.setattr(quantize, "cpu_has_bf16", lambda: False)
    assert quantize.decoder_for(captioner.model, "int8") is captioner.model

    images = torch.stack([captioner.preprocess.transform()(load_image(p)) for p in EXAMPLES])
    with torch.inference_mode():
        feats = int8(images)
    options = captioner._options(3, 20, 1, {})
    fp32 = [c[0] for c in captioner.caption_features(feats, options)]
    captioner.decoder = decoder
    try:
        bf16 = [c[0] for c in captioner.caption_features(feats, options)]
    finally:
        captioner.decoder = captioner.model
    same = sum(a[0] == b[0] for a, b in zip(fp32, bf16))
    assert same >= 7, list(zip(fp32, bf16))
    assert all(abs(a[1] - b[1]) < 0.05 for a, b in zip(fp32, bf16) if a[0] == b[0]), list(zip(fp32, bf16))
