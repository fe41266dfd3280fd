"""The result of captioning one image; torch-free, shared by the PyTorch and ONNX captioners."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from showtell.errors import ShowtellError
from showtell.images import ImageInput, check_image_input, describe, is_image_input
from showtell.loader import default_workers, load_ahead, process_pool

T = TypeVar("T")


@dataclass
class CaptionResult:
    """The caption of one image, or the error that kept it from being captioned."""

    image: str
    caption: str | None = None
    score: float | None = None       # length-normalised log-probability of the caption
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # other beams, best first
    error: str | None = None
    tags: list[tuple[str, float]] = field(default_factory=list)  # ImageNet (label, probability), best first
    tags_note: str | None = None     # why tags were asked for but there are none
    confidence: float | None = None  # the probability that the caption is right (showtell.confidence)
    model_caption: str | None = None  # the model's own caption, when a confident tag overruled it (showtell.grounding)
    # an attention decoder's: for each word of the caption, (word, [grid, grid] numpy map summing to 1) of where it
    # looked on the photo's center crop; not in to_dict
    attention: list[tuple[str, Any]] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = {"image": self.image, "caption": self.caption, "score": self.score}
        if self.alternatives:
            d["alternatives"] = [{"caption": c, "score": s} for c, s in self.alternatives]
        if self.error:
            d["error"] = self.error
        return {**d, **self.extras()}

    def extras(self) -> dict:
        """What goes beside the caption in JSON: ``confidence`` when set, ``tags`` as [{"label", "p"}] when there
        are any, ``tags_note`` when there are none for a reason."""
        d: dict[str, Any] = {}
        if self.confidence is not None:
            d["confidence"] = round(float(self.confidence), 4)
        if self.model_caption is not None:
            d["model_caption"] = self.model_caption
        if self.tags:
            d["tags"] = [{"label": label, "p": round(float(p), 4)} for label, p in self.tags]
        if self.tags_note:
            d["tags_note"] = self.tags_note
        return d

    def extras_text(self) -> str:
        """The same as text: "confidence: 0.83", "tags: tabby (0.62), tiger cat (0.10)", "model caption: ...",
        tab-separated."""
        parts = [] if self.confidence is None else [f"confidence: {self.confidence:.2f}"]
        if self.tags:
            parts.append("tags: " + ", ".join(f"{label} ({p:.2f})" for label, p in self.tags))
        if self.model_caption is not None:
            parts.append(f"model caption: {self.model_caption}")
        return "\t".join(parts)


@dataclass
class Described:
    """What a captioner says of one image: its beams, (caption, score) best first, and what goes with them."""

    beams: list[tuple[str, float]]
    tags: list[tuple[str, float]] = field(default_factory=list)
    confidence: float | None = None
    model_caption: str | None = None
    attention: list[tuple[str, Any]] | None = None  # an attention decoder's maps of the best caption's words


class BatchCaptioning:
    """What the PyTorch and ONNX captioners share: images are loaded in threads, a batch ahead of the model (see
    :mod:`showtell.loader`), the readable ones of each batch are captioned together, and an unreadable one gets
    ``error`` instead of stopping the rest.

    A captioner provides ``_load(src) -> array or error message``, ``_stack(arrays)``,
    ``_options(beam_size, max_length, num_return, decoding)`` and ``_describe(stacked, options, tags)``,
    which returns a :class:`Described` per image, with up to ``tags`` ImageNet (label, probability) pairs best
    first; ``tags_note`` says why there are none when the model has no tagger.
    """

    tags_note: str | None = None

    def _load(self, src: ImageInput) -> Any: ...

    def _stack(self, arrays: list) -> Any: ...

    def _options(self, beam_size: int, max_length: int, num_return: int, decoding: dict) -> Any: ...

    def _describe(self, stacked: Any, options: Any, tags: int) -> list[Described]: ...

    _process_pools: dict[int, Any] | None = None  # loading processes, by their number

    def picklable_load(self) -> Callable[[ImageInput], Any] | None:
        """:meth:`load` as a function that pickles, for loading in processes; None where there is none."""
        return None

    def load_in_processes(self) -> bool:
        """Whether photos decode in processes by default rather than threads (where a GPU runs the model)."""
        return False

    def _loader(self, processes: bool | None, workers: int | None,
                batch_size: int) -> tuple[Callable[[ImageInput], Any], Any, int]:
        """The load function, the pool (None: :func:`load_ahead`'s own threads) and the items a task. A process
        pool is made once for each number of ``workers`` and kept (starting its processes costs seconds; another
        caption run may still use it); a batch goes to it in one task a process, since each task and result costs
        this process time."""
        load = self.picklable_load()
        if load is None or not (self.load_in_processes() if processes is None else processes):
            return self.load, None, 1
        workers = workers or default_workers()
        if self._process_pools is None:
            self._process_pools = {}
        if workers not in self._process_pools:
            self._process_pools[workers] = process_pool(workers)
        return load, self._process_pools[workers], math.ceil(batch_size / workers)

    def load(self, src: ImageInput) -> Any:
        """One image decoded and preprocessed for the model, or the message of what is wrong with it; TypeError for
        an input that is not an image. Thread-safe: :meth:`iter_caption` calls it from several threads."""
        return self._load(src)

    def iter_caption(self, images: Iterable[ImageInput], beam_size: int = 3, max_length: int = 20,
                     batch_size: int = 32, num_return: int = 1, tags: int = 5, workers: int | None = None,
                     ahead: int = 1, processes: bool | None = None, **decoding) -> Iterator[CaptionResult]:
        """Caption images batch by batch, yielding results in input order as they are ready. An element of a type
        that is not an image raises TypeError when its batch is reached (see :func:`showtell.images.load_image`).
        Each result also gets the ``tags`` most probable ImageNet classes (0: none). Images load in ``workers``
        threads (default: one per core, at most 8), or that many processes with ``processes`` (default: where a GPU
        runs the model; then ``images`` must pickle); the next ``ahead`` batches load while one is captioned, so
        ``images`` is consumed at most that many batches ahead of the results (0: no overlap)."""
        check_tags(tags)
        options = self._options(beam_size, max_length, min(max(num_return, 1), beam_size), decoding)
        load, pool, chunk = self._loader(processes, workers, batch_size)
        if pool is not None:  # to another process: a memoryview does not pickle, its bytes do
            images = (bytes(src) if isinstance(src, memoryview) else src for src in images)
        for batch, loaded in load_ahead(_chunks(images, batch_size), load, workers=workers, ahead=ahead, pool=pool,
                                        chunk=chunk):
            yield from self._caption_loaded(batch, loaded, options, tags)

    def caption_loaded(self, batch: Sequence[ImageInput], loaded: Sequence[Any], beam_size: int = 3,
                       max_length: int = 20, num_return: int = 1, tags: int = 5, **decoding) -> list[CaptionResult]:
        """Caption one batch given what :meth:`load` returned for each of its images: those that loaded are
        captioned together, the others get their message as ``error``."""
        check_tags(tags)
        options = self._options(beam_size, max_length, min(max(num_return, 1), beam_size), decoding)
        return self._caption_loaded(batch, loaded, options, tags)

    def _caption_loaded(self, batch: Sequence[ImageInput], loaded: Sequence[Any], options: Any,
                        tags: int) -> list[CaptionResult]:
        results = [CaptionResult(describe(src)) for src in batch]
        good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
        for i, x in enumerate(loaded):
            if isinstance(x, str):
                results[i].error = x
        if good:
            described = self._describe(self._stack([loaded[i] for i in good]), options, tags)
            for i, d in zip(good, described, strict=True):
                r = results[i]
                if not d.beams:  # the decoders return only finite scores; a model whose outputs overflowed has none
                    r.error = f"{r.image}: no caption, the model's outputs are NaN or infinite"
                    continue
                (r.caption, r.score), r.alternatives = d.beams[0], d.beams[1:]
                r.tags, r.confidence, r.model_caption = d.tags, d.confidence, d.model_caption
                r.attention = d.attention
                r.tags_note = self.tags_note if tags and not d.tags else None
        return results

    def caption(self, images: ImageInput | Iterable[ImageInput], **kwargs) -> list[CaptionResult]:
        """Caption one image or a list (or iterator) of them; an unreadable image gets ``error`` set, the others
        are captioned. Anything :func:`showtell.images.load_image` takes (a path, bytes, bytearray, memoryview, PIL
        image, numpy array) is one image. An element of any other type raises TypeError before any work."""
        images = [images] if is_image_input(images) or not isinstance(images, (Sequence, Iterator)) else list(images)
        for src in images:
            check_image_input(src)
        return list(self.iter_caption(images, **kwargs))


def check_tags(tags: object) -> None:
    if isinstance(tags, bool) or not isinstance(tags, int) or tags < 0:
        raise ShowtellError(f"tags must be a whole number >= 0, got {tags!r}")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
