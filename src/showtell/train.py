"""The training loop: cached features (or images end to end), length-bucket batches, teacher
forcing with cross-entropy, real dev decoding and scoring after every epoch, best/last
checkpoints, early stopping, resume, readable logs."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from showtell.checkpoint import load_checkpoint, save_checkpoint
from showtell.config import TrainConfig
from showtell.data import LengthBucketSampler, pad_captions
from showtell.datasets import CaptionRecord, load_corpus
from showtell.decoding import DecodingOptions
from showtell.devices import init_distributed, resolve_device
from showtell.encoders import encoder_info
from showtell.errors import ImageError, ShowtellError
from showtell.evaluate import generate, score_records
from showtell.features import FeatureCache, extract_features, find_features, iter_features
from showtell.fileio import atomic_write_text, sha256_file
from showtell.images import load_image
from showtell.model import ATTENTION, CaptionModel, Ensemble, ModelConfig, create_model
from showtell.vocab import Vocabulary

# Settings a resumed run may change: how long it goes on, and where and how it runs.
RESUMABLE_CHANGES = ("epochs", "patience", "cache_dir", "device", "num_workers")
DEV_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")


def _amp(enabled: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """Mixed precision: fp16 on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16/AMX: ~1.7x here)."""
    if device.type == "cuda":
        return enabled, torch.float16
    return enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported(), torch.bfloat16


class _Log:
    """metrics.csv, optional TensorBoard, and the end-of-run plot."""

    COLUMNS = ("epoch", "stage", "train_loss", "train_perplexity", *DEV_METRICS, "dev_distinct", "lr", "seconds")

    def __init__(self, out: Path):
        self.out = out
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, history: list[dict]) -> None:
        path = self.out / "metrics.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
            w.writeheader()
            for row in history:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.tb is not None and history:
            row = history[-1]
            for k in self.COLUMNS[1:]:
                if isinstance(row.get(k), (int, float)):
                    self.tb.add_scalar(k, row[k], row["epoch"])
            self.tb.flush()

    def plot(self, history: list[dict]) -> Path | None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        epochs = [r["epoch"] for r in history]
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax1.plot(epochs, [r["train_loss"] for r in history], "o-", color="tab:blue", label="train loss")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("train loss", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(epochs, [r["CIDEr"] for r in history], "s-", color="tab:red", label="dev CIDEr")
        ax2.set_ylabel("dev CIDEr", color="tab:red")
        fig.suptitle("showtell training")
        fig.tight_layout()
        path = self.out / "training.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _split_records(corpus, limit: int | None) -> dict[str, list[CaptionRecord]]:
    out = {}
    for split in ("train", "dev"):
        recs = corpus.split(split)
        out[split] = recs[:limit] if limit else recs
        if not out[split]:
            raise ShowtellError(f"dataset has no '{split}' images; training needs a train and a dev split")
    return out


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"state/{i}/{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
               for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, i, k = key.split("/")
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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


class Trainer:
    def __init__(self, config: TrainConfig, out: str | os.PathLike, quiet: bool = False, resume: bool = False):
        self.config, self.out, self.quiet, self.resume = config, Path(out), quiet, resume
        self.device = resolve_device(config.device)
        self.rank, self.world = init_distributed(self.device)
        self.main = self.rank == 0
        self.init = None  # (vocabulary, model, record) of the --init checkpoint, loaded by run()
        self.spatial = config.decoder == ATTENTION  # the model reads feature maps, not pooled features

    def say(self, msg: str) -> None:
        if self.main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # ---- data ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        c = self.config
        corpus = load_corpus(c.dataset, c.root, c.captions, c.images, c.split_name)
        skipped = self.main and not self.quiet and corpus.first_skipped_message()  # said once per data set
        if skipped:
            self.say(f"showtell: warning: {skipped}")
        self.records = _split_records(corpus, c.limit)
        self.info = encoder_info(c.encoder)
        caches = {}
        for split, flip in (("train", c.flip), ("dev", False)):
            if c.end_to_end:  # images go through the (possibly changing) encoder every time: no cache
                continue
            caches[split] = self._features([r.image for r in self.records[split]], flip)
        for split, cache in caches.items():
            if cache.failed:
                self.say(f"showtell: warning: {len(cache.failed)} {split} image(s) could not be read and are left "
                         f"out, e.g. {next(iter(cache.failed.values()))}")
                self.records[split] = [r for r in self.records[split] if str(r.image.resolve()) not in cache.failed]
        self.caches = caches
        self.dev_features = self._cache_tensor("dev")[:, 0] if "dev" in caches else None
        self.train_features = self._cache_tensor("train") if "train" in caches else None

    def _features(self, images: list[Path], flip: bool) -> FeatureCache:
        """The feature cache of ``images``, extracted first when missing. Under torchrun each rank extracts every
        world-th image into a cache of its own (resumable like any cache), then rank 0 joins the shares into the
        one cache that a single process would have built; this needs the cache folder on a shared file system."""
        c = self.config
        kwargs = dict(encoder_name=c.encoder, cache_dir=c.cache_dir, flip=flip, device=str(self.device),
                      num_workers=c.num_workers, spatial=self.spatial)
        if self.world == 1:
            return extract_features(images, quiet=self.quiet, **kwargs)
        cache = find_features(images, c.encoder, c.cache_dir, flip, self.spatial) if self.main else None
        missing = [cache is None]
        torch.distributed.broadcast_object_list(missing, 0)  # rank 0 decides, so every rank takes one path
        if missing[0]:
            self.say(f"extracting features on {self.world} processes")
            extract_features(images[self.rank::self.world], quiet=self.quiet or not self.main, **kwargs)
            torch.distributed.barrier()
            if self.main:
                shares = [extract_features(images[r::self.world], quiet=True, **kwargs) for r in range(self.world)]
                cache = extract_features(images, quiet=True, reuse=shares, **kwargs)
                for share in shares:
                    shutil.rmtree(share.path, ignore_errors=True)
            torch.distributed.barrier()
        return cache or extract_features(images, quiet=True, **kwargs)

    def _cache_tensor(self, split: str) -> torch.Tensor:
        cache = self.caches[split]
        rows = [cache.row(r.image.resolve()) for r in self.records[split]]
        return torch.from_numpy(np.ascontiguousarray(cache.features[rows]))  # [N, views, D] fp16

    # ---- model ---------------------------------------------------------------------------------
    def build(self) -> None:
        c = self.config
        if self.resume and (self.out / "last.safetensors").is_file():
            ckpt = load_checkpoint(self.out / "last.safetensors")
            saved = TrainConfig.from_dict(ckpt.meta["config"])
            diff = [f.name for f in fields(c) if getattr(saved, f.name) != getattr(c, f.name)
                    and f.name not in RESUMABLE_CHANGES and not f.name.startswith("scst_")]
            if diff:
                raise ShowtellError(f"--resume with different settings than the run in {self.out}: {', '.join(diff)}")
            self.vocab, self.model = ckpt.vocab, ckpt.model
            self.state = dict(ckpt.meta["train_state"])
            started_from = self.state.get("init", {}).get("sha256")
            if self.init and started_from and self.init[2]["sha256"] != started_from:
                raise ShowtellError(f"--init {c.init} changed since the run in {self.out} started from it; start a "
                                    "new run (another --out)")
            self.optim_state = self.state.pop("optimizer")
            self.optim_tensors = ckpt.tensors("optimizer/")
            self.encoder_tensors = ckpt.tensors("encoder/")
            self.say(f"resuming {self.out} after epoch {self.state['epoch']}")
        else:
            if self.resume:
                self.say(f"nothing to resume in {self.out}; starting a new run")
            if (self.out / "last.safetensors").exists() and not self.resume:
                raise ShowtellError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                                    "another --out")
            if c.init:
                self.vocab, self.model, record = self.init
            else:
                captions = [cap for r in self.records["train"] for cap in r.captions]
                self.vocab = Vocabulary.build(captions, min_count=c.min_count)
                mc = ModelConfig(vocab_size=len(self.vocab), feature_dim=self.info["feature_dim"],
                                 embed_dim=c.embed_dim, hidden_dim=c.hidden_dim, num_layers=c.num_layers,
                                 dropout=c.dropout, image_dropout=c.image_dropout, batch_norm=c.batch_norm,
                                 decoder=c.decoder, grid=self.info["grid"] if self.spatial else None)
                torch.manual_seed(c.seed)
                self.model = create_model(mc)
            self.state = {"stage": "xe", "epoch": 0, "best_cider": -1.0, "best_epoch": 0, "bad_epochs": 0,
                          "history": [], "train_seconds": 0.0, **({"init": record} if c.init else {})}
            self.optim_tensors, self.encoder_tensors = {}, {}
        self.model.to(self.device)
        self.encoder = None
        if c.end_to_end:
            from showtell.encoders import create_encoder
            self.encoder = create_encoder(c.encoder, fine_tune=c.fine_tune).to(self.device)
            if self.encoder_tensors:
                self.encoder.load_state_dict(self.encoder_tensors)
        params = [p for p in self.model.parameters()]
        if self.encoder is not None and c.fine_tune:
            params += [p for p in self.encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        if self.optim_tensors:
            _restore_optimizer(self.optimizer, self.optim_tensors, self.optim_state)
        self.loss_fn = _Loss(self.model, c.label_smoothing)
        if self.world > 1:
            self.loss_fn = torch.nn.parallel.DistributedDataParallel(
                self.loss_fn, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # Training captions: (record index, <start> words <end>), cut to max_words.
        def encode(cap: str) -> list[int]:
            ids = self.vocab.encode(cap)
            return ids if len(ids) <= c.max_words + 2 else [*ids[: c.max_words + 1], self.vocab.end_id]

        self.items = [(i, encode(cap)) for i, r in enumerate(self.records["train"]) for cap in r.captions]
        self.sampler = LengthBucketSampler([len(t) for _, t in self.items], c.batch_size, seed=c.seed,
                                           num_replicas=self.world, rank=self.rank)

    def _load_init(self) -> tuple[Vocabulary, CaptionModel | Ensemble, dict] | None:
        """The vocabulary and model of the --init checkpoint (its sizes and vocabulary replace the config's) and
        a record of it (file, sha256, an ensemble's members), checked before any work; None when resuming."""
        c = self.config
        if not c.init or (self.resume and (self.out / "last.safetensors").is_file() and not Path(c.init).is_file()):
            return None
        ckpt = load_checkpoint(c.init)
        if ckpt.encoder != c.encoder:
            raise ShowtellError(f"--init {c.init} was trained on {ckpt.encoder} features, not {c.encoder}")
        if ckpt.tensors("encoder/"):
            raise ShowtellError(f"--init {c.init} has a fine-tuned encoder, which --init does not carry over")
        if ckpt.model.config.decoder != c.decoder:
            raise ShowtellError(f"--init {c.init} has a {ckpt.model.config.decoder} decoder; pass --decoder "
                                f"{ckpt.model.config.decoder}")
        if isinstance(ckpt.model, Ensemble) and c.epochs:
            raise ShowtellError("an ensemble trains only in the self-critical stage: pass --epochs 0 and "
                                "--scst-epochs N with --init " + str(c.init))
        record = {"file": str(c.init), "sha256": sha256_file(c.init),
                  **{k: ckpt.meta[k] for k in ("members", "training") if k in ckpt.meta}}
        return ckpt.vocab, ckpt.model, record

    # ---- one epoch -----------------------------------------------------------------------------
    def _batches(self):
        """(caption indices, their photos or None) per step. End to end, loader workers decode and augment the photos
        in parallel with the step (in the main process, decoding bounded a GPU)."""
        if self.encoder is None:
            return ((idx, None) for idx in self.sampler)
        photos = [self.records["train"][rec].image for rec, _ in self.items]
        data = _TrainPhotos(photos, self.encoder.preprocess.transform(train=True))
        return torch.utils.data.DataLoader(data, batch_sampler=self.sampler, num_workers=self.config.num_workers,
                                           collate_fn=_stack_photos, pin_memory=self.device.type == "cuda")

    def _batch_features(self, idx: list[int], rng: np.random.Generator,
                        photos: torch.Tensor | ImageError | None) -> torch.Tensor:
        if isinstance(photos, ImageError):
            raise photos
        if photos is None:
            recs = [self.items[i][0] for i in idx]
            feats = self.train_features[recs]  # [B, views, D]
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

    def train_epoch(self, epoch: int) -> float:
        c = self.config
        self.sampler.set_epoch(epoch)
        torch.manual_seed(c.seed * 1000 + epoch)
        rng = np.random.default_rng([c.seed, epoch])
        self.model.train()
        use_amp, amp_dtype = _amp(c.amp, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        total_loss, total_tokens, seen, t0 = 0.0, 0, 0, time.time()
        bar = tqdm(self._batches(), desc=f"epoch {epoch}", unit="batch", disable=self.quiet or not self.main,
                   leave=False, total=len(self.sampler))
        for idx, photos in bar:
            caps = pad_captions([self.items[i][1] for i in idx]).to(self.device)
            feats = self._batch_features(idx, rng, photos)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                loss = self.loss_fn(feats, caps)
            self.optimizer.zero_grad(set_to_none=True)
            weight = 1.0
            if self.world > 1:  # DDP averages the ranks' gradients: weight each rank by its share of the tokens
                tokens = (caps[:, 1:] != 0).sum().to("cpu", torch.float64).reshape(1)
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
            n = int((caps[:, 1:] != 0).sum())
            total_loss += loss.item() * n
            total_tokens += n
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / total_tokens:.3f}", caps_s=f"{seen / (time.time() - t0):.0f}")
        stats = torch.tensor([total_loss, total_tokens], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(stats)
        return float(stats[0] / stats[1])

    def dev_scores(self) -> dict:
        c = self.config
        feats = self.dev_features
        if feats is None:  # end to end: the encoder may be changing, so no cache
            images = [r.image for r in self.records["dev"]]
            feats = torch.cat([f[:, 0] for _, f, _ in iter_features(self.encoder, images, list(range(len(images))),
                                                                   device=str(self.device), spatial=self.spatial)])
        options = DecodingOptions(beam_size=c.eval_beam_size, max_length=c.eval_max_length)
        captions = generate(self.model, self.vocab, feats.to(self.device), options)
        scores, summary = score_records(self.records["dev"], captions, metrics=DEV_METRICS)
        return {**scores.values, "dev_distinct": summary["distinct"]}

    # ---- the run -------------------------------------------------------------------------------
    def save(self, name: str, optimizer: bool = False) -> None:
        meta = {"config": self.config.to_dict(), "train_state": self.state,
                "metrics": {"dev": self.state.get("best_dev", {})},
                "training": {"command": " ".join(["showtell", *sys.argv[1:]]), "data": self.config.root,
                             "best_epoch": self.state["best_epoch"], "epochs": self.state["epoch"]},
                **({"init": self.state["init"]} if "init" in self.state else {})}
        extra = {}
        if optimizer:
            tensors, ometa = _optimizer_tensors(self.optimizer)
            extra = {f"optimizer/{k}": v for k, v in tensors.items()}
            meta["train_state"] = {**self.state, "optimizer": ometa}
        if self.encoder is not None and self.config.fine_tune:
            extra.update({f"encoder/{k}": v for k, v in self.encoder.state_dict().items()})
        save_checkpoint(self.out / name, self.model, self.vocab, self.config.encoder, self.info["preprocess"],
                        meta=meta, extra_tensors=extra)

    def scst_epoch(self, epoch: int) -> float:
        """One epoch of self-critical training; returns the mean reward of the samples."""
        from showtell.scst import Reward, scst_loss
        from showtell.vocab import tokenize

        c = self.config
        if not hasattr(self, "reward"):
            self.reward = Reward([[tokenize(cap) for cap in r.captions] for r in self.records["train"]], c.scst_bleu)
        torch.manual_seed(c.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(c.seed * 1000 + epoch)
        rng = np.random.default_rng([c.seed, epoch])
        order = rng.permutation(len(self.records["train"]))
        use_amp, amp_dtype = _amp(c.amp, self.device)
        # Samples come from the model as it captions (no dropout; BatchNorm's running statistics): on Flickr8k dev
        # this rewarded better and scored higher BLEU-4 than sampling with dropout on (docs/MODEL_CARD.md).
        self.model.eval()
        total, n = 0.0, 0
        batches = [order[i:i + c.scst_batch_size] for i in range(0, len(order), c.scst_batch_size)]
        bar = tqdm(batches, desc=f"scst {epoch}", unit="batch", disable=self.quiet or not self.main, leave=False)
        for idx in bar:
            feats = self.train_features[idx]
            views = rng.integers(0, feats.shape[1], size=len(idx))
            feats = feats[torch.arange(len(idx)), torch.from_numpy(views)].float().to(self.device)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                loss, reward = scst_loss(self.model, feats, idx.tolist(), self.reward, self.vocab.itos,
                                         samples=c.scst_samples, max_length=c.scst_max_length,
                                         baseline=c.scst_baseline,
                                         end_id=self.vocab.end_id, generator=gen)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            total, n = total + reward * len(idx), n + len(idx)
            bar.set_postfix(reward=f"{total / n:.3f}")
        return total / n

    def _end_epoch(self, epoch: int, loss: float, seconds: float, log: _Log) -> None:
        """Dev scores, history, best/last checkpoints and logs after one epoch (rank 0)."""
        dev = self.dev_scores()
        row = {"epoch": epoch, "stage": self.state["stage"], "train_loss": loss,
               "train_perplexity": math.exp(min(loss, 50)) if self.state["stage"] == "xe" else "",
               **dev, "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds}
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
            self.save("best.safetensors")
        self.save("last.safetensors", optimizer=True)
        log.write(self.state["history"])

    def _start_scst(self) -> None:
        """Switch to the self-critical stage, starting from the best cross-entropy weights."""
        best = load_checkpoint(self.out / "best.safetensors")
        self.model.load_state_dict(best.model.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.scst_lr)
        self.state.update(stage="scst", bad_epochs=0, scst_start=self.state["epoch"])
        self.say(f"self-critical training from the best cross-entropy epoch {self.state['best_epoch']}")

    def run(self) -> dict:
        c = self.config
        if c.scst_epochs and self.world > 1:  # before any work, on every rank
            raise ShowtellError("self-critical training runs in one process; drop --scst-epochs under torchrun")
        self.init = self._load_init()  # a bad --init is one line before the slow feature stage
        if self.init:
            self.say(f"starting from {c.init}")
        self.prepare()  # reads and checks the data first: a bad dataset leaves no empty run folder behind
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.build()
        if self.main:
            atomic_write_text(self.out / "config.json", json.dumps(c.to_dict(), indent=2) + "\n")
        log = _Log(self.out) if self.main else None
        if self.state["epoch"] == 0 and self.main:
            base = self.dev_scores()
            if c.init:  # the starting model is the one to beat
                self.say(f"starting model: dev CIDEr {base['CIDEr']:.3f}")
                self.state.update(init_dev=base, best_cider=base["CIDEr"],
                                  best_dev={k: base[k] for k in DEV_METRICS})
                self.save("best.safetensors")
            else:
                self.say(f"untrained model: dev CIDEr {base['CIDEr']:.3f}")
                self.state["untrained_dev"] = base
        trained = len(self.state["history"])
        while (self.state["stage"] == "xe" and self.state["epoch"] < c.epochs
               and self.state["bad_epochs"] < c.patience):
            epoch = self.state["epoch"] + 1
            for g in self.optimizer.param_groups:
                g["lr"] = c.lr * c.lr_decay ** (epoch - 1)
            t0 = time.time()
            loss = self.train_epoch(epoch)
            stop = torch.tensor([0])
            if self.main:
                self._end_epoch(epoch, loss, time.time() - t0, log)
                stop[0] = int(self.state["bad_epochs"] >= c.patience)
            if self.world > 1:
                torch.distributed.broadcast(stop, 0)
                state = [self.state]
                torch.distributed.broadcast_object_list(state, 0)
                self.state = state[0]
        if self.main and self.state["stage"] == "xe" and self.state["bad_epochs"] >= c.patience:
            self.say(f"early stop: no better dev CIDEr for {c.patience} epochs")
        if c.scst_epochs and self.main:
            if self.state["stage"] == "xe":
                self._start_scst()
            while (self.state["epoch"] - self.state["scst_start"] < c.scst_epochs
                   and self.state["bad_epochs"] < c.patience):
                epoch = self.state["epoch"] + 1
                t0 = time.time()
                reward = self.scst_epoch(epoch)
                self._end_epoch(epoch, reward, time.time() - t0, log)
        if self.main:
            self.say(self._summary(len(self.state["history"]) - trained, log))
        return self.state

    def _summary(self, trained: int, log: _Log) -> str:
        """The last line of a run: what it trained and where the checkpoints are; honest when nothing was trained."""
        s = self.state
        if not s["history"]:  # no epoch at all: only a starting model (--init, --epochs 0) was scored
            return (f"no epoch trained; the starting model {self.config.init} scores dev CIDEr {s['best_cider']:.3f} "
                    f"(best.safetensors in {self.out} is a copy of it)")
        plot = log.plot(s["history"])
        where = "the starting model" if s["best_epoch"] == 0 else f"epoch {s['best_epoch']}"
        return ("" if trained else f"nothing left to train after epoch {s['epoch']}; ") + (
            f"best dev CIDEr {s['best_cider']:.3f} at {where}; checkpoints in {self.out}"
            + (f"; plot {plot}" if plot else ""))
