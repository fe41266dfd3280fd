"""ONNX export: three graphs and one JSON file that run a checkpoint without torch.

    encoder.onnx        images [B, 3, S, S] (normalized)            -> features [B, D]
    decoder_init.onnx   features [B, D]                             -> h, c [layers, B, hidden]
    decoder_step.onnx   tokens [B] (int64), h, c                    -> logprobs [B, vocab], h, c
    tagger.onnx         features [B, D]                             -> probs [B, 1000] (ImageNet classes)
    showtell_onnx.json  vocabulary, special ids, preprocessing, model and encoder names, the classes' lemmas

An attention decoder (showtell.attention) exports the same way with a larger state: encoder.onnx gives the feature
map [B, L, D], the decoder's state is h, c, map [L, B, D] and keys [L, B, hidden] (map and keys pass through the
step unchanged), and tagger.onnx reads the map and pools it.

tagger.onnx is there when the encoder has a usable ImageNet head (showtell.tags); otherwise the JSON's
``tags_note`` says why not. The batch dimension is dynamic in all graphs. Every graph is checked with
``onnx.checker`` and run with onnxruntime on random input against the PyTorch modules; the largest absolute
differences are returned and stored in the JSON file. ``showtell.onnx_runtime`` runs the export with numpy and
onnxruntime only.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from showtell import __version__
from showtell.errors import ShowtellError

FORMAT = "showtell-onnx"
FORMAT_VERSION = 1
CONFIG_NAME = "showtell_onnx.json"
FILES = {"encoder": "encoder.onnx", "decoder_init": "decoder_init.onnx", "decoder_step": "decoder_step.onnx"}
TAGGER_FILE = "tagger.onnx"
DEFAULT_OPSET = 17
# largest allowed |onnxruntime - torch| on the random parity inputs
TOLERANCE = {"encoder": 1e-3, "decoder_init": 1e-4, "decoder_step": 1e-4, "tagger": 1e-5}


class _Init(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.init_state(features))


class _Step(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, state = self.model.step(tokens, tuple(state))
        return (torch.log_softmax(logits.float(), dim=-1), *state)


class _FeatureMap(nn.Module):
    """The encoder's feature map [B, L, D], for an attention decoder."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.feature_map(images)


class _PooledTagger(nn.Module):
    """The tagger on the mean of a feature map (the pooled features it was made for)."""

    def __init__(self, tagger: nn.Module):
        super().__init__()
        self.tagger = tagger

    def forward(self, features: Tensor) -> Tensor:
        return self.tagger(features.mean(1))


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            batch_dims: dict[str, int], opset: int) -> None:
    import onnx

    axes = {name: {dim: "batch"} for name, dim in batch_dims.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the parity check is what counts
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _max_diff(path: Path, feeds: dict[str, np.ndarray], expected: list[Tensor]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    if len(got) != len(expected):
        raise ShowtellError(f"{path.name}: {len(got)} outputs, expected {len(expected)}")
    diffs = []
    for g, e in zip(got, expected, strict=True):
        e = e.detach().cpu().numpy()
        if g.shape != e.shape:
            raise ShowtellError(f"{path.name}: output shape {g.shape}, torch gives {e.shape}")
        diffs.append(float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))))
    return max(diffs)


