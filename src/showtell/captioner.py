"""The Python API: ``showtell.load(path_or_name).caption(images)``."""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from showtell.checkpoint import Checkpoint, load_checkpoint
from showtell.confidence import ConfidenceModel
from showtell.decoding import DecodingOptions, Hypothesis, LogitFilter, decode
from showtell.errors import CheckpointError, ShowtellError
from showtell.grounding import Grounding, GroundingRule
from showtell.images import ImageInput, prepare
from showtell.result import BatchCaptioning, Described

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


class Captioner(BatchCaptioning):
    """A checkpoint with its encoder, ready to caption paths, bytes, PIL images or numpy arrays (see ``load_image``)."""

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu", encoder=None, ground: bool = True,
                 precision: str | None = None):
        from showtell.encoders import ENCODER_BATCH, check_preprocessing, create_encoder
        from showtell.quantize import decoder_for, feature_encoder
        from showtell.tags import NoTags, create_tagger

        self.checkpoint = checkpoint
        self.vocab = checkpoint.vocab
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        check_preprocessing(checkpoint.encoder, checkpoint.preprocess)  # the pixels its features were made of
        self.encoder = encoder or create_encoder(checkpoint.encoder)
        self.encoder_batch = ENCODER_BATCH  # images a pass through the encoder on the CPU
        tuned = checkpoint.tensors("encoder/")
        if tuned:  # the encoder's last stage was fine-tuned with the model
            try:
                self.encoder.load_state_dict(tuned)
            except RuntimeError as e:
                raise CheckpointError(f"fine-tuned encoder weights do not fit {checkpoint.encoder}: "
                                      f"{' '.join(str(e).split())[:160]}") from None
        self.encoder = self.encoder.to(self.device).eval()
        self.tagger, self.tags_note = None, None
        try:
            self.tagger = create_tagger(self.encoder, fine_tuned=bool(tuned))
        except NoTags as e:
            self.tags_note = f"no tags: {e}"
        if self.encoder.feature_dim != self.model.config.feature_dim:
            raise CheckpointError(f"checkpoint expects {self.model.config.feature_dim}-d features but encoder "
                                  f"{checkpoint.encoder} gives {self.encoder.feature_dim}")
        self.spatial = self.model.config.spatial  # an attention decoder: it reads the encoder's feature map
        if self.spatial:  # the int8 graph gives pooled features only
            if precision == "int8":
                raise ShowtellError("precision int8: the int8 encoder gives pooled features, and this attention "
                                    "model reads feature maps; use fp32")
            self.precision, self.feature_encoder, self.decoder = "fp32", self.encoder, self.model
        else:
            # features come from the int8 build of the encoder where it runs (showtell.quantize), else the encoder
            self.precision, self.feature_encoder = feature_encoder(self.encoder, precision, self.device)
            self.decoder = decoder_for(self.model, self.precision, self.device)  # the model, or in bf16 with int8
        self.grounding = self._grounding(checkpoint, ground)
        self.preprocess = self.encoder.preprocess  # the registry's: one source with training and the feature cache
        self.pixels = self.preprocess.pixels()  # uint8: features() normalizes on the model's device
        self.name = str(checkpoint.meta.get("name", checkpoint.encoder))

    @property
    def meta(self) -> dict:
        return self.checkpoint.meta

    def _load(self, src: ImageInput) -> torch.Tensor | str:
        return prepare(src, self.pixels)

    def picklable_load(self):
        return functools.partial(_numpy_pixels, pixels=self.pixels)

    def load_in_processes(self) -> bool:
        return self.device.type == "cuda"

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder features of uint8 pixels [B, 3, H, W] as :meth:`load` gives them (stacked)."""
        from showtell.encoders import encode

        with torch.inference_mode():
            images = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
            return encode(self.feature_encoder, images, self.encoder_batch, spatial=self.spatial)

    def pooled(self, feats: torch.Tensor) -> torch.Tensor:
        """The pooled features [B, D] (what the tagger reads) of ``features()``: the mean of a feature map."""
        return feats.mean(1) if self.spatial else feats

    def _grounding(self, checkpoint: Checkpoint, ground: bool) -> Grounding | None:
        """The checkpoint's confidence model and grounding rule (scripts/fit_confidence.py), when it has them and
        there are tags to read them with; without the rule when ``ground`` is false (captions are the model's own,
        each with its confidence)."""
        meta = checkpoint.meta
        if ("confidence" not in meta and "grounding" not in meta) or self.spatial:  # fitted to Show and Tell only
            return None
        confidence = ConfidenceModel.from_meta(meta.get("confidence"), checkpoint.extra_tensors,
                                               self.model.config.feature_dim)
        rule = GroundingRule.from_meta(meta["grounding"]) if "grounding" in meta else None
        rule = rule if ground else None
        return None if self.tagger is None else Grounding(confidence, rule, self.tagger, self.vocab)

    def hypotheses(self, feats: torch.Tensor, options: DecodingOptions, model=None,
                   filters: list[LogitFilter] = ()) -> list[list[Hypothesis]]:
        return decode(model or self.decoder, feats.to(self.device), options, self.vocab.special, filters)

    def caption_features(self, feats: torch.Tensor, options: DecodingOptions) -> list[list[tuple[str, float]]]:
        """Decode encoder features: per image, (caption, score) pairs best first."""
        return [[(self.vocab.decode(h.tokens), float(h.score)) for h in per_image]
                for per_image in self.hypotheses(feats, options)]

    def _stack(self, arrays: list) -> torch.Tensor:
        return torch.stack([torch.as_tensor(a) for a in arrays])  # tensors from threads, numpy from processes

    def _options(self, beam_size: int, max_length: int, num_return: int, decoding: dict) -> DecodingOptions:
        return DecodingOptions(beam_size=beam_size, max_length=max_length, num_return=num_return, **decoding)

    def tag_features(self, feats: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable ImageNet classes as (label, probability), best first; none when the
        encoder has no usable ImageNet head (``tags_note`` says why)."""
        if not k or self.tagger is None:
            return [[] for _ in range(len(feats))]
        return self.tagger.top(self.pooled(feats.to(self.device)), k)

    def attention_maps(self, feats: torch.Tensor, hyps: list[list[Hypothesis]]) -> list[list]:
        """Per image, where the attention decoder looked for each word of its best caption: (word, [grid, grid]
        numpy map summing to 1) pairs."""
        best = [per_image[0].tokens if per_image else [] for per_image in hyps]
        maps = self.model.attention_maps(feats.to(self.device), best, self.vocab.special)
        return [[(self.vocab.itos[t], m.numpy()) for t, m in zip(tokens, grid)] for tokens, grid in zip(best, maps)]

    def _describe(self, images: torch.Tensor, options: DecodingOptions, tags: int) -> list[Described]:
        return self.describe_features(self.features(images), options, tags)

    def describe_features(self, feats: torch.Tensor, options: DecodingOptions, tags: int = 0) -> list[Described]:
        """What the captioner says of images given their encoder features: beams, ``tags`` tags, confidence and
        grounding (when the checkpoint has them); the same for photos and for features from the cache."""
        with torch.inference_mode():  # the tags' probabilities once, for the tags and for the grounding
            probs = None if self.tagger is None or not (tags or self.grounding) else \
                self.tagger(self.pooled(feats.to(self.device)))
        image_tags = self.tagger.top_of(probs, tags) if probs is not None and tags else [[] for _ in range(len(feats))]
        if self.grounding is None:
            hyps = self.hypotheses(feats, options)
            maps = self.attention_maps(feats, hyps) if self.spatial else [None] * len(hyps)
            return [Described([(self.vocab.decode(h.tokens), float(h.score)) for h in per_image], t, attention=m)
                    for per_image, t, m in zip(hyps, image_tags, maps)]
        every = replace(options, num_return=options.beam_size)  # the confidence compares the beams
        own = self.caption_features(feats, every)
        with torch.inference_mode():
            # grounded captions decode in fp32 even with the bf16 decoder: with it, their words changed with the other
            # photos of the batch ("a cat in the air" with three others, "a cat in a white shirt" alone)
            judged = self.grounding(
                lambda f, changes, wrap, filters: self.hypotheses(f, replace(every, **changes), wrap(self.model),
                                                                  filters), feats, own, probs, every)
        return [Described(beams[:options.num_return], t, confidence, mine[0][0] if grounded else None)
                for (confidence, beams, grounded), t, mine in zip(judged, image_tags, own)]


