"""Object tags: the encoders' own ImageNet heads on the pooled features the caption already computed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from PIL import Image

import showtell
from showtell.checkpoint import load_checkpoint, save_checkpoint
from showtell.encoders import Encoder, Preprocess, create_encoder
from showtell.errors import ShowtellError
from showtell.images import load_image
from showtell.tags import NoTags, Tagger, create_tagger, imagenet_lemmas

EXAMPLES = REPO / "examples" / "images"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}  # classes 281-285


@pytest.fixture(scope="module")
def pair() -> Encoder:
    return create_encoder("efficientnet_lite0+2")


def _images(encoder: Encoder, *names: str) -> torch.Tensor:
    transform = encoder.preprocess.transform()
    return torch.stack([transform(load_image(EXAMPLES / f"{name}.jpg")) for name in names])


def test_heads_on_the_pooled_features_give_each_networks_own_imagenet_answer(pair):
    x = _images(pair, "chelsea", "coffee", "camera")
    with torch.inference_mode():
        feats = pair(x)  # what the caption computes: [3, 2560], lite0's 1280 then lite2's
        lite0, lite2 = (part.classify(x).softmax(-1) for part in pair.parts)  # the networks' full forward
        assert torch.allclose(Tagger(pair.heads(), "lite0")(feats), lite0, atol=1e-6)
        assert torch.allclose(Tagger(pair.heads(), "lite2")(feats), lite2, atol=1e-6)
        assert torch.allclose(Tagger(pair.heads(), "mean_prob")(feats), (lite0 + lite2) / 2, atol=1e-6)
        logits = [part.classify(x) for part in pair.parts]
        assert torch.allclose(Tagger(pair.heads(), "mean_logit")(feats), ((logits[0] + logits[1]) / 2).softmax(-1),
                              atol=1e-6)
    tagger = create_tagger(pair)
    assert tagger.rule == "mean_prob" and tagger.rules == ("mean_prob", "mean_logit", "lite0", "lite2")
    with pytest.raises(ShowtellError, match="unknown tag rule 'lite1'; use one of mean_prob, mean_logit, lite0, lite2"):
        Tagger(pair.heads(), "lite1")


def test_labels_are_imagenets_own_names():
    lemmas = imagenet_lemmas()
    assert len(lemmas) == 1000
    tagger = Tagger([("x", torch.nn.Linear(4, 1000))])
    assert [tagger.label(i) for i in (281, 967, 547)] == ["tabby", "espresso", "electric locomotive"]
    assert tagger.lemmas(281) == ("tabby", "tabby cat") and tagger.lemmas(967) == ("espresso",)
    assert len(tagger.labels) == 1000 and all(label and label == label.strip() for label in tagger.labels)


def test_shipped_model_tags_the_photos_it_cannot_caption():
    names = ["chelsea", "coffee", "camera", "astronaut"]
    results = showtell.load().caption([EXAMPLES / f"{n}.jpg" for n in names], beam_size=3)
    tags = {n: r.tags for n, r in zip(names, results)}
    assert all(len(t) == 5 for t in tags.values())
    for t in tags.values():
        probs = [p for _, p in t]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs) and sum(probs) <= 1
    assert tags["chelsea"][0][0] == "Egyptian cat" and tags["chelsea"][0][1] > 0.3
    assert {label for label, _ in tags["chelsea"][:3]} <= CATS  # the cat photo: three cat classes on top
    assert tags["coffee"][0][0] == "espresso" and tags["coffee"][0][1] > 0.5
    assert tags["camera"][0][0] == "tripod"
    assert not CATS & {label for label, _ in tags["coffee"] + tags["camera"] + tags["astronaut"]}
    assert all(r.tags_note is None and 0 <= r.confidence <= 1 for r in results)
    row = results[0].to_dict()
    assert row["tags"][0] == {"label": "Egyptian cat", "p": round(tags["chelsea"][0][1], 4)}
    assert "confidence" in row and "tags_note" not in row

    none = showtell.load().caption(EXAMPLES / "chelsea.jpg", tags=0)[0]
    assert none.tags == [] and none.tags_note is None and "tags" not in none.to_dict()
    assert none.caption == results[0].caption  # tags do not touch the caption
    with pytest.raises(ShowtellError, match="tags must be a whole number >= 0, got -1"):
        showtell.load().caption(EXAMPLES / "chelsea.jpg", tags=-1)


class _Headless(Encoder):
    def __init__(self):
        super().__init__("headless", 8, Preprocess(8, "bilinear", (0.5,) * 3, (0.5,) * 3))
        self.pretrained = True


@pytest.mark.parametrize("make, why", [
    (lambda: create_encoder("efficientnet_lite0", pretrained=False), "built without its pretrained weights"),
    (lambda: create_encoder("efficientnet_lite0+2", pretrained=False), "built without its pretrained weights"),
    (_Headless, "encoder headless has no ImageNet classifier"),
])
def test_encoders_whose_heads_mean_nothing_give_no_tags_and_say_why(make, why):
    with pytest.raises(NoTags, match=why):
        create_tagger(make())


def test_fine_tuned_encoder_checkpoint_gives_no_tags_with_a_note(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    encoder = create_encoder("efficientnet_lite0")
    tuned = {f"encoder/{k}": v.clone() for k, v in encoder.state_dict().items()}
    tuned["encoder/model.conv_head.weight"] *= 1.05  # its last stage trained on with the caption model
    path = tmp_path / "tuned.safetensors"
    save_checkpoint(path, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, meta=ckpt.meta, extra_tensors=tuned)

    captioner = showtell.load(path)
    assert captioner.tagger is None
    img = Image.open(EXAMPLES / "chelsea.jpg")
    result = captioner.caption(img)[0]
    assert result.ok and result.caption and result.tags == []
    assert result.tags_note == ("no tags: encoder efficientnet_lite0 was fine-tuned with this model, so its "
                                "ImageNet classifier no longer fits its features")
    assert result.to_dict()["tags_note"] == result.tags_note
    assert captioner.caption(img, tags=0)[0].tags_note is None  # none asked for: nothing to explain
    assert showtell.load(tiny_checkpoint).caption(img)[0].tags[0][0] in CATS  # the same encoder, not fine-tuned


def test_tag_heads_script_scores_each_rule_on_labelled_photos(tmp_path):
    table = tmp_path / "objects.csv"
    table.write_text("image,object,imagenet\n"
                     f"{EXAMPLES / 'chelsea.jpg'},cat,281 282 283 284 285\n"
                     f"{EXAMPLES / 'coffee.jpg'},coffee,967 968\n"
                     f"{EXAMPLES / 'camera.jpg'},camera,759\n"  # the tripod wins; the camera is not in the top 3
                     f"{EXAMPLES / 'hubble_deep_field.jpg'},galaxies,\n")  # no ImageNet class: not scored
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "tag_heads.py"), str(table), "--encoder",
                          "efficientnet_lite0"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["photos"] == 3 and out["no_imagenet_class"] == 1 and out["unreadable"] == {}
    assert out["rules"]["lite0"] == out["rules"]["mean_prob"] == {"top1": round(2 / 3, 4), "top3": round(2 / 3, 4)}
