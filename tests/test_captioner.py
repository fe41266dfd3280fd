import itertools
import json
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

import showtell
from showtell.checkpoint import load_checkpoint
from showtell.errors import CheckpointError


def showtell_cli(*args):
    return subprocess.run([sys.executable, "-m", "showtell", *map(str, args)], capture_output=True, text=True)


def test_api_takes_paths_pil_and_bytes(tiny_checkpoint, photos):
    captioner = showtell.load(tiny_checkpoint)
    path = photos / "chelsea.jpg"
    by_path, by_pil, by_bytes = captioner.caption([path, Image.open(path), path.read_bytes()], beam_size=3)
    assert by_path.caption and by_path.caption == by_pil.caption == by_bytes.caption
    assert by_path.score == pytest.approx(by_bytes.score)
    single = captioner.caption(path, beam_size=3, num_return=3)[0]
    assert single.caption == by_path.caption and len(single.alternatives) == 2


def test_captioning_a_photo_loads_no_training_or_feature_cache_code(tiny_checkpoint, photos):
    """Layering: the captioner needs the encoders, not the feature cache, the data set readers or the trainer."""
    code = ("import sys, showtell; r = showtell.load(sys.argv[1], device='cpu').caption([sys.argv[2]])[0]; "
            "print(r.caption); print(' '.join(sorted(m for m in sys.modules if m.startswith('showtell.'))))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), str(photos / "chelsea.jpg")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    caption, modules = out.stdout.splitlines()
    assert caption and "showtell.captioner" in modules.split() and "showtell.encoders" in modules.split()
    loaded = set(modules.split()) & {"showtell.features", "showtell.datasets", "showtell.train", "showtell.scst",
                                     "showtell.evaluate", "showtell.metrics", "showtell.data"}
    assert not loaded, loaded


def test_api_bad_image_does_not_stop_the_others(tiny_checkpoint, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>")
    results = showtell.load(tiny_checkpoint).caption([photos / "coffee.jpg", bad, photos / "rocket.jpg"])
    assert [r.ok for r in results] == [True, False, True]
    assert "bad.jpg" in results[1].error


def test_loading_ahead_keeps_order_errors_and_captions(tiny_checkpoint, photos, tmp_path):
    """Photos load in threads a batch ahead of the model: the results are those of loading one batch at a time."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>")
    good = sorted(photos.iterdir())
    images = [*good[:3], bad, *good, *good[:2]]  # the bad file in the middle of the second batch of 3
    captioner = showtell.load(tiny_checkpoint)
    one_at_a_time = captioner.caption(images, batch_size=3, ahead=0, workers=1)
    ahead = captioner.caption(images, batch_size=3, ahead=1, workers=3)
    assert [r.image for r in ahead] == [str(p) for p in images]
    assert [r.ok for r in ahead] == [True, True, True, False, True, True, True, True, True, True]
    assert ahead[3].error.startswith(f"{bad}: not an image")
    assert [r.to_dict() for r in ahead] == [r.to_dict() for r in one_at_a_time]


def test_input_is_read_at_most_one_batch_ahead_of_the_results(tiny_checkpoint, photos):
    taken = []

    def lazily():
        for i in range(12):
            taken.append(i)
            yield photos / "coffee.jpg"

    results = showtell.load(tiny_checkpoint).iter_caption(lazily(), batch_size=2)
    first = next(results)
    time.sleep(0.3)  # time for the loader to run as far ahead as it may
    assert first.ok and len(taken) == 4  # the first batch, captioned, and the second, loaded meanwhile
    assert sum(r.ok for r in results) == 11 and len(taken) == 12


def test_a_non_image_raises_when_its_batch_is_reached(tiny_checkpoint, photos):
    results = showtell.load(tiny_checkpoint).iter_caption([photos / "coffee.jpg", photos / "rocket.jpg", 42],
                                                          batch_size=2)
    assert [r.ok for r in itertools.islice(results, 2)] == [True, True]  # the batch before it is not lost
    with pytest.raises(TypeError):
        next(results)


def test_checkpoint_round_trip_gives_identical_captions(tiny_checkpoint, photos, tmp_path):
    from showtell.checkpoint import save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    copy = tmp_path / "copy.safetensors"
    save_checkpoint(copy, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, meta=ckpt.meta)
    images = sorted(photos.iterdir())
    a = [r.caption for r in showtell.load(tiny_checkpoint).caption(images)]
    b = [r.caption for r in showtell.load(copy).caption(images)]
    assert a == b


def test_fp16_and_int8_weights_are_smaller_close_and_stable(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    from showtell.checkpoint import save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    full = ckpt.model.state_dict()
    sizes = {}
    for weights in ("fp32", "fp16", "int8"):
        path = tmp_path / f"{weights}.safetensors"
        save_checkpoint(path, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, weights=weights)
        sizes[weights] = path.stat().st_size
        loaded = load_checkpoint(path).model.state_dict()
        assert loaded.keys() == full.keys()
        for k, v in full.items():
            if v.is_floating_point():  # int8: within half a step of the row's scale (its largest value / 127)
                bound = 0 if weights == "fp32" else (1e-3 * v.abs().max() if weights == "fp16" or v.dim() != 2
                                                     else v.abs().amax(dim=1, keepdim=True) / 254 + 1e-7)
                assert ((loaded[k] - v).abs() <= bound).all(), (weights, k)
    assert sizes["int8"] < 0.3 * sizes["fp32"] and sizes["fp16"] < 0.55 * sizes["fp32"]
    stored = load_file(str(tmp_path / "int8.safetensors"))
    assert stored["head.weight"].dtype == torch.int8 and stored["head.bias"].dtype == torch.float16
    # quantizing the dequantized weights again gives the same file contents (re-packaging loses nothing more)
    again = tmp_path / "again.safetensors"
    reloaded = load_checkpoint(tmp_path / "int8.safetensors")
    save_checkpoint(again, reloaded.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, weights="int8")
    assert all(torch.equal(stored[k], v) for k, v in load_file(str(again)).items())
    with pytest.raises(Exception, match="choose one of fp32, fp16, int8"):
        save_checkpoint(again, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, weights="bf16")
    # an int8 matrix without its scales is a broken file, said in one line
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(again), framework="pt") as f:
        metadata = f.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in stored.items() if k != "head.weight.int8_scale"}, str(broken), metadata=metadata)
    with pytest.raises(CheckpointError, match="head.weight has no head.weight.int8_scale"):
        load_checkpoint(broken)


@pytest.mark.parametrize("content, match", [
    (b"", "not a safetensors checkpoint"),
    (b"\x80\x04\x95" + b"pickle" * 20, "not a safetensors checkpoint"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}        ", "not a safetensors checkpoint"),
])
def test_bad_checkpoint_files(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_truncated_and_mismatched_checkpoints(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    data = tiny_checkpoint.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.safetensors")
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tiny_checkpoint))
    tensors["head.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match the stored model config"):
        load_checkpoint(tmp_path / "mismatch.safetensors")
    header = json.loads(meta["showtell"])
    save_file(load_file(str(tiny_checkpoint)), str(tmp_path / "v9.safetensors"),
              metadata={"showtell": json.dumps({**header, "version": 9})})
    with pytest.raises(CheckpointError, match="version 9 is not supported"):
        load_checkpoint(tmp_path / "v9.safetensors")
    save_file(load_file(str(tiny_checkpoint)), str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a showtell checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_caption_cli_folder_with_a_broken_file(tiny_checkpoint, photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in photos.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = showtell_cli("caption", folder, "--model", tiny_checkpoint)
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.count("\t") == 2 and line.split("\t")[1] for line in lines)
    # path, caption, then the five most probable ImageNet classes: "tags: Egyptian cat (0.26), tiger cat (0.23), ..."
    assert all(re.fullmatch(r"tags: [^\t]+ \(\d\.\d\d\)(, [^\t]+ \(\d\.\d\d\)){4}", line.split("\t")[2])
               for line in lines)
    assert [line for line in out.stderr.splitlines()] == [
        f"showtell: error: {folder / 'broken.jpg'}: not an image file (unrecognised format)"]
    ok = showtell_cli("caption", photos / "coffee.jpg", "--model", tiny_checkpoint, "--format", "jsonl")
    assert ok.returncode == 0
    row = json.loads(ok.stdout)
    assert set(row) == {"image", "caption", "score", "tags"} and row["caption"]


def test_caption_cli_tags(tiny_checkpoint, photos):
    paths = [photos / "chelsea.jpg", photos / "coffee.jpg"]
    jsonl = showtell_cli("caption", *paths, "--model", tiny_checkpoint, "--format", "jsonl", "--tags", "3")
    none = showtell_cli("caption", *paths, "--model", tiny_checkpoint, "--tags", "0")
    assert jsonl.returncode == none.returncode == 0 and not jsonl.stderr + none.stderr
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    for row in rows:
        assert [set(t) for t in row["tags"]] == [{"label", "p"}] * 3
        probs = [t["p"] for t in row["tags"]]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs) and sum(probs) <= 1
    assert rows[0]["tags"][0]["label"] == "Egyptian cat" and rows[1]["tags"][0]["label"] == "espresso"
    # --tags 0: the two columns as before tags existed
    assert none.stdout.splitlines() == [f"{row['image']}\t{row['caption']}" for row in rows]
    bad = showtell_cli("caption", *paths, "--model", tiny_checkpoint, "--tags", "-1")
    assert bad.returncode == 2 and bad.stderr == ("showtell: error: argument --tags: must be 0 to 1000, got -1 "
                                                  "(see showtell caption --help)\n")


def test_caption_cli_bad_model_is_one_line(tmp_path, photos):
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    out = showtell_cli("caption", photos / "coffee.jpg", "--model", tmp_path / "x.safetensors")
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_ensemble_cli_folds_checkpoints_into_one_that_captions(tiny_checkpoint, photos, tmp_path):
    import torch

    from showtell.checkpoint import save_checkpoint
    from showtell.model import Ensemble
    from showtell.vocab import Vocabulary

    ckpt = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ckpt.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, ckpt.model, ckpt.vocab, ckpt.encoder, ckpt.preprocess, meta={"training": {"seed": 3}})
    out = tmp_path / "ens.safetensors"
    run = showtell_cli("ensemble", tiny_checkpoint, other, "--out", out, "--weights", "int8")
    assert run.returncode == 0, run.stderr
    assert "an ensemble of 2 models" in run.stdout
    folded = load_checkpoint(out)
    assert isinstance(folded.model, Ensemble) and folded.meta["name"] == "ens"
    assert [m["file"] for m in folded.meta["members"]] == ["tiny.safetensors", "other.safetensors"]
    captions = showtell_cli("caption", photos, "--model", out, "--beam-size", "3")
    assert captions.returncode == 0 and len(captions.stdout.splitlines()) == 4, captions.stderr
    # members of other data (vocabulary) cannot be folded: one line, no file
    wrong = tmp_path / "wrong.safetensors"
    vocab = Vocabulary.build(["a b c d e f g h i j k l m n"], min_count=1)
    model = ckpt.model.__class__(ckpt.model.config.__class__(**{**ckpt.model.config.to_dict(),
                                                                 "vocab_size": len(vocab)}))
    save_checkpoint(wrong, model, vocab, ckpt.encoder, ckpt.preprocess)
    bad = showtell_cli("ensemble", tiny_checkpoint, wrong, "--out", tmp_path / "no.safetensors")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "vocabulary" in bad.stderr
    assert not (tmp_path / "no.safetensors").exists()
    for args, message in (((tiny_checkpoint, tiny_checkpoint), "given twice"), ((tiny_checkpoint, other), "directory")):
        refused = showtell_cli("ensemble", *args, "--out", tmp_path)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and message in refused.stderr
    # the ensemble's metadata holds each member's record, not the first member's as its own
    assert "metrics" not in folded.meta and "training" not in folded.meta
    assert folded.meta["members"][1]["training"] == {"seed": 3}


def test_photos_decoded_in_processes_caption_as_in_threads(tiny_checkpoint, photos):
    """Where a GPU runs the model photos decode in processes (threads shared the interpreter lock with the captioner);
    same captions, same per-image errors, every input type (a memoryview goes over as its bytes)."""
    import numpy as np
    from PIL import Image

    captioner = showtell.load(tiny_checkpoint, device="cpu")
    assert not captioner.load_in_processes()  # the default on a CPU: threads
    raw = (photos / "coffee.jpg").read_bytes()
    inputs = [photos / "chelsea.jpg", memoryview(raw), raw, Image.open(photos / "rocket.jpg"),
              np.asarray(Image.open(photos / "astronaut.jpg")), b"junk", photos / "missing.jpg",
              str(photos / "coffee.jpg")]
    threads = captioner.caption(inputs, batch_size=3, processes=False)
    expected = [(r.caption, r.score, r.error) for r in threads]
    for workers in (None, 1, 4):  # a batch of 3 goes over in tasks of ceil(3 / workers) photos
        processes = captioner.caption(inputs, batch_size=3, processes=True, workers=workers)
        assert [(r.caption, r.score, r.error) for r in processes] == expected
    # two runs at once, interleaved, on pools of other sizes: neither takes the other's pool away
    one, two = (captioner.iter_caption(inputs, batch_size=2, processes=True, workers=w) for w in (1, 3))
    assert [((a.caption, a.score, a.error), (b.caption, b.score, b.error)) for a, b in zip(one, two)] == [
        (e, e) for e in expected]
    assert [r.ok for r in processes] == [True] * 5 + [False] * 2 + [True]
    with pytest.raises(TypeError, match="an image must be"):
        captioner.caption([photos / "chelsea.jpg", 3.5], processes=True)
