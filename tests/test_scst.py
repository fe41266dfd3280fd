"""Self-critical training's pieces: CIDEr-D rewards equal to pycocoevalcap's, and the loss with both baselines."""

from __future__ import annotations

import pytest
import torch

from showtell.model import CaptionModel, ModelConfig
from showtell.scst import CiderD, Reward, SentenceBleu, sample_captions, scst_loss
from showtell.vocab import SPECIAL, Vocabulary

REFS = [["a dog runs on the grass", "a brown dog is running", "the dog plays in a field"],
        ["a man rides a bike", "a person on a bicycle", "a cyclist rides down the road"],
        ["two children play in the water", "kids splash in a pool", "children are swimming"]]
CANDIDATES = ["a dog is running on the grass", "a man rides a red bike", "a dog in the water"]


def test_rewards_equal_pycocoevalcap_cider_d():
    from pycocoevalcap.cider.cider import Cider

    expected, per_image = Cider().compute_score({i: refs for i, refs in enumerate(REFS)},
                                                {i: [c] for i, c in enumerate(CANDIDATES)})
    cider = CiderD([[r.split() for r in refs] for refs in REFS])
    ours = [cider.score(c.split(), i) for i, c in enumerate(CANDIDATES)]
    assert ours == pytest.approx(list(per_image), abs=1e-9)
    assert sum(ours) / len(ours) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("candidate, refs, expected", [
    ("a dog is running", ["a dog is running fast", "the dog runs"], 1.0),  # ties go to the shorter reference
    ("a dog", ["a dog is running fast"], 0.22313016),  # all n-grams match, brevity penalty exp(1 - 5/2)
    ("a cat is running", ["a dog is running"], 0.5),  # (3/4 * 2/4 * 1/3 * 1/2) ** (1/4), add-one from 2-grams
    ("cat", ["a dog is running"], 0.0),  # no word in common
])
def test_sentence_bleu_by_hand(candidate, refs, expected):
    bleu = SentenceBleu([[r.split() for r in refs]])
    assert bleu.score(candidate.split(), 0) == pytest.approx(expected, abs=1e-7)


def test_reward_adds_weighted_bleu_to_cider():
    refs = [[r.split() for r in rs] for rs in REFS]
    words = CANDIDATES[0].split()
    cider, bleu = CiderD(refs).score(words, 0), SentenceBleu(refs).score(words, 0)
    assert Reward(refs).score(words, 0) == pytest.approx(cider)
    assert Reward(refs, bleu=0.5).score(words, 0) == pytest.approx(cider + 0.5 * bleu)
    assert bleu > 0


def _model() -> tuple[CaptionModel, list[str]]:
    itos = ["<pad>", "<start>", "<end>", "<unk>"] + sorted({w for refs in REFS for r in refs for w in r.split()})
    torch.manual_seed(0)
    return CaptionModel(ModelConfig(vocab_size=len(itos), feature_dim=8, embed_dim=16, hidden_dim=32)), itos


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_loss_has_gradients_and_keeps_the_training_mode(baseline):
    model, itos = _model()
    cider = CiderD([[r.split() for r in refs] for refs in REFS])
    model.train()
    loss, reward = scst_loss(model, torch.randn(3, 8), [0, 1, 2], cider, Vocabulary(itos), samples=4, max_length=8,
                             generator=torch.Generator().manual_seed(0), baseline=baseline)
    loss.backward()
    assert model.training and reward >= 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p is not model.embed.weight)


def test_greedy_captions_are_the_most_likely_words():
    model, _ = _model()
    model.eval()
    feats = torch.randn(2, 8)
    with torch.no_grad():
        captions, _, _ = sample_captions(model, feats, 1, 6, greedy=True)
        state = model.init_state(feats)
        logits, _ = model.step(torch.full((2,), SPECIAL.start), state)
        logits[:, [SPECIAL.pad, SPECIAL.start, SPECIAL.unk]] = float("-inf")
    assert [(c + [SPECIAL.end])[0] for c in captions] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("settings, message", [
    ({"scst_samples": 1}, "at least 2 with the mean baseline"),
    ({"scst_baseline": "median"}, "'mean' or 'greedy'"),
    ({"scst_bleu": -1.0}, "scst_bleu must be at least 0"),
    ({"image_dropout": 1.5}, "image_dropout must be in"),
])
def test_bad_settings_are_refused_before_any_work(settings, message):
    from dataclasses import asdict

    from showtell.config import TrainConfig
    from showtell.errors import ShowtellError

    with pytest.raises(ShowtellError, match=message):
        TrainConfig.from_dict({**asdict(TrainConfig()), **settings})
    TrainConfig.from_dict({**asdict(TrainConfig()), "scst_samples": 1, "scst_baseline": "greedy"})
