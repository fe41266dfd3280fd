"""Caption decoding: greedy, sampling and beam search over any model with `init_state` and `step`.

Modelled on openai/whisper's decoding.py: a frozen `DecodingOptions`, small filters that edit the next-token
log-probabilities in place, and one loop, `run`, into which the token decoders (greedy, sampling, beam search; SCST
samples through it too) plug with `update`/`finalize`, their hypotheses ranked by `showtell.hypotheses.Ranker`
(``showtell.onnx_runtime`` has the same loop in numpy). Everything is batched over images (and beams, which are
folded into the batch dimension); the per-step work is tensor ops whose Python cost does not grow with the batch.

Images whose caption is complete are dropped from the batch, so a batch costs what its longest captions cost. On a
GPU a step waits for the device once, to learn which rows go on: the hypotheses that end are handed to the ranker
after the loop.
A caption that never emits <end> is still returned after `max_length` words, marked ``finished=False``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from showtell.errors import ShowtellError
from showtell.hypotheses import Hypothesis, Ranker
from showtell.limits import MAX_BEAM_SIZE, MAX_LENGTH, is_int, is_real
from showtell.vocab import SPECIAL, SpecialTokens

State = tuple[Tensor, ...]  # tensors with the batch in dimension 1, like an LSTM's (h, c)


class StepModel(Protocol):
    def init_state(self, features: Tensor) -> State: ...

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]: ...


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode. Sizes are bounded (``showtell.limits``): work and memory grow with beam_size x max_length,
    and beams beyond ~10 give no better captions, so ``beam_size=100000`` is refused, not attempted."""

    beam_size: int = 1  # 1 = greedy; at most MAX_BEAM_SIZE
    max_length: int = 20  # max words, not counting <end>; at most MAX_LENGTH
    length_penalty: float | None = None  # None: rank by logprob / length; alpha: GNMT logprob / ((5+len)/6)**alpha
    no_repeat_ngram_size: int = 0  # 0 = off; n > 0: never produce the same n-gram twice
    sample: bool = False  # sample instead of greedy/beam (beam_size must be 1)
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0 = full distribution
    num_return: int = 1  # hypotheses per image (<= beam_size)
    suppress_unk: bool = True  # never emit <unk>
    seed: int | None = None  # sampling: a seed makes the samples reproducible
    prefix: tuple[int, ...] = ()  # token ids every caption starts with (whisper's prefix); <unk> allowed here
    not_after_prefix: tuple[int, ...] = ()  # token ids never produced right after the prefix

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int, maximum: int = sys.maxsize) -> None:
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ShowtellError(f"decoding: {name} must be an integer >= {minimum}, got {value!r}")
            if value > maximum:
                raise ShowtellError(f"decoding: {name} must be at most {maximum}, got {value}")

        integer("beam_size", 1, MAX_BEAM_SIZE)
        integer("max_length", 1, MAX_LENGTH)
        integer("no_repeat_ngram_size", 0)
        integer("top_k", 0)
        integer("num_return", 1)
        if self.num_return > self.beam_size:
            raise ShowtellError(f"decoding: num_return ({self.num_return}) cannot exceed beam_size ({self.beam_size})")
        if self.sample and self.beam_size != 1:
            raise ShowtellError("decoding: sampling draws one caption per image; use beam_size=1 with sample")
        # finite, and not so small that every log-probability / temperature overflows to -inf
        if not is_real(self.temperature) or not self.temperature >= 1e-6:
            raise ShowtellError(f"decoding: temperature must be a number >= 1e-06, got {self.temperature!r}")
        if self.length_penalty is not None and not (is_real(self.length_penalty) and 0 <= self.length_penalty <= 10):
            raise ShowtellError(f"decoding: length_penalty must be a number from 0 to 10, got {self.length_penalty!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ShowtellError(f"decoding: seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}")
        if len(self.prefix) >= self.max_length:
            raise ShowtellError(f"decoding: a prefix of {len(self.prefix)} words leaves no room in max_length "
                                f"{self.max_length}")


# ---------------------------------------------------------------------------------------------- filters


class LogitFilter:
    """Edits next-token log-probabilities [N, vocab] in place, given the words generated so far [N, t]."""

    def apply(self, logprobs: Tensor, tokens: Tensor) -> None:
        raise NotImplementedError


class NaNIsImpossible(LogitFilter):
    """A NaN log-probability (a model whose outputs overflowed) counts as -inf: never chosen, never ranked."""

    def apply(self, logprobs: Tensor, tokens: Tensor) -> None:
        logprobs.masked_fill_(logprobs.isnan(), -math.inf)


