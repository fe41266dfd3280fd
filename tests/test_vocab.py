import pytest

from showtell.errors import ShowtellError
from showtell.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_splits_off_punctuation():
    assert tokenize("A dog, running!  On the BEACH.") == ["a", "dog", "running", "on", "the", "beach"]
    assert tokenize("A man in a t-shirt; the dog's ball") == ["a", "man", "in", "a", "t-shirt", "the", "dog", "'s",
                                                            "ball"]
    assert tokenize("two\tkids\n(playing)") == ["two", "kids", "playing"]
    assert tokenize("It don't stop, cannot stop; the dog 's toy") == ["it", "do", "n't", "stop", "can", "not", "stop",
                                                                      "the", "dog", "'s", "toy"]
    assert tokenize("") == [] and tokenize(" ... !") == []


def test_build_counts_threshold_and_specials():
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_count=2)
    assert vocab.itos[:4] == list(SPECIALS)
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.itos[4:] == ["a", "dog"]  # most frequent first; "runs", "sits", "cat" below threshold


def test_encode_decode():
    vocab = Vocabulary.build(["a dog runs on the grass"] * 5)
    ids = vocab.encode("A dog flies.")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[3] == vocab.unk_id
    assert vocab.decode(ids) == "a dog"  # specials dropped
    assert vocab.decode([vocab.start_id, vocab.stoi["dog"], vocab.end_id, vocab.stoi["a"]]) == "dog"  # stops at <end>


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "a café is here"] * 5, min_count=1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.min_count == 1
    assert '"version": 1' in path.read_text()


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read vocabulary"),
    ('{"tokens": ["<pad>"]}', "not a showtell vocabulary"),
    ('{"format": "showtell-vocab", "version": 99, "tokens": []}', "version 99"),
    ('{"format": "showtell-vocab", "version": 1, "tokens": ["a", "b"]}', "must start with"),
])
def test_bad_vocab_file(tmp_path, content, message):
    path = tmp_path / "v.json"
    path.write_text(content)
    with pytest.raises(ShowtellError, match=message):
        Vocabulary.load(path)
