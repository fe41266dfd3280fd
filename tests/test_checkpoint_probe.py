"""Hostile checkpoints and options (issue 22): each ends in one line at load, never a traceback, exhausted memory,
or a NaN in the output.

Every metadata field is checked (types, the bounds of showtell.limits) and the model it declares must have exactly
the tensors stored before anything is built; non-finite weights are refused; decoding sizes are bounded; a score
that is not finite never reaches a caller.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_inputs import showtell_many

import showtell
from showtell.checkpoint import load_checkpoint
from showtell.decoding import DecodingOptions, decode
from showtell.errors import CheckpointError, ShowtellError
from showtell.limits import MAX_BEAM_SIZE, MAX_HEADER_BYTES, MAX_LENGTH
from showtell.model import CaptionModel, Ensemble, ModelConfig

NAN = float("nan")


@pytest.fixture(scope="module")
def parts(tiny_checkpoint) -> tuple[dict, dict]:
    """The tiny checkpoint's metadata and tensors, to edit."""
    with safe_open(str(tiny_checkpoint), "pt") as f:
        header = json.loads(f.metadata()["showtell"])
    return header, load_file(str(tiny_checkpoint))


def craft(path: Path, parts: tuple[dict, dict], change) -> Path:
    """Write ``change(header, tensors)`` -> (header, or the raw metadata text; tensors) as a checkpoint."""
    header, tensors = change(json.loads(json.dumps(parts[0])), dict(parts[1]))
    raw = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors, str(path), metadata={"showtell": raw})
    return path


def model(**kw):
    return lambda h, t: ({**h, "model": {**h["model"], **kw}}, t)


def pre(**kw):
    return lambda h, t: ({**h, "preprocess": {**h["preprocess"], **kw}}, t)


def top(**kw):
    return lambda h, t: ({**h, **kw}, t)


def without(key):
    return lambda h, t: ({k: v for k, v in h.items() if k != key}, t)


def tensor(name, make):
    """Set tensor ``name`` to ``make(tensors)`` (None removes it)."""
    def change(h, t):
        value = make(t)
        return h, ({k: v for k, v in t.items() if k != name} if value is None else {**t, name: value})
    return change


def raw(text):
    return lambda h, t: (text, t)


def int8_head(scale: float):
    """head.weight stored as int8 with every row's scale set to ``scale``."""
    def change(h, t):
        w = t["head.weight"]
        return h, {**t, "head.weight": torch.ones_like(w, dtype=torch.int8),
                   "head.weight.int8_scale": torch.full((w.shape[0], 1), scale)}
    return change


