"""The training run: cached features (or images end to end), length-bucket batches, teacher forcing with
cross-entropy, an optional self-critical stage (showtell.scst), real dev decoding and scoring after every epoch,
best/last checkpoints, early stopping, resume and readable logs (showtell.runs).

    Trainer(config, out).run()

reads the data, starts or resumes the run, then trains epoch by epoch. Its parts stand alone: ``load_data``,
``CrossEntropyStage`` (one epoch of teacher forcing, data-parallel under torchrun), ``dev_scores``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from showtell.checkpoint import load_checkpoint
from showtell.config import TrainConfig
from showtell.data import LengthBucketSampler, pad_captions
from showtell.datasets import CaptionRecord, load_corpus
from showtell.decoding import DecodingOptions
from showtell.devices import init_distributed, mixed_precision, resolve_device
from showtell.encoders import encoder_info
from showtell.errors import ImageError, ShowtellError
from showtell.evaluate import generate, score_records
from showtell.features import FeatureCache, extract_features_distributed, iter_features
from showtell.fileio import atomic_write_text
from showtell.images import load_image
from showtell.model import ATTENTION, CaptionModel, Ensemble
from showtell.runs import DEV_METRICS, MetricsLog, load_init, restore_optimizer, save_run_checkpoint, start_run
from showtell.scst import SelfCriticalStage
from showtell.vocab import SPECIAL, Vocabulary


@dataclass
class TrainData:
    """The train and dev records, and their cached features in record order: train [N, views, D] fp16 (view 1 the
    flipped image with ``flip``), dev [N, D] fp16 (feature maps [.., positions, D] for an attention decoder); both
    None end to end (images go through the encoder)."""

    records: dict[str, list[CaptionRecord]]
    train_features: torch.Tensor | None
    dev_features: torch.Tensor | None


def load_data(config: TrainConfig, device: torch.device, rank: int = 0, world: int = 1, quiet: bool = False,
              say=lambda msg: None) -> TrainData:
    """Read the dataset's train and dev splits (the first ``limit`` images of each) and their features, extracted
    into the cache first when missing (a share per rank under torchrun). Unreadable images are left out with a
    warning."""
    c = config
    corpus = load_corpus(c.dataset, c.root, c.captions, c.images, c.split_name)
    skipped = rank == 0 and not quiet and corpus.first_skipped_message()  # said once per data set
    if skipped:
        say(f"showtell: warning: {skipped}")
    records = {}
    for split in ("train", "dev"):
        recs = corpus.split(split)
        records[split] = recs[:c.limit] if c.limit else recs
        if not records[split]:
            raise ShowtellError(f"dataset has no '{split}' images; training needs a train and a dev split")
    if c.end_to_end:  # images go through the (possibly changing) encoder every time: no cache
        return TrainData(records, None, None)
    caches: dict[str, FeatureCache] = {}
    for split, flip in (("train", c.flip), ("dev", False)):
        caches[split] = extract_features_distributed(
            [r.image for r in records[split]], c.encoder, rank, world, cache_dir=c.cache_dir, flip=flip,
            num_workers=c.num_workers, device=str(device), quiet=quiet, spatial=c.decoder == ATTENTION)
    for split, cache in caches.items():
        if cache.failed:
            say(f"showtell: warning: {len(cache.failed)} {split} image(s) could not be read and are left "
                f"out, e.g. {next(iter(cache.failed.values()))}")
            records[split] = [r for r in records[split] if str(r.image.resolve()) not in cache.failed]

    def tensor(split: str) -> torch.Tensor:
        rows = [caches[split].row(r.image.resolve()) for r in records[split]]
        return torch.from_numpy(np.ascontiguousarray(caches[split].features[rows]))

    return TrainData(records, tensor("train"), tensor("dev")[:, 0])


class _TrainPhotos(torch.utils.data.Dataset):
    """The augmented photo of each training caption, by caption index (end-to-end training)."""

    def __init__(self, photos: list[Path], transform):
        self.photos, self.transform = photos, transform

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, self.transform(load_image(self.photos[i]))
        except ImageError as e:  # raised in the main process, as one line (a worker's exception carries its traceback)
            return i, str(e)


def _stack_photos(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | ImageError]:
    errors = [x for _, x in items if isinstance(x, str)]
    return [i for i, _ in items], ImageError(errors[0]) if errors else torch.stack([x for _, x in items])


class _Loss(torch.nn.Module):
    """The model's teacher-forced loss as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: CaptionModel, label_smoothing: float):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        return self.model.loss(features, captions, label_smoothing=self.label_smoothing)


