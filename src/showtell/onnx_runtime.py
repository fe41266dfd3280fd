"""Caption with an ONNX export (``showtell export``) using onnxruntime, numpy and PIL only: no torch.

    captioner = load_onnx("export_dir")
    [r.caption for r in captioner.caption(["photo.jpg"], beam_size=3)]

Preprocessing reproduces the torchvision eval transform of ``showtell.encoders.Preprocess`` (on PIL images
torchvision's Resize is PIL's resize, so the pixels are the same), and decoding is ``showtell.decoding``'s loop and
beam search in numpy, step for step, so both runtimes give the same captions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from showtell.errors import ShowtellError
from showtell.hypotheses import Hypothesis, Ranker
from showtell.images import ImageInput, prepare
from showtell.limits import MAX_BEAM_SIZE, MAX_HEADER_BYTES, MAX_LENGTH, check_int, check_preprocess
from showtell.result import BatchCaptioning, Described
from showtell.vocab import SPECIAL, SpecialTokens, Vocabulary

CONFIG_NAME = "showtell_onnx.json"  # = showtell.export.CONFIG_NAME (that module imports torch)
FORMAT, FORMAT_VERSION = "showtell-onnx", 1
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

State = tuple[np.ndarray, ...]  # (h, c), each [layers, B, hidden]; an attention decoder's also map and keys


# ---------------------------------------------------------------------------------------------- preprocessing


def preprocess(img: Image.Image, size: int, interpolation: str, mean: Sequence[float], std: Sequence[float],
               crop_pct: float = 1.0) -> np.ndarray:
    """RGB PIL image -> float32 [3, size, size], as torchvision's Resize(round(size / crop_pct), antialias=True),
    CenterCrop(size), ToTensor, Normalize(mean, std)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    short_target = round(size / crop_pct)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = short_target, int(short_target * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _PIL_FILTERS[interpolation])
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))  # the resized short side is >= size: no padding
    x = np.asarray(img, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- decoding
# showtell.decoding's loop (`run`) and its BeamSearchDecoder, step for step in numpy (beam_size=1 is greedy).


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices [rows, k] of the k largest scores of each row, best first, ties to the lower index."""
    width = scores.shape[1]
    if k < width:
        kth = np.partition(scores, width - k, axis=1)[:, width - k, None]  # the k-th largest value
        above, tied = scores > kth, scores == kth
        take = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
        index = np.nonzero(take)[1].reshape(-1, k)  # ascending in each row
    else:
        index = np.tile(np.arange(width), (scores.shape[0], 1))
    perm = np.argsort(-np.take_along_axis(scores, index, 1), axis=1, kind="stable")
    return np.take_along_axis(index, perm, 1)


class BeamSearchDecoder:
    """``showtell.decoding.BeamSearchDecoder`` in numpy: the same ``reset``/``update``/``finalize``, the same rules.

    Each step takes the top 2*beam of an image's (beams x vocab) cumulative log-probabilities, ties to the lower
    index; an <end> candidate is a finished hypothesis if it ranks within the top `beam`; the best `beam` other
    candidates go on. An image leaves the batch once it has `beam` finished hypotheses; after `max_length` words
    the live beams are returned unfinished.
    """

    def __init__(self, beam_size: int, end: int):
        self.beam, self.end = beam_size, end

    def reset(self, batch_size: int, out: Ranker) -> None:
        self.out = out
        self.images = np.arange(batch_size)  # the image of each row of `cum`
        self.num_finished = np.zeros(batch_size, dtype=np.int64)
        self.cum = np.zeros((batch_size, 1), dtype=np.float32)  # [images, beams]
        self.beams = np.zeros((batch_size, 1, 0), dtype=np.int64)  # [images, beams, t]

    @property
    def words(self) -> np.ndarray:
        n, nb, t = self.beams.shape
        return self.beams.reshape(n * nb, t)

    def update(self, logprobs: np.ndarray, last: bool) -> tuple[np.ndarray, np.ndarray] | None:
        beam, (n, nb, t) = self.beam, self.beams.shape
        vocab = logprobs.shape[1]
        scores = (logprobs.reshape(n, nb, vocab) + self.cum[:, :, None]).reshape(n, nb * vocab)
        k = min(2 * beam, nb * vocab)
        index = _top_k(scores, k)
        top = np.take_along_axis(scores, index, 1)
        source, token = index // vocab, index % vocab
        is_end = token == self.end
        ended = is_end & (np.arange(k) < beam) & (top > -np.inf)  # possible <end>s within the top `beam`
        if ended.any():
            rows, cols = ended.nonzero()
            self.out.add(self.images[rows], self.beams[rows, source[rows, cols]], top[rows, cols], finished=True)
            self.num_finished += ended.sum(axis=1)
        if last:
            return None
        order = np.argsort(is_end.astype(np.uint8), axis=1, kind="stable")[:, : min(beam, k - nb)]
        top, source, token = (np.take_along_axis(x, order, 1) for x in (top, source, token))
        keep = (self.num_finished < beam).nonzero()[0]
        if keep.size == 0:
            self.images, self.cum, self.beams = keep, self.cum[:0], self.beams[:0]
            return None
        images, num_finished = self.images, self.num_finished
        if keep.size < n:
            images, num_finished, top, source, token = (x[keep] for x in (images, num_finished, top, source, token))
        rows = ((keep * nb)[:, None] + source).reshape(-1)
        self.beams = np.concatenate([self.words[rows], token.reshape(-1, 1)], axis=1).reshape(*token.shape, t + 1)
        self.images, self.num_finished, self.cum = images, num_finished, top
        return token.reshape(-1), rows

    def finalize(self) -> Ranker:
        self.out.add(np.repeat(self.images, self.cum.shape[1]), self.words, self.cum.reshape(-1), finished=False)
        return self.out


def run(init: Callable[[np.ndarray], State], step: Callable[[np.ndarray, State], tuple[np.ndarray, State]],
        features: np.ndarray, decoder: BeamSearchDecoder, suppress: Sequence[int], start: int, max_length: int,
        out: Ranker) -> Ranker:
    """``showtell.decoding.run`` in numpy; ``step`` returns log-probabilities [rows, vocab]. The filters are
    decoding's NaNIsImpossible and SuppressTokens(``suppress``)."""
    n = features.shape[0]
    decoder.reset(n, out)
    state = init(features)
    tokens = np.full(n, start, dtype=np.int64)
    for t in range(max_length + 1):
        logprobs, state = step(tokens, state)
        logprobs = np.array(logprobs, dtype=np.float32)  # a writable copy
        logprobs[np.isnan(logprobs)] = -np.inf  # NaN (a model whose outputs overflowed) counts as impossible
        logprobs[:, suppress] = -np.inf
        chosen = decoder.update(logprobs, last=t == max_length)
        if chosen is None:
            break
        tokens, rows = chosen
        if rows is not None:
            state = tuple(s[:, rows] for s in state)
    return decoder.finalize()


def beam_search(init: Callable[[np.ndarray], State], step: Callable[[np.ndarray, State], tuple[np.ndarray, State]],
                features: np.ndarray, beam_size: int = 3, max_length: int = 20, special: SpecialTokens = SPECIAL,
                suppress_unk: bool = True, length_penalty: float | None = None,
                num_return: int = 1) -> list[list[Hypothesis]]:
    """``showtell.decoding.decode`` with beam search (beam_size=1 is greedy), in numpy: per image, the best
    ``min(num_return, beam_size)`` hypotheses."""
    suppress = [special.pad, special.start, *([special.unk] if suppress_unk else [])]
    ranker = run(init, step, features, BeamSearchDecoder(beam_size, special.end), suppress, special.start, max_length,
                 Ranker(features.shape[0], length_penalty))
    return ranker.rank(min(num_return, beam_size))


# ---------------------------------------------------------------------------------------------- captioner


class OnnxCaptioner(BatchCaptioning):
    """An export folder ready to caption paths, PIL images or bytes, with the API of ``showtell.Captioner``."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ShowtellError("the ONNX runtime needs onnxruntime: pip install onnxruntime") from None
        folder = Path(folder)
        if folder.is_file() and folder.name == CONFIG_NAME:
            folder = folder.parent
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise ShowtellError(f"{folder}: not an ONNX export folder (no {CONFIG_NAME}); make one with "
                                "showtell export --format onnx --out DIR")
        self.config, checked = _read_config(path)
        self.name, self.vocab, self.special, self.pre = (checked[k] for k in ("name", "vocab", "special", "preprocess"))
        self.meta = {"name": self.name, "metrics": checked["metrics"]}
        self.tag_lemmas, self.tags_note = checked["tag_lemmas"], checked["tags_note"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for key, filename in checked["files"].items():
            try:
                self.sessions[key] = ort.InferenceSession(str(folder / filename), options,
                                                          providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise ShowtellError(f"{folder / filename}: cannot load ({str(e).splitlines()[0][:160]})") from None
        if self.tag_lemmas is not None:
            classes = self.sessions["tagger"].get_outputs()[0].shape[-1]
            if classes != len(self.tag_lemmas):
                raise ShowtellError(f"{path}: tags names {len(self.tag_lemmas)} classes, tagger.onnx gives {classes}")

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return preprocess(img, **self.pre)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Normalized images [B, 3, S, S] -> encoder features [B, D] (an attention decoder's: maps [B, L, D])."""
        return self.sessions["encoder"].run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]

    def _init(self, features: np.ndarray) -> State:
        return tuple(self.sessions["decoder_init"].run(None, {"features": features.astype(np.float32, copy=False)}))

    def _step(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        session = self.sessions["decoder_step"]
        names = [i.name for i in session.get_inputs()[1:]]  # after tokens: the state, as decoder_init gives it
        feeds = {"tokens": tokens.astype(np.int64, copy=False),
                 **{name: np.ascontiguousarray(s) for name, s in zip(names, state, strict=True)}}
        logprobs, *state = session.run(None, feeds)
        return logprobs, tuple(state)

    def caption_features(self, feats: np.ndarray, beam_size: int = 3, max_length: int = 20, num_return: int = 1,
                         length_penalty: float | None = None,
                         suppress_unk: bool = True) -> list[list[tuple[str, float]]]:
        """Decode encoder features: per image, (caption, score) pairs best first."""
        check_int("decoding: beam_size", beam_size, 1, MAX_BEAM_SIZE)  # the bounds of showtell.decoding
        check_int("decoding: max_length", max_length, 1, MAX_LENGTH)
        hyps = beam_search(self._init, self._step, feats, beam_size=beam_size, max_length=max_length,
                           special=self.special, suppress_unk=suppress_unk, length_penalty=length_penalty,
                           num_return=max(1, num_return))
        return [[(self.vocab.decode(h.tokens), float(h.score)) for h in per_image] for per_image in hyps]

    def _load(self, src: ImageInput) -> np.ndarray | str:
        return prepare(src, self.preprocess)

    def _stack(self, arrays: list) -> np.ndarray:
        return np.stack(arrays)

    def _options(self, beam_size: int, max_length: int, num_return: int, decoding: dict) -> dict:
        return {"beam_size": beam_size, "max_length": max_length, "num_return": num_return, **decoding}

    def tag_features(self, feats: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable ImageNet classes as (label, probability), best first; none when the
        export has no tagger (``tags_note`` says why)."""
        if not k or self.tag_lemmas is None:
            return [[] for _ in range(len(feats))]
        probs = self.sessions["tagger"].run(None, {"features": feats.astype(np.float32, copy=False)})[0]
        index = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.tag_lemmas[i][0], float(p[i])) for i in ix] for ix, p in zip(index.tolist(), probs)]

    def _describe(self, images: np.ndarray, options: dict, tags: int) -> list[Described]:
        feats = self.features(images)
        return [Described(beams, image_tags) for beams, image_tags in
                zip(self.caption_features(feats, **options), self.tag_features(feats, tags), strict=True)]


def _read_config(path: Path) -> tuple[dict, dict]:
    """The export's JSON config, and what the captioner uses of it checked as a checkpoint's metadata is (untrusted
    input, showtell.limits bounds): name, metrics, vocab, special ids within the vocabulary, preprocess (checked and
    normalised), the graph files, plain names in the folder (tagger.onnx when there is one) and the ImageNet
    classes' lemmas, or why there are no tags."""
    try:
        if path.stat().st_size > MAX_HEADER_BYTES:
            raise ShowtellError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB; an export config is at most "
                                f"{MAX_HEADER_BYTES // 2**20} MiB")
        config = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ShowtellError(f"{path}: cannot read (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ShowtellError(f"{path}: cannot read ({str(e)[:120]})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise ShowtellError(f"{path}: not a showtell ONNX export (version {FORMAT_VERSION})")
    try:
        vocab = Vocabulary.from_dict(config["vocab"])
        special, files = config["special_ids"], config["files"]
        if not isinstance(special, dict) or not isinstance(files, dict):
            raise ShowtellError("special_ids and files must be mappings")
        for key in asdict(SPECIAL):
            check_int(f"special_ids: {key}", special.get(key), 0, len(vocab) - 1)
        special = SpecialTokens(**{key: special[key] for key in asdict(SPECIAL)})
        graphs = {key: files.get(key) for key in ("encoder", "decoder_init", "decoder_step", "tagger")
                  if key != "tagger" or key in files}
        for key, name in graphs.items():
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise ShowtellError(f"files: {key} must be a file name in the export folder, got {name!r:.60}")
        metrics = config.get("metrics", {})
        lemmas, note = _tag_lemmas(config, "tagger" in graphs)
        return config, {"name": str(config.get("name", config.get("encoder", "onnx"))),
                        "metrics": metrics if isinstance(metrics, dict) else {}, "vocab": vocab,
                        "special": special, "preprocess": check_preprocess(config["preprocess"]), "files": graphs,
                        "tag_lemmas": lemmas, "tags_note": note}
    except KeyError as e:
        raise ShowtellError(f"{path}: incomplete export config (no {e})") from None
    except ShowtellError as e:
        raise ShowtellError(f"{path}: invalid export config: {e}") from None


def _tag_lemmas(config: dict, has_tagger: bool) -> tuple[list[list[str]] | None, str | None]:
    """The lemmas of the tagger's classes (label = the first), or None and why there are no tags."""
    if not has_tagger:
        return None, str(config.get("tags_note") or "no tags: this export has no tagger.onnx")
    tags = config.get("tags")
    lemmas = tags.get("lemmas") if isinstance(tags, dict) else None
    if not (isinstance(lemmas, list) and lemmas and all(
            isinstance(ls, list) and ls and all(isinstance(w, str) for w in ls) for ls in lemmas)):
        raise ShowtellError("tags: lemmas must be a list of each class's names (lists of strings)")
    return lemmas, None


def load_onnx(folder: str | os.PathLike | None, threads: int | None = None) -> OnnxCaptioner:
    """Load an export folder made by ``showtell export --format onnx``."""
    if folder is None:
        raise ShowtellError("--runtime onnx needs --model DIR, a folder made by showtell export --format onnx")
    return OnnxCaptioner(folder, threads=threads)
