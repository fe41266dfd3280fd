"""Confidence: the probability that a caption is right, from what captioning already computed.

A caption counts as *right* when its CIDEr-D against the human references of its photo is at least
``RIGHT_CIDER``: 0.25, about the 20th percentile of a Flickr8k dev human caption scored against the other
four (so four in five human captions count as right). The probability is a logistic model of five inputs:

    score           the caption's length-normalised log-probability (the beam score)
    beam_agreement  how many of the caption's words the other beams share (the model hesitating or not)
    tag_max         the top ImageNet tag's probability (the encoder knows what it sees)
    tag_agreement   the probability of the top tags whose words the caption uses
    familiarity     cosine similarity of the image's features to the nearest training-photo centroid
    grounded        1 for a caption grounded on the top tag (showtell.grounding), 0 for the model's own

``scripts/fit_confidence.py`` fits it on Flickr8k dev plus the out-of-domain set and stores it in the
checkpoint: the coefficients and the words each tag agrees with as JSON metadata, the centroids as tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from showtell.errors import ShowtellError

INPUTS = ("score", "beam_agreement", "tag_max", "tag_agreement", "familiarity", "grounded")
RIGHT_CIDER = 0.25
TOP_TAGS = 5  # tag_agreement looks at this many tags
CENTROIDS = "confidence/centroids"
MAX_CENTROIDS = 4096


def beam_agreement(words: Sequence[str], others: Sequence[Sequence[str]]) -> float:
    """Mean share of the caption's distinct words found in each other beam (1.0 when there are none)."""
    mine = set(words)
    if not others or not mine:
        return 1.0
    return sum(len(mine & set(o)) / len(mine) for o in others) / len(others)


def tag_agreement(words: Sequence[str], top: Sequence[tuple[int, float]],
                  tag_words: dict[int, tuple[str, ...]]) -> float:
    """Total probability of the top tags (class index, p) that share a word with the caption."""
    mine = set(words)
    return sum(p for c, p in top if mine.intersection(tag_words.get(c, ())))


def familiarity(features: Tensor, centroids: Tensor) -> Tensor:
    """[N] cosine similarity of each feature vector to its nearest centroid."""
    return (F.normalize(features.float(), dim=1) @ F.normalize(centroids.float(), dim=1).T).amax(dim=1)


def kmeans(features: Tensor, k: int, iterations: int = 30, seed: int = 0) -> Tensor:
    """Spherical k-means centroids [k, D] of the L2-normalised features (deterministic for a seed)."""
    x = F.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iterations):
        nearest = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, x)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]  # a centroid that lost all its points stays where it was
        centroids = F.normalize(sums, dim=1)
    return centroids


@dataclass(frozen=True)
class ConfidenceModel:
    """``p(right) = sigmoid(bias + sum(weights * (inputs - mean) / std))`` over :data:`INPUTS`."""

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    centroids: Tensor  # [K, feature_dim], unit rows
    tag_words: dict[int, tuple[str, ...]]  # ImageNet class -> caption words that agree with it, best first

    def inputs(self, features: Tensor, beams: Sequence[Sequence[tuple[str, float]]], tag_probs: Tensor,
               grounded: bool = False) -> Tensor:
        """[N, len(INPUTS)] for N images: their features, their beams ((caption, score), best first; the first is
        the caption judged), their tag probabilities [N, 1000] and whether the beams are grounded on a tag."""
        fam = familiarity(features, self.centroids).tolist()
        top_p, top_i = tag_probs.float().topk(min(TOP_TAGS, tag_probs.shape[1]), dim=1)
        rows = []
        for n, image_beams in enumerate(beams):
            words = image_beams[0][0].split()
            top = list(zip(top_i[n].tolist(), top_p[n].tolist()))
            rows.append([image_beams[0][1], beam_agreement(words, [c.split() for c, _ in image_beams[1:]]),
                         top[0][1], tag_agreement(words, top, self.tag_words), fam[n], float(grounded)])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(INPUTS))

    def __call__(self, inputs: Tensor) -> Tensor:
        """[N] probabilities that each caption is right."""
        z = (inputs - torch.tensor(self.mean)) / torch.tensor(self.std)
        return torch.sigmoid(z @ torch.tensor(self.weights) + self.bias)

    @classmethod
    def fit(cls, inputs: Tensor, right: Tensor, centroids: Tensor, tag_words: dict[int, tuple[str, ...]],
            l2: float = 1e-3) -> ConfidenceModel:
        """Logistic regression (L-BFGS, a little L2) of ``right`` [N] in {0, 1} on ``inputs`` [N, len(INPUTS)]."""
        x = inputs.double()
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
        z, y = (x - mean) / std, right.double()
        w = torch.zeros(z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ w[1:] + w[0], y) + l2 * w[1:].pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        w = w.detach()
        return cls(tuple(w[1:].tolist()), float(w[0]), tuple(mean.tolist()), tuple(std.tolist()),
                   F.normalize(centroids.float(), dim=1), tag_words)

    def to_meta(self) -> tuple[dict, dict[str, Tensor]]:
        """JSON metadata and tensors for the checkpoint."""
        meta = {"inputs": list(INPUTS), "weights": list(self.weights), "bias": self.bias, "mean": list(self.mean),
                "std": list(self.std), "right": f"per-image CIDEr-D >= {RIGHT_CIDER}",
                "tag_words": {str(c): list(w) for c, w in sorted(self.tag_words.items())}}
        return meta, {CENTROIDS: self.centroids.half()}

    @classmethod
    def from_meta(cls, meta: object, tensors: dict[str, Tensor], feature_dim: int) -> ConfidenceModel:
        """Rebuild from checkpoint metadata and tensors; anything malformed is one ShowtellError."""
        def bad(why: str) -> ShowtellError:
            return ShowtellError(f"bad confidence model in checkpoint: {why}")

        if not isinstance(meta, dict) or meta.get("inputs") != list(INPUTS):
            raise bad(f"expected inputs {list(INPUTS)}")
        numbers = {}
        for key, size in (("weights", len(INPUTS)), ("mean", len(INPUTS)), ("std", len(INPUTS)), ("bias", None)):
            value = meta.get(key)
            values = [value] if size is None else value
            if not isinstance(values, list) or (size is not None and len(values) != size) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise bad(f"'{key}' must be {'a finite number' if size is None else f'{size} finite numbers'}")
            numbers[key] = value
        if not all(s > 0 for s in numbers["std"]):
            raise bad("'std' must be positive")
        words = meta.get("tag_words")
        if not isinstance(words, dict) or not all(
                k.isdigit() and int(k) < 1000 and isinstance(v, list) and all(isinstance(w, str) for w in v)
                for k, v in words.items()):
            raise bad("'tag_words' must map ImageNet class numbers to lists of words")
        centroids = tensors.get(CENTROIDS)
        if (centroids is None or centroids.dim() != 2 or not 1 <= centroids.shape[0] <= MAX_CENTROIDS
                or centroids.shape[1] != feature_dim or not torch.isfinite(centroids).all()):
            shape = None if centroids is None else tuple(centroids.shape)
            raise bad(f"'{CENTROIDS}' must be finite [K <= {MAX_CENTROIDS}, {feature_dim}], got {shape}")
        return cls(tuple(map(float, numbers["weights"])), float(numbers["bias"]), tuple(map(float, numbers["mean"])),
                   tuple(map(float, numbers["std"])), F.normalize(centroids.float(), dim=1),
                   {int(k): tuple(v) for k, v in words.items()})
