"""Caption decoding: greedy, sampling and beam search over any model with `init_state` and `step`.

Modelled on openai/whisper's decoding.py: a frozen `DecodingOptions`, small filters that edit the next-token
log-probabilities in place, and small decoder classes. Everything is batched over images (and beams, which are
folded into the batch dimension); the per-step work is tensor ops whose Python cost does not grow with the batch.

Images whose caption is complete are dropped from the batch, so a batch costs what its longest captions cost.
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
from showtell.limits import MAX_BEAM_SIZE, MAX_LENGTH, is_int, is_real

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


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>/<end>
    logprob: float  # total log-probability, including the <end> step when it was emitted
    score: float  # the ranking score (length-normalised as per the options)
    finished: bool  # emitted <end> within max_length


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


# ---------------------------------------------------------------------------------------------- decoders


def _score(logprob: float, length: int, length_penalty: float | None) -> float:
    """Ranking score; ``length`` counts the words and the <end> when it was emitted."""
    if length_penalty is None:
        return logprob / max(length, 1)
    return logprob / ((5 + length) / 6) ** length_penalty


def _select_state(state: State, index: Tensor) -> State:
    return tuple(s.index_select(1, index) for s in state)


class _Collector:
    """Per-image lists of finished and unfinished hypotheses; Python work only when a hypothesis ends."""

    def __init__(self, batch_size: int, options: DecodingOptions):
        self.options = options
        self.finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
        self.unfinished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]

    def add(self, images: Tensor, tokens: Tensor, logprobs: Tensor, finished: bool) -> None:
        extra = 1 if finished else 0  # the <end> token counts in the length
        target = self.finished if finished else self.unfinished
        for i, toks, lp in zip(images.tolist(), tokens.tolist(), logprobs.tolist(), strict=True):
            if not math.isfinite(lp):  # an impossible sequence; no NaN or inf score ever reaches a caller
                continue
            target[i].append(Hypothesis(toks, lp, _score(lp, len(toks) + extra, self.options.length_penalty), finished))

    def results(self, num_return: int) -> list[list[Hypothesis]]:
        out = []
        for fin, unf in zip(self.finished, self.unfinished, strict=True):
            fin = sorted(fin, key=lambda h: -h.score)
            seen = {tuple(h.tokens) for h in fin}
            unf = sorted((h for h in unf if tuple(h.tokens) not in seen), key=lambda h: -h.score)
            out.append((fin + unf)[:num_return])  # complete sentences first
        return out


class GreedyDecoder:
    """Greedy (argmax) or, with ``options.sample``, ancestral sampling; one hypothesis per image."""

    def __init__(self, options: DecodingOptions, filters: list[LogitFilter], start_id: int, end_id: int):
        self.options, self.filters, self.start_id, self.end_id = options, filters, start_id, end_id
        self.generator: torch.Generator | None = None

    def choose(self, scores: Tensor, cum: Tensor) -> Tensor:
        """Next token [N] from the cumulative scores [N, vocab] (cum [N] + this step's log-probabilities)."""
        if not self.options.sample:
            # the max of the cumulative score (not of logprobs), first index on ties: beam_size=1 picks the same
            return scores.max(dim=1).indices
        logits = (scores - cum.unsqueeze(1)) / self.options.temperature
        if 0 < self.options.top_k < logits.shape[1]:
            kth = logits.topk(self.options.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        # a row with every token impossible (a model that gives NaN) has NaN probabilities: draw any token there,
        # its -inf log-probability drops the hypothesis
        probs = logits.softmax(dim=1).nan_to_num_(nan=1.0)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def run(self, model: StepModel, features: Tensor) -> list[list[Hypothesis]]:
        opts, n = self.options, features.shape[0]
        device = features.device
        if opts.sample and opts.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(opts.seed)
        out = _Collector(n, opts)
        state = model.init_state(features)
        images = torch.arange(n, device=device)
        cum = torch.zeros(n, device=device)
        words = torch.zeros(n, 0, dtype=torch.long, device=device)
        tokens = torch.full((n,), self.start_id, dtype=torch.long, device=device)
        for t in range(opts.max_length + 1):
            logits, state = model.step(tokens, state)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for f in self.filters:
                f.apply(logprobs, words)
            scores = logprobs.add_(cum.unsqueeze(1))  # in place: no second [N, vocab] buffer
            tokens = self.choose(scores, cum)
            new_cum = scores.gather(1, tokens.unsqueeze(1)).squeeze(1)
            ended = tokens == self.end_id
            if ended.any():
                out.add(images[ended], words[ended], new_cum[ended], finished=True)
            if t == opts.max_length:  # out of room: the rest are returned unfinished
                out.add(images[~ended], words[~ended], cum[~ended], finished=False)
                break
            words = torch.cat([words, tokens.unsqueeze(1)], dim=1)
            cum = new_cum
            if ended.any():
                keep = (~ended).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                images, words, cum, tokens = images[keep], words[keep], cum[keep], tokens[keep]
                state = _select_state(state, keep)
        return out.results(1)


class BeamSearchDecoder:
    """Beam search, batched over images and beams (beams folded into the batch dimension).

    Each step takes the top 2*beam of the (beams x vocab) cumulative log-probabilities of an image. An <end>
    candidate becomes a finished hypothesis if it ranks within the top `beam`; the best `beam` non-<end>
    candidates go on (as in fairseq). An image is done when it has `beam` finished hypotheses; after
    `max_length` words the beams still going are returned as unfinished. With beam_size=1 this is greedy.
    """

    def __init__(self, options: DecodingOptions, filters: list[LogitFilter], start_id: int, end_id: int):
        self.options, self.filters, self.start_id, self.end_id = options, filters, start_id, end_id

    def run(self, model: StepModel, features: Tensor) -> list[list[Hypothesis]]:
        opts, beam, n = self.options, self.options.beam_size, features.shape[0]
        device = features.device
        out = _Collector(n, opts)
        state = model.init_state(features)
        images = torch.arange(n, device=device)  # the image of each row of `cum`
        num_finished = torch.zeros(n, dtype=torch.long, device=device)
        cum = torch.zeros(n, 1, device=device)  # [images, beams]: one beam per image to start with
        words = torch.zeros(n, 1, 0, dtype=torch.long, device=device)  # [images, beams, t]
        tokens = torch.full((n,), self.start_id, dtype=torch.long, device=device)
        for t in range(opts.max_length + 1):
            logits, state = model.step(tokens, state)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            n, nb = cum.shape
            vocab = logprobs.shape[1]
            for f in self.filters:
                f.apply(logprobs, words.view(n * nb, t))
            scores = logprobs.view(n, nb, vocab).add_(cum.unsqueeze(2)).view(n, nb * vocab)
            k = min(2 * beam, nb * vocab)
            top, index = scores.topk(k, dim=1)
            # best first, ties to the lower index as argmax does (topk's order of ties is unspecified)
            index, perm = index.sort(dim=1)
            top, perm = top.gather(1, perm).sort(dim=1, descending=True, stable=True)
            index = index.gather(1, perm)
            source, token = index // vocab, index % vocab
            is_end = token == self.end_id
            ended = is_end.clone()
            ended[:, beam:] = False
            ended &= top > -math.inf
            if ended.any():
                rows, cols = ended.nonzero(as_tuple=True)
                out.add(images[rows], words[rows, source[rows, cols]], top[rows, cols], finished=True)
                num_finished += ended.sum(dim=1)
            if t == opts.max_length:  # out of room: the live beams are returned unfinished
                out.add(images.repeat_interleave(nb), words.view(n * nb, t), cum.view(-1), finished=False)
                break
            # the best non-<end> candidates go on; at most nb of the k candidates are <end>, so k - nb >= 1 remain
            order = torch.argsort(is_end.to(torch.uint8), dim=1, stable=True)[:, : min(beam, k - nb)]
            top, source, token = top.gather(1, order), source.gather(1, order), token.gather(1, order)
            keep = (num_finished < beam).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            if keep.numel() < n:
                images, num_finished, top, source, token = (x[keep] for x in (images, num_finished, top, source, token))
                rows = (keep * nb).unsqueeze(1) + source
            else:
                rows = (torch.arange(n, device=device) * nb).unsqueeze(1) + source
            rows = rows.view(-1)
            state = _select_state(state, rows)
            words = torch.cat([words.view(n * nb, t)[rows], token.view(-1, 1)], dim=1).view(*token.shape, t + 1)
            cum, tokens = top, token.view(-1)
        return out.results(min(opts.num_return, beam))


def make_filters(options: DecodingOptions, start_id: int = 1, unk_id: int = 3, pad_id: int = 0) -> list[LogitFilter]:
    """NaN counts as impossible; the prefix's words first; <pad> and <start> are never produced, nor <unk> with
    ``suppress_unk`` (except where the prefix puts it); then n-gram blocking if asked."""
    filters: list[LogitFilter] = [NaNIsImpossible()] + ([ForcePrefix(options.prefix)] if options.prefix else [])
    filters.append(SuppressTokens([pad_id, start_id]))
    if options.suppress_unk:
        filters.append(SuppressTokens([unk_id], from_step=len(options.prefix)))
    if options.not_after_prefix:
        n = len(options.prefix)
        filters.append(SuppressTokens(list(options.not_after_prefix), from_step=n, until_step=n + 1))
    if options.no_repeat_ngram_size > 0:
        filters.append(NoRepeatNgram(options.no_repeat_ngram_size))
    return filters


def decode(model: StepModel, features: Tensor, options: DecodingOptions | None = None, start_id: int = 1,
           end_id: int = 2, unk_id: int = 3, pad_id: int = 0) -> list[list[Hypothesis]]:
    """Caption a batch of image features [B, feature_dim]: one list of hypotheses per image, best first,
    ``min(num_return, beam_size)`` long (1 for greedy and sampling); shorter only when a tiny vocabulary has
    fewer distinct captions than that. Complete captions rank before unfinished ones (cut at ``max_length``).
    Every score is finite: a hypothesis whose log-probability is not (a model whose outputs are NaN or infinite)
    is dropped, so such a model can leave an image with an empty list.

    An ``nn.Module`` in training mode is switched to eval mode for the call (dropout off) and back after.
    """
    options = options or DecodingOptions()
    filters = make_filters(options, start_id=start_id, unk_id=unk_id, pad_id=pad_id)
    decoder_class = GreedyDecoder if options.beam_size == 1 else BeamSearchDecoder
    decoder = decoder_class(options, filters, start_id, end_id)
    if features.shape[0] == 0:
        return []
    was_training = isinstance(model, nn.Module) and model.training
    try:
        if was_training:
            model.eval()
        with torch.inference_mode():
            return decoder.run(model, features)
    finally:
        if was_training:
            model.train()
