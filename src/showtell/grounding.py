"""Captions that do not contradict a confident tag (the "decide what to say" step of Tran et al. 2016).

When the caption's confidence is low, the top ImageNet tag is confident and the caption uses none of the tag's
words, the caption is asserting a scene the encoder does not see. Then a tag-guided caption is decoded instead:
the caption is made to start with "a <word>" (a prefix, as Anderson et al. 2017's constrained beam search with one
constraint in first place), where <word> is one of the tag's words that the vocabulary has ("cat" for "tabby
cat", "dog" for "golden retriever"), and the model writes the rest. For a tag without such a word ("zebra",
"espresso") the prefix is "a <unk>" and the tag's name is put in the place of <unk>: the model has learnt how a
sentence goes on after a word it does not know. The model's own caption stays available as an alternative.

The thresholds are chosen on Flickr8k dev and the out-of-domain set by ``scripts/fit_confidence.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from showtell.errors import ShowtellError
from showtell.vocab import Vocabulary, tokenize


@dataclass(frozen=True)
class GroundingRule:
    """Replace the caption when its confidence < ``low_confidence`` and the top tag's p >= ``sure_tag``."""

    low_confidence: float
    sure_tag: float

    def applies(self, confidence: float, tag_p: float, agrees: bool) -> bool:
        return confidence < self.low_confidence and tag_p >= self.sure_tag and not agrees

    def to_meta(self) -> dict:
        return {"low_confidence": self.low_confidence, "sure_tag": self.sure_tag}

    @classmethod
    def from_meta(cls, meta: object) -> GroundingRule:
        values = [meta.get(k) if isinstance(meta, dict) else None for k in ("low_confidence", "sure_tag")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                   for v in values):
            raise ShowtellError("bad grounding rule in checkpoint: 'low_confidence' and 'sure_tag' must be in [0, 1]")
        return cls(float(values[0]), float(values[1]))


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def guided_prefix(vocab: Vocabulary, label: str, words: list[str]) -> tuple[tuple[int, ...], str | None]:
    """The prefix that starts a caption about a tag: ("a", word) for the first of ``words`` (the tag's words, best
    first) in the vocabulary, else ("a", <unk>) and the label to write in place of <unk>."""
    for word in words:
        if word in vocab.stoi:
            first = article(word)
            return (vocab.stoi.get(first, vocab.unk_id), vocab.stoi[word]), None
    name = " ".join(tokenize(label)) or label
    return (vocab.stoi.get(article(name), vocab.unk_id), vocab.unk_id), name


def text_of(vocab: Vocabulary, tokens: list[int], unk_as: str | None) -> str:
    """The caption text of ``tokens``; <unk> becomes ``unk_as`` when given (the tag's name)."""
    if unk_as is None:
        return vocab.decode(tokens)
    parts = [unk_as if t == vocab.unk_id else vocab.decode([t]) for t in tokens]
    return " ".join(p for p in parts if p)
