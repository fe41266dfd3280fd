"""Confidence: the probability that a caption is right, from what captioning already computed.

A caption counts as *right* when its CIDEr-D against the human references of its photo is at least
``RIGHT_CIDER``: 0.25, about the 20th percentile of a Flickr8k dev human caption scored against the other
four (so four in five human captions count as right). The probability is a logistic model of five inputs:

    score           the caption's length-normalised log-probability (the beam score)
    beam_agreement  how many of the caption's words the other beams share (the model hesitating or not)
    tag_max         the top ImageNet tag's probability (the encoder knows what it sees)
    tag_agreement   the probability of the top tags whose words the caption uses
    familiarity     cosine similarity of the image's features to the nearest training-photo centroid

``scripts/fit_confidence.py`` fits it on Flickr8k dev plus the out-of-domain set and stores it in the
checkpoint: the coefficients and the words each tag agrees with as JSON metadata, the centroids as tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from showtell.errors import ShowtellError

INPUTS = ("score", "beam_agreement", "tag_max", "tag_agreement", "familiarity")
KINDS = ("own", "grounded")  # the model's own caption; one grounded on the top tag (showtell.grounding)
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
    centroids = centroids.to(features.device)  # the checkpoint's centroids stay on the CPU; features may be on a GPU
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
class Logistic:
    """``p = sigmoid(bias + sum(weights * (inputs - mean) / std))``."""

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, inputs: Tensor) -> Tensor:
        z = (inputs.double() - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std,
                                                                                              dtype=torch.float64)
        return torch.sigmoid(z @ torch.tensor(self.weights, dtype=torch.float64) + self.bias).float()

    @classmethod
    def fit(cls, inputs: Tensor, right: Tensor, l2: float = 1e-3) -> Logistic:
        """Logistic regression (L-BFGS, a little L2) of ``right`` [N] in {0, 1} on ``inputs`` [N, k]."""
        x = inputs.double()
        mean, std = x.mean(dim=0), x.std(dim=0).nan_to_num(1.0).clamp_min(1e-6)
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
        return cls(tuple(w[1:].tolist()), float(w[0]), tuple(mean.tolist()), tuple(std.tolist()))

    @classmethod
    def from_meta(cls, meta: object) -> Logistic:
        if not isinstance(meta, dict):
            raise ValueError("must be a mapping of weights, bias, mean and std")
        for key, size in (("weights", len(INPUTS)), ("mean", len(INPUTS)), ("std", len(INPUTS)), ("bias", None)):
            value = meta.get(key)
            values = [value] if size is None else list(value) if isinstance(value, (list, tuple)) else [None]
            if (size is not None and len(values) != size) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ValueError(f"'{key}' must be {'a finite number' if size is None else f'{size} finite numbers'}")
        if not all(v > 0 for v in meta["std"]):
            raise ValueError("'std' must be positive")
        return cls(tuple(map(float, meta["weights"])), float(meta["bias"]), tuple(map(float, meta["mean"])),
                   tuple(map(float, meta["std"])))


@dataclass(frozen=True)
class ConfidenceModel:
    """The probability that a caption is right: a :class:`Logistic` over :data:`INPUTS` for each of :data:`KINDS`."""

    own: Logistic
    grounded: Logistic
    centroids: Tensor  # [K, feature_dim], unit rows
    tag_words: dict[int, tuple[str, ...]]  # ImageNet class -> caption words that agree with it, best first

    def inputs(self, features: Tensor, beams: Sequence[Sequence[tuple[str, float]]], tag_probs: Tensor) -> Tensor:
        """[N, len(INPUTS)] for N images: their features, their beams ((caption, score), best first; the first is
        the caption judged) and their tag probabilities [N, 1000]."""
        fam = familiarity(features, self.centroids).tolist()
        top_p, top_i = (t.tolist() for t in tag_probs.float().topk(min(TOP_TAGS, tag_probs.shape[1]), dim=1))
        rows = []
        for n, image_beams in enumerate(beams):
            words = image_beams[0][0].split()
            top = list(zip(top_i[n], top_p[n]))
            rows.append([image_beams[0][1], beam_agreement(words, [c.split() for c, _ in image_beams[1:]]),
                         top[0][1], tag_agreement(words, top, self.tag_words), fam[n]])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(INPUTS))

    def __call__(self, inputs: Tensor, grounded: bool = False) -> Tensor:
        """[N] probabilities that each caption is right (``grounded``: the captions are grounded on a tag)."""
        return (self.grounded if grounded else self.own)(inputs)

    def to_meta(self) -> tuple[dict, dict[str, Tensor]]:
        """JSON metadata and tensors for the checkpoint."""
        meta = {"inputs": list(INPUTS), "right": f"per-image CIDEr-D >= {RIGHT_CIDER}",
                **{kind: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(getattr(self, kind)).items()}
                   for kind in KINDS},
                "tag_words": {str(c): list(w) for c, w in sorted(self.tag_words.items())}}
        return meta, {CENTROIDS: self.centroids.half()}

    @classmethod
    def from_meta(cls, meta: object, tensors: dict[str, Tensor], feature_dim: int) -> ConfidenceModel:
        """Rebuild from checkpoint metadata and tensors; anything malformed is one ShowtellError."""
        def bad(why: str) -> ShowtellError:
            return ShowtellError(f"bad confidence model in checkpoint: {why}")

        if not isinstance(meta, dict) or meta.get("inputs") != list(INPUTS):
            raise bad(f"expected inputs {list(INPUTS)}")
        models = {}
        for kind in KINDS:
            try:
                models[kind] = Logistic.from_meta(meta.get(kind))
            except ValueError as e:
                raise bad(f"{kind}: {e}") from None
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
        return cls(models["own"], models["grounded"], F.normalize(centroids.float(), dim=1),
                   {int(k): tuple(v) for k, v in words.items()})
