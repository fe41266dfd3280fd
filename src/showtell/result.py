"""The result of captioning one image; torch-free, shared by the PyTorch and ONNX captioners."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from showtell.images import ImageInput, check_image_input, describe, is_image_input


@dataclass
class CaptionResult:
    """The caption of one image, or the error that kept it from being captioned."""

    image: str
    caption: str | None = None
    score: float | None = None       # length-normalised log-probability of the caption
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # other beams, best first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = {"image": self.image, "caption": self.caption, "score": self.score}
        if self.alternatives:
            d["alternatives"] = [{"caption": c, "score": s} for c, s in self.alternatives]
        if self.error:
            d["error"] = self.error
        return d


class BatchCaptioning:
    """What the PyTorch and ONNX captioners share: images are loaded in threads, the readable ones of
    each batch are captioned together, and an unreadable one gets ``error`` instead of stopping the rest.

    A captioner provides ``_load(src) -> array or error message``, ``_stack(arrays)``,
    ``_options(beam_size, max_length, num_return, decoding)`` and ``_describe(stacked, options)``,
    which returns, per image, (caption, score) pairs best first.
    """

    def _load(self, src: ImageInput) -> Any: ...

    def _stack(self, arrays: list) -> Any: ...

    def _options(self, beam_size: int, max_length: int, num_return: int, decoding: dict) -> Any: ...

    def _describe(self, stacked: Any, options: Any) -> list[list[tuple[str, float]]]: ...

    def iter_caption(self, images: Iterable[ImageInput], beam_size: int = 3, max_length: int = 20,
                     batch_size: int = 16, num_return: int = 1, **decoding) -> Iterator[CaptionResult]:
        """Caption images batch by batch, yielding results in input order as they are ready. An element of a type
        that is not an image raises TypeError when it is reached (see :func:`showtell.images.load_image`)."""
        options = self._options(beam_size, max_length, min(max(num_return, 1), beam_size), decoding)
        batch: list[ImageInput] = []
        with ThreadPoolExecutor(max_workers=2) as pool:
            for src in images:
                check_image_input(src)
                batch.append(src)
                if len(batch) == batch_size:
                    yield from self._caption_batch(batch, options, pool)
                    batch = []
            if batch:
                yield from self._caption_batch(batch, options, pool)

    def _caption_batch(self, batch: Sequence[ImageInput], options: Any,
                       pool: ThreadPoolExecutor) -> list[CaptionResult]:
        loaded = list(pool.map(self._load, batch))
        results = [CaptionResult(describe(src)) for src in batch]
        good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
        for i, x in enumerate(loaded):
            if isinstance(x, str):
                results[i].error = x
        if good:
            described = self._describe(self._stack([loaded[i] for i in good]), options)
            for i, beams in zip(good, described, strict=True):
                if not beams:  # the decoders return only finite scores; a model whose outputs overflowed has none
                    results[i].error = f"{results[i].image}: no caption, the model's outputs are NaN or infinite"
                    continue
                results[i].caption, results[i].score = beams[0]
                results[i].alternatives = beams[1:]
        return results

    def caption(self, images: ImageInput | Iterable[ImageInput], **kwargs) -> list[CaptionResult]:
        """Caption one image or a list (or iterator) of them; an unreadable image gets ``error`` set, the others
        are captioned. Anything :func:`showtell.images.load_image` takes (a path, bytes, bytearray, memoryview, PIL
        image, numpy array) is one image. An element of any other type raises TypeError before any work."""
        images = [images] if is_image_input(images) or not isinstance(images, (Sequence, Iterator)) else list(images)
        for src in images:
            check_image_input(src)
        return list(self.iter_caption(images, **kwargs))
