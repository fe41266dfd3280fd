"""One checkpoint file: safetensors weights plus JSON metadata, nothing pickled.

The metadata holds the format version, the model config, the vocabulary, the encoder name and
its preprocessing, and whatever the trainer adds (config, summary, metrics). Loading needs
nothing else. Extra tensors ride along under a prefix: ``optimizer/`` (training state for
``--resume``, in ``last.safetensors`` only) and ``encoder/`` (an encoder whose last stage was
fine-tuned).

Model weights are stored as fp32, fp16, or int8: each weight matrix as int8 with one fp32 scale per row
(``<name>.int8_scale``; symmetric, the row's largest magnitude maps to 127), vectors as fp16. Loading gives fp32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from showtell.errors import CheckpointError, ShowtellError
from showtell.fileio import atomic_path
from showtell.model import CaptionModel, Ensemble, ModelConfig
from showtell.vocab import Vocabulary

FORMAT = "showtell-checkpoint"
FORMAT_VERSION = 1
EXTRA_PREFIXES = ("optimizer/", "encoder/")
WEIGHTS = ("fp32", "fp16", "int8")
INT8_SCALE = ".int8_scale"


@dataclass
class Checkpoint:
    model: CaptionModel | Ensemble
    vocab: Vocabulary
    encoder: str
    preprocess: dict
    meta: dict = field(default_factory=dict)          # everything else in the metadata (training, metrics, ...)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "optimizer/...", "encoder/..."

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Extra tensors under ``prefix`` (e.g. "encoder/"), with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.extra_tensors.items() if k.startswith(prefix)}


def save_checkpoint(path: str | os.PathLike, model: CaptionModel | Ensemble, vocab: Vocabulary, encoder: str,
                    preprocess: dict, meta: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    weights: str = "fp32") -> None:
    """Write the checkpoint atomically (temp file + rename), the model weights as ``weights`` (see WEIGHTS)."""
    if len(vocab) != model.config.vocab_size:
        raise ShowtellError(f"vocabulary has {len(vocab)} tokens but the model expects {model.config.vocab_size}")
    if weights not in WEIGHTS:
        raise ShowtellError(f"weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if not v.is_floating_point() or weights == "fp32":
            tensors[k] = v
        elif weights == "int8" and v.dim() == 2:
            v = v.float()
            scale = v.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            tensors[k] = torch.round(v / scale).to(torch.int8)
            tensors[k + INT8_SCALE] = scale
        else:
            tensors[k] = v.half()
    for k, v in (extra_tensors or {}).items():
        if not k.startswith(EXTRA_PREFIXES):
            raise ValueError(f"extra tensor {k!r} must start with one of {EXTRA_PREFIXES}")
        tensors[k] = v.detach().cpu().contiguous()
    header = {"format": FORMAT, "version": FORMAT_VERSION, "model": model.config.to_dict(),
              **({"ensemble": len(model.members)} if isinstance(model, Ensemble) else {}),
              "vocab": vocab.to_dict(), "encoder": encoder, "preprocess": preprocess, **(meta or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"showtell": json.dumps(header)})


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint, without loading weights."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)  # safetensors: an 8-byte header length, then the JSON header's "{"
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    # torch.save's zip, or a bare pickle (protocol 2-5); the "{" test keeps a real header length that starts alike
    pickled = head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
    if pickled and head[8:9] != b"{":
        raise CheckpointError(f"{path}: not a safetensors checkpoint but a pickle (torch.save) file; showtell "
                              "never unpickles files, as that can run code")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("showtell")
    except (SafetensorError, OSError, ValueError) as e:
        detail = str(e).splitlines()[0][:120]
        if "not fully covered" in detail:  # the header describes more bytes than the file has
            raise CheckpointError(f"{path}: checkpoint is truncated (the file is shorter than its header says; "
                                  "copy or download it again)") from None
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({detail})") from None
    if raw is None:
        raise CheckpointError(f"{path}: a safetensors file but not a showtell checkpoint (no 'showtell' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: not a showtell checkpoint (metadata format {found!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')!r} is not supported "
                              f"(this showtell {_version()} reads version {FORMAT_VERSION})")
    return meta


def _version() -> str:
    from showtell import __version__
    return __version__


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> Checkpoint:
    """Rebuild the model, vocabulary and encoder description from one file."""
    meta = dict(read_metadata(path))
    try:
        tensors = load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({str(e).splitlines()[0][:120]})") from None
    try:
        vocab = Vocabulary.from_dict(meta.pop("vocab"))
        config = ModelConfig.from_dict(meta.pop("model"))
        members = meta.pop("ensemble", None)
        model = CaptionModel(config) if members is None else Ensemble(config, members)
        encoder, preprocess = meta.pop("encoder"), meta.pop("preprocess")
    except (KeyError, TypeError, ShowtellError) as e:
        raise CheckpointError(f"{path}: incomplete or invalid checkpoint metadata ({e})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {len(vocab)} tokens but the model config says "
                              f"{config.vocab_size}")
    extra = {k: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIXES)}
    weights = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()
               if not k.startswith(EXTRA_PREFIXES) and not k.endswith(INT8_SCALE)}
    for k, v in weights.items():
        if v.dtype == torch.int8:  # an int8 weight matrix: dequantize with its per-row scale
            if k + INT8_SCALE not in tensors:
                raise CheckpointError(f"{path}: int8 weight {k} has no {k + INT8_SCALE}")
            weights[k] = v.float() * tensors[k + INT8_SCALE].float()
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: weights do not match the stored model config ({detail[:200]})") from None
    model.eval()
    return Checkpoint(model, vocab, encoder, preprocess, meta, extra)


def fold_checkpoints(paths: list[str | os.PathLike], out: str | os.PathLike, meta: dict | None = None,
                     weights: str = "fp32") -> Checkpoint:
    """Fold trained checkpoints (one model config, vocabulary and encoder) into one ensemble checkpoint at ``out``.
    Its metadata is the first member's, updated by ``meta``, with each member's file name and training record."""
    if len(paths) < 2:
        raise ShowtellError("an ensemble needs at least 2 checkpoints")
    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise ShowtellError("the same checkpoint is given twice; an ensemble needs models trained apart")
    if Path(out).is_dir():
        raise ShowtellError(f"{out}: is a directory; --out names the checkpoint file to write")
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    for path, c in zip(paths[1:], ckpts[1:]):
        if c.vocab.to_dict() != first.vocab.to_dict() or (c.encoder, c.preprocess) != (first.encoder, first.preprocess):
            raise ShowtellError(f"{path}: another vocabulary or encoder than {paths[0]}; ensemble members must be "
                                "trained on the same data with the same encoder")
    members = [m for c in ckpts for m in (c.model.members if isinstance(c.model, Ensemble) else [c.model])]
    model = Ensemble.of(members)
    per_member = ("training", "config", "metrics")  # each member's own record, not the ensemble's
    info = {k: v for k, v in first.meta.items() if k not in (*per_member, "train_state", "samples", "name")}
    info["members"] = [{"file": Path(p).name, **{k: c.meta[k] for k in per_member if k in c.meta}}
                       for p, c in zip(paths, ckpts)]
    save_checkpoint(out, model, first.vocab, first.encoder, first.preprocess, meta={**info, **(meta or {})},
                    weights=weights)
    return load_checkpoint(out)