class CrossEntropyStage:
    """Teacher forcing with cross-entropy: every training caption (<start> words <end>, cut to ``max_words``) once
    an epoch, in length-bucket batches; Adam with the learning rate decayed per epoch, gradient clipping, mixed
    precision. The image of a caption is a random view of its cached features ([N, views, D], one row a record),
    or with an ``encoder`` (end to end) the record's image through it. Under torchrun (``world`` > 1) each rank
    trains its part of every global batch and the gradients are averaged with weights by token count."""

    def __init__(self, config: TrainConfig, model: CaptionModel, vocab: Vocabulary, records: list[CaptionRecord],
                 features: torch.Tensor | None, device: torch.device, rank: int = 0, world: int = 1,
                 encoder: torch.nn.Module | None = None, quiet: bool = False):
        c = config
        self.config, self.model, self.records, self.features = config, model, records, features
        self.device, self.rank, self.world, self.encoder, self.quiet = device, rank, world, encoder, quiet
        self.spatial = c.decoder == ATTENTION  # the model reads feature maps, not pooled features
        params = list(model.parameters())
        if encoder is not None and c.fine_tune:
            params += [p for p in encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        self.loss_fn = _Loss(model, c.label_smoothing)
        if world > 1:
            self.loss_fn = torch.nn.parallel.DistributedDataParallel(
                self.loss_fn, device_ids=[device.index] if device.type == "cuda" else None)

        def encode(cap: str) -> list[int]:
            ids = vocab.encode(cap)
            return ids if len(ids) <= c.max_words + 2 else [*ids[: c.max_words + 1], vocab.special.end]

        self.items = [(i, encode(cap)) for i, r in enumerate(records) for cap in r.captions]  # (record, tokens)
        self.sampler = LengthBucketSampler([len(t) for _, t in self.items], c.batch_size, seed=c.seed,
                                           num_replicas=world, rank=rank)

    def _batches(self):
        """(caption indices, their photos or None) per step. End to end, loader workers decode and augment the photos
        in parallel with the step (in the main process, decoding bounded a GPU)."""
        if self.encoder is None:
            return ((idx, None) for idx in self.sampler)
        photos = [self.records[rec].image for rec, _ in self.items]
        data = _TrainPhotos(photos, self.encoder.preprocess.transform(train=True))
        return torch.utils.data.DataLoader(data, batch_sampler=self.sampler, num_workers=self.config.num_workers,
                                           collate_fn=_stack_photos, pin_memory=self.device.type == "cuda")

    def _batch_features(self, idx: list[int], rng: np.random.Generator,
                        photos: torch.Tensor | ImageError | None) -> torch.Tensor:
        if isinstance(photos, ImageError):
            raise photos
        if photos is None:
            recs = [self.items[i][0] for i in idx]
            feats = self.features[recs]  # [B, views, D]
            views = rng.integers(0, feats.shape[1], size=len(idx)) if self.config.flip else np.zeros(len(idx), int)
            return feats[torch.arange(len(idx)), torch.from_numpy(views)].float().to(self.device)
        # Length buckets make batches of every size; each new input shape costs the GPU's convolution library a new
        # plan, which made the first end-to-end epoch ~4x the second. So the encoder sees at most four batch sizes:
        # the batch is filled up to the next quarter of --batch-size with repeats of its photos, and cut after.
        n, step = len(photos), -(-self.config.batch_size // 4)
        x = photos[torch.arange(max(n, min(self.config.batch_size, -(-n // step) * step))) % n]
        x = x.to(self.device, non_blocking=True)
        encode = self.encoder.feature_map if self.spatial else self.encoder
        if self.config.fine_tune:
            self.encoder.train()
            return encode(x)[:n]
        with torch.no_grad():
            return encode(x)[:n]

    def epoch(self, epoch: int) -> float:
        """Train epoch ``epoch`` (1, 2, ...: its learning rate, batches and seeds); returns the mean loss per token
        over all ranks."""
        c = self.config
        for g in self.optimizer.param_groups:
            g["lr"] = c.lr * c.lr_decay ** (epoch - 1)
        self.sampler.set_epoch(epoch)
        torch.manual_seed(c.seed * 1000 + epoch)
        rng = np.random.default_rng([c.seed, epoch])
        self.model.train()
        use_amp, amp_dtype = mixed_precision(c.amp, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        total_loss, total_tokens, seen, t0 = 0.0, 0, 0, time.time()
        bar = tqdm(self._batches(), desc=f"epoch {epoch}", unit="batch", disable=self.quiet or self.rank != 0,
                   leave=False, total=len(self.sampler))
        for idx, photos in bar:
            caps = pad_captions([self.items[i][1] for i in idx]).to(self.device)
            feats = self._batch_features(idx, rng, photos)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                loss = self.loss_fn(feats, caps)
            self.optimizer.zero_grad(set_to_none=True)
            weight = 1.0
            if self.world > 1:  # DDP averages the ranks' gradients: weight each rank by its share of the tokens
                tokens = (caps[:, 1:] != SPECIAL.pad).sum().to("cpu", torch.float64).reshape(1)
                mine = tokens.item()
                torch.distributed.all_reduce(tokens)
                weight = mine * self.world / tokens.item()
            scaler.scale(loss * weight).backward()
            if self.world > 1 and self.encoder is not None and c.fine_tune:  # outside DDP: average by hand
                for p in self.encoder.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= self.world
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           c.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
            n = int((caps[:, 1:] != SPECIAL.pad).sum())
            total_loss += loss.item() * n
            total_tokens += n
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / total_tokens:.3f}", caps_s=f"{seen / (time.time() - t0):.0f}")
        stats = torch.tensor([total_loss, total_tokens], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(stats)
        return float(stats[0] / stats[1])


def dev_scores(model: CaptionModel | Ensemble, vocab: Vocabulary, records: list[CaptionRecord],
               features: torch.Tensor, config: TrainConfig) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr and the fraction of distinct captions (``dev_distinct``) of the captions the model
    decodes for ``features`` [N, D] (on the model's device) with the config's eval beam size and length."""
    options = DecodingOptions(beam_size=config.eval_beam_size, max_length=config.eval_max_length)
    captions = generate(model, vocab, features, options)
    scores, summary = score_records(records, captions, metrics=DEV_METRICS)
    return {**scores.values, "dev_distinct": summary["distinct"]}


class Trainer:
    """A training run into the folder ``out``. Building it checks --init and the data, extracts missing features,
    and starts or resumes the run (all checks before the folder is written); ``run()`` trains the epochs that are
    left: cross-entropy with early stopping on dev CIDEr, then the self-critical stage from the best epoch. Under
    torchrun every rank trains, rank 0 alone evaluates and writes."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike, quiet: bool = False, resume: bool = False):
        c = config
        self.config, self.out, self.quiet = config, Path(out), quiet
        self.device = resolve_device(c.device)
        self.rank, self.world = init_distributed(self.device)
        self.main = self.rank == 0
        self.spatial = c.decoder == ATTENTION  # the model reads feature maps, not pooled features
        if c.scst_epochs and self.world > 1:  # before any work, on every rank
            raise ShowtellError("self-critical training runs in one process; drop --scst-epochs under torchrun")
        if c.scst_epochs and c.end_to_end:
            raise ShowtellError("self-critical training needs cached features; drop --scst-epochs or --end-to-end")
        init = load_init(c, self.out, resume)  # a bad --init is one line before the slow feature stage
        if init:
            self.say(f"starting from {c.init}")
        # reads and checks the data first: a bad dataset leaves no empty run folder behind
        self.data = load_data(c, self.device, self.rank, self.world, quiet=quiet, say=self.say)
        self.info = encoder_info(c.encoder)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        start = start_run(c, self.out, resume, init, self.data.records["train"], self.info["feature_dim"],
                          self.info["grid"] if self.spatial else None, self.say)
        self.vocab, self.model, self.state = start.vocab, start.model.to(self.device), start.state
        self.encoder = None  # end to end: the image encoder, trained with --fine-tune
        if c.end_to_end:
            from showtell.encoders import create_encoder
            self.encoder = create_encoder(c.encoder, fine_tune=c.fine_tune).to(self.device)
            if start.encoder:
                self.encoder.load_state_dict(start.encoder)
        self.xe = CrossEntropyStage(c, self.model, self.vocab, self.data.records["train"], self.data.train_features,
                                    self.device, self.rank, self.world, self.encoder, quiet=quiet)
        self.scst = SelfCriticalStage(c, self.model, self.vocab, self.data.records["train"], self.data.train_features,
                                      self.device, quiet=quiet) if c.scst_epochs else None
        if start.optimizer and start.optimizer[0] and self._optimizer() is not None:
            restore_optimizer(self._optimizer(), *start.optimizer)
        if self.main:
            atomic_write_text(self.out / "config.json", json.dumps(c.to_dict(), indent=2) + "\n")
        self.log = MetricsLog(self.out) if self.main else None

    def say(self, msg: str) -> None:
        if self.main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def _optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the stage the run is in."""
        if self.state["stage"] == "scst":
            return self.scst.optimizer if self.scst else None
        return self.xe.optimizer

    def run(self) -> dict:
        """Train the epochs left; returns the run's state (history, best epoch and dev scores)."""
        c = self.config
        if self.state["epoch"] == 0 and self.main:
            self._score_start()
        trained = len(self.state["history"])
        while (self.state["stage"] == "xe" and self.state["epoch"] < c.epochs
               and self.state["bad_epochs"] < c.patience):
            epoch = self.state["epoch"] + 1
            t0 = time.time()
            loss = self.xe.epoch(epoch)
            if self.main:
                self._end_epoch(epoch, loss, time.time() - t0)
            if self.world > 1:  # every rank goes on with rank 0's state (its best epoch, its early stop)
                state = [self.state]
                torch.distributed.broadcast_object_list(state, 0)
                self.state = state[0]
        if self.main and self.state["stage"] == "xe" and self.state["bad_epochs"] >= c.patience:
            self.say(f"early stop: no better dev CIDEr for {c.patience} epochs")
        if self.scst:
            if self.state["stage"] == "xe":
                self._start_scst()
            while (self.state["epoch"] - self.state["scst_start"] < c.scst_epochs
                   and self.state["bad_epochs"] < c.patience):
                epoch = self.state["epoch"] + 1
                t0 = time.time()
                reward = self.scst.epoch(epoch)
                self._end_epoch(epoch, reward, time.time() - t0)
        if self.main:
            self.say(self._summary(len(self.state["history"]) - trained))
        return self.state

    def _dev_scores(self) -> dict:
        feats = self.data.dev_features
        if feats is None:  # end to end: the encoder may be changing, so no cache
            images = [r.image for r in self.data.records["dev"]]
            feats = torch.cat([f[:, 0] for _, f, _ in iter_features(self.encoder, images, list(range(len(images))),
                                                                   device=str(self.device), spatial=self.spatial)])
        return dev_scores(self.model, self.vocab, self.data.records["dev"], feats.to(self.device), self.config)

    def _score_start(self) -> None:
        """Dev scores of the model before training: with --init it is the one to beat (and best.safetensors)."""
        base = self._dev_scores()
        if self.config.init:
            self.say(f"starting model: dev CIDEr {base['CIDEr']:.3f}")
            self.state.update(init_dev=base, best_cider=base["CIDEr"], best_dev={k: base[k] for k in DEV_METRICS})
            self._save("best.safetensors")
        else:
            self.say(f"untrained model: dev CIDEr {base['CIDEr']:.3f}")
            self.state["untrained_dev"] = base

    def _save(self, name: str, optimizer: bool = False) -> None:
        tuned = self.encoder if self.encoder is not None and self.config.fine_tune else None
        save_run_checkpoint(self.out / name, self.config, self.state, self.model, self.vocab,
                            self.info["preprocess"], optimizer=self._optimizer() if optimizer else None,
                            encoder=tuned)

    def _end_epoch(self, epoch: int, loss: float, seconds: float) -> None:
        """Dev scores, history, best/last checkpoints and logs after one epoch (rank 0)."""
        dev = self._dev_scores()
        row = {"epoch": epoch, "stage": self.state["stage"], "train_loss": loss,
               "train_perplexity": math.exp(min(loss, 50)) if self.state["stage"] == "xe" else "",
               **dev, "lr": self._optimizer().param_groups[0]["lr"], "seconds": seconds}
        self.state["history"].append(row)
        self.state["train_seconds"] += seconds
        self.state["epoch"] = epoch
        improved = dev["CIDEr"] > self.state["best_cider"]
        if improved:
            self.state.update(best_cider=dev["CIDEr"], best_epoch=epoch, bad_epochs=0,
                              best_dev={k: dev[k] for k in DEV_METRICS})
        else:
            self.state["bad_epochs"] += 1
        what = "loss" if self.state["stage"] == "xe" else "reward"
        self.say(f"epoch {epoch} ({self.state['stage']}): {what} {loss:.3f}  dev BLEU-4 {dev['BLEU-4']:.3f}  "
                 f"CIDEr {dev['CIDEr']:.3f}  distinct {dev['dev_distinct']:.0%}  ({seconds:.0f}s)"
                 + ("  *best" if improved else ""))
        if improved:
            self._save("best.safetensors")
        self._save("last.safetensors", optimizer=True)
        self.log.write(self.state["history"])

    def _start_scst(self) -> None:
        """Switch to the self-critical stage, starting from the best cross-entropy weights."""
        best = load_checkpoint(self.out / "best.safetensors")
        self.model.load_state_dict(best.model.state_dict())
        self.state.update(stage="scst", bad_epochs=0, scst_start=self.state["epoch"])
        self.say(f"self-critical training from the best cross-entropy epoch {self.state['best_epoch']}")

    def _summary(self, trained: int) -> str:
        """The last line of a run: what it trained and where the checkpoints are; honest when nothing was trained."""
        s = self.state
        if not s["history"]:  # no epoch at all: only a starting model (--init, --epochs 0) was scored
            return (f"no epoch trained; the starting model {self.config.init} scores dev CIDEr {s['best_cider']:.3f} "
                    f"(best.safetensors in {self.out} is a copy of it)")
        plot = self.log.plot(s["history"])
        where = "the starting model" if s["best_epoch"] == 0 else f"epoch {s['best_epoch']}"
        return ("" if trained else f"nothing left to train after epoch {s['epoch']}; ") + (
            f"best dev CIDEr {s['best_cider']:.3f} at {where}; checkpoints in {self.out}"
            + (f"; plot {plot}" if plot else ""))
