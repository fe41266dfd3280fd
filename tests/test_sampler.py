import random
from collections import Counter

import pytest
import torch
from conftest import rank_batches

from showtell.data import LengthBucketSampler, pad_captions


def lengths_fixture(n=1003, seed=0):
    rng = random.Random(seed)
    return [rng.choice([5, 6, 7, 8, 9, 10, 11, 14, 20, 31]) for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 7, 32, 64])
def test_each_caption_once_and_one_length_per_batch(batch_size):
    lengths = lengths_fixture()
    sampler = LengthBucketSampler(lengths, batch_size, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))  # every caption exactly once
        assert all(len({lengths[i] for i in b}) == 1 for b in batches)
        assert all(1 <= len(b) <= batch_size for b in batches)


def test_order_depends_only_on_seed_and_epoch():
    lengths = lengths_fixture()
    a, b = LengthBucketSampler(lengths, 16, seed=1), LengthBucketSampler(lengths, 16, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(LengthBucketSampler(lengths, 16, seed=2)) != list(LengthBucketSampler(lengths, 16, seed=1))


def test_no_shuffle_is_sorted_by_length():
    lengths = [3, 1, 2, 1, 3]
    assert list(LengthBucketSampler(lengths, 2, shuffle=False)) == [[1, 3], [2], [0, 4]]


@pytest.mark.parametrize("world, n, batch_size", [(2, 1003, 16), (3, 1003, 16), (4, 50, 8), (2, 7, 64)])
def test_distributed_ranks_disjoint_equal_and_covering(world, n, batch_size):
    lengths = lengths_fixture(n)
    for epoch in range(2):
        per_rank = rank_batches(lengths, batch_size, 5, world, epoch)
        assert len({len(b) for b in per_rank}) == 1  # equal batch counts
        flat = [i for batches in per_rank for b in batches for i in b]
        assert Counter(flat) == Counter(range(n))  # disjoint and covering
        assert all(len({lengths[i] for i in b}) == 1 for batches in per_rank for b in batches)


def test_pad_captions():
    out = pad_captions([[1, 5, 2], [1, 2]])
    assert torch.equal(out, torch.tensor([[1, 5, 2], [1, 2, 0]]))
