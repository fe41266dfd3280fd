"""`showtell data stats`: the classic data-exploration notebook as one function."""

from __future__ import annotations

from collections import Counter

import numpy as np

from showtell.datasets import SPLITS, Corpus
from showtell.vocab import Vocabulary, tokenize


def corpus_stats(corpus: Corpus, min_count: int = 5, top: int = 20) -> dict:
    """Counts per split, skipped captions, vocabulary size, caption lengths and common words."""
    splits = {}
    found = {r.split for r in corpus.records}
    for name in [*SPLITS, *sorted(found - set(SPLITS))]:
        recs = corpus.split(name)
        splits[name] = {"images": len(recs), "captions": sum(len(r.captions) for r in recs)}
    train_captions = [c for r in corpus.split("train") for c in r.captions]
    vocab = Vocabulary.build(train_captions, min_count=min_count)
    tokens = [tokenize(c) for r in corpus.records for c in r.captions]
    lengths = np.array([len(t) for t in tokens]) if tokens else np.zeros(1)
    words = Counter(w for c in train_captions for w in tokenize(c))
    return {
        "source": corpus.source,
        "splits": splits,
        "skipped_captions": corpus.skipped_captions,
        "missing_images": corpus.missing_images,
        "vocab_size": len(vocab),
        "min_count": min_count,
        "caption_length": {f"p{p}": float(np.percentile(lengths, p)) for p in (5, 25, 50, 75, 95, 100)},
        "most_common": words.most_common(top),
    }


def format_stats(stats: dict) -> str:
    lines = [f"dataset: {stats['source']}", "", f"{'split':<11}{'images':>8}{'captions':>10}"]
    for name, s in stats["splits"].items():
        lines.append(f"{name:<11}{s['images']:>8,}{s['captions']:>10,}")
    lines += [
        "",
        f"captions skipped (image missing): {stats['skipped_captions']}"
        + (f"  [{', '.join(stats['missing_images'][:5])}]" if stats["missing_images"] else ""),
        f"vocabulary (train, min count {stats['min_count']}): {stats['vocab_size']:,} tokens incl. 4 specials",
        "caption length in words: " + "  ".join(f"{k}={v:g}" for k, v in stats["caption_length"].items()),
        "most common words: " + ", ".join(f"{w} ({c:,})" for w, c in stats["most_common"]),
    ]
    return "\n".join(lines)
