"""Bad inputs through every front door: the CLI, the Python API and the HTTP server.

Whatever a user can hand us (a broken or odd image, a malformed caption file, a file that is not a
checkpoint, a run killed half-way) ends in one clear line naming the file and a non-zero exit,
never a traceback; batch work reports the bad item and keeps the rest.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from badimages import make_catalogue
from fastapi.testclient import TestClient
from PIL import Image

import showtell
from showtell.server import create_app

# What the user is told about each bad image of tests/badimages.py (after "<path>: ").
IMAGE_ERRORS = {
    "zero_bytes.jpg": "empty file, not an image",
    "truncated.jpg": "cannot decode image (image file is truncated",
    "random_bytes.jpg": "not an image file (unrecognised format)",
    "page.jpg": "not an image file (unrecognised format)",
    "bomb.png": "image too large (Image size (1600000000 pixels) exceeds limit",
    "no_permission.jpg": "permission denied",
    "folder.jpg": "is a directory, not an image",
}
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def showtell_cli(*args, prefix=(), timeout=180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "showtell", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def one_error_line(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit code 1 and exactly one `showtell: error:` line holding every fragment."""
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("showtell: error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def unprivileged_prefix(probe: Path) -> tuple[str, ...] | None:
    """A command prefix under which root cannot read a mode-000 file (root without CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        return None
    ok = subprocess.run([*NO_DAC, sys.executable, "-c", f"open({str(probe)!r}, 'rb')"], capture_output=True)
    return tuple(NO_DAC) if ok.returncode == 1 and b"PermissionError" in ok.stderr else None


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_catalogue(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    return showtell.load(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------- images


def test_cli_captions_the_good_images_and_names_each_bad_one(catalogue, tiny_checkpoint):
    folder = catalogue["zero_bytes.jpg"][0].parent
    missing = folder / "missing.jpg"
    expected = {path: kind for path, kind in catalogue.values()}
    prefix = unprivileged_prefix(catalogue["no_permission.jpg"][0])
    if prefix is None:  # running as root and cannot drop the capability: root reads any file
        expected[catalogue["no_permission.jpg"][0]] = "ok"
    # the folder itself (a subfolder named folder.jpg is not an image file, so the scan passes it by),
    # then the folder named like an image and a missing file given explicitly
    out = showtell_cli("caption", folder, folder / "folder.jpg", missing, "--model", tiny_checkpoint,
                       "--beam-size", "1", "--max-length", "5", prefix=prefix or ())
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    captioned = dict(line.split("\t")[:2] for line in out.stdout.splitlines())  # path, caption[, tags]
    assert sorted(captioned) == sorted(str(p) for p, kind in expected.items() if kind == "ok")
    assert all(captioned.values())
    errors = out.stderr.splitlines()
    bad = [p for p, kind in expected.items() if kind == "error"] + [missing]
    assert len(errors) == len(bad), out.stderr
    for path in bad:
        (line,) = [e for e in errors if e.startswith(f"showtell: error: {path}: ")]
        if path == missing:
            assert line.endswith(": no such file")
        elif path.name == "folder.jpg":
            assert line.endswith(": a folder with no image files in it, not an image")
        else:
            assert IMAGE_ERRORS[path.name] in line, line


def test_api_gives_a_caption_or_an_error_naming_the_file(catalogue, captioner):
    paths = [path for path, _ in catalogue.values()]
    results = captioner.caption(paths, beam_size=1, max_length=5)
    assert [r.image for r in results] == [str(p) for p in paths]  # one result per input, in order
    for (path, kind), r in zip(catalogue.values(), results):
        if path.name == "no_permission.jpg" and os.geteuid() == 0:
            kind = "ok"  # in-process as root; the CLI test above drops the privilege
        if kind == "ok":
            assert r.ok and r.caption and r.score is not None, (path.name, r.error)
        else:
            assert r.caption is None and r.error.startswith(f"{path}: {IMAGE_ERRORS[path.name]}"), r.error


def test_server_answers_each_upload_with_a_caption_or_a_clear_4xx(catalogue, captioner):
    files = {name: path.read_bytes() for name, (path, _) in catalogue.items()
             if path.is_file() and os.access(path, os.R_OK)}
    status_of = {"zero_bytes.jpg": 400, "bomb.png": 413}  # the server refuses it from its header: too many pixels
    bad = set(IMAGE_ERRORS) - {"no_permission.jpg"}  # its bytes, once read (as root), are a fine photo
    with TestClient(create_app(captioner, beam_size=1, max_length=5)) as client:
        for name, data in files.items():
            r = client.post("/v1/caption", files={"file": (name, data, "application/octet-stream")})
            body = r.json()
            if name in bad:
                assert r.status_code == status_of.get(name, 415), (name, r.status_code, body)
                assert set(body) == {"error"}
                if name == "zero_bytes.jpg":
                    assert body["error"] == "zero_bytes.jpg: empty upload, not an image"
                else:
                    assert body["error"].startswith(f"{name}: {IMAGE_ERRORS[name]}"), body
            else:
                assert r.status_code == 200 and body["caption"], (name, body)
        # all at once: one entry per file, in order, the bad ones with their status
        r = client.post("/v1/captions", files=[("files", (n, d)) for n, d in files.items()])
        assert r.status_code == 200
        for (name, _), entry in zip(files.items(), r.json()):
            assert entry["file"] == name
            if name in bad:
                assert entry["status"] == status_of.get(name, 415) and entry["error"].startswith(f"{name}: ")
            else:
                assert entry["caption"]
        assert client.get("/healthz").json()["queue"] == 0


# ---------------------------------------------------------------------------------------------- data files


def make_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8), "red").save(folder / n)


def flickr8k(root: Path, tokens: bytes, train=b"a.jpg\n", dev=b"b.jpg\n", test=b"") -> Path:
    make_images(root / "Flicker8k_Dataset", ["a.jpg", "b.jpg"])
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    (text / "Flickr8k.token.txt").write_bytes(tokens)
    for split, lines in (("train", train), ("dev", dev), ("test", test)):
        if lines is not None:
            (text / f"Flickr_8k.{split}Images.txt").write_bytes(lines)
    return text


GOOD_TOKENS = b"a.jpg#0\tA dog runs .\nb.jpg#0\tA cat sits\n"
CSV_HEADER = b"image,caption,split\n"
# (name, format, files {relative path: bytes}, expected file in the message, expected fragments)
DATA_CASES = [
    ("flickr8k-empty-token-file", "flickr8k", {"tokens": b""}, "Flickr8k.token.txt", ": no captions"),
    ("flickr8k-malformed-line", "flickr8k", {"tokens": b"a.jpg#0\tA dog\nb.jpg A cat with no tab\n"},
     "Flickr8k.token.txt", ":2: expected '<image>#<n><TAB><caption>'"),
    ("flickr8k-not-utf8", "flickr8k", {"tokens": b"a.jpg#0\tA dog\nb.jpg#0\tA caf\xe9 terrace\n"},
     "Flickr8k.token.txt", ":2: not UTF-8 text"),
    ("flickr8k-malformed-split-file", "flickr8k", {"tokens": GOOD_TOKENS, "train": b"a.jpg\tx\n"},
     "Flickr_8k.trainImages.txt", ":1: expected one image file name a line"),
    ("flickr8k-missing-split-file", "flickr8k", {"tokens": GOOD_TOKENS, "test": None},
     "Flickr_8k.testImages.txt", ": no such file"),
    ("flickr8k-split-without-captions", "flickr8k", {"tokens": b"a.jpg#0\tA dog\n"},
     "Flickr8k.token.txt", ": no captions for 1 image(s) of the split files, e.g. b.jpg"),
    ("csv-empty", "csv", {"captions.txt": b""}, "captions.txt", ": empty file, expected a header line"),
    ("csv-no-caption-column", "csv", {"captions.txt": b"image,words\na.jpg,A dog\n"}, "captions.txt",
     ":1: no caption column"),
    ("csv-short-row", "csv", {"captions.txt": CSV_HEADER + b"a.jpg,A dog,train\nb.jpg\n"}, "captions.txt",
     ":3: expected 3 fields, got 1"),
    ("csv-not-utf8", "csv", {"captions.txt": CSV_HEADER + b"a.jpg,A dog,train\nb.jpg,A caf\xe9,dev\n"},
     "captions.txt", ":3: not UTF-8 text"),
    ("csv-giant-field", "csv", {"captions.txt": CSV_HEADER + b"a.jpg,A dog,train\nb.jpg,\"" + b"x" * 200_000
                                + b"\",dev\n"}, "captions.txt", ":3: field larger than field limit"),
    ("csv-image-in-two-splits", "csv", {"captions.txt": CSV_HEADER + b"a.jpg,A dog,train\na.jpg,A pup,test\n"},
     "captions.txt", ":3: a.jpg is in both the train and test splits"),
    ("csv-binary", "csv", {"captions.txt": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"}, "captions.txt",
     ":1: not UTF-8 text"),
    ("coco-not-json", "coco", {"c.json": b'{"images": [], "annotations": ['}, "c.json",
     ": invalid JSON at line 1"),
    ("coco-top-level-list", "coco", {"c.json": b"[1, 2]"}, "c.json", ": missing field 'images'"),
    ("coco-duplicate-image-id", "coco",
     {"c.json": json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                            "annotations": []}).encode()}, "c.json", ": images[1]: duplicate image id 1"),
    ("coco-unknown-image-id", "coco",
     {"c.json": json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                            "annotations": [{"image_id": 1, "caption": "A dog"},
                                            {"image_id": 7, "caption": "x"}]}).encode()},
     "c.json", ": annotations[1]: image_id 7 is not in 'images'"),
    ("coco-caption-wrong-type", "coco",
     {"c.json": json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                            "annotations": [{"image_id": 1, "caption": ["A dog"]}]}).encode()},
     "c.json", ": annotations[0]: field 'caption' has the wrong type (list)"),
    ("karpathy-duplicate-image", "karpathy",
     {"dataset_x.json": json.dumps({"images": [
         {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog"}]},
         {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog"}]}]}).encode()},
     "dataset_x.json", ": images[1]: duplicate image a.jpg"),
    ("karpathy-sentences-not-a-list", "karpathy",
     {"dataset_x.json": json.dumps({"images": [{"filename": "a.jpg", "split": "train",
                                                "sentences": "A dog"}]}).encode()},
     "dataset_x.json", ": images[0]: field 'sentences' has the wrong type (str)"),
    ("karpathy-not-utf8", "karpathy", {"dataset_x.json": b'{"images": [\n{"filename": "caf\xe9.jpg"}]}'},
     "dataset_x.json", ":2: not UTF-8 text"),
    ("karpathy-empty", "karpathy", {"dataset_x.json": b""}, "dataset_x.json", ": invalid JSON at line 1 column 1"),
]


def write_case(root: Path, fmt: str, files: dict) -> list[str]:
    """Write one data case under root; the extra `data stats` arguments it needs."""
    if fmt == "flickr8k":
        flickr8k(root, files["tokens"], **{k: v for k, v in files.items() if k != "tokens"})
        return []
    make_images(root / "Images" if fmt == "csv" else root, ["a.jpg", "b.jpg"])
    for name, data in files.items():
        (root / name).write_bytes(data)
    return ["--captions", str(root / "c.json")] if fmt == "coco" else []


@pytest.mark.parametrize("name, fmt, files, file, fragment", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_stats_malformed_file_is_one_line_naming_file_and_place(tmp_path, name, fmt, files, file, fragment):
    extra = write_case(tmp_path, fmt, files)
    out = showtell_cli("data", "stats", "--dataset", fmt, "--root", tmp_path, *extra)
    path = tmp_path / "Flickr8k_text" / file if fmt == "flickr8k" else tmp_path / file
    one_error_line(out, f"showtell: error: {path}{fragment}")
    assert out.stdout == ""


def test_data_stats_missing_images_warn_with_counts_and_an_empty_split_shows_zero(tmp_path):
    make_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    (tmp_path / "captions.txt").write_text("image,caption,split\na.jpg,A dog,train\nb.jpg,A cat,test\n"
                                           "gone.jpg,A cow,train\ngone.jpg,A brown cow,train\nlost.jpg,A hen,dev\n")
    out = showtell_cli("data", "stats", "--dataset", "csv", "--root", tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "showtell: warning: skipped 3 caption(s) of 2 missing image(s): gone.jpg, lost.jpg"]
    stats = json.loads(out.stdout.splitlines()[-1])
    assert stats["splits"] == {"train": {"images": 1, "captions": 1}, "dev": {"images": 0, "captions": 0},
                               "test": {"images": 1, "captions": 1}}
    assert stats["skipped_captions"] == 3 and stats["missing_images"] == ["gone.jpg", "lost.jpg"]
    table = out.stdout.splitlines()
    assert any(line.split() == ["dev", "0", "0"] for line in table)
    assert "captions skipped (image missing): 3  [gone.jpg, lost.jpg]" in table


def test_train_with_an_empty_dev_split_fails_fast_before_feature_extraction(tmp_path):
    make_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    (tmp_path / "captions.txt").write_text("image,caption,split\na.jpg,A dog,train\nb.jpg,A cat,test\n")
    cache = tmp_path / "cache"
    started = time.monotonic()
    out = showtell_cli("train", "--dataset", "csv", "--root", tmp_path, "--out", tmp_path / "run",
                       "--cache-dir", cache, "--quiet", timeout=120)
    one_error_line(out, "no 'dev' images", "needs a train and a dev split")
    assert not cache.exists()  # no encoder ran
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------------------------------------- checkpoints


class Planted:
    """A pickle that, when loaded, creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoints(folder: Path, good: Path, marker: Path) -> list[tuple[Path, str]]:
    """(file, fragment of the message) for each kind of bad --model."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(good), "pt") as f:
        header = json.loads(f.metadata()["showtell"])
    tensors = load_file(str(good))
    data = good.read_bytes()
    out: list[tuple[Path, str]] = []

    def put(name: str, content: bytes, fragment: str) -> None:
        (folder / name).write_bytes(content)
        out.append((folder / name, fragment))

    def save(name: str, fragment: str, tensors=tensors, **meta) -> None:
        save_file(tensors, str(folder / name), metadata={"showtell": json.dumps({**header, **meta})})
        out.append((folder / name, fragment))

    put("truncated.safetensors", data[: len(data) // 2], "checkpoint is truncated (the file is shorter than")
    put("random.safetensors", os.urandom(4096), "not a safetensors checkpoint")
    put("empty.safetensors", b"", "not a safetensors checkpoint")
    torch.save({"a": 1}, folder / "torch_save.pt")
    out.append((folder / "torch_save.pt", "not a safetensors checkpoint but a pickle (torch.save) file"))
    torch.save({"model": Planted(marker)}, folder / "planted.pt")
    out.append((folder / "planted.pt", "showtell never unpickles files"))
    put("planted.pkl", pickle.dumps(Planted(marker)), "showtell never unpickles files")
    save("version9.safetensors", "checkpoint format version 9 is not supported", version=9)
    save("other_format.safetensors", "not a showtell checkpoint (metadata format 'other')", format="other")
    wrong = dict(tensors, **{"head.weight": torch.zeros(3, 3)})
    save("mismatch.safetensors", "weights do not match the stored model config", tensors=wrong)
    save("wrong_dim.safetensors", "size mismatch for image_proj.weight", model={**header["model"], "feature_dim": 7})
    save("unknown_encoder.safetensors", "unknown encoder 'vgg99'", encoder="vgg99")
    save("bad_vocab.safetensors", "vocabulary must start with <pad>",
         vocab={"format": "showtell-vocab", "version": 1, "tokens": ["a"]})
    save_file(tensors, str(folder / "plain.safetensors"))
    out.append((folder / "plain.safetensors", "no 'showtell' metadata"))
    save_file(tensors, str(folder / "list_meta.safetensors"), metadata={"showtell": "[1, 2]"})
    out.append((folder / "list_meta.safetensors", "not a showtell checkpoint"))
    (folder / "a_folder.safetensors").mkdir()
    out.append((folder / "a_folder.safetensors", "is a directory, not a checkpoint file"))
    out.append((folder / "missing.safetensors", "no such checkpoint file"))
    return out


def test_planted_pickle_is_live(tmp_path):
    """The payload used below really runs code when unpickled (so its marker staying absent means something)."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Planted(proof)))
    assert proof.exists()


# Runs `showtell.cli.main(argv)` (what the `showtell` script runs) once per argv in one fresh process, so that
# 16 cases pay for one torch import; an exception escaping main() is reported as a traceback, as it would be.
MANY_RUNS = """
import contextlib, io, json, resource, sys, traceback
if len(sys.argv) > 2:  # a limit on the process's data (heap) size, in bytes
    resource.setrlimit(resource.RLIMIT_DATA, (int(sys.argv[2]), int(sys.argv[2])))
from showtell.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = 1
            traceback.print_exc()
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def showtell_many(argvs: list[list[str]], data_limit: int | None = None, **kwargs) -> list[subprocess.CompletedProcess]:
    """Each argv's exit code, stdout and stderr; ``data_limit``: the process may use at most that many bytes of data
    (RLIMIT_DATA: torch maps about 4 GiB of address space even for a normal run, but needs about 1 GiB of data)."""
    limit = [] if data_limit is None else [str(data_limit)]
    run = subprocess.run([sys.executable, "-c", MANY_RUNS, json.dumps(argvs), *limit], capture_output=True,
                         text=True, timeout=300, **kwargs)
    assert run.returncode == 0, run.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, code, out, err) for argv, (code, out, err)
            in zip(argvs, json.loads(run.stdout))]


def test_caption_with_a_bad_model_is_one_line_naming_it_and_nothing_is_unpickled(tmp_path, tiny_checkpoint, photos):
    marker = tmp_path / "UNPICKLED"
    cases = bad_checkpoints(tmp_path, tiny_checkpoint, marker)
    argvs = [["caption", str(photos / "coffee.jpg"), "--model", str(path)] for path, _ in cases]
    pickles = [i for i, (path, _) in enumerate(cases) if path.suffix in (".pt", ".pkl")]
    with ThreadPoolExecutor(2) as pool:  # the pickles also through the real `python -m showtell`, one process each
        separate = pool.map(lambda i: showtell_cli(*argvs[i]), pickles)
        outs = showtell_many(argvs)
        outs += list(separate)
    for (path, fragment), out in zip([*cases, *(cases[i] for i in pickles)], outs):
        one_error_line(out, f"showtell: error: {path}: ", fragment)
        assert out.stdout == ""
    assert not marker.exists(), "a checkpoint was unpickled"


# ---------------------------------------------------------------------------------------------- interruptions


@pytest.fixture()
def forty_photos(tmp_path, photos) -> Path:
    folder = tmp_path / "forty"
    folder.mkdir()
    for i in range(10):
        for p in sorted(photos.glob("*.jpg")):
            shutil.copy(p, folder / f"{p.stem}_{i:02d}.jpg")
    return folder


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"fewer than {n} lines in {path} after {timeout} s"
        time.sleep(0.02)


def test_caption_resume_after_sigkill_records_each_image_once(forty_photos, tiny_checkpoint, tmp_path):
    out_file = tmp_path / "captions.jsonl"
    args = [sys.executable, "-m", "showtell", "caption", str(forty_photos), "--model", str(tiny_checkpoint),
            "--format", "jsonl", "--output", str(out_file), "--batch-size", "2", "--beam-size", "1",
            "--max-length", "5", "--resume"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_lines(out_file, 6, proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    text = out_file.read_text()
    complete = text[: text.rfind("\n") + 1].splitlines()
    done = len(complete)
    assert 6 <= done < 40
    if text.endswith("\n"):
        # Each record goes out in one write, so the kill rarely tears one; a full disk or a power cut can.
        # Leave a torn record of the next image, as such a write would.
        kept = {json.loads(line)["image"] for line in complete}
        nxt = next(str(p) for p in sorted(forty_photos.iterdir()) if str(p) not in kept)
        with open(out_file, "a") as f:
            f.write(json.dumps({"image": nxt, "caption": "a half-written"})[:30])

    again = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    assert again.stderr.splitlines() == [
        f"showtell: warning: dropped a partial last line of {out_file} (an interrupted write)",
        f"showtell: skipped {done} image(s) already in {out_file}"]
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]  # every line is whole JSON
    images = [r["image"] for r in rows]
    assert sorted(images) == sorted(str(p) for p in forty_photos.iterdir())  # each image exactly once
    assert all(r["caption"] for r in rows)


def test_drop_torn_tail(tmp_path):
    from showtell.cli import _drop_torn_tail

    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    assert _drop_torn_tail(str(path)) == 0 and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert _drop_torn_tail(str(path)) == 6 and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b"x" * 200_000)  # no newline at all, longer than one read block
    assert _drop_torn_tail(str(path)) == 200_000 and path.read_bytes() == b""
    path.write_bytes(b"y\n" + b"x" * 200_000)
    assert _drop_torn_tail(str(path)) == 200_000 and path.read_bytes() == b"y\n"
    assert _drop_torn_tail(str(tmp_path / "none.jsonl")) == 0


def test_caption_output_that_cannot_be_written_is_one_line(tiny_checkpoint, photos, tmp_path):
    cases = [(tmp_path / "no" / "such" / "dir" / "out.jsonl", [], "cannot write (No such file or directory)"),
             (tmp_path, [], "cannot write (Is a directory)"), (tmp_path, ["--resume"], "cannot write (Is a directory)")]
    outs = showtell_many([["caption", str(photos / "coffee.jpg"), "--model", str(tiny_checkpoint), "--format",
                           "jsonl", "--output", str(output), *extra] for output, extra, _ in cases])
    for (output, _, message), out in zip(cases, outs):
        one_error_line(out, f"showtell: error: {output}: {message}")


def test_ctrl_c_exits_130_with_one_line(forty_photos, tiny_checkpoint):
    # Ctrl-C's default action in the child even when the tests run in a background job (a shell starts those
    # with SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-m", "showtell", "caption", str(forty_photos), "--model",
                             str(tiny_checkpoint), "--batch-size", "2", "--beam-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()  # captioning is under way
    assert "\t" in first, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr == "showtell: interrupted\n"
    assert len(stdout.splitlines()) < 39  # it stopped, it did not run to the end


def test_ctrl_c_with_an_output_file_says_what_stays_and_how_to_go_on(forty_photos, tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "showtell", "caption", str(forty_photos), "--model",
                             str(tiny_checkpoint), "--batch-size", "2", "--beam-size", "1", "--format", "jsonl",
                             "--output", str(out)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out.is_file() and out.read_bytes().count(b"\n") >= 2):  # captioning is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr == (f"showtell: interrupted; the lines written stay in {out}; the same command with --resume "
                      "continues\n")
    assert 2 <= len(out.read_text().splitlines()) < 40
