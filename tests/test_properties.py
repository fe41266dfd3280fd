"""Property-based tests (hypothesis): tokenizer, vocabulary and decoding hold for any input, not just examples."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from showtell.decoding import DecodingOptions, decode
from showtell.model import CaptionModel, ModelConfig
from showtell.vocab import SPECIALS, Vocabulary, tokenize

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any unicode at all, lone surrogates, controls and unassigned code points included.
any_text = st.text(st.characters(exclude_categories=()), max_size=60)
# Caption-like text: words, punctuation, clitics, hyphens, odd spacing, some non-ASCII letters.
pieces = st.sampled_from(["a", "dog", "Dog", "DOG's", "don't", "cannot", "t-shirt", "café", "naïve", "ﬁsh", "Straße",
                          "İstanbul", "2", "42nd", ",", ".", "!", "'", "-", "--", "_", "...", "’s", "n't", "(", ")",
                          " ", "  ", "\t", "\n", "\u00a0", "\u3000", "日本", "σς", "ǅ"])
caption_text = st.lists(pieces, max_size=25).map("".join) | any_text


@FAST
@given(caption_text)
def test_tokenize_is_idempotent_lowercase_and_tokens_have_no_whitespace(text):
    tokens = tokenize(text)
    assert tokenize(" ".join(tokens)) == tokens
    for tok in tokens:
        assert tok and tok == tok.lower()
        assert not any(ch.isspace() for ch in tok)


@FAST
@given(any_text)
def test_tokenize_never_crashes_and_returns_strings(text):
    tokens = tokenize(text)
    assert isinstance(tokens, list) and all(isinstance(t, str) and t for t in tokens)


@FAST
@given(caption_text)
def test_decode_encode_round_trip_when_every_word_is_known(text):
    vocab = Vocabulary.build([text], min_count=1)
    ids = vocab.encode(text)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and vocab.unk_id not in ids
    assert vocab.decode(ids) == " ".join(tokenize(text))


@FAST
@given(st.lists(pieces, max_size=20).map("".join), caption_text)
def test_unknown_words_become_unk_and_decode_drops_them(known, text):
    vocab = Vocabulary.build([known], min_count=1)
    ids = vocab.encode(text)
    tokens = tokenize(text)
    assert len(ids) == len(tokens) + 2
    for tok, i in zip(tokens, ids[1:-1]):
        assert i == vocab.stoi.get(tok, vocab.unk_id)
    assert vocab.decode(ids) == " ".join(t for t in tokens if t in vocab.stoi)


@FAST
@given(st.lists(caption_text, max_size=8), st.integers(1, 3))
def test_vocabulary_json_save_load_is_equal(captions, min_count):
    vocab = Vocabulary.build(captions, min_count=min_count)
    assert vocab.itos[: len(SPECIALS)] == list(SPECIALS) and len(set(vocab.itos)) == len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.json"
        vocab.save(path)
        loaded = Vocabulary.load(path)
        assert json.loads(path.read_text(encoding="utf-8"))["tokens"] == vocab.itos
    assert loaded == vocab and loaded.itos == vocab.itos and loaded.stoi == vocab.stoi
    assert loaded.min_count == min_count
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab


VOCAB = Vocabulary.build(["a dog runs on the grass", "a cat sits on a mat"], min_count=1)
any_int = st.integers(-(2**70), 2**70) | st.integers(-5, len(VOCAB) + 5)


@FAST
@given(st.lists(any_int, max_size=40))
def test_vocab_decode_never_crashes_stops_at_end_and_drops_specials(ids):
    text = VOCAB.decode(ids)
    words = text.split()
    assert all(w in VOCAB.stoi and w not in SPECIALS for w in words)
    if VOCAB.end_id in ids:
        before = ids[: ids.index(VOCAB.end_id)]
        assert text == VOCAB.decode(before)
        assert len(words) <= len(before)
    else:
        assert len(words) == sum(len(SPECIALS) <= i < len(VOCAB) for i in ids)
    assert VOCAB.decode(torch.tensor([i for i in ids if abs(i) < 2**62], dtype=torch.long)) == VOCAB.decode(
        [i for i in ids if abs(i) < 2**62])


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return [CaptionModel(ModelConfig(vocab_size=len(VOCAB), feature_dim=8, embed_dim=8, hidden_dim=16)).eval()
            for _ in range(3)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_index=st.integers(0, 2), batch=st.integers(1, 3), beam=st.integers(1, 4), max_length=st.integers(1, 6),
       num_return=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_decoding_gives_valid_captions_for_any_model_and_options(tiny_models, model_index, batch, beam, max_length,
                                                                 num_return, seed):
    assume(num_return <= beam)
    feats = torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed)) * 3
    options = DecodingOptions(beam_size=beam, max_length=max_length, num_return=num_return)
    hyps = decode(tiny_models[model_index], feats, options, VOCAB.special)
    assert len(hyps) == batch
    for per_image in hyps:
        assert 1 <= len(per_image) <= num_return
        assert [h.score for h in per_image] == sorted((h.score for h in per_image), reverse=True) or any(
            not h.finished for h in per_image)  # finished captions rank first, then by score
        for h in per_image:
            assert len(h.tokens) <= max_length
            assert all(len(SPECIALS) <= t < len(VOCAB) for t in h.tokens)  # no <pad>/<start>/<end>/<unk>
            assert len(VOCAB.decode(h.tokens).split()) == len(h.tokens)
            assert h.logprob <= 1e-6
