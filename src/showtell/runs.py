"""A training run's folder: what a run starts from (a new model, an --init checkpoint, or the last checkpoint of the
run it resumes, each checked in one line before any work), its checkpoints (best; last with the optimizer state)
and its logs (metrics.csv, optional TensorBoard, the end-of-run plot)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from showtell.checkpoint import load_checkpoint, save_checkpoint
from showtell.config import TrainConfig
from showtell.datasets import CaptionRecord
from showtell.errors import ShowtellError
from showtell.fileio import sha256_file
from showtell.model import CaptionModel, Ensemble, ModelConfig, create_model
from showtell.vocab import Vocabulary

# Settings a resumed run may change: how long it goes on, and where and how it runs (and the self-critical stage's).
RESUMABLE_CHANGES = ("epochs", "patience", "cache_dir", "device", "num_workers")
DEV_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")


@dataclass
class Init:
    """The --init checkpoint: its vocabulary and model replace the config's sizes; ``record`` is what the run keeps
    of it (file, sha256, an ensemble's members)."""

    vocab: Vocabulary
    model: CaptionModel | Ensemble
    record: dict


@dataclass
class Start:
    """What a run starts from. ``state`` is the run's progress (stage, epoch, best dev scores, history);
    ``optimizer`` the saved optimizer (tensors, param groups) and ``encoder`` the fine-tuned encoder weights of a
    resumed run (None and empty otherwise)."""

    vocab: Vocabulary
    model: CaptionModel | Ensemble
    state: dict
    optimizer: tuple[dict[str, torch.Tensor], dict] | None = None
    encoder: dict[str, torch.Tensor] | None = None


def _resuming(out: Path, resume: bool) -> bool:
    return resume and (out / "last.safetensors").is_file()


def load_init(config: TrainConfig, out: Path, resume: bool) -> Init | None:
    """The --init checkpoint, checked against the config; None without --init, or when resuming a run whose
    starting file is gone (the run holds all it needs)."""
    c = config
    if not c.init or (_resuming(out, resume) and not Path(c.init).is_file()):
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
    return Init(ckpt.vocab, ckpt.model, record)


def new_model(config: TrainConfig, vocab_size: int, feature_dim: int, grid: int | None = None) -> torch.nn.Module:
    """A fresh model of the config's decoder and sizes (``grid``: the side of the feature map an attention decoder
    attends over), its weights drawn from the config's seed."""
    c = config
    mc = ModelConfig(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=c.embed_dim, hidden_dim=c.hidden_dim,
                     num_layers=c.num_layers, dropout=c.dropout, image_dropout=c.image_dropout,
                     batch_norm=c.batch_norm, decoder=c.decoder, grid=grid)
    torch.manual_seed(c.seed)
    return create_model(mc)


def start_run(config: TrainConfig, out: Path, resume: bool, init: Init | None, train: list[CaptionRecord],
              feature_dim: int, grid: int | None = None, say: Callable[[str], None] = lambda msg: None) -> Start:
    """The run in ``out`` resumed (same settings but RESUMABLE_CHANGES and scst_*; the same --init file), else a new
    one: from ``init``, or a vocabulary of the ``train`` captions and a fresh model. A folder that holds a run is
    refused without ``resume``."""
    c = config
    if _resuming(out, resume):
        ckpt = load_checkpoint(out / "last.safetensors")
        saved = TrainConfig.from_dict(ckpt.meta["config"])
        diff = [f.name for f in fields(c) if getattr(saved, f.name) != getattr(c, f.name)
                and f.name not in RESUMABLE_CHANGES and not f.name.startswith("scst_")]
        if diff:
            raise ShowtellError(f"--resume with different settings than the run in {out}: {', '.join(diff)}")
        state = dict(ckpt.meta["train_state"])
        started_from = state.get("init", {}).get("sha256")
        if init and started_from and init.record["sha256"] != started_from:
            raise ShowtellError(f"--init {c.init} changed since the run in {out} started from it; start a "
                                "new run (another --out)")
        optimizer = (ckpt.tensors("optimizer/"), state.pop("optimizer"))
        say(f"resuming {out} after epoch {state['epoch']}")
        return Start(ckpt.vocab, ckpt.model, state, optimizer, ckpt.tensors("encoder/"))
    if resume:
        say(f"nothing to resume in {out}; starting a new run")
    if (out / "last.safetensors").exists() and not resume:
        raise ShowtellError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if init:
        vocab, model = init.vocab, init.model
    else:
        vocab = Vocabulary.build([cap for r in train for cap in r.captions], min_count=c.min_count)
        model = new_model(c, len(vocab), feature_dim, grid)
    state = {"stage": "xe", "epoch": 0, "best_cider": -1.0, "best_epoch": 0, "bad_epochs": 0,
             "history": [], "train_seconds": 0.0, **({"init": init.record} if init else {})}
    return Start(vocab, model, state)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"state/{i}/{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
               for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load the optimizer state that ``save_run_checkpoint`` stored (``Start.optimizer``) into ``opt``."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, i, k = key.split("/")
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_run_checkpoint(path: Path, config: TrainConfig, state: dict, model: CaptionModel | Ensemble,
                        vocab: Vocabulary, preprocess: dict, optimizer: torch.optim.Optimizer | None = None,
                        encoder: torch.nn.Module | None = None) -> None:
    """A checkpoint of the run: the model with its config, progress, best dev scores and the command that trained it;
    with ``optimizer`` its state (what --resume needs), with ``encoder`` the fine-tuned encoder's weights."""
    meta = {"config": config.to_dict(), "train_state": state,
            "metrics": {"dev": state.get("best_dev", {})},
            "training": {"command": " ".join(["showtell", *sys.argv[1:]]), "data": config.root,
                         "best_epoch": state["best_epoch"], "epochs": state["epoch"]},
            **({"init": state["init"]} if "init" in state else {})}
    extra = {}
    if optimizer is not None:
        tensors, ometa = _optimizer_tensors(optimizer)
        extra = {f"optimizer/{k}": v for k, v in tensors.items()}
        meta["train_state"] = {**state, "optimizer": ometa}
    if encoder is not None:
        extra.update({f"encoder/{k}": v for k, v in encoder.state_dict().items()})
    save_checkpoint(path, model, vocab, config.encoder, preprocess, meta=meta, extra_tensors=extra)


class MetricsLog:
    """metrics.csv, optional TensorBoard, and the end-of-run plot."""

    COLUMNS = ("epoch", "stage", "train_loss", "train_perplexity", *DEV_METRICS, "dev_distinct", "lr", "seconds")

    def __init__(self, out: Path):
        self.out = out
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
