"""Int8 encoders for captioning on the CPU: the frozen convolution stacks quantized after training, run by onnxruntime.

    precision, encoder = feature_encoder(create_encoder("efficientnet_lite0+2"))   # "int8" where it can run
    feats = encoder(images)                                                         # [B, 2560], as fp32 gives
    decoder = decoder_for(model, precision)       # with int8, the decoder in bf16 where the CPU computes bf16

The int8 graph ships in the package (``weights/<encoder>.int8.onnx``, 9 MB), so nothing is built or downloaded at
run time. It is onnxruntime's post-training static quantization (``quantize_static``, QDQ format: weights int8
per output channel, activations uint8 per tensor) of the encoder's ONNX graph, with activation ranges from 300
Flickr8k training photos; ``python -m showtell.quantize --root FLICKR8K`` rebuilds it. A graph is used only for
the fp32 weights it was built from (their SHA-256 is in its metadata): a fine-tuned encoder keeps fp32.

Why this route (2 CPU cores, side by side in one process; the figures are in benchmarks/encoder_precision.py's
docstring): onnxruntime's int8 encoder ran 2.4-8x torch fp32 with no compiler and no first-use cost. PyTorch 2
export quantization (torchao's X86InductorQuantizer) was no faster and needs torch.compile, i.e. a C++ compiler
on the user's machine and 90 s of compiling at first use (20 s more for each new batch size); torch's FX graph
mode quantization is deprecated and cannot trace timm's TF-"same" convolutions.

The int8 graph runs only where the CPU has VNNI (x86 AVX512-VNNI, AVX-VNNI or AMX): that is where it was measured,
and without VNNI onnxruntime's uint8 x int8 products can saturate. Elsewhere, or without onnxruntime, captioning
runs the fp32 encoder and says so in one line. With the int8 encoder, the caption model decodes with bf16 weights
where the CPU computes bf16 natively (AVX512-BF16 or AMX), which halves the decoding time: ``decoder_for``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from showtell.errors import ShowtellError

PRECISIONS = ("fp32", "int8")
WEIGHTS_DIR = Path(__file__).parent / "weights"
SOURCE_KEY = "showtell_source_sha256"  # graph metadata: SHA-256 of the fp32 weights the graph was built from
ENCODER_KEY = "showtell_encoder"
CALIBRATION_KEY = "showtell_calibration"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # torch.cpu.get_capabilities() names; /proc/cpuinfo's agree


class Int8Encoder(nn.Module):
    """An encoder's int8 ONNX graph in an onnxruntime session: images [B, 3, S, S] -> features [B, D], like the
    fp32 ``Encoder`` it was built from (same name, feature size and preprocessing). CPU only; no parameters."""

    precision = "int8"

    def __init__(self, path: Path, encoder: nn.Module, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        self.name, self.feature_dim, self.preprocess = encoder.name, encoder.feature_dim, encoder.preprocess
        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # like OMP_WAIT_POLICY=PASSIVE for torch (cli.main): idle threads sleep, so they leave the cores to the
        # decoder and to other processes; OMP_WAIT_POLICY=ACTIVE lets them spin
        spin = os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE"
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {self.input: x})[0])


def int8_path(encoder_name: str) -> Path:
    return WEIGHTS_DIR / f"{encoder_name}.int8.onnx"


def weights_sha256(encoder: nn.Module) -> str:
    """SHA-256 of an encoder's weights (names, dtypes, shapes, values): which fp32 encoder a graph belongs to."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cpu_lacks_int8() -> str | None:
    """Why this CPU should not run the int8 encoder (None when it has VNNI)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no measured int8 path for {platform.machine() or 'this'} CPUs"
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        flags = {k for k, v in caps().items() if v is True}
    else:
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
    if not flags & set(VNNI_FLAGS):
        return "this CPU lacks VNNI int8 instructions"
    return None


def _runtime_missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    return None


def _graph_for(encoder: nn.Module) -> Path | None:
    """The shipped int8 graph built from exactly this encoder's weights, or None."""
    path = int8_path(encoder.name)
    if not path.is_file():
        return None
    source = _graph_metadata(path).get(SOURCE_KEY)
    return path if source == weights_sha256(encoder) else None


