"""The confidence model and the grounding rule: fitted numbers, stored and refused like any checkpoint field."""

from __future__ import annotations

import math

import pytest
import torch

from showtell.confidence import (
    CENTROIDS,
    INPUTS,
    ConfidenceModel,
    Logistic,
    beam_agreement,
    familiarity,
    kmeans,
    tag_agreement,
)
from showtell.errors import ShowtellError
from showtell.grounding import GroundingRule, guided_prefix, text_of
from showtell.vocab import Vocabulary


def test_fit_recovers_a_calibrated_probability():
    torch.manual_seed(0)
    x = torch.randn(4000, len(INPUTS))
    p_true = torch.sigmoid(2 * x[:, 0] - x[:, 3] + 0.5)
    y = torch.bernoulli(p_true)
    p = Logistic.fit(x, y)(x)
    assert ((p >= 0) & (p <= 1)).all()
    assert (p - p_true).abs().mean() < 0.03  # close to the probability that generated the labels
    for lo in (0.1, 0.3, 0.5, 0.7):  # calibrated: in each band, the share of positives matches the mean prediction
        band = (p >= lo) & (p < lo + 0.2)
        assert abs(y[band].mean() - p[band].mean()) < 0.05


def test_inputs():
    assert beam_agreement("a cat on a mat".split(), [["a", "cat"], "a dog on a rug".split()]) == pytest.approx(
        (2 / 4 + 2 / 4) / 2)
    assert beam_agreement(["cat"], []) == 1.0
    words = {281: ("cat",), 207: ("dog", "puppy")}
    assert tag_agreement("a cat sleeps".split(), [(281, 0.6), (207, 0.3)], words) == pytest.approx(0.6)
    assert tag_agreement("a man runs".split(), [(281, 0.6), (207, 0.3)], words) == 0.0
    centroids = torch.eye(3)
    assert familiarity(torch.tensor([[2.0, 0, 0], [1, 1, 0]]), centroids).tolist() == pytest.approx(
        [1.0, 1 / math.sqrt(2)])


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centers = torch.eye(4) * 10
    x = torch.cat([c + torch.randn(50, 4) for c in centers])
    found = kmeans(x, 4)
    assert familiarity(centers, found).min() > 0.98


def test_round_trip_through_checkpoint_metadata():
    model = ConfidenceModel(Logistic((1.0, -0.5, 0.25, 2.0, 0.1), -0.3, (0.1,) * 5, (2.0,) * 5),
                            Logistic((0.0, 0.5, 2.0, 1.0, -0.1), 0.2, (0.0,) * 5, (1.0,) * 5), torch.randn(4, 6),
                            {281: ("cat", "kitten")})
    meta, tensors = model.to_meta()
    again = ConfidenceModel.from_meta(meta, tensors, feature_dim=6)
    x = torch.randn(7, 5)
    assert torch.allclose(again(x), model(x), atol=1e-6)
    assert torch.allclose(again(x, grounded=True), model(x, grounded=True), atol=1e-6)
    assert not torch.allclose(model(x), model(x, grounded=True))
    assert again.tag_words == {281: ("cat", "kitten")}


@pytest.mark.parametrize("change", [
    lambda m, t: m["own"].update(weights=[1.0, 2.0]),
    lambda m, t: m["grounded"].update(weights=[float("nan")] * 5),
    lambda m, t: m["own"].update(bias="x"),
    lambda m, t: m["grounded"].update(std=[0.0] * 5),
    lambda m, t: m.pop("grounded"),
    lambda m, t: m.update(inputs=["score"]),
    lambda m, t: m.update(tag_words={"cat": ["cat"]}),
    lambda m, t: m.update(tag_words={"5000": ["cat"]}),
    lambda m, t: t.pop(CENTROIDS),
    lambda m, t: t.update({CENTROIDS: torch.randn(4, 7)}),
    lambda m, t: t.update({CENTROIDS: torch.full((4, 6), float("inf"))}),
])
def test_a_corrupt_field_is_refused_in_one_line(change):
    zero = Logistic((0.0,) * 5, 0.0, (0.0,) * 5, (1.0,) * 5)
    meta, tensors = ConfidenceModel(zero, zero, torch.randn(4, 6), {}).to_meta()
    change(meta, tensors)
    with pytest.raises(ShowtellError, match="bad confidence model") as e:
        ConfidenceModel.from_meta(meta, tensors, feature_dim=6)
    assert "\n" not in str(e.value)


def test_grounding_rule():
    rule = GroundingRule(low_confidence=0.3, sure_tag=0.5)
    assert rule.applies(confidence=0.1, tag_p=0.8, agrees=False)
    assert not rule.applies(confidence=0.1, tag_p=0.8, agrees=True)  # the caption already names it
    assert not rule.applies(confidence=0.5, tag_p=0.8, agrees=False)  # the caption is probably right
    assert not rule.applies(confidence=0.1, tag_p=0.2, agrees=False)  # the tag is not sure either
    assert GroundingRule.from_meta(rule.to_meta()) == rule
    for bad in ({"low_confidence": 2, "sure_tag": 0.5}, {"sure_tag": 0.5}, [], {"low_confidence": True, "sure_tag": 0}):
        with pytest.raises(ShowtellError, match="bad grounding rule"):
            GroundingRule.from_meta(bad)