class SuppressTokens(LogitFilter):
    """Never produce these tokens (as word ``from_step`` and after, up to word ``until_step`` when given)."""

    def __init__(self, token_ids: list[int], from_step: int = 0, until_step: int | None = None):
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
        self.from_step, self.until_step = from_step, until_step

    def apply(self, logprobs: Tensor, tokens: Tensor) -> None:
        if tokens.shape[1] < self.from_step or (self.until_step is not None and tokens.shape[1] >= self.until_step):
            return
        if self.token_ids.device != logprobs.device:
            self.token_ids = self.token_ids.to(logprobs.device)
        logprobs.index_fill_(1, self.token_ids, -math.inf)


class SuppressFirst(LogitFilter):
    """Never produce these tokens as the first word of some images' captions (``images``: their rows in the batch;
    at the first step the rows are the images, in order). So images whose first word is barred and images whose
    is not decode in one batch."""

    def __init__(self, token_ids: list[int], images: list[int]):
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
        self.images = torch.tensor(images, dtype=torch.long)

    def apply(self, logprobs: Tensor, tokens: Tensor) -> None:
        if tokens.shape[1] == 0:
            rows, ids = self.images.to(logprobs.device), self.token_ids.to(logprobs.device)
            logprobs[rows.unsqueeze(1), ids] = -math.inf


class ForcePrefix(LogitFilter):
    """The first words are given: every other token is impossible there; the given one keeps its log-probability."""

    def __init__(self, prefix: tuple[int, ...]):
        self.prefix = prefix

    def apply(self, logprobs: Tensor, tokens: Tensor) -> None:
        t = tokens.shape[1]
        if t < len(self.prefix):
            keep = logprobs[:, self.prefix[t]].clone()
            logprobs.fill_(-math.inf)
            logprobs[:, self.prefix[t]] = keep


class NoRepeatNgram(LogitFilter):
    """Forbid any token that would complete an n-gram already present in the sequence."""

    def __init__(self, n: int):
        self.n = n

    def apply(self, logprobs: Tensor, tokens: Tensor) -> None:
        n, t = self.n, tokens.shape[1]
        if t < n:  # no complete n-gram yet
            return
        windows = tokens.unfold(1, n, 1)  # [N, t-n+1, n]
        prefix = tokens[:, t - n + 1:].unsqueeze(1)  # the last n-1 words
        match = (windows[:, :, :-1] == prefix).all(dim=-1)  # [N, t-n+1]
        penalty = torch.zeros(match.shape, dtype=logprobs.dtype, device=logprobs.device)
        penalty.masked_fill_(match, -math.inf)
        logprobs.scatter_add_(1, windows[:, :, -1], penalty)


# ---------------------------------------------------------------------------------------------- the loop


def _select_state(state: State, index: Tensor) -> State:
    return tuple(s.index_select(1, index) for s in state)


class Collector(Protocol):
    """Where a decoder puts the hypotheses that end: a :class:`Ranker` when captioning, SCST's samples."""

    def add(self, images: Tensor, tokens: Tensor, logprobs: Tensor, finished: bool) -> None: ...


class TokenDecoder:
    """A decoding strategy inside :func:`run` (whisper's TokenDecoder). It keeps the words and log-probabilities
    of the rows the model steps, hands the hypotheses that end to ``out`` and says which rows go on. ``words``
    [rows, t] are the words so far of each row, what the filters read."""

    words: Tensor

    def reset(self, batch_size: int, device: torch.device, out: Collector) -> None:
        raise NotImplementedError

    def update(self, logprobs: Tensor, last: bool) -> tuple[Tensor, Tensor | None] | None:
        """One step, given its filtered log-probabilities [rows, vocab] (edited in place): the next tokens of the
        rows that go on and which rows of the state they continue (None: all, in order); None when no row goes
        on. ``last``: the step after ``max_length`` words, where only an <end> still counts."""
        raise NotImplementedError

    def finalize(self) -> Collector:
        """The rows still going become unfinished hypotheses; returns ``out``."""
        raise NotImplementedError


def run(model: StepModel, features: Tensor, decoder: TokenDecoder, filters: list[LogitFilter], start: int,
        max_length: int, out: Collector) -> Collector:
    """The decoding loop of every strategy: step the model, normalise, filter, let the decoder choose, keep the
    state of the rows that go on. Returns ``decoder.finalize()``. With gradients enabled (SCST) the log-probabilities
    of the samples keep theirs."""
    n, device = features.shape[0], features.device
    decoder.reset(n, device, out)
    state = model.init_state(features)
    tokens = torch.full((n,), start, dtype=torch.long, device=device)
    for t in range(max_length + 1):
        logits, state = model.step(tokens, state)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        if logprobs.requires_grad:  # autograd keeps log_softmax's output; the filters and decoders edit in place
            logprobs = logprobs.clone()
        for f in filters:
            f.apply(logprobs, decoder.words)
        chosen = decoder.update(logprobs, last=t == max_length)
        if chosen is None:
            break
        tokens, rows = chosen
        if rows is not None:
            state = _select_state(state, rows)
    return decoder.finalize()