PREFIX = '{"format": "showtell-checkpoint", "version": 1, '
DEPTH = 100_000
# (id, change, a fragment of the one-line message); sizes in the tiny checkpoint: vocab 16, embed 32, hidden 64
CASES = [
    # 5. declared sizes that would exhaust memory: refused by the bounds before anything is built
    ("hidden_dim_1e7", model(hidden_dim=10**7), "model config: hidden_dim must be an integer from 1 to 16384, "
                                                "got 10000000"),
    ("num_layers_1e5", model(num_layers=10**5), "num_layers must be an integer from 1 to 16, got 100000"),
    ("embed_dim_1e6", model(embed_dim=10**6), "embed_dim must be an integer from 1 to 16384"),
    ("vocab_size_1e9", model(vocab_size=10**9), "vocab_size must be an integer from 4 to 500000, got 1000000000"),
    ("feature_dim_0", model(feature_dim=0), "feature_dim must be an integer from 1 to 16384, got 0"),
    ("ensemble_1e4", top(ensemble=10**4), "ensemble must be an integer from 2 to 32, got 10000"),
    ("crop_pct_1e-6", pre(crop_pct=1e-6), "preprocessing: crop_pct must be a number from 0.5 to 1, got 1e-06"),
    ("crop_pct_nan", pre(crop_pct=NAN), "crop_pct must be a number from 0.5 to 1, got nan"),
    ("size_20000", pre(size=20000), "preprocessing: size must be an integer from 1 to 1024, got 20000"),
    # ... and sizes within the bounds that are not what the file stores: refused from the header's shapes
    ("hidden_not_stored", model(hidden_dim=128),
     "weights do not match the stored model config (size mismatch for lstm.weight_ih_l0: the file has [256, 32], "
     "the config makes [512, 32])"),
    ("layers_not_stored", model(num_layers=2), "missing tensor(s) lstm.bias_hh_l1, lstm.bias_ih_l1, "
                                               "lstm.weight_hh_l1 ..."),
    ("members_not_stored", top(ensemble=3), "missing tensor(s) members.0.embed.weight"),
    ("batch_norm_not_stored", model(batch_norm=True), "missing tensor(s) image_norm.bias"),
    ("vocab_not_config", lambda h, t: ({**h, "vocab": {**h["vocab"], "tokens": h["vocab"]["tokens"] + ["zebra"]}}, t),
     "vocabulary has 17 tokens but the model config says 16"),
    ("extra_weight", tensor("extra.weight", lambda t: torch.zeros(2)), "unexpected tensor(s) extra.weight"),
    ("missing_weight", tensor("head.bias", lambda t: None), "missing tensor(s) head.bias"),
    # 9. preprocessing that is not three channels of sane numbers
    ("std_zeros", pre(std=[0, 0, 0]), "preprocessing: std must be > 0 in every channel, got [0, 0, 0]"),
    ("std_two", pre(std=[0.5, 0.5]), "preprocessing: std must be 3 finite numbers (R, G, B), got [0.5, 0.5]"),
    ("mean_two", pre(mean=[0.5, 0.5]), "preprocessing: mean must be 3 finite numbers (R, G, B), got [0.5, 0.5]"),
    ("mean_inf", pre(mean=[0.5, math.inf, 0.5]), "mean must be 3 finite numbers"),
    ("interpolation", pre(interpolation="nearest"), "unknown interpolation 'nearest'; use one of bicubic, bilinear"),
    ("preprocess_key", pre(flip=True), "preprocessing: unknown key(s) flip"),
    # 9. wrong types: strings for numbers, lists for mappings
    ("hidden_str", model(hidden_dim="64"), "hidden_dim must be an integer from 1 to 16384, got '64'"),
    ("hidden_float", model(hidden_dim=64.0), "hidden_dim must be an integer from 1 to 16384, got 64.0"),
    ("dropout_str", model(dropout="0.5"), "dropout must be in [0, 1), got '0.5'"),
    ("size_str", pre(size="224"), "size must be an integer from 1 to 1024, got '224'"),
    ("crop_str", pre(crop_pct="1.0"), "crop_pct must be a number from 0.5 to 1, got '1.0'"),
    ("std_str", pre(std="0.5"), "std must be 3 finite numbers (R, G, B), got '0.5'"),
    ("ensemble_str", top(ensemble="2"), "ensemble must be an integer from 2 to 32, got '2'"),
    ("ensemble_true", top(ensemble=True), "ensemble must be an integer from 2 to 32, got True"),
    ("model_list", top(model=[18, 1280]), "model config must be a mapping, got list"),
    ("preprocess_list", top(preprocess=[224]), "preprocessing must be a mapping, got list"),
    ("vocab_list", top(vocab=["<pad>"]), "not a showtell vocabulary"),
    ("tokens_str", lambda h, t: ({**h, "vocab": {**h["vocab"], "tokens": "abc"}}, t),
     "vocabulary 'tokens' must be a list of strings"),
    ("min_count_str", lambda h, t: ({**h, "vocab": {**h["vocab"], "min_count": "5"}}, t),
     "vocabulary 'min_count' must be an integer or null, got str"),
    ("encoder_int", top(encoder=5), "encoder must be a name, got int"),
    ("version_str", top(version="1"), "checkpoint format version '1' is not supported"),
    ("no_model", without("model"), "incomplete checkpoint metadata (no 'model')"),
    # 9. JSON that breaks parsers: deep nesting, huge integers, a huge header
    ("nested", raw(PREFIX + '"x": ' + "[" * DEPTH + "]" * DEPTH + "}"), "checkpoint metadata is nested too deeply"),
    ("nested_dict", raw(PREFIX + '"x": ' + '{"a": ' * DEPTH + "1" + "}" * DEPTH + "}"), "nested too deeply"),
    ("huge_int", raw(PREFIX + '"x": 1' + "0" * 5000 + "}"), "checkpoint metadata is not valid JSON"),
    ("huge_header", lambda h, t: ({**h, "pad": "x" * MAX_HEADER_BYTES}, t), "checkpoint header is 16 MiB; showtell "
                                                                             "reads at most 16 MiB of metadata"),
    # 7. weights that are not finite, or not weights
    ("nan_weight", tensor("head.weight", lambda t: torch.full_like(t["head.weight"], NAN)),
     "tensor head.weight has values that are not finite (NaN or infinite)"),
    ("inf_fp16_bias", tensor("lstm.bias_ih_l0", lambda t: t["lstm.bias_ih_l0"].half().index_fill(0, torch.tensor([3]),
                                                                                                     math.inf)),
     "tensor lstm.bias_ih_l0 has values that are not finite"),
    ("int8_inf_scale", int8_head(math.inf), "tensor head.weight has values that are not finite"),
    ("int8_scale_shape", lambda h, t: (h, {**int8_head(1.0)(h, t)[1], "head.weight.int8_scale": torch.ones(3, 1)}),
     "head.weight.int8_scale is F32 [3, 1], not a float [16, 1]"),
    ("orphan_scale", tensor("head.bias.int8_scale", lambda t: torch.ones(16, 1)), "head.bias.int8_scale scales no "
                                                                                   "int8 weight"),
    ("int32_weight", tensor("head.weight", lambda t: t["head.weight"].int()), "head.weight is I32; weights are "
                                                                              "stored as floats or int8 matrices"),
    ("int8_vector", tensor("head.bias", lambda t: t["head.bias"].to(torch.int8)), "head.bias is I8"),
    # an encoder/ set that is corrupt
    ("encoder_nan", tensor("encoder/model.conv_head.weight", lambda t: torch.full((1280, 320, 1, 1), NAN)),
     "tensor encoder/model.conv_head.weight has values that are not finite"),
    ("encoder_bool", tensor("encoder/model.bn2.weight", lambda t: torch.ones(1280, dtype=torch.bool)),
     "extra tensor encoder/model.bn2.weight is BOOL, not a float tensor or counter"),
]


