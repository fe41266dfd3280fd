"""From records to training batches: caption encoding, length-bucket sampling, collation."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of caption indices where every batch holds captions of one token length.

    Every caption appears exactly once per epoch (no sampling with replacement). The order
    depends only on ``seed`` and the epoch (:meth:`set_epoch`). With ``num_replicas > 1`` the
    epoch's batches are dealt to ranks round-robin: ranks are disjoint, together cover the
    epoch, and all get the same number of batches (batches are halved where needed to make the
    count divisible by the number of ranks).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(self.lengths):
            buckets[n].append(i)
        batches: list[list[int]] = []
        for n in sorted(buckets):
            idx = buckets[n]
            if self.shuffle:
                rng.shuffle(idx)
            batches.extend(idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size))
        if self.shuffle:
            rng.shuffle(batches)
        # Make the batch count divisible by the number of ranks by halving the largest batches.
        while len(batches) % self.num_replicas:
            j = max(range(len(batches)), key=lambda k: len(batches[k]))
            if len(batches[j]) < 2:
                raise ValueError(f"{len(self.lengths)} captions cannot be split into equal batch counts "
                                 f"for {self.num_replicas} ranks")
            half = len(batches[j]) // 2
            batches[j:j + 1] = [batches[j][:half], batches[j][half:]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._epoch_batches()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        total = sum(math.ceil(c / self.batch_size) for c in _counts(self.lengths).values())
        return math.ceil(total / self.num_replicas)


def _counts(lengths: Sequence[int]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for n in lengths:
        counts[n] += 1
    return counts


def pad_captions(encoded: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Stack token id lists into a [B, T] long tensor, right-padded with ``pad_id``."""
    width = max(len(c) for c in encoded)
    out = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    for i, c in enumerate(encoded):
        out[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
    return out
