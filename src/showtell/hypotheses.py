"""What both decoding loops return (torch's in ``showtell.decoding``, numpy's in ``showtell.onnx_runtime``): the
hypotheses, their ranking score and the ranker that collects and orders them (whisper's ranker). No array library
is imported here, so the torch-free ONNX runtime shares it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>/<end>
    logprob: float  # total log-probability, including the <end> step when it was emitted
    score: float  # the ranking score (length-normalised as per the options)
    finished: bool  # emitted <end> within max_length


def score(logprob: float, length: int, length_penalty: float | None) -> float:
    """Ranking score; ``length`` counts the words and the <end> when it was emitted. ``length_penalty`` None: the
    mean log-probability per token; alpha: GNMT's logprob / ((5 + length) / 6) ** alpha."""
    if length_penalty is None:
        return logprob / max(length, 1)
    return logprob / ((5 + length) / 6) ** length_penalty


class Ranker:
    """Per-image lists of finished and unfinished hypotheses; Python work only when a hypothesis ends.
    ``add`` takes arrays of any library that has ``tolist()``."""

    def __init__(self, batch_size: int, length_penalty: float | None):
        self.length_penalty = length_penalty
        self.finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
        self.unfinished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]

    def add(self, images, tokens, logprobs, finished: bool) -> None:
        """Hypotheses of ``images`` [N]: their words [N, t] and total log-probabilities [N]."""
        extra = 1 if finished else 0  # the <end> token counts in the length
        target = self.finished if finished else self.unfinished
        for i, toks, lp in zip(images.tolist(), tokens.tolist(), logprobs.tolist(), strict=True):
            if not math.isfinite(lp):  # an impossible sequence; no NaN or inf score ever reaches a caller
                continue
            target[i].append(Hypothesis(toks, lp, score(lp, len(toks) + extra, self.length_penalty), finished))

    def rank(self, num_return: int) -> list[list[Hypothesis]]:
        """Per image, the best ``num_return`` hypotheses: complete sentences first, each kind best score first."""
        out = []
        for fin, unf in zip(self.finished, self.unfinished, strict=True):
            fin = sorted(fin, key=lambda h: -h.score)
            seen = {tuple(h.tokens) for h in fin}
            unf = sorted((h for h in unf if tuple(h.tokens) not in seen), key=lambda h: -h.score)
            out.append((fin + unf)[:num_return])
        return out
