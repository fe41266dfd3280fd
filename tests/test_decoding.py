from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from showtell.decoding import (
    BeamSearchDecoder,
    DecodingOptions,
    Hypothesis,
    SuppressFirst,
    decode,
    make_filters,
    run,
)
from showtell.errors import ShowtellError
from showtell.hypotheses import Ranker
from showtell.model import CaptionModel, ModelConfig
from showtell.vocab import SPECIAL, Vocabulary

START, END, UNK = SPECIAL.start, SPECIAL.end, SPECIAL.unk
CAPTIONS = [
    "a dog runs on the grass",
    "two men play football in the park",
    "a cat sleeps on a red sofa",
    "children are swimming in a pool",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is several times faster than two (and than a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(seed: int = 0, vocab_size: int = 50, **overrides) -> CaptionModel:
    torch.manual_seed(seed)
    kwargs = {"vocab_size": vocab_size, "feature_dim": 10, "embed_dim": 16, "hidden_dim": 24, "dropout": 0.0}
    return CaptionModel(ModelConfig(**(kwargs | overrides))).eval()


def beam_search(model, features, options: DecodingOptions) -> list[list[Hypothesis]]:
    """Run the beam search decoder itself, even for beam_size=1 (decode() uses greedy there)."""
    with torch.inference_mode():
        ranker = run(model, features, BeamSearchDecoder(options.beam_size, END), make_filters(options), START,
                     options.max_length, Ranker(len(features), options.length_penalty))
    return ranker.rank(min(options.num_return, options.beam_size))


def same(a: list[list[Hypothesis]], b: list[list[Hypothesis]]) -> bool:
    """Same tokens, same logprob bit for bit, same finished flag."""
    return [[(h.tokens, h.logprob, h.finished) for h in hs] for hs in a] == [
        [(h.tokens, h.logprob, h.finished) for h in hs] for hs in b
    ]


def has_repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.fixture(scope="module")
def trained():
    """A small model that has memorised four captions, each tied to a fixed random feature vector."""
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    encoded = [vocab.encode(c) for c in CAPTIONS]
    captions = torch.zeros(len(encoded), max(map(len, encoded)), dtype=torch.long)
    for i, ids in enumerate(encoded):
        captions[i, : len(ids)] = torch.tensor(ids)
    torch.manual_seed(0)
    features = torch.randn(len(CAPTIONS), 20)
    model = CaptionModel(ModelConfig(vocab_size=len(vocab), feature_dim=20, embed_dim=32, hidden_dim=64, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = model.loss(features, captions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    words = [ids[1:-1] for ids in encoded]
    return model, features, captions, words, losses


# ------------------------------------------------------------------------------------------------ trained model


def test_overfitting_drives_the_loss_down(trained):
    *_, losses = trained
    assert losses[0] > 3.0  # about log(vocab) at the start
    assert losses[-1] < 0.02


@pytest.mark.parametrize("beam_size", [1, 3])
def test_memorised_captions_are_decoded_exactly(trained, beam_size):
    model, features, _, words, _ = trained
    results = decode(model, features, DecodingOptions(beam_size=beam_size))
    assert [r[0].tokens for r in results] == words
    assert all(r[0].finished for r in results)


def test_logprob_is_the_teacher_forced_log_likelihood(trained):
    model, features, captions, words, _ = trained
    results = decode(model, features, DecodingOptions(beam_size=3))
    with torch.no_grad():
        logprobs = F.log_softmax(model(features, captions), dim=-1)
    for i, (hyp, ids) in enumerate(zip((r[0] for r in results), words, strict=True)):
        targets = [*ids, END]
        expected = sum(logprobs[i, t, w].item() for t, w in enumerate(targets))
        assert hyp.logprob == pytest.approx(expected, abs=1e-4)
        assert hyp.score == pytest.approx(expected / len(targets), abs=1e-4)  # length includes <end>


def test_beam1_equals_greedy_on_the_trained_model(trained):
    model, features, *_ = trained
    for options in (DecodingOptions(), DecodingOptions(max_length=4), DecodingOptions(no_repeat_ngram_size=1)):
        assert same(beam_search(model, features, options), decode(model, features, options))


def test_max_length_counts_words_not_end(trained):
    model, features, _, words, _ = trained
    n = len(words[0])
    exact = decode(model, features[:1], DecodingOptions(max_length=n, beam_size=3))[0][0]
    assert exact.tokens == words[0] and exact.finished
    cut = decode(model, features[:1], DecodingOptions(max_length=n - 2, beam_size=3))[0][0]
    assert cut.tokens == words[0][: n - 2] and not cut.finished


def test_caption_does_not_depend_on_the_batch(trained):
    model, features, *_ = trained
    options = DecodingOptions(beam_size=3, num_return=3)
    together = decode(model, features, options)
    alone = [decode(model, features[i : i + 1], options)[0] for i in range(len(features))]
    assert [[h.tokens for h in r] for r in together] == [[h.tokens for h in r] for r in alone]


def test_low_temperature_sampling_is_greedy(trained):
    model, features, *_ = trained
    greedy = decode(model, features, DecodingOptions())
    sampled = decode(model, features, DecodingOptions(sample=True, temperature=1e-4, seed=1))
    assert same(sampled, greedy)


def test_decode_puts_a_training_model_in_eval_mode_and_back(trained):
    model, features, *_ = trained
    model.train()
    try:
        results = decode(model, features, DecodingOptions(beam_size=2))
        assert model.training
    finally:
        model.eval()
    assert same(results, decode(model, features, DecodingOptions(beam_size=2)))


# ------------------------------------------------------------------------------------------------ random models


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_beam1_equals_greedy_on_random_models(seed, batch):
    model = random_model(seed, vocab_size=[12, 50, 300, 1000][seed], num_layers=1 + seed % 2)
    features = torch.randn(batch, 10, generator=torch.Generator().manual_seed(seed))
    options = DecodingOptions(max_length=15)
    greedy = decode(model, features, options)
    assert same(beam_search(model, features, options), greedy)
    assert all(len(r) == 1 for r in greedy)


@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_exact_ties_go_to_the_lower_token_id(beam_size):
    """Words 5 and 9 always get the same score; greedy (argmax) takes 5, and so must beam search."""
    model = random_model(seed=11, vocab_size=60)
    with torch.no_grad():
        model.head.weight[9] = model.head.weight[5]
        model.head.bias[9] = model.head.bias[5] = model.head.bias.max() + 3.0
    features = torch.randn(64, 10)
    options = DecodingOptions(beam_size=beam_size, max_length=6, no_repeat_ngram_size=2)
    results = decode(model, features, options)
    if beam_size == 1:
        assert same(beam_search(model, features, options), results)
    for (h,) in results:
        assert 5 in h.tokens and (9 not in h.tokens or h.tokens.index(5) < h.tokens.index(9))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    vocab_size=st.integers(5, 60),
    hidden=st.integers(2, 24),
    layers=st.integers(1, 2),
    batch=st.integers(1, 6),
    max_length=st.integers(1, 10),
    ngram=st.integers(0, 3),
    end_bias=st.floats(-2.0, 2.0),
)
def test_beam1_equals_greedy_property(seed, vocab_size, hidden, layers, batch, max_length, ngram, end_bias):
    model = random_model(seed, vocab_size=vocab_size, hidden_dim=hidden, num_layers=layers)
    with torch.no_grad():
        model.head.bias[END] += end_bias
    features = torch.randn(batch, 10, generator=torch.Generator().manual_seed(seed))
    options = DecodingOptions(max_length=max_length, no_repeat_ngram_size=ngram)
    greedy = decode(model, features, options)
    assert same(beam_search(model, features, options), greedy)
    for (h,) in greedy:
        assert len(h.tokens) <= max_length and (h.finished or len(h.tokens) == max_length)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_model_that_never_ends_still_returns_max_length_words(beam_size):
    model = random_model(vocab_size=40)
    with torch.no_grad():
        model.head.bias[END] = -1e9
    results = decode(model, torch.randn(5, 10), DecodingOptions(beam_size=beam_size, num_return=beam_size,
                                                                 max_length=7))
    assert len(results) == 5
    for hyps in results:
        assert len(hyps) == beam_size
        assert len({tuple(h.tokens) for h in hyps}) == beam_size
        for h in hyps:
            assert len(h.tokens) == 7 and not h.finished and math.isfinite(h.logprob)
            assert h.score == pytest.approx(h.logprob / 7)


def test_num_return_gives_distinct_hypotheses_best_first():
    model = random_model(seed=5, vocab_size=40)
    features = torch.randn(6, 10)
    results = decode(model, features, DecodingOptions(beam_size=5, num_return=5, max_length=6))
    best = decode(model, features, DecodingOptions(beam_size=5, max_length=6))
    for hyps, (top,) in zip(results, best, strict=True):
        assert len(hyps) == 5
        assert len({tuple(h.tokens) for h in hyps}) == 5
        finished = [h.score for h in hyps if h.finished]
        unfinished = [h.score for h in hyps if not h.finished]
        assert finished == sorted(finished, reverse=True) and unfinished == sorted(unfinished, reverse=True)
        assert [h.finished for h in hyps] == sorted((h.finished for h in hyps), reverse=True)  # complete ones first
        assert hyps[0].tokens == top.tokens


def test_beam_search_scores_at_least_as_well_as_greedy():
    model = random_model(seed=2, vocab_size=30)
    with torch.no_grad():
        model.head.bias[END] += 2.0  # so that most hypotheses finish
    features = torch.randn(20, 10)
    greedy = decode(model, features, DecodingOptions(max_length=10))
    beam = decode(model, features, DecodingOptions(beam_size=4, max_length=10))
    for (g,), (b,) in zip(greedy, beam, strict=True):
        if g.finished and b.finished:
            assert b.score >= g.score - 1e-6


def test_gnmt_length_penalty_scores():
    model = random_model(seed=3, vocab_size=30)
    with torch.no_grad():
        model.head.bias[END] += 2.0
    for h in [r[0] for r in decode(model, torch.randn(8, 10), DecodingOptions(beam_size=3, length_penalty=0.7))]:
        length = len(h.tokens) + (1 if h.finished else 0)
        assert h.score == pytest.approx(h.logprob / ((5 + length) / 6) ** 0.7)


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(beam_size, n):
    model = random_model(seed=4, vocab_size=12)
    with torch.no_grad():
        model.head.bias[5] += 8.0  # the model loves word 5: "5 5 5 5 ..."
        model.head.bias[END] -= 4.0
    features = torch.randn(8, 10)
    plain = decode(model, features, DecodingOptions(beam_size=beam_size, max_length=12))
    assert all(has_repeated_ngram(r[0].tokens, n) for r in plain)
    blocked = decode(model, features, DecodingOptions(beam_size=beam_size, max_length=12, no_repeat_ngram_size=n))
    for (h,) in blocked:
        assert not has_repeated_ngram(h.tokens, n)
        assert h.tokens.count(5) >= 1


@pytest.mark.parametrize("options", [DecodingOptions(), DecodingOptions(beam_size=3, num_return=3),
                                     DecodingOptions(sample=True, seed=0)])
def test_special_tokens_are_never_emitted(options):
    model = random_model(seed=6, vocab_size=20)
    with torch.no_grad():
        model.head.bias[UNK] += 6.0
        model.head.bias[0] += 6.0
        model.head.bias[1] += 6.0
    features = torch.randn(10, 10)
    for hyps in decode(model, features, options):
        for h in hyps:
            assert not {0, 1, END, UNK} & set(h.tokens)
    unk_allowed = decode(model, features, DecodingOptions(suppress_unk=False))
    assert any(UNK in r[0].tokens for r in unk_allowed)


def test_sampling_is_reproducible_with_a_seed():
    model = random_model(seed=7, vocab_size=50)
    features = torch.randn(20, 10)
    a = decode(model, features, DecodingOptions(sample=True, seed=123))
    b = decode(model, features, DecodingOptions(sample=True, seed=123))
    c = decode(model, features, DecodingOptions(sample=True, seed=124))
    assert same(a, b)
    assert not same(a, c)
    assert not same(a, decode(model, features, DecodingOptions()))


def test_top_k_1_sampling_is_greedy():
    model = random_model(seed=8, vocab_size=200)
    features = torch.randn(16, 10)
    assert same(decode(model, features, DecodingOptions(sample=True, top_k=1, seed=0)),
                decode(model, features, DecodingOptions()))


def test_top_k_sampling_stays_in_the_top_k():
    model = random_model(seed=9, vocab_size=200)
    features = torch.randn(16, 10)
    (h,) = decode(model, features[:1], DecodingOptions(sample=True, top_k=3, seed=0, max_length=1))[0]
    with torch.no_grad():
        logits, _ = model.step(torch.tensor([1]), model.init_state(features[:1]))
    logits[0, [0, 1, UNK]] = -math.inf
    assert (h.tokens or [END])[0] in logits[0].topk(3).indices.tolist()


def test_decoding_is_deterministic():
    model = random_model(seed=10, vocab_size=100)
    features = torch.randn(12, 10)
    options = DecodingOptions(beam_size=3, num_return=2, no_repeat_ngram_size=2)
    assert same(decode(model, features, options), decode(model, features, options))


def test_empty_batch():
    assert decode(random_model(), torch.zeros(0, 10), DecodingOptions(beam_size=3)) == []


@pytest.mark.parametrize("kwargs", [{"num_return": 2}, {"beam_size": 0}, {"sample": True, "beam_size": 2},
                                    {"temperature": 0.0}, {"max_length": 0}, {"top_k": -1},
                                    {"no_repeat_ngram_size": -1}])
def test_invalid_options_are_user_errors(kwargs):
    with pytest.raises(ShowtellError):
        DecodingOptions(**kwargs)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_prefix_starts_every_caption_and_counts_in_its_logprob(trained, beam_size):
    model, features, _, words, _ = trained
    prefix = tuple(words[2][:2])  # "a cat", forced onto every image, even the dog's
    results = decode(model, features, DecodingOptions(beam_size=beam_size, num_return=beam_size, prefix=prefix))
    assert all(h.tokens[:2] == list(prefix) for hyps in results for h in hyps)
    assert results[2][0].tokens == words[2]  # the cat's own caption is unchanged
    # the forced words' log-probabilities are part of the caption's: a forced caption is less likely than its own
    own = decode(model, features, DecodingOptions(beam_size=beam_size))
    assert results[0][0].logprob < own[0][0].logprob


def test_unk_is_allowed_in_the_prefix_only():
    model = random_model(seed=3, vocab_size=30)
    with torch.no_grad():
        model.head.bias[UNK] = 50.0  # the model would say <unk> everywhere
    (hyp,), = decode(model, torch.randn(1, 10), DecodingOptions(max_length=5, prefix=(5, UNK)))
    assert hyp.tokens[:2] == [5, UNK] and UNK not in hyp.tokens[2:]
    assert math.isfinite(hyp.logprob)


def test_a_prefix_as_long_as_max_length_is_refused():
    with pytest.raises(ShowtellError, match="prefix"):
        DecodingOptions(max_length=2, prefix=(5, 6))


def test_tokens_can_be_barred_right_after_the_prefix_only(trained):
    model, features, _, words, _ = trained
    prefix = tuple(words[2][:1])  # "a"
    free = decode(model, features[2:3], DecodingOptions(prefix=prefix))[0][0].tokens
    barred = decode(model, features[2:3], DecodingOptions(prefix=prefix, not_after_prefix=(free[1],)))[0][0].tokens
    assert barred[0] == prefix[0] and barred[1] != free[1]  # the word the model wanted there is barred ...
    later = decode(model, features[2:3], DecodingOptions(prefix=prefix, not_after_prefix=(free[2],)))[0][0].tokens
    assert later == free  # ... but not a word it wants later


@pytest.mark.parametrize("beam_size", [1, 3])
def test_first_words_can_be_barred_for_some_images_of_a_batch(trained, beam_size):
    """How the grounding decodes images whose first word is barred together with images whose is not."""
    model, features, _, words, _ = trained
    options = DecodingOptions(beam_size=beam_size)
    free = decode(model, features, options)
    assert [h[0].tokens for h in free] == words
    two_a = [words[1][0], words[2][0]]  # "two", "a"
    barred = decode(model, features, options, filters=[SuppressFirst(two_a, [1, 2])])
    assert barred[1][0].tokens[0] not in two_a and barred[2][0].tokens[0] not in two_a
    for i in (1, 2):  # as the option does for a batch of that image alone
        alone = decode(model, features[i:i + 1], replace(options, not_after_prefix=tuple(two_a)))
        assert barred[i][0].tokens == alone[0][0].tokens
    # the others keep their captions bit for bit, image 0's "a dog runs on the grass" too
    assert same([barred[0], barred[3]], [free[0], free[3]])