def test_guided_prefix_uses_a_vocabulary_word_or_the_tag_name():
    vocab = Vocabulary.build(["a cat sits on an orange mat", "a dog runs"], min_count=1)
    prefix, unk_as = guided_prefix(vocab, "tabby", ["tabby", "cat"])
    assert [vocab.itos[i] for i in prefix] == ["a", "cat"] and unk_as is None
    prefix, unk_as = guided_prefix(vocab, "electric locomotive", ["locomotive"])
    assert prefix == (vocab.stoi["an"], vocab.unk_id) and unk_as == "electric locomotive"
    tokens = [vocab.stoi["an"], vocab.unk_id, vocab.stoi["sits"], vocab.end_id]
    assert text_of(vocab, tokens, "electric locomotive") == "an electric locomotive sits"
    assert text_of(vocab, tokens, None) == "an sits"


def with_confidence(src, dst, rule: dict | None, feature_dim: int = 1280, **meta_changes):
    """A copy of checkpoint ``src`` with a confidence model (and a grounding rule) stored in it."""
    from showtell.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(src)
    torch.manual_seed(0)
    words = {c: ("cat",) for c in range(281, 286)}  # the domestic cats
    judge = Logistic((1.0, 0.0, 0.5, 1.0, 1.0), 0.0, (-1.0, 0.5, 0.2, 0.1, 0.6), (1.0,) * 5)
    conf, tensors = ConfidenceModel(judge, judge, torch.randn(8, feature_dim), words).to_meta()
    conf["own"].update(meta_changes)
    meta = {**ck.meta, "confidence": conf, **({"grounding": rule} if rule else {})}
    save_checkpoint(dst, ck.model, ck.vocab, ck.encoder, ck.preprocess, meta=meta, extra_tensors=tensors)
    return dst


def test_every_caption_gets_a_confidence(tiny_checkpoint, photos, tmp_path):
    import showtell

    path = with_confidence(tiny_checkpoint, tmp_path / "c.safetensors", rule=None)
    results = showtell.load(path).caption(sorted(photos.iterdir()))
    assert all(r.ok and 0.0 <= r.confidence <= 1.0 and r.model_caption is None for r in results)
    assert len({round(r.confidence, 6) for r in results}) > 1  # it depends on the photo
    assert all("confidence" in r.to_dict() for r in results)


def test_a_doubtful_caption_is_grounded_on_a_sure_tag(tiny_checkpoint, photos, tmp_path):
    import showtell

    always = {"low_confidence": 1.0, "sure_tag": 0.0}  # doubt every caption, trust every tag
    captioner = showtell.load(with_confidence(tiny_checkpoint, tmp_path / "g.safetensors", rule=always))
    cat, coffee = captioner.caption([photos / "chelsea.jpg", photos / "coffee.jpg"], beam_size=2)
    assert cat.caption.startswith("a cat") and cat.model_caption is not None  # "cat": a word of the tabby tag
    assert cat.to_dict()["model_caption"] == cat.model_caption
    # "espresso" is not in this tiny vocabulary (nor "an"): the caption starts with the tag's name in place of <unk>
    assert coffee.tags[0][0] == "espresso" and coffee.caption.startswith("a espresso ")
    never = {"low_confidence": 0.0, "sure_tag": 1.0}
    plain = showtell.load(with_confidence(tiny_checkpoint, tmp_path / "n.safetensors", rule=never))
    (own,) = plain.caption([photos / "chelsea.jpg"], beam_size=2)
    assert own.caption == cat.model_caption and own.model_caption is None
    # --no-grounding / ground=False: the model's own caption, still with its confidence
    (own,) = showtell.load(tmp_path / "g.safetensors", ground=False).caption([photos / "chelsea.jpg"], beam_size=2)
    assert own.caption == cat.model_caption and own.model_caption is None and 0 <= own.confidence <= 1


def test_a_corrupt_confidence_field_is_refused_at_load(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    bad = with_confidence(tiny_checkpoint, tmp_path / "bad.safetensors", rule=None, weights=[1.0, "x"])
    out = subprocess.run([sys.executable, "-m", "showtell", "caption", "--model", str(bad), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"showtell: error: {bad}: bad confidence model in checkpoint: "
                                               "own: 'weights' must be 5 finite numbers"]


def test_confidence_and_the_models_own_caption_reach_the_server_the_gallery_and_text(tiny_checkpoint, photos,
                                                                                      tmp_path):
    from fastapi.testclient import TestClient

    import showtell
    from showtell.report import render_gallery
    from showtell.server import create_app

    always = {"low_confidence": 1.0, "sure_tag": 0.0}
    captioner = showtell.load(with_confidence(tiny_checkpoint, tmp_path / "g.safetensors", rule=always))
    with TestClient(create_app(captioner)) as client:
        body = client.post("/v1/caption", files={"file": ("cat.jpg", (photos / "chelsea.jpg").read_bytes())}).json()
    assert body["caption"].startswith("a cat") and 0 <= body["confidence"] <= 1
    assert body["model_caption"] and body["tags"][0]["label"] in ("Egyptian cat", "tabby", "tiger cat")
    (result,) = captioner.caption([photos / "chelsea.jpg"])
    assert f"the model's own caption: {result.model_caption}" in render_gallery([result])
    assert result.extras_text().split("\t")[0] == f"confidence: {result.confidence:.2f}"
    assert result.extras_text().split("\t")[-1] == f"model caption: {result.model_caption}"

