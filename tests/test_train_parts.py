"""The parts of a training run alone, on tiny synthetic data: the cross-entropy stage, the self-critical stage, and
the run folder (resume, its refusals, the optimizer state a resumed run continues from)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from showtell.config import TrainConfig
from showtell.data import pad_captions
from showtell.datasets import CaptionRecord
from showtell.decoding import DecodingOptions
from showtell.encoders import encoder_info
from showtell.errors import ShowtellError
from showtell.evaluate import generate
from showtell.runs import new_model, restore_optimizer, save_run_checkpoint, start_run
from showtell.scst import SelfCriticalStage
from showtell.train import CrossEntropyStage
from showtell.vocab import Vocabulary

# Five words each: one caption length, so one epoch is one batch.
CAPTIONS = ["a dog runs on grass", "a man rides a bike", "two kids swim in water"]
RECORDS = [CaptionRecord(Path(f"{i}.jpg"), (c,), "train") for i, c in enumerate(CAPTIONS)]
CONFIG = TrainConfig(embed_dim=16, hidden_dim=32, dropout=0.0, flip=False, amp=False, lr=1e-2, lr_decay=1.0,
                     batch_size=8, min_count=1, device="cpu", scst_lr=1e-2, scst_batch_size=3, scst_max_length=8)
CPU = torch.device("cpu")


def setup(config: TrainConfig = CONFIG):
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    features = torch.randn(len(RECORDS), 2, 8, generator=torch.Generator().manual_seed(1)).half()  # [N, views, D]
    return vocab, new_model(config, len(vocab), 8), features


def test_cross_entropy_epoch_returns_the_loss_of_its_batch_and_learns_the_captions():
    vocab, model, features = setup()
    stage = CrossEntropyStage(CONFIG, model, vocab, RECORDS, features, CPU, quiet=True)
    assert [t for _, t in stage.items] == [vocab.encode(c) for c in CAPTIONS]
    with torch.no_grad():
        before = model.loss(features[:, 0].float(), pad_captions([vocab.encode(c) for c in CAPTIONS])).item()
    first = stage.epoch(1)
    assert first == pytest.approx(before, rel=1e-5)  # one batch: the loss before its step, no dropout
    losses = [stage.epoch(e) for e in range(2, 41)]
    assert losses[-1] < 0.05 * first
    captions = generate(model, vocab, features[:, 0], DecodingOptions(beam_size=1, max_length=10))
    assert captions == CAPTIONS


def test_cross_entropy_learning_rate_decays_per_epoch():
    vocab, model, features = setup()
    stage = CrossEntropyStage(replace(CONFIG, lr_decay=0.5), model, vocab, RECORDS, features, CPU, quiet=True)
    stage.epoch(3)
    assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(CONFIG.lr * 0.25)


@pytest.mark.slow
def test_self_critical_stage_raises_the_reward():
    """From an untrained model the samples' mean CIDEr-D is about 0.7 (a few words in common with the references);
    80 epochs of one batch more than double it (measured with the shared decoding loop's sampler: 0.67 -> 3.54,
    10-epoch means; the reward is noisy from epoch to epoch, so the first and last ten are compared)."""
    vocab, model, features = setup()
    stage = SelfCriticalStage(replace(CONFIG, scst_lr=0.03), model, vocab, RECORDS, features, CPU, quiet=True)
    rewards = [stage.epoch(e) for e in range(1, 81)]
    assert sum(rewards[-10:]) > 2 * sum(rewards[:10])


def test_resumed_run_continues_exactly_and_refuses_other_settings(tmp_path):
    vocab, model, features = setup()
    stage = CrossEntropyStage(CONFIG, model, vocab, RECORDS, features, CPU, quiet=True)
    stage.epoch(1)
    state = {"stage": "xe", "epoch": 1, "best_cider": 0.5, "best_epoch": 1, "bad_epochs": 0, "history": []}
    save_run_checkpoint(tmp_path / "last.safetensors", CONFIG, state, model, vocab,
                        encoder_info(CONFIG.encoder)["preprocess"], optimizer=stage.optimizer)
    straight = copy.deepcopy(stage)

    start = start_run(replace(CONFIG, epochs=50), tmp_path, True, None, RECORDS, 8)  # epochs may change
    assert start.state == state and start.vocab.itos == vocab.itos
    resumed = CrossEntropyStage(CONFIG, start.model, start.vocab, RECORDS, features, CPU, quiet=True)
    restore_optimizer(resumed.optimizer, *start.optimizer)
    assert resumed.epoch(2) == straight.epoch(2)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)

    with pytest.raises(ShowtellError, match="different settings .*: hidden_dim, lr$"):
        start_run(replace(CONFIG, lr=1e-3, hidden_dim=64), tmp_path, True, None, RECORDS, 8)
    with pytest.raises(ShowtellError, match="already holds a run; pass --resume"):
        start_run(CONFIG, tmp_path, False, None, RECORDS, 8)
    fresh = start_run(CONFIG, tmp_path / "new", True, None, RECORDS, 8)  # nothing to resume: a new run
    assert fresh.state["epoch"] == 0 and fresh.optimizer is None
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), setup()[1].parameters()))
