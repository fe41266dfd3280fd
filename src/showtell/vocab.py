"""Tokenizer and vocabulary: the one place text becomes token ids and back.

The tokenizer is used for training, for building the vocabulary and for metric references, so a
caption is split the same way everywhere. It needs no downloads (no nltk punkt).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from showtell.errors import ShowtellError
from showtell.limits import MAX_VOCAB_SIZE, is_int

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of the special tokens, by name (``Vocabulary.special``): no other module writes them as numbers."""

    pad: int
    start: int
    end: int
    unk: int


SPECIAL = SpecialTokens(*range(len(SPECIALS)))  # every vocabulary starts with SPECIALS, in this order
FORMAT = "showtell-vocab"
FORMAT_VERSION = 1

# Mirrors the PTB tokenizer used for the caption metrics: clitics split off ("dog's" -> dog 's,
# "don't" -> do n't, "cannot" -> can not); a word is a run of letters/digits, optionally joined by
# inner apostrophes or hyphens ("t-shirt"); everything else (punctuation, symbols) is dropped.
# A clitic is split off only while attached to a word, so splitting again changes nothing.
_CLITICS = [(re.compile(r"\bcannot\b"), "can not"), (re.compile(r"(?<=[^\W_])n't\b"), " n't"),
            (re.compile(r"(?<=[^\W_])'(s|re|ve|ll|d|m)\b"), r" '\1")]
_WORD = re.compile(r"'?[^\W_]+(?:['\-][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words; punctuation is split off and dropped."""
    # "_" is dropped like punctuation, so it must also end a word for the clitic rules ("dog's_" as "dog's")
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'").replace("_", " ")
    # Until nothing changes: a split can expose another clitic ("an'tn't" -> "an't n't" -> "a n't n't").
    # Each pass that changes something splits off at least one apostrophe clitic, which bounds the loop.
    for _ in range(text.count("'") + 2):
        before = text
        for pattern, repl in _CLITICS:
            text = pattern.sub(repl, text)
        if text == before:
            break
    return _WORD.findall(text)


class Vocabulary:
    """Token <-> id mapping with ``<pad>``=0, ``<start>``, ``<end>``, ``<unk>`` as distinct ids."""

    def __init__(self, tokens: Sequence[str], min_count: int | None = None):
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ShowtellError(f"vocabulary must start with {', '.join(SPECIALS)}")
        if len(set(tokens)) != len(tokens):
            raise ShowtellError("vocabulary has duplicate tokens")
        self.itos: list[str] = list(tokens)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        self.min_count = min_count

    special = SPECIAL  # what decoding, training and export take
    pad_id, start_id, end_id, unk_id = SPECIAL.pad, SPECIAL.start, SPECIAL.end, SPECIAL.unk

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words], min_count=min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, text: str | Sequence[str], add_special: bool = True) -> list[int]:
        """Token ids of a caption (a string, or a list of tokens), framed by <start> ... <end>."""
        tokens = tokenize(text) if isinstance(text, str) else text
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token id sequence: stops at <end>, drops special tokens."""
        return " ".join(self.words(ids))

    def words(self, ids: Iterable[int]) -> list[str]:
        """The words of a token id sequence: stops at <end>, drops special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i >= len(SPECIALS) and i < len(self.itos):
                words.append(self.itos[i])
        return words

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "min_count": self.min_count, "tokens": self.itos}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ShowtellError("not a showtell vocabulary (missing format tag)")
        if data.get("version") != FORMAT_VERSION:
            raise ShowtellError(f"vocabulary format version {data.get('version')!r} is not supported "
                                f"(this showtell reads version {FORMAT_VERSION})")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ShowtellError("vocabulary 'tokens' must be a list of strings")
        if len(tokens) > MAX_VOCAB_SIZE:
            raise ShowtellError(f"vocabulary has {len(tokens)} tokens; at most {MAX_VOCAB_SIZE} are supported")
        min_count = data.get("min_count")
        if min_count is not None and not is_int(min_count):
            raise ShowtellError(f"vocabulary 'min_count' must be an integer or null, got {type(min_count).__name__}")
        return cls(tokens, min_count=min_count)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShowtellError(f"{path}: cannot read vocabulary: {e}") from None
        try:
            return cls.from_dict(data)
        except ShowtellError as e:
            raise ShowtellError(f"{path}: {e}") from None
