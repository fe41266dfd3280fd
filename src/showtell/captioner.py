"""The Python API: ``showtell.load(path_or_name).caption(images)``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from showtell.checkpoint import Checkpoint, load_checkpoint
from showtell.decoding import DecodingOptions, decode
from showtell.errors import CheckpointError, ImageError, ShowtellError
from showtell.images import ImageInput, describe, load_image
from showtell.result import CaptionResult

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "flickr8k"


def resolve_model(path_or_name: str | os.PathLike | None) -> Path:
    """A checkpoint path from a path or the name of a model shipped in the package."""
    if path_or_name is None:
        path_or_name = DEFAULT_MODEL
    path = Path(path_or_name)
    if path.suffix != ".safetensors" and (WEIGHTS_DIR / f"{path_or_name}.safetensors").is_file():
        return WEIGHTS_DIR / f"{path_or_name}.safetensors"
    if path_or_name == DEFAULT_MODEL and not path.exists():
        raise ShowtellError(f"the built-in model '{DEFAULT_MODEL}' is not in this install ({WEIGHTS_DIR}); "
                            "pass --model FILE")
    return path


class Captioner:
    """A checkpoint with its encoder, ready to caption paths, PIL images or bytes."""

    def __init__(self, checkpoint: Checkpoint, device: str = "cpu", encoder=None):
        from showtell.encoders import Preprocess, create_encoder

        self.checkpoint = checkpoint
        self.vocab = checkpoint.vocab
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.encoder = encoder or create_encoder(checkpoint.encoder)
        tuned = checkpoint.tensors("encoder/")
        if tuned:  # the encoder's last stage was fine-tuned with the model
            try:
                self.encoder.load_state_dict(tuned)
            except RuntimeError as e:
                raise CheckpointError(f"fine-tuned encoder weights do not fit {checkpoint.encoder}: "
                                      f"{' '.join(str(e).split())[:160]}") from None
        self.encoder = self.encoder.to(self.device).eval()
        if self.encoder.feature_dim != self.model.config.feature_dim:
            raise CheckpointError(f"checkpoint expects {self.model.config.feature_dim}-d features but encoder "
                                  f"{checkpoint.encoder} gives {self.encoder.feature_dim}")
        self.preprocess = Preprocess.from_dict(checkpoint.preprocess)
        self.transform = self.preprocess.transform(train=False)
        self.name = str(checkpoint.meta.get("name", checkpoint.encoder))

    @property
    def meta(self) -> dict:
        return self.checkpoint.meta

    def _load(self, src: ImageInput) -> torch.Tensor | str:
        try:
            return self.transform(load_image(src))
        except ImageError as e:
            return str(e)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from showtell.features import encode

        with torch.inference_mode():
            return encode(self.encoder, images.to(self.device))

    def caption_features(self, feats: torch.Tensor, options: DecodingOptions) -> list[list[tuple[str, float]]]:
        """Decode encoder features: per image, (caption, score) pairs best first."""
        hyps = decode(self.model, feats.to(self.device), options, start_id=self.vocab.start_id,
                      end_id=self.vocab.end_id, unk_id=self.vocab.unk_id, pad_id=self.vocab.pad_id)
        return [[(self.vocab.decode(h.tokens), float(h.score)) for h in per_image] for per_image in hyps]

    def iter_caption(self, images: Iterable[ImageInput], beam_size: int = 3, max_length: int = 20,
                     batch_size: int = 16, num_return: int = 1, **decoding) -> Iterator[CaptionResult]:
        """Caption images batch by batch, yielding results in input order as they are ready."""
        options = DecodingOptions(beam_size=beam_size, max_length=max_length,
                                  num_return=min(max(num_return, 1), beam_size), **decoding)
        batch: list[ImageInput] = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            for src in images:
                batch.append(src)
                if len(batch) == batch_size:
                    yield from self._caption_batch(batch, options, pool)
                    batch = []
            if batch:
                yield from self._caption_batch(batch, options, pool)

    def _caption_batch(self, batch: Sequence[ImageInput], options: DecodingOptions,
                       pool: ThreadPoolExecutor) -> list[CaptionResult]:
        loaded = list(pool.map(self._load, batch))
        results = [CaptionResult(describe(src)) for src in batch]
        good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
        for i, x in enumerate(loaded):
            if isinstance(x, str):
                results[i].error = x
        if good:
            feats = self.features(torch.stack([loaded[i] for i in good]))
            for i, beams in zip(good, self.caption_features(feats, options)):
                results[i].caption, results[i].score = beams[0]
                results[i].alternatives = beams[1:]
        return results

    def caption(self, images: ImageInput | Sequence[ImageInput], **kwargs) -> list[CaptionResult]:
        """Caption one image or a list of them; a bad image gets ``error`` set, the others are captioned."""
        if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, Sequence):
            images = [images]
        return list(self.iter_caption(images, **kwargs))


def load(path_or_name: str | os.PathLike | None = None, device: str = "cpu") -> Captioner:
    """Load a checkpoint file, or the built-in model when no argument is given."""
    path = resolve_model(path_or_name)
    checkpoint = load_checkpoint(path, map_location="cpu")
    try:
        return Captioner(checkpoint, device=device)
    except ShowtellError as e:  # an unknown encoder, a bad preprocessing record, features of the wrong size
        raise CheckpointError(f"{path}: {e}") from None