def load(path_or_name: str | os.PathLike | None = None, device: str = "auto", ground: bool = True,
         precision: str | None = None) -> Captioner:
    """Load a checkpoint file, or the built-in model when no argument is given. ``device``: auto (CUDA when there
    is a GPU, else the CPU), cpu, cuda, cuda:N or mps. ``ground=False``: never replace the model's caption by one
    grounded on a sure tag (showtell.grounding). ``precision``: "fp32" or "int8" (the int8 encoder, and the decoder
    in bf16 where the CPU computes bf16; CPU only); None = int8 where this CPU runs it well (showtell.quantize)."""
    from showtell.devices import resolve_device
    from showtell.quantize import check_precision

    check_precision(precision)
    device = resolve_device(device)  # a device this machine lacks fails before the checkpoint is read
    path = resolve_model(path_or_name)
    checkpoint = load_checkpoint(path, map_location="cpu")
    try:
        return Captioner(checkpoint, device=device, ground=ground, precision=precision)
    except ShowtellError as e:  # an unknown encoder, a bad preprocessing record, features of the wrong size
        raise CheckpointError(f"{path}: {e}") from None


def _numpy_pixels(src: ImageInput, pixels) -> np.ndarray | str:
    """:meth:`Captioner.load` in a loading process: a numpy array crosses the pipe as plain bytes, where a tensor
    goes through torch's shared-memory handover, which cost the captioning process twice the time a photo
    (benchmarks/loader_ipc.py)."""
    x = prepare(src, pixels)
    return x if isinstance(x, str) else x.numpy()