# ---------------------------------------------------------------------------------------------- decoders


class GreedyDecoder(TokenDecoder):
    """The most likely next word, one hypothesis per image. Images whose caption is complete leave the batch."""

    def __init__(self, end: int):
        self.end = end

    def reset(self, batch_size: int, device: torch.device, out: Collector) -> None:
        self.out = out
        self.images = torch.arange(batch_size, device=device)  # the image of each row
        self.cum = torch.zeros(batch_size, device=device)
        self.words = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.ends: list[tuple[Tensor, ...]] = []  # per step: images, words, log-probabilities, which ended

    def choose(self, scores: Tensor, cum: Tensor) -> Tensor:
        """Next token [N] from the cumulative scores [N, vocab] (cum [N] + this step's log-probabilities)."""
        # the max of the cumulative score (not of logprobs), first index on ties: beam_size=1 picks the same
        return scores.max(dim=1).indices

    def update(self, logprobs: Tensor, last: bool) -> tuple[Tensor, Tensor | None] | None:
        scores = logprobs.add_(self.cum.unsqueeze(1))  # in place: no second [N, vocab] buffer
        tokens = self.choose(scores, self.cum)
        cum = scores.gather(1, tokens.unsqueeze(1)).squeeze(1)
        ended = tokens == self.end
        self.ends.append((self.images, self.words, cum, ended))  # handed to `out` after the loop (no sync here)
        keep = (~ended).nonzero().squeeze(1)  # the one sync of a step: which rows go on
        if last:  # out of room: the rest are returned unfinished
            self.images, self.words, self.cum = self.images[keep], self.words[keep], self.cum[keep]
            return None
        words = torch.cat([self.words, tokens.unsqueeze(1)], dim=1)
        if keep.numel() == tokens.numel():
            self.words, self.cum = words, cum
            return tokens, None
        self.images, self.words, self.cum = self.images[keep], words[keep], cum[keep]
        return (tokens[keep], keep) if keep.numel() else None

    def finalize(self) -> Collector:
        for images, words, cum, ended in self.ends:
            rows = ended.nonzero().squeeze(1)
            if rows.numel():
                self.out.add(images[rows], words[rows], cum[rows], finished=True)
        self.out.add(self.images, self.words, self.cum, finished=False)
        return self.out


