"""From records to training batches: caption encoding, length-bucket sampling, collation."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from showtell.vocab import SPECIAL


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of caption indices where every batch holds captions of one token length.

    Every caption appears exactly once per epoch (no sampling with replacement). The order
    depends only on ``seed`` and the epoch (:meth:`set_epoch`). With ``num_replicas > 1``,
    ``batch_size`` is per rank: the epoch is cut into global batches of ``batch_size *
    num_replicas`` exactly as one process with that batch size would cut it, and each global
    batch is split into one near-equal part per rank, so a step of all ranks together trains on
    the same captions as that process's step. Global batches with fewer captions than ranks go
    last, one caption per part, and parts are halved where needed so that every rank gets the
    same number of batches. Ranks are disjoint and together cover the epoch.
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
        world, size = self.num_replicas, self.batch_size * self.num_replicas
        batches: list[list[int]] = []
        for n in sorted(buckets):
            idx = buckets[n]
            if self.shuffle:
                rng.shuffle(idx)
            batches.extend(idx[i:i + size] for i in range(0, len(idx), size))
        if self.shuffle:
            rng.shuffle(batches)
        if world == 1:
            return batches
        # One part per rank of each global batch; step s is parts[s * world:(s + 1) * world].
        steps = [part for b in batches if len(b) >= world for part in _split(b, world)]
        tail = [[i] for b in batches if len(b) < world for i in b]
        while len(tail) % world:  # halve the largest part of the tail, borrowing a step if none can be halved
            j = max(range(len(tail)), key=lambda k: len(tail[k]), default=None)
            if j is None or len(tail[j]) < 2:
                if not steps:
                    raise ValueError(f"{len(self.lengths)} captions cannot be split into equal batch counts "
                                     f"for {world} ranks")
                tail[:0], steps = steps[-world:], steps[:-world]
                continue
            half = len(tail[j]) // 2
            tail[j:j + 1] = [tail[j][:half], tail[j][half:]]
        return steps + tail

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._epoch_batches()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        world, size = self.num_replicas, self.batch_size * self.num_replicas
        parts = sum((c // size) * world + min(c % size, world) for c in _counts(self.lengths).values())
        return math.ceil(parts / world)


def _split(batch: list[int], parts: int) -> list[list[int]]:
    """``batch`` in ``parts`` contiguous pieces whose sizes differ by at most one."""
    q, r = divmod(len(batch), parts)
    bounds = [i * q + min(i, r) for i in range(parts + 1)]
    return [batch[a:b] for a, b in zip(bounds, bounds[1:])]


def _counts(lengths: Sequence[int]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for n in lengths:
        counts[n] += 1
    return counts


def pad_captions(encoded: Sequence[Sequence[int]]) -> torch.Tensor:
    """Stack token id lists into a [B, T] long tensor, right-padded with <pad>."""
    width = max(len(c) for c in encoded)
    out = torch.full((len(encoded), width), SPECIAL.pad, dtype=torch.long)
    for i, c in enumerate(encoded):
        out[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
    return out