def export_onnx(model: str | os.PathLike | None, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
                quiet: bool = False, seed: int = 0) -> dict:
    """Export a checkpoint (a file, or None for the built-in model) to ``out``; returns the JSON config written,
    whose ``parity`` entry holds the max abs difference of each graph from torch on random input."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ShowtellError("ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    from showtell.captioner import load

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShowtellError(f"{out}: exists and is not a directory")
    captioner = load(model, precision="fp32")  # the export is of the fp32 encoder
    out.mkdir(parents=True, exist_ok=True)
    ckpt, encoder, decoder = captioner.checkpoint, captioner.encoder.cpu().eval(), captioner.model.cpu().eval()
    config, pre, vocab = decoder.config, captioner.preprocess, captioner.vocab
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    gen = torch.Generator().manual_seed(seed)
    paths = {k: out / v for k, v in FILES.items()}
    parity: dict[str, float] = {}

    # export with batch 2, check with batch 3: the batch dimension must really be dynamic
    say(f"exporting encoder {ckpt.encoder} -> {paths['encoder']}")
    images = torch.randn(2, 3, pre.size, pre.size, generator=gen)
    features = _FeatureMap(encoder).eval() if config.spatial else encoder  # an attention decoder reads the map
    _export(features, (images,), paths["encoder"], ["images"], ["features"], {"images": 0, "features": 0}, opset)
    images = torch.randn(3, 3, pre.size, pre.size, generator=gen)
    with torch.inference_mode():
        feats = features(images)
    parity["encoder"] = _max_diff(paths["encoder"], {"images": images.numpy()}, [feats])

    say(f"exporting decoder -> {paths['decoder_init']}, {paths['decoder_step']}")
    names = ["h", "c", "map", "keys"] if config.spatial else ["h", "c"]  # the state, each with the batch in dim 1
    inputs = [f"{n}_in" for n in names]
    init, step = _Init(decoder).eval(), _Step(decoder).eval()
    _export(init, (torch.randn(2, *feats.shape[1:], generator=gen),), paths["decoder_init"], ["features"],
            names, {"features": 0, **dict.fromkeys(names, 1)}, opset)
    with torch.inference_mode():
        state = init(feats)
    parity["decoder_init"] = _max_diff(paths["decoder_init"], {"features": feats.numpy()}, list(state))

    # state of batch 2: [layers (all members' for an ensemble) or positions, batch, size]
    example = (torch.tensor([vocab.special.start, 5 % config.vocab_size]),
               *(torch.randn(s.shape[0], 2, *s.shape[2:], generator=gen) for s in state))
    _export(step, example, paths["decoder_step"], ["tokens", *inputs], ["logprobs", *names],
            {"tokens": 0, "logprobs": 0, **dict.fromkeys(inputs + names, 1)}, opset)
    tokens = torch.randint(0, config.vocab_size, (3,), generator=gen)
    with torch.inference_mode():
        expected = step(tokens, *state)
    feeds = {"tokens": tokens.numpy(), **{n: s.numpy() for n, s in zip(inputs, state)}}
    parity["decoder_step"] = _max_diff(paths["decoder_step"], feeds, list(expected))

    files, tagger = dict(FILES), captioner.tagger
    if tagger is not None:
        files["tagger"] = TAGGER_FILE
        say(f"exporting tagger ({tagger.rule} of {', '.join(tagger.names)}) -> {out / TAGGER_FILE}")
        tagger = tagger.cpu().eval()
        graph = _PooledTagger(tagger).eval() if config.spatial else tagger
        _export(graph, (torch.randn(2, *feats.shape[1:], generator=gen),), out / TAGGER_FILE, ["features"],
                ["probs"], {"features": 0, "probs": 0}, opset)
        with torch.inference_mode():
            probs = graph(feats)
        parity["tagger"] = _max_diff(out / TAGGER_FILE, {"features": feats.numpy()}, [probs])

    for name, diff in parity.items():
        say(f"  {name}: max abs diff vs torch {diff:.2e}")
        if not diff <= TOLERANCE[name]:
            raise ShowtellError(f"{files[name]} differs from torch by {diff:.3g} (> {TOLERANCE[name]:g}); "
                                "the export is not usable")
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "showtell_version": __version__,
        "name": captioner.name,
        "encoder": ckpt.encoder,
        "feature_dim": config.feature_dim,
        "model": config.to_dict(),
        "preprocess": pre.to_dict(),
        "vocab": vocab.to_dict(),  # vocab["tokens"] is itos: the word of each id
        "special_ids": asdict(vocab.special),
        "files": files,
        **({"tags": {"rule": tagger.rule, "heads": tagger.names,
                     "lemmas": [list(tagger.lemmas(i)) for i in range(len(tagger.labels))]}}
           if tagger is not None else {"tags_note": captioner.tags_note}),
        "step_output": "logprobs",
        "opset": opset,
        "parity": parity,
        "metrics": ckpt.meta.get("metrics", {}),
    }
    (out / CONFIG_NAME).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    say(f"wrote {out / CONFIG_NAME}")
    return record