class SamplingDecoder(GreedyDecoder):
    """Ancestral sampling with a temperature, from the ``top_k`` most likely words (0: all); reproducible with
    a seeded ``generator``."""

    def __init__(self, end: int, temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None):
        super().__init__(end)
        self.temperature, self.top_k, self.generator = temperature, top_k, generator

    def choose(self, scores: Tensor, cum: Tensor) -> Tensor:
        logits = (scores - cum.unsqueeze(1)) / self.temperature
        if 0 < self.top_k < logits.shape[1]:
            kth = logits.topk(self.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        # a row with every token impossible (a model that gives NaN) has NaN probabilities: draw any token there,
        # its -inf log-probability drops the hypothesis
        probs = logits.softmax(dim=1).nan_to_num_(nan=1.0)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


class BeamSearchDecoder(TokenDecoder):
    """Beam search, batched over images and beams (beams folded into the batch dimension).

    Each step takes the top 2*beam of the (beams x vocab) cumulative log-probabilities of an image. An <end>
    candidate becomes a finished hypothesis if it ranks within the top `beam`; the best `beam` non-<end>
    candidates go on (as in fairseq). An image is done when it has `beam` finished hypotheses; after
    `max_length` words the beams still going are returned as unfinished. With beam_size=1 this is greedy.
    """

    def __init__(self, beam_size: int, end: int):
        self.beam, self.end = beam_size, end

    def reset(self, batch_size: int, device: torch.device, out: Collector) -> None:
        self.out = out
        self.images = torch.arange(batch_size, device=device)  # the image of each row of `cum`
        self.num_finished = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.cum = torch.zeros(batch_size, 1, device=device)  # [images, beams]: one beam per image to start with
        self.beams = torch.zeros(batch_size, 1, 0, dtype=torch.long, device=device)  # [images, beams, t]
        self.ends: list[tuple[Tensor, ...]] = []  # per step: images, beams, candidates' source and score, ended

    @property
    def words(self) -> Tensor:
        return self.beams.flatten(0, 1)

    def update(self, logprobs: Tensor, last: bool) -> tuple[Tensor, Tensor | None] | None:
        beam, (n, nb, t) = self.beam, self.beams.shape
        vocab = logprobs.shape[1]
        scores = logprobs.view(n, nb, vocab).add_(self.cum.unsqueeze(2)).view(n, nb * vocab)
        k = min(2 * beam, nb * vocab)
        top, index = scores.topk(k, dim=1)
        # best first, ties to the lower index as argmax does (topk's order of ties is unspecified)
        index, perm = index.sort(dim=1)
        top, perm = top.gather(1, perm).sort(dim=1, descending=True, stable=True)
        index = index.gather(1, perm)
        source, token = index // vocab, index % vocab
        is_end = token == self.end
        ended = is_end[:, :beam] & (top[:, :beam] > -math.inf)
        self.ends.append((self.images, self.beams, source, top, ended))  # handed to `out` after the loop (no sync)
        self.num_finished += ended.sum(dim=1)
        if last:  # out of room: the live beams are returned unfinished
            return None
        # the best non-<end> candidates go on; at most nb of the k candidates are <end>, so k - nb >= 1 remain
        order = torch.argsort(is_end.to(torch.uint8), dim=1, stable=True)[:, : min(beam, k - nb)]
        top, source, token = top.gather(1, order), source.gather(1, order), token.gather(1, order)
        keep = (self.num_finished < beam).nonzero().squeeze(1)
        if keep.numel() == 0:
            self.images, self.cum, self.beams = keep, self.cum[:0], self.beams[:0]
            return None
        images, num_finished = self.images, self.num_finished
        if keep.numel() < n:
            images, num_finished, top, source, token = (x[keep] for x in (images, num_finished, top, source, token))
            rows = (keep * nb).unsqueeze(1) + source
        else:
            rows = (torch.arange(n, device=keep.device) * nb).unsqueeze(1) + source
        rows = rows.view(-1)
        self.beams = torch.cat([self.words[rows], token.view(-1, 1)], dim=1).view(*token.shape, t + 1)
        self.images, self.num_finished, self.cum = images, num_finished, top
        return token.view(-1), rows

    def finalize(self) -> Collector:
        for images, beams, source, top, ended in self.ends:
            rows, cols = ended.nonzero(as_tuple=True)
            if rows.numel():
                self.out.add(images[rows], beams[rows, source[rows, cols]], top[rows, cols], finished=True)
        self.out.add(self.images.repeat_interleave(self.cum.shape[1]), self.words, self.cum.view(-1), finished=False)
        return self.out


def make_filters(options: DecodingOptions, special: SpecialTokens = SPECIAL) -> list[LogitFilter]:
    """NaN counts as impossible; the prefix's words first; <pad> and <start> are never produced, nor <unk> with
    ``suppress_unk`` (except where the prefix puts it); then n-gram blocking if asked."""
    filters: list[LogitFilter] = [NaNIsImpossible()] + ([ForcePrefix(options.prefix)] if options.prefix else [])
    filters.append(SuppressTokens([special.pad, special.start]))
    if options.suppress_unk:
        filters.append(SuppressTokens([special.unk], from_step=len(options.prefix)))
    if options.not_after_prefix:
        n = len(options.prefix)
        filters.append(SuppressTokens(list(options.not_after_prefix), from_step=n, until_step=n + 1))
    if options.no_repeat_ngram_size > 0:
        filters.append(NoRepeatNgram(options.no_repeat_ngram_size))
    return filters


def decode(model: StepModel, features: Tensor, options: DecodingOptions | None = None,
           special: SpecialTokens = SPECIAL, filters: list[LogitFilter] = ()) -> list[list[Hypothesis]]:
    """Caption a batch of image features [B, feature_dim]: one list of hypotheses per image, best first,
    ``min(num_return, beam_size)`` long (1 for greedy and sampling); shorter only when a tiny vocabulary has
    fewer distinct captions than that. Complete captions rank before unfinished ones (cut at ``max_length``).
    Every score is finite: a hypothesis whose log-probability is not (a model whose outputs are NaN or infinite)
    is dropped, so such a model can leave an image with an empty list.

    ``filters`` apply after the options' own (per-image constraints such as :class:`SuppressFirst`). An
    ``nn.Module`` in training mode is switched to eval mode for the call (dropout off) and back after.
    """
    options = options or DecodingOptions()
    if features.shape[0] == 0:
        return []
    if options.beam_size > 1:
        decoder: TokenDecoder = BeamSearchDecoder(options.beam_size, special.end)
    elif options.sample:
        generator = None if options.seed is None else torch.Generator(features.device).manual_seed(options.seed)
        decoder = SamplingDecoder(special.end, options.temperature, options.top_k, generator)
    else:
        decoder = GreedyDecoder(special.end)
    ranker = Ranker(features.shape[0], options.length_penalty)
    was_training = isinstance(model, nn.Module) and model.training
    try:
        if was_training:
            model.eval()
        with torch.inference_mode():
            run(model, features, decoder, [*make_filters(options, special), *filters], special.start,
                options.max_length, ranker)
    finally:
        if was_training:
            model.train()
    return ranker.rank(min(options.num_return, options.beam_size))