@pytest.mark.parametrize("change, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_one_line_at_load(tmp_path, parts, change, fragment):
    path = craft(tmp_path / "BAD.safetensors", parts, change)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400, message
    assert fragment in message


def test_the_untouched_parts_load(tmp_path, parts, tiny_checkpoint):
    """The baseline of the table: the same crafting with no change loads, as fp32 and with int8 matrices."""
    plain = load_checkpoint(craft(tmp_path / "same.safetensors", parts, lambda h, t: (h, t)))
    assert torch.equal(plain.model.head.weight, load_checkpoint(tiny_checkpoint).model.head.weight)
    quantized = load_checkpoint(craft(tmp_path / "int8.safetensors", parts, int8_head(0.25))).model.head.weight
    assert quantized.dtype == torch.float32 and bool((quantized == 0.25).all())


def test_checkpoints_with_training_extras_load(tmp_path, tiny_checkpoint, photos):
    """What training writes passes the checks: Adam's state (optimizer/, with its step counters) and a fine-tuned
    encoder's whole state (encoder/, with BatchNorm's int64 counters), here changed so that it shows in the caption."""
    from showtell.checkpoint import save_checkpoint
    from showtell.encoders import create_encoder

    ckpt = load_checkpoint(tiny_checkpoint)
    opt = torch.optim.Adam(ckpt.model.parameters())
    ckpt.model.loss(torch.randn(2, 1280), torch.tensor([[1, 5, 2], [1, 6, 2]])).backward()
    opt.step()
    state = {f"optimizer/state/{i}/{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    encoder = create_encoder(ckpt.encoder).state_dict()
    encoder = {f"encoder/{k}": v * 0.5 if k == "model.conv_head.weight" else v for k, v in encoder.items()}
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, extra_tensors={**state, **encoder})
    loaded = load_checkpoint(path)
    assert loaded.tensors("optimizer/").keys() == {k[len("optimizer/"):] for k in state}
    tuned = showtell.load(path)
    assert torch.equal(tuned.encoder.state_dict()["model.conv_head.weight"], encoder["encoder/model.conv_head.weight"])
    image = photos / "coffee.jpg"
    assert tuned.caption(image)[0].score != showtell.load(tiny_checkpoint).caption(image)[0].score


@pytest.mark.parametrize("kwargs, members", [({}, None), ({"num_layers": 3, "batch_norm": True}, None),
                                             ({"hidden_dim": 24, "embed_dim": 40}, 3)])
def test_declared_shapes_are_the_built_models(kwargs, members):
    """The shapes a checkpoint is checked against, from the config alone, are those of the model built from it."""
    config = ModelConfig(vocab_size=11, feature_dim=7, **{"embed_dim": 8, "hidden_dim": 12, **kwargs})
    built = CaptionModel(config) if members is None else Ensemble(config, members)
    declared = CaptionModel.state_shapes(config) if members is None else Ensemble.state_shapes(config, members)
    assert declared == {k: tuple(v.shape) for k, v in built.state_dict().items()}


@pytest.mark.parametrize("change, fragment", [
    (tensor("encoder/model.not_a_layer.weight", lambda t: torch.zeros(3)), "fine-tuned encoder weights do not fit"),
    (tensor("encoder/model.conv_head.weight", lambda t: torch.zeros(7, 7)), "fine-tuned encoder weights do not fit"),
], ids=["unknown_key", "wrong_shape"])
def test_bad_encoder_tensors_are_refused_at_load(tmp_path, parts, change, fragment):
    path = craft(tmp_path / "BAD.safetensors", parts, change)
    with pytest.raises(CheckpointError, match=fragment) as info:
        showtell.load(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_recorded_preprocessing_that_is_not_the_encoders_is_refused_at_load(tmp_path, parts, photos, capsys):
    """A hand-edited record (valid numbers, but not the pixels the model's features were made of) is one line from
    the API and the CLI, before the encoder is built."""
    from showtell.cli import main

    path = craft(tmp_path / "EDITED.safetensors", parts, pre(crop_pct=0.875, interpolation="bilinear"))
    with pytest.raises(CheckpointError) as info:
        showtell.load(path)
    assert str(info.value) == (f"{path}: the recorded preprocessing is not that of encoder 'efficientnet_lite0': "
                               "interpolation 'bilinear' (encoder: 'bicubic'), crop_pct 0.875 (encoder: 1.0)")
    assert main(["caption", str(photos / "coffee.jpg"), "--model", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"showtell: error: {info.value}\n"


@pytest.mark.parametrize("change, fragment", [
    (lambda c: {**c, "preprocess": {**c["preprocess"], "crop_pct": 1e-6}}, "crop_pct must be a number from 0.5 to 1"),
    (lambda c: {**c, "preprocess": {**c["preprocess"], "size": 20000}}, "size must be an integer from 1 to 1024"),
    (lambda c: {**c, "preprocess": {**c["preprocess"], "std": [0, 0, 0]}}, "std must be > 0"),
    (lambda c: {**c, "vocab": {**c["vocab"], "tokens": ["<pad>"] * 10}}, "vocabulary must start with"),
    (lambda c: {**c, "special_ids": {**c["special_ids"], "end": 10**9}}, "special_ids: end must be an integer from 0"),
    (lambda c: {**c, "files": {**c["files"], "encoder": "../../elsewhere.onnx"}}, "files: encoder must be a file name"),
    (lambda c: {**c, "preprocess": [224]}, "preprocessing must be a mapping, got list"),
    (lambda c: {k: v for k, v in c.items() if k != "vocab"}, "incomplete export config (no 'vocab')"),
    (lambda c: '{"format": "showtell-onnx", "x": ' + "[" * DEPTH + "]" * DEPTH + "}", "nested too deeply"),
], ids=["crop_pct", "size", "std", "vocab", "special_id", "file_path", "preprocess_list", "no_vocab", "nested"])
def test_bad_onnx_export_config_is_one_line_at_load(tmp_path, parts, change, fragment):
    pytest.importorskip("onnxruntime")
    from showtell.onnx_runtime import CONFIG_NAME, load_onnx

    header = parts[0]
    config = {"format": "showtell-onnx", "version": 1, "name": "tiny", "preprocess": header["preprocess"],
              "vocab": header["vocab"], "special_ids": {"pad": 0, "start": 1, "end": 2, "unk": 3},
              "files": {"encoder": "encoder.onnx", "decoder_init": "decoder_init.onnx",
                        "decoder_step": "decoder_step.onnx"}}
    config = change(config)
    (tmp_path / CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ShowtellError, match=re.escape(fragment)) as info:
        load_onnx(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / CONFIG_NAME}: ") and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- through the CLI

# Runs `showtell.cli.main(argv)` once per argv in one process whose data segment is limited (RLIMIT_DATA: heap and
# private mappings; torch reserves far more address space than it uses, so RLIMIT_AS would measure the wrong thing).
# A plain caption run needs about 1.1 GiB of it (VmData, measured with the built-in model). Before the bounds, each
# hostile run here ended in a traceback under this limit (allocations of 5 GB for hidden_dim 1e7, 128 GB for
# vocab_size 1e9, a resize to 224 million pixels for crop_pct 1e-6, ...), and the NaN checkpoint captioned
# "man the the the ..." with exit 0. An exception escaping main() is reported as a traceback.
DATA_LIMIT = 3 * 2**30


@pytest.mark.slow  # ~15 s: 14 runs, two of them load the built-in model
def test_hostile_models_and_options_end_in_one_line_within_a_memory_limit(tmp_path, parts, tiny_checkpoint, photos):
    photo = str(photos / "coffee.jpg")
    hostile = {name: change for name, change, _ in CASES
               if name in ("hidden_dim_1e7", "num_layers_1e5", "ensemble_1e4", "vocab_size_1e9", "crop_pct_1e-6",
                           "size_20000", "nested", "nan_weight", "std_zeros", "model_list")}
    paths = {name: craft(tmp_path / f"{name}.safetensors", parts, change) for name, change in hostile.items()}
    # finite weights whose products overflow: every log-probability is NaN, so no caption has a finite score
    overflow = craft(tmp_path / "overflow.safetensors", parts,
                     tensor("image_proj.weight", lambda t: torch.full_like(t["image_proj.weight"], 3e38)))
    argvs = [["caption", photo, "--model", str(p)] for p in paths.values()]
    argvs += [["caption", photo, "--beam-size", "100000"],  # with the built-in model: vocabulary 2,540, 4 members
              ["caption", photo, "--max-length", "1000000", "--model", str(tiny_checkpoint)],
              ["caption", photo, "--model", str(overflow), "--format", "jsonl"],
              ["caption", photo, "--model", str(tiny_checkpoint), "--format", "jsonl"]]  # a good run fits the limit
    outs = [(r.returncode, r.stdout, r.stderr) for r in showtell_many(argvs, data_limit=DATA_LIMIT)]
    expected = [f"showtell: error: {p}: " for p in paths.values()]
    expected += ["showtell: error: ", "showtell: error: ",  # the option's bound, from argparse (exit 2) or decoding
                 f"showtell: error: {photo}: no caption, the model's outputs are NaN or infinite"]
    for argv, (code, out, err), start in zip(argvs, outs, expected):
        assert code in ((1, 2) if start == "showtell: error: " else (1,)), (argv, code, out, err)
        assert len(err.splitlines()) == 1 and err.startswith(start), (argv, err)
    assert all(out == "" for _, out, _ in outs[:-2])
    assert f"{MAX_BEAM_SIZE}, got 100000" in outs[-4][2] and f"{MAX_LENGTH}, got 1000000" in outs[-3][2]
    no_nan = {"parse_constant": lambda c: pytest.fail(f"{c} in the output")}  # NaN, Infinity are not JSON
    assert all(json.loads(line, **no_nan)["caption"] is None for line in outs[-2][1].splitlines())
    code, out, err = outs[-1]
    assert code == 0 and err == "", err
    row = json.loads(out, **no_nan)
    assert row["caption"] and math.isfinite(row["score"]) and row["score"] < 0


# ---------------------------------------------------------------------------------------------- decoding


class HalfNaN:
    """A step model over 6 words whose outputs are NaN for odd images (as a model whose numbers overflowed)."""

    def init_state(self, features):
        return (features[None, :, :1].clone(),)

    def step(self, tokens, state):
        logits = torch.tensor([0.0, 0.0, 1.0, 0.0, 2.0, 1.5]).repeat(len(tokens), 1)
        return logits.masked_fill(state[0][0] > 0, NAN), state


@pytest.mark.parametrize("options", [DecodingOptions(), DecodingOptions(beam_size=3, num_return=3),
                                     DecodingOptions(sample=True, seed=0),
                                     DecodingOptions(beam_size=2, length_penalty=1.0)],
                         ids=["greedy", "beam", "sample", "beam-gnmt"])
def test_decoding_never_returns_a_score_that_is_not_finite(options):
    features = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])  # images 1 and 3 give NaN
    results = decode(HalfNaN(), features, options)
    assert [len(r) > 0 for r in results] == [True, False, True, False]
    for r in results:
        for h in r:
            assert math.isfinite(h.logprob) and math.isfinite(h.score) and h.score < 0
    json.dumps([[h.__dict__ for h in r] for r in results], allow_nan=False)  # valid JSON


def test_captioner_reports_an_error_instead_of_a_nan_caption(tmp_path, parts, photos):
    path = craft(tmp_path / "overflow.safetensors", parts,
                 tensor("image_proj.weight", lambda t: torch.full_like(t["image_proj.weight"], 3e38)))
    results = showtell.load(path).caption([photos / "coffee.jpg", photos / "rocket.jpg"], beam_size=3)
    assert [r.caption for r in results] == [None, None]
    assert all(r.error.endswith("no caption, the model's outputs are NaN or infinite") for r in results)
    json.dumps([r.to_dict() for r in results], allow_nan=False)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"beam_size": MAX_BEAM_SIZE + 1}, f"beam_size must be at most {MAX_BEAM_SIZE}, got {MAX_BEAM_SIZE + 1}"),
    ({"beam_size": 100_000}, "beam_size must be at most 32"),
    ({"max_length": MAX_LENGTH + 1}, f"max_length must be at most {MAX_LENGTH}"),
    ({"beam_size": 2.0}, "beam_size must be an integer >= 1, got 2.0"),
    ({"temperature": math.inf}, "temperature must be a number >= 1e-06, got inf"),
    ({"temperature": 1e-300}, "temperature must be a number >= 1e-06"),
    ({"temperature": NAN}, "temperature must be a number >= 1e-06, got nan"),
    ({"length_penalty": math.inf}, "length_penalty must be a number from 0 to 10, got inf"),
    ({"length_penalty": 1e308}, "length_penalty must be a number from 0 to 10"),
    ({"seed": 2**64}, "seed must be an integer from 0 to 2**64 - 1"),
])
def test_decoding_options_are_bounded(kwargs, fragment):
    with pytest.raises(ShowtellError, match=re.escape(fragment)):
        DecodingOptions(**kwargs)
    limits = DecodingOptions(beam_size=MAX_BEAM_SIZE, max_length=MAX_LENGTH, num_return=MAX_BEAM_SIZE)
    assert (limits.beam_size, limits.max_length) == (32, 100)


def test_memory_limit_of_the_cli_test_is_enforced():
    """The limit the CLI test runs under does refuse a large allocation (so its one-line errors mean something)."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_DATA, (int(sys.argv[1]),) * 2); "
            "bytearray(int(sys.argv[1]))")
    run = subprocess.run([sys.executable, "-c", code, str(DATA_LIMIT)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "MemoryError" in run.stderr
