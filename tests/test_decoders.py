"""Every decoding strategy through the same checks: greedy, beam search and seeded sampling (showtell.decoding's
loop), beam search in numpy (the ONNX runtime's loop, fed by the same torch model) and SCST's sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import numpy_model

from showtell.decoding import DecodingOptions, decode
from showtell.hypotheses import Hypothesis, score
from showtell.model import CaptionModel, ModelConfig
from showtell.onnx_runtime import beam_search
from showtell.scst import sample_captions
from showtell.vocab import SPECIAL

MAX_LENGTH = 5


@pytest.fixture(scope="module")
def model() -> CaptionModel:
    """A random model with sharp distributions: some captions end early, some are cut at MAX_LENGTH."""
    torch.manual_seed(1)
    model = CaptionModel(ModelConfig(vocab_size=14, feature_dim=6, embed_dim=8, hidden_dim=16, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(9, 6, generator=torch.Generator().manual_seed(0))


def _numpy(model: CaptionModel, features: torch.Tensor, beam: int) -> list[list[Hypothesis]]:
    init, step = numpy_model(model)
    return beam_search(init, step, features.numpy(), beam_size=beam, max_length=MAX_LENGTH, num_return=beam)


STRATEGIES = {
    "greedy": (1, lambda m, f: decode(m, f, DecodingOptions(max_length=MAX_LENGTH))),
    "beam": (3, lambda m, f: decode(m, f, DecodingOptions(beam_size=3, num_return=3, max_length=MAX_LENGTH))),
    "sampling": (1, lambda m, f: decode(m, f, DecodingOptions(sample=True, seed=0, max_length=MAX_LENGTH))),
    "onnx-numpy": (3, lambda m, f: _numpy(m, f, 3)),
}


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, model, features):
    num_return, run = STRATEGIES[request.param]
    return request.param, num_return, run, run(model, features)


def rescore(model: CaptionModel, feature: torch.Tensor, tokens: list[int]) -> float:
    """The model's log-probability of ``tokens`` after <start>, word by word, one image alone."""
    with torch.inference_mode():
        state = model.init_state(feature[None])
        total, previous = 0.0, SPECIAL.start
        for token in tokens:
            logits, state = model.step(torch.tensor([previous]), state)
            total += float(F.log_softmax(logits.float(), dim=-1)[0, token])
            previous = token
    return total


def test_one_ranked_list_per_image(strategy, features):
    _, num_return, _, results = strategy
    assert len(results) == len(features)
    for hyps in results:
        assert 1 <= len(hyps) <= num_return
        keys = [(not h.finished, -h.score) for h in hyps]
        assert keys == sorted(keys)  # complete captions first, each kind best score first


def test_captions_are_words_within_max_length(strategy):
    _, _, _, results = strategy
    outcomes = set()
    for h in (h for hyps in results for h in hyps):
        assert not set(h.tokens) & {SPECIAL.pad, SPECIAL.start, SPECIAL.end, SPECIAL.unk}
        assert len(h.tokens) <= MAX_LENGTH and (h.finished or len(h.tokens) == MAX_LENGTH)
        outcomes.add((h.finished, len(h.tokens) == MAX_LENGTH))
    assert (True, False) in outcomes and (False, True) in outcomes  # some end early, some are cut off


def test_logprob_and_score_are_the_models(strategy, model, features):
    _, _, _, results = strategy
    for feature, hyps in zip(features, results, strict=True):
        for h in hyps:
            ended = [SPECIAL.end] if h.finished else []
            assert h.logprob == pytest.approx(rescore(model, feature, h.tokens + ended), abs=1e-4)
            assert h.score == score(h.logprob, len(h.tokens) + h.finished, None)


def test_the_same_call_gives_the_same_hypotheses(strategy, model, features):
    _, _, run, results = strategy
    again = run(model, features)
    assert [[(h.tokens, h.logprob) for h in hs] for hs in again] == [[(h.tokens, h.logprob) for h in hs]
                                                                        for hs in results]


@pytest.mark.parametrize("beam", [1, 3])
def test_numpy_loop_equals_the_torch_loop_bit_for_bit(model, features, beam):
    options = DecodingOptions(beam_size=beam, num_return=beam, max_length=MAX_LENGTH)
    assert [[(h.tokens, h.logprob, h.score, h.finished) for h in hs] for hs in _numpy(model, features, beam)] == [
        [(h.tokens, h.logprob, h.score, h.finished) for h in hs] for hs in decode(model, features, options)]


def test_scst_samples_carry_the_policys_log_probability_and_its_gradient(model, features):
    """SCST samples through the same loop, with gradients; a sample's log-probability is under the policy (the
    model's distribution over the words a caption may contain), re-scored here word by word."""
    words, logp, lengths = sample_captions(model, features, 2, MAX_LENGTH, generator=torch.Generator().manual_seed(0))
    assert len(words) == len(logp) == len(lengths) == 2 * len(features)
    allowed = torch.ones(model.config.vocab_size, dtype=torch.bool)
    allowed[[SPECIAL.pad, SPECIAL.start, SPECIAL.unk]] = False
    for row, (w, n) in enumerate(zip(words, lengths.tolist(), strict=True)):
        assert n in (len(w), len(w) + 1) and len(w) <= MAX_LENGTH
        tokens = w + [SPECIAL.end] * (n - len(w))
        with torch.inference_mode():
            state, previous, total = model.init_state(features[row // 2][None]), SPECIAL.start, 0.0
            for token in tokens:
                logits, state = model.step(torch.tensor([previous]), state)
                total += float(logits[0, allowed].log_softmax(-1)[allowed[:token].sum()])
                previous = token
        assert float(logp.detach()[row]) == pytest.approx(total, abs=1e-4)
    logp.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    model.zero_grad()
    assert np.isfinite(logp.detach().numpy()).all()
