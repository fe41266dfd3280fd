"""Decode a split for real and score it with the standard caption metrics."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from showtell.datasets import CaptionRecord
from showtell.decoding import DecodingOptions, decode
from showtell.fileio import atomic_write_text
from showtell.metrics import METRIC_NAMES, Scores, score_captions
from showtell.model import CaptionModel
from showtell.vocab import Vocabulary


def generate(model: CaptionModel, vocab: Vocabulary, features: torch.Tensor, options: DecodingOptions,
             batch_size: int = 250) -> list[str]:
    """Captions for a [N, feature_dim] tensor of image features, decoded in batches."""
    model.eval()
    captions: list[str] = []
    for i in range(0, len(features), batch_size):
        hyps = decode(model, features[i:i + batch_size].float(), options, vocab.special)
        captions.extend(vocab.decode(h[0].tokens) for h in hyps)
    return captions


def score_records(records: list[CaptionRecord], captions: list[str],
                  metrics: tuple[str, ...] = METRIC_NAMES) -> tuple[Scores, dict]:
    """Metric scores of ``captions`` (one per record) against the records' references, plus summary
    figures: images captioned and the fraction of distinct captions."""
    refs = {str(i): list(r.captions) for i, r in enumerate(records)}
    cands = {str(i): c for i, c in enumerate(captions)}
    scores = score_captions(refs, cands, metrics=metrics)
    summary = {"images": len(captions), "distinct": len(set(captions)) / max(len(captions), 1)}
    return scores, summary


def most_common_captions(captions: list[str], n: int = 5) -> list[tuple[str, int]]:
    return Counter(captions).most_common(n)


def format_scores(scores: Scores, summary: dict) -> str:
    lines = [f"{'metric':<10}{'score':>8}"]
    lines += [f"{k:<10}{v:>8.4f}" for k, v in scores.values.items()]
    lines += [f"{k:<10}{'skipped':>8}  ({why})" for k, why in scores.skipped.items()]
    lines.append(f"images {summary['images']}, distinct captions {summary['distinct']:.1%}, "
                 f"tokenizer {scores.tokenizer}")
    return "\n".join(lines)


def write_results(path: str | Path, records: list[CaptionRecord], captions: list[str]) -> None:
    """COCO-format results: [{"image_id", "caption"}], image_id = the image file's name."""
    rows = [{"image_id": r.image.name, "caption": c} for r, c in zip(records, captions)]
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")


def evaluate_records(captioner, records: list[CaptionRecord], options: DecodingOptions,
                     cache_dir: str | Path | None = None, quiet: bool = False,
                     metrics: tuple[str, ...] = METRIC_NAMES) -> tuple[Scores, dict, list[CaptionRecord], list[str]]:
    """Caption ``records`` with a loaded Captioner (features through the cache) and score them: the captions a user
    gets, grounded on tags where the checkpoint's rule says so.

    Returns the scores, the summary (images, distinct), the records captioned (unreadable images
    are left out) and their captions."""
    from showtell.features import extract_features

    cache = extract_features([r.image for r in records], captioner.checkpoint.encoder, cache_dir, quiet=quiet,
                             encoder=captioner.feature_encoder, device=captioner.device,
                             spatial=captioner.spatial)
    records = [r for r in records if str(r.image.resolve()) not in cache.failed]
    rows = [cache.row(r.image.resolve()) for r in records]
    feats = torch.from_numpy(cache.features[rows, 0].astype("float32"))
    captions = [d.beams[0][0] for i in range(0, len(feats), 250)
                for d in captioner.describe_features(feats[i:i + 250], options)]
    scores, summary = score_records(records, captions, metrics=metrics)
    return scores, summary, records, captions
