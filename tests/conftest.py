from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]


def flickr8k_root() -> Path:
    return Path(os.environ.get("SHOWTELL_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))


def missing(why: str) -> NoReturn:
    """What a test needs (data, Java, chromium, the built-in model) is not here: the test fails in CI (CI=true), where
    everything is installed, and is skipped elsewhere; pytest prints ``why`` either way (-rs in pyproject.toml)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The shared Flickr8k folder."""
    root = flickr8k_root()
    if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
        missing(f"Flickr8k not found at {root} (set SHOWTELL_FLICKR8K)")
    return root


@pytest.fixture(scope="session")
def java() -> None:
    """Java on PATH: pycocoevalcap's PTB tokenizer and METEOR run it."""
    from showtell.metrics import java_available

    if not java_available():
        missing("no Java on PATH (pycocoevalcap's PTB tokenizer and METEOR; apt-get install default-jre-headless)")


@pytest.fixture(scope="session")
def builtin_model() -> Path:
    """The model shipped in the package (src/showtell/weights/flickr8k.safetensors)."""
    from showtell.captioner import DEFAULT_MODEL, WEIGHTS_DIR

    path = WEIGHTS_DIR / f"{DEFAULT_MODEL}.safetensors"
    if not path.is_file():
        missing(f"the built-in model is not in this install ({path})")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small checkpoint (random LSTM weights, real efficientnet_lite0 encoder) for API/CLI/server tests."""
    import torch

    from showtell.checkpoint import save_checkpoint
    from showtell.encoders import encoder_info
    from showtell.model import CaptionModel, ModelConfig
    from showtell.vocab import Vocabulary

    info = encoder_info("efficientnet_lite0")
    vocab = Vocabulary.build(["a cat sits on a mat", "a dog runs on the grass", "a man rides a bike"], min_count=1)
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(vocab_size=len(vocab), feature_dim=info["feature_dim"], embed_dim=32,
                                     hidden_dim=64))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model.eval(), vocab, "efficientnet_lite0", info["preprocess"], meta={"name": "tiny"})
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """A folder of real photos with open licences (scikit-image's data)."""
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache folder for every test that trains, so each image set is extracted once."""
    return tmp_path_factory.mktemp("features")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(checkpoint: Path, *args: str, timeout: float = 90):
    """`showtell serve` on 127.0.0.1 in a subprocess, once it answers /healthz: yields (url, process).
    On exit the server is stopped and its output kept in ``process.output``."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "showtell", "serve", "--model", str(checkpoint),
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not answer /healthz within {timeout:g} s"
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.output = proc.communicate()[0]


def rank_batches(lengths: list[int], batch_size: int, seed: int, world: int, epoch: int) -> list[list[list[int]]]:
    """Each rank's batches of one epoch from a LengthBucketSampler sharded over ``world`` ranks (the sampler's
    length checked against what it yields)."""
    from showtell.data import LengthBucketSampler

    ranks = []
    for rank in range(world):
        sampler = LengthBucketSampler(lengths, batch_size, seed=seed, num_replicas=world, rank=rank)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
        assert len(ranks[-1]) == len(sampler)
    return ranks


def numpy_model(model):
    """A torch model behind the numpy init/step interface of onnx_runtime.beam_search."""
    import torch
    import torch.nn.functional as F

    def init(features):
        with torch.inference_mode():
            return tuple(s.numpy() for s in model.init_state(torch.from_numpy(features)))

    def step(tokens, state):
        with torch.inference_mode():
            logits, (h, c) = model.step(torch.from_numpy(tokens), tuple(map(torch.from_numpy, state)))
            return F.log_softmax(logits.float(), dim=-1).numpy(), (h.numpy(), c.numpy())

    return init, step
