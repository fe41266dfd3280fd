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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from showtell.confidence import ConfidenceModel
from showtell.decoding import DecodingOptions, LogitFilter, SuppressFirst
from showtell.errors import ShowtellError
from showtell.hypotheses import Hypothesis, score
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
    def starting(word: str) -> tuple[int, ...]:  # the article, when the vocabulary has it
        first = vocab.stoi.get(article(word), vocab.stoi.get("a"))
        return () if first is None else (first,)

    for word in words:
        if word in vocab.stoi:
            return (*starting(word), vocab.stoi[word]), None
    name = " ".join(tokenize(label)) or label
    return (*starting(name), vocab.special.unk), name


def text_of(vocab: Vocabulary, tokens: list[int], unk_as: str | None) -> str:
    """The caption text of ``tokens``; <unk> becomes ``unk_as`` when given (the tag's name)."""
    if unk_as is None:
        return vocab.decode(tokens)
    parts = [unk_as if t == vocab.special.unk else vocab.decode([t]) for t in tokens]
    return " ".join(p for p in parts if p)


Beams = list[tuple[str, float]]  # (caption, score), best first
# features, DecodingOptions changes, a wrapper of the decoder, more filters -> hypotheses per image
DecodeHyps = Callable[[Tensor, dict, Callable, list[LogitFilter]], list[list[Hypothesis]]]


class Prefixed:
    """A step model whose captions start with given words, one prefix per image (all of one length): ``init_state``
    feeds <start> and all but the last prefix word and adds up the prefix's log-probability (``logprob``); the first
    ``step`` feeds each image's last prefix word whatever token it is given. So images with different prefixes are
    decoded in one batch, the same as a prefix forced word by word."""

    def __init__(self, model, prefixes: list[tuple[int, ...]], start_id: int):
        self.model, self.start_id = model, start_id
        self.prefixes = torch.tensor(prefixes, dtype=torch.long)
        self.logprob = torch.zeros(len(prefixes))
        self.first = True

    def init_state(self, features: Tensor):
        prefixes = self.prefixes.to(features.device)
        state = self.model.init_state(features)
        inputs = torch.cat([torch.full_like(prefixes[:, :1], self.start_id), prefixes[:, :-1]], dim=1)
        logprob = torch.zeros(len(prefixes), device=features.device)
        for t in range(prefixes.shape[1]):
            logits, state = self.model.step(inputs[:, t], state)
            logprob += logits.float().log_softmax(-1).gather(1, prefixes[:, t:t + 1]).squeeze(1)
        self.logprob, self.first = logprob.cpu(), True
        return state

    def step(self, tokens: Tensor, state):
        if self.first:  # the decoders' first step has one row per image, in order
            tokens, self.first = self.prefixes[:, -1].to(tokens.device), False
        return self.model.step(tokens, state)


class Grounding:
    """The confidence of each caption, and a tag-grounded caption where ``rule`` says the caption is doubtful."""

    def __init__(self, confidence: ConfidenceModel, rule: GroundingRule | None, tagger, vocab: Vocabulary):
        self.confidence, self.rule, self.tagger, self.vocab = confidence, rule, tagger, vocab
        self.nouns = tuple(sorted({vocab.stoi[w] for words in confidence.tag_words.values() for w in words
                                   if w in vocab.stoi}))

    def agrees(self, caption: str, tag: int) -> bool:
        return bool(set(caption.split()).intersection(self.confidence.tag_words.get(tag, ())))

    def guided_beams(self, decode_hyps: DecodeHyps, feats: Tensor, tags: list[int],
                     options: DecodingOptions) -> list[Beams]:
        """Per image, the beams of a caption about its tag (see :func:`guided_prefix`), decoded with ``options``."""
        out: list[Beams] = [[] for _ in tags]
        groups: dict[int, list[int]] = {}  # by prefix length: one decode for each
        prefixes = [guided_prefix(self.vocab, self.tagger.label(tag), list(self.confidence.tag_words.get(tag, ())))
                    for tag in tags]
        for n, (prefix, _) in enumerate(prefixes):
            groups.setdefault(len(prefix), []).append(n)
        for length, rows in groups.items():
            wrapped = Prefixed(None, [prefixes[n][0] for n in rows], self.vocab.special.start)

            def wrap(model, wrapped=wrapped):
                wrapped.model = model
                return wrapped
            # after a tag's name the sentence goes on with a verb or a preposition, not with a noun ("an espresso
            # dog"): the words any tag agrees with stand for the nouns
            unknown = [i for i, n in enumerate(rows) if prefixes[n][1] is not None]
            filters = [SuppressFirst(list(self.nouns), unknown)] if unknown and self.nouns else []
            changes = {"max_length": options.max_length - length}
            for n, hyps, before in zip(rows, decode_hyps(feats[rows], changes, wrap, filters),
                                       wrapped.logprob.tolist()):
                prefix, unk_as = prefixes[n]
                scored = [(not h.finished, -score(before + h.logprob, length + len(h.tokens) + h.finished,
                                                   options.length_penalty), h) for h in hyps]
                out[n] = [(text_of(self.vocab, [*prefix, *h.tokens], unk_as), -neg)  # complete ones first, as decode()
                          for _, neg, h in sorted(scored, key=lambda x: x[:2])]
        return out

    def __call__(self, decode_hyps: DecodeHyps, feats: Tensor, beams: list[Beams], probs: Tensor,
                 options: DecodingOptions) -> list[tuple[float | None, Beams, bool]]:
        """Per image: the confidence, the beams to return and whether they are grounded on the top tag instead of
        the model's own (``beams``, decoded with every beam returned: the confidence compares them). An image
        without beams (a model whose outputs overflowed) keeps none and gets no confidence."""
        out: list[tuple[float | None, Beams, bool]] = [(None, b, False) for b in beams]
        rows = [n for n, b in enumerate(beams) if b]
        if not rows:
            return out
        conf = dict(zip(rows, self.confidence(self.confidence.inputs(feats[rows], [beams[n] for n in rows],
                                                                     probs[rows])).tolist()))
        top_p, top_tag = (t.tolist() for t in probs.max(dim=1))
        for n in rows:
            out[n] = (conf[n], beams[n], False)
        doubted = [n for n in rows if self.rule is not None
                   and self.rule.applies(conf[n], top_p[n], self.agrees(beams[n][0][0], top_tag[n]))]
        if doubted:
            guided = self.guided_beams(decode_hyps, feats[doubted], [top_tag[n] for n in doubted], options)
            guided_conf = self.confidence(self.confidence.inputs(feats[doubted], guided, probs[doubted]),
                                          grounded=True).tolist()
            for n, b, c in zip(doubted, guided, guided_conf):
                if b:
                    out[n] = (c, b, True)
        return out