@functools.cache
def _graph_metadata(path: Path) -> dict[str, str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def note(message: str) -> None:
    print(f"showtell: note: {message}", file=sys.stderr, flush=True)


def check_precision(precision: str | None) -> None:
    if precision not in (None, *PRECISIONS):
        raise ShowtellError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def feature_encoder(encoder: nn.Module, precision: str | None = None, device: str | torch.device = "cpu"):
    """(precision, the callable that gives features) for captioning with ``encoder``.

    ``precision`` None: int8 where it can run (CPU device, onnxruntime, a VNNI CPU, a graph built from these
    weights), else fp32. "int8": the same, but saying why when it cannot. "fp32": the encoder itself. When a
    missing runtime or CPU feature is what keeps int8 from running, the fallback is noted in one line on stderr.
    """
    check_precision(precision)
    if precision == "fp32":
        return "fp32", encoder
    if torch.device(device).type != "cpu":
        if precision == "int8":
            note(f"the int8 encoder runs on the CPU only; using fp32 on {device}")
        return "fp32", encoder
    why = _runtime_missing()
    path = None if why else _graph_for(encoder)
    if path is None and why is None:  # no int8 build of these weights: nothing is missing, so only say so if asked
        if precision == "int8":
            note(f"no int8 build of encoder {encoder.name} with these weights; using fp32")
        return "fp32", encoder
    why = why or cpu_lacks_int8()
    if why:
        note(f"{why}; the encoder runs in fp32")
        return "fp32", encoder
    return "int8", Int8Encoder(path, encoder)


class Bf16Decoder(nn.Module):
    """A caption model (or ensemble) with bf16 weights, for decoding: ``init_state`` takes fp32 features, ``step``
    gives fp32 logits; the LSTM state stays bf16. On a CPU with native bf16 a step takes about half the time."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.config = model.config
        self.model = copy.deepcopy(model).to(torch.bfloat16).eval()

    def init_state(self, features: torch.Tensor):
        return self.model.init_state(features.to(torch.bfloat16))

    def step(self, tokens: torch.Tensor, state):
        logits, state = self.model.step(tokens, state)
        return logits.float(), state


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; emulated bf16 is slower than fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def decoder_for(model: nn.Module, precision: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model that decodes at ``precision`` (as ``feature_encoder`` resolved it): with "int8" on a CPU with
    native bf16, the model in bf16 (on Flickr8k dev, beam 3, int8 features: CIDEr 0.4925 vs 0.4914 with the fp32
    decoder, distinct captions 61.3% both, half the decoding time); else the model itself."""
    if precision == "int8" and torch.device(device).type == "cpu" and cpu_has_bf16():
        return Bf16Decoder(model)
    return model


# --- building the int8 graph (development: needs onnx and calibration photos) ---


def _static_same_padding(model: nn.Module, size: int) -> nn.Module:
    """A copy of ``model`` whose TF-"same" convolutions pad by constants computed for ``size`` x ``size`` inputs.

    timm computes that padding from the input's shape at run time; exported, it becomes shape arithmetic and an
    fp32 Pad between int8 ops (half the int8 graph's time). A constant Pad, onnxruntime folds into the Conv."""
    import torch.nn.functional as F
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg

    model = copy.deepcopy(model).eval()
    sizes: dict[nn.Module, tuple[int, int]] = {}
    convs = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:])))
             for m in convs]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()

    def forward(conv: nn.Conv2d, pad: list[int], x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, pad, value=0.0), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    for m in convs:
        m.forward = functools.partial(forward, m, pad_same_arg(sizes[m], m.weight.shape[-2:], m.stride, m.dilation))
    return model


class _Calibration:
    """onnxruntime's CalibrationDataReader over batches of preprocessed images."""

    def __init__(self, batches: Iterator[torch.Tensor], input_name: str) -> None:
        self.batches, self.input_name = batches, input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch.numpy()}


def build_int8(encoder: nn.Module, batches: Iterable[torch.Tensor], out: str | os.PathLike,
               calibration: str = "", **options) -> Path:
    """Quantize ``encoder`` (fp32, eval) to an int8 ONNX graph at ``out``, activation ranges from ``batches`` of
    preprocessed images [b, 3, S, S]; the graph's metadata records the source weights and ``calibration``."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from showtell.export import _export
    from showtell.fileio import atomic_path

    size = encoder.preprocess.size
    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, q = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        _export(_static_same_padding(encoder, size), (torch.zeros(2, 3, size, size),), fp32, ["images"],
                ["features"], {"images": 0, "features": 0}, opset=17)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # constant-fold, fuse Pad and BN into Conv
        quantize_static(str(pre), str(q), _Calibration(iter(batches), "images"), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        **options)
        model = onnx.load(str(q))
        meta = {ENCODER_KEY: encoder.name, SOURCE_KEY: weights_sha256(encoder), CALIBRATION_KEY: calibration}
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        with atomic_path(out) as path:
            onnx.save(model, str(path))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    """Rebuild the shipped int8 graph of an encoder from Flickr8k training photos."""
    from showtell.datasets import load_corpus
    from showtell.encoders import create_encoder
    from showtell.images import load_image

    ap = argparse.ArgumentParser(prog="python -m showtell.quantize", description=main.__doc__)
    ap.add_argument("--root", required=True, help="Flickr8k folder")
    ap.add_argument("--encoder", default="efficientnet_lite0+2")
    ap.add_argument("--n", type=int, default=300, help="calibration photos: the first N of the training split")
    ap.add_argument("--out", help=f"graph to write (default {int8_path('ENCODER')})")
    args = ap.parse_args(argv)
    encoder = create_encoder(args.encoder)
    records = load_corpus("flickr8k", args.root).split("train")[: args.n]
    transform = encoder.preprocess.transform(train=False)

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(records), 10):
            yield torch.stack([transform(load_image(r.image)) for r in records[i:i + 10]])

    out = build_int8(encoder, batches(), args.out or int8_path(args.encoder),
                     calibration=f"first {len(records)} Flickr8k train photos")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
