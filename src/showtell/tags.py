"""Object tags from the encoder's own ImageNet-1k heads, read off the pooled features the caption already has.

    tagger = create_tagger(encoder)      # NoTags, saying why, when the heads cannot be trusted
    tagger.top(features, 5)              # [[("Egyptian cat", 0.42), ("tiger cat", 0.19), ...], ...]

An encoder's ImageNet classifier is linear on its pooled features (timm's ``forward_head(pre_logits=True)``
then ``classifier``; torchvision's ``fc``), so tags cost one small matrix product and no second pass over the
image. A paired encoder has one head per network, each reading its slice of the features; ``rule`` says how
their answers are combined: ``mean_prob`` (the mean of their softmax probabilities), ``mean_logit`` (the softmax
of their mean logits) or one network's head alone, by its name (``lite0``, ``lite2``). scripts/tag_heads.py
measures the rules on labelled photos.

Labels are ImageNet's own (timm's ImageNetInfo, shipped with timm): ``label(i)`` is the first lemma of class i
("tabby"), ``lemmas(i)`` all of them ("tabby", "tabby cat").
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn

from showtell.errors import ShowtellError

# python scripts/tag_heads.py tests/data/ood/objects.csv, the shipped model's lite0+2 (75 photos with an ImageNet
# class): top-1 mean_prob 0.827, mean_logit 0.813, lite2 0.800, lite0 0.760; top-3 0.880 for all but mean_logit (0.867)
DEFAULT_RULE = "mean_prob"
MEAN_RULES = ("mean_prob", "mean_logit")


class NoTags(ShowtellError):
    """An encoder gives no tags; the message says why."""


@functools.cache
def imagenet_lemmas() -> tuple[tuple[str, ...], ...]:
    """The lemmas of each ImageNet-1k class, in class-index order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(tuple(info.index_to_description(i).split(", ")) for i in range(info.num_classes()))


class Tagger(nn.Module):
    """Pooled features [B, D] -> ImageNet probabilities [B, 1000], from heads that read consecutive slices of D."""

    def __init__(self, heads: list[tuple[str, nn.Linear]], rule: str = DEFAULT_RULE) -> None:
        super().__init__()
        self.names = [name for name, _ in heads]
        if rule not in self.rules:
            raise ShowtellError(f"unknown tag rule {rule!r}; use one of {', '.join(self.rules)}")
        self.rule = rule
        self.heads = nn.ModuleList(head for _, head in heads)
        ends = list(itertools.accumulate(head.in_features for _, head in heads))
        self.slices = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends)]
        self.feature_dim = ends[-1]
        self._lemmas = imagenet_lemmas()
        if any(head.out_features != len(self._lemmas) for _, head in heads):
            raise NoTags(f"the encoder's head does not have the {len(self._lemmas)} ImageNet-1k classes")

    @property
    def rules(self) -> tuple[str, ...]:
        return (*MEAN_RULES, *self.names)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.rule in self.names:
            i = self.names.index(self.rule)
            return self.heads[i](features[:, self.slices[i]]).float().softmax(-1)
        logits = torch.stack([head(features[:, s]).float() for head, s in zip(self.heads, self.slices)])
        if self.rule == "mean_logit":
            return logits.mean(0).softmax(-1)
        return logits.softmax(-1).mean(0)

    def label(self, i: int) -> str:
        return self._lemmas[i][0]

    def lemmas(self, i: int) -> tuple[str, ...]:
        return self._lemmas[i]

    @property
    def labels(self) -> list[str]:
        return [lemmas[0] for lemmas in self._lemmas]

    def top(self, features: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable classes as (label, probability), best first."""
        with torch.inference_mode():
            return self.top_of(self(features), k)

    def top_of(self, probs: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The same from probabilities [B, 1000] already computed."""
        values, index = probs.topk(min(k, len(self._lemmas)), dim=-1)
        return [[(self.label(i), p) for i, p in zip(ix, ps)] for ix, ps in zip(index.tolist(), values.tolist())]


def create_tagger(encoder, fine_tuned: bool = False, rule: str = DEFAULT_RULE) -> Tagger:
    """The tagger of an encoder built by ``showtell.encoders.create_encoder``; NoTags when its heads are missing
    or meaningless: no pretrained weights, or a network fine-tuned with the caption model (``fine_tuned``), whose
    features no longer match the head trained on the original ones."""
    name = getattr(encoder, "name", type(encoder).__name__)
    heads = encoder.heads() if hasattr(encoder, "heads") else []
    if not heads:
        raise NoTags(f"encoder {name} has no ImageNet classifier")
    if not getattr(encoder, "pretrained", False):
        raise NoTags(f"encoder {name} was built without its pretrained weights, so its ImageNet classifier is random")
    if fine_tuned:
        raise NoTags(f"encoder {name} was fine-tuned with this model, so its ImageNet classifier no longer fits "
                     "its features")
    tagger = Tagger(heads, rule)
    if tagger.feature_dim != encoder.feature_dim:
        raise NoTags(f"the ImageNet classifiers of {name} read {tagger.feature_dim} features, it gives "
                     f"{encoder.feature_dim}")
    return tagger.eval()
