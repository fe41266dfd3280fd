"""An attacker's probe of the command line: outputs that would destroy a file, numbers out of range, file names
that are not text, a full disk, paths that look like options, training settings that fail late, failed photos
in jsonl. Each ends in one line before any work (or, for a full disk, keeps what was written)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import one_error_line, showtell_cli, showtell_many

MISSING_MODEL = "no-such-model.safetensors"  # a refusal that names the output, not this, came before the model load


def one_usage_line(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """argparse refused the command line: exit 2, one `showtell: error:` line (no usage block)."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("showtell: error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture()
def photo(tmp_path, photos) -> Path:
    path = tmp_path / "coffee.jpg"
    shutil.copy(photos / "coffee.jpg", path)
    return path


# ---------------------------------------------------------------------------------------------- 4: outputs


def test_output_that_is_an_input_or_not_ours_is_refused_before_the_model_loads(tmp_path, photo, photos):
    (tmp_path / "link.jpg").symlink_to(photo)
    os.link(photo, tmp_path / "hard.jpg")
    other = tmp_path / "other.jpg"  # an image that is not an input
    shutil.copy(photos / "rocket.jpg", other)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, no tab\n")
    ours_text = tmp_path / "old.txt"
    ours_text.write_text(f"{photo}\ta cup\n")
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><p>mine</p>\n")
    before = {p: p.read_bytes() for p in (photo, other, notes, ours_text, page)}
    cases = [  # (extra arguments, the start of the message after "showtell: error: ")
        (["--output", photo], f"{photo}: is one of the input images; --output would overwrite it"),
        (["--output", tmp_path / "link.jpg"], f"{tmp_path / 'link.jpg'}: is one of the input images"),
        (["--output", tmp_path / "hard.jpg"], f"{tmp_path / 'hard.jpg'}: is one of the input images"),
        (["--output", photo, "--resume", "--format", "jsonl"], f"{photo}: is one of the input images"),
        (["--html", tmp_path / "link.jpg"], f"{tmp_path / 'link.jpg'}: is one of the input images; --html would"),
        (["--output", other], f"{other}: exists and is not a showtell results file; --output will not overwrite"),
        (["--output", other, "--resume", "--format", "jsonl"],
         f"{other}: exists and is not a showtell jsonl results file; --output will not append to it"),
        (["--output", notes], f"{notes}: exists and is not a showtell results file"),
        (["--output", ours_text, "--resume", "--format", "jsonl"], f"{ours_text}: exists and is not a showtell jsonl"),
        (["--html", page], f"{page}: exists and is not a showtell gallery; --html will not overwrite it"),
        (["--html", other], f"{other}: exists and is not a showtell gallery"),
        (["--output", ours_text, "--html", ours_text], f"{ours_text}: --output and --html name the same file"),
    ]
    outs = showtell_many([["caption", str(photo), "--model", MISSING_MODEL, *map(str, extra)] for extra, _ in cases])
    for (_, message), out in zip(cases, outs):
        one_error_line(out, f"showtell: error: {message}")
    assert {p: p.read_bytes() for p in before} == before  # nothing was written, truncated or appended to


def test_output_of_ours_is_replaced(tmp_path, photo, tiny_checkpoint):
    results, gallery = tmp_path / "old.txt", tmp_path / "gallery.html"
    results.write_text("/elsewhere/x.jpg\tan old caption\n")
    common = ["caption", str(photo), "--model", str(tiny_checkpoint), "--beam-size", "1", "--html", str(gallery)]
    first, again = showtell_many([common, [*common, "--output", str(results), "--format", "jsonl"]])
    assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
    assert [json.loads(line)["image"] for line in results.read_text().splitlines()] == [str(photo)]
    assert str(photo) in gallery.read_text()


# ---------------------------------------------------------------------------------------------- 6: numbers


def test_numeric_flags_out_of_range_are_one_line(tmp_path, photo):
    data = ["--dataset", "csv", "--root", str(tmp_path)]
    cases = [
        (["caption", photo, "--beam-size", "0"], "argument --beam-size: must be 1 to 32, got 0"),
        (["caption", photo, "--beam-size", "-2"], "argument --beam-size: must be 1 to 32, got -2"),
        (["caption", photo, "--beam-size", "33"], "argument --beam-size: must be 1 to 32, got 33"),
        (["caption", photo, "--batch-size", "0"], "argument --batch-size: must be 1 to 256, got 0"),
        (["caption", photo, "--batch-size", "100000"], "argument --batch-size: must be 1 to 256, got 100000"),
        (["caption", photo, "--max-length", "0"], "argument --max-length: must be 1 to 100, got 0"),
        (["caption", photo, "--max-length", "101"], "argument --max-length: must be 1 to 100, got 101"),
        (["caption", photo, "--max-length", "ten"], "argument --max-length: expected a whole number, got 'ten'"),
        (["evaluate", *data, "--limit", "-1"], "argument --limit: must be 1 or more, got -1"),
        (["evaluate", *data, "--beam-size", "0"], "argument --beam-size: must be 1 to 32, got 0"),
        (["evaluate", *data, "--length-penalty", "nan"],
         "argument --length-penalty: must be a finite number, got 'nan'"),
        (["features", *data, "--limit", "-1"], "argument --limit: must be 1 or more, got -1"),
        (["features", *data, "--batch-size", "0"], "argument --batch-size: must be 1 to 256, got 0"),
    ]
    # the largest values pass the command line (the next complaint is the missing model)
    largest = ["caption", photo, "--model", MISSING_MODEL, "--beam-size", 32, "--batch-size", 256, "--max-length", 100]
    *outs, passed = showtell_many([list(map(str, argv)) for argv, _ in cases] + [list(map(str, largest))])
    for (argv, message), out in zip(cases, outs):
        line = one_usage_line(out, message, f"(see showtell {argv[0]} --help)")
        assert line == f"showtell: error: {message} (see showtell {argv[0]} --help)"
    one_error_line(passed, MISSING_MODEL)


# ---------------------------------------------------------------------------------------------- 8: names, disks


def test_odd_file_names_are_written_safely(tmp_path, photo, tiny_checkpoint):
    folder = tmp_path / "odd"
    folder.mkdir()
    raw = [b"caf\xe9.jpg", b"new\nline\tand tab.jpg", b"back\\slash.jpg"]  # not UTF-8; a newline and TAB; a '\'
    for name in raw:
        shutil.copy(photo, os.path.join(os.fsencode(folder), name))
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    text_out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"out\xff.txt"))  # the outputs' names too
    html_out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"gallery\xff.html"))
    common = ["caption", str(folder), "--model", str(tiny_checkpoint), "--beam-size", "1", "--max-length", "4"]
    text, jsonl = showtell_many([[*common, "--output", text_out, "--html", html_out], [*common, "--format", "jsonl"]])
    bad_line = f"showtell: error: {folder / 'bad.jpg'}: not an image file (unrecognised format)"
    for out in (text, jsonl):
        assert out.returncode == 1 and out.stderr.splitlines() == [bad_line], out.stderr
    # text: one line a photo; backslash, newline and TAB escaped, the byte that is not UTF-8 as \xNN
    lines = Path(text_out).read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        f"{folder}/back\\\\slash.jpg", f"{folder}/caf\\xe9.jpg", f"{folder}/new\\nline\\tand tab.jpg"]
    assert all(len(line.split("\t")) == 3 and line.split("\t")[1] for line in lines)  # path, caption, tags
    # jsonl: the exact bytes of each name come back through json.loads + os.fsencode
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    names = {os.path.basename(os.fsencode(r["image"])) for r in rows if r["caption"]}
    assert names == set(raw)
    page = Path(html_out).read_text(encoding="utf-8")
    assert "caf\\xe9.jpg" in page and "back\\slash.jpg" in page


def test_gallery_place_is_checked_before_work_and_results_come_first(tmp_path, photo, tiny_checkpoint, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    cases = [(tmp_path, "cannot write (Is a directory)"),
             (tmp_path / "no" / "such" / "g.html", "cannot write (No such file or directory)"),
             (tmp_path / "a_file" / "g.html", "cannot write (Not a directory)")]
    outs = showtell_many([["caption", str(photo), "--model", MISSING_MODEL, "--html", str(html)] for html, _ in cases])
    for (html, message), out in zip(cases, outs):
        one_error_line(out, f"showtell: error: {html}: {message}")
    # a gallery that fails after the captioning (here a full disk): one line, the captions are already written
    import errno

    import showtell.report
    from showtell.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(showtell.report, "write_gallery", full)
    results = tmp_path / "r.jsonl"
    code = main(["caption", str(photo), "--model", str(tiny_checkpoint), "--format", "jsonl", "--output",
                 str(results), "--html", str(tmp_path / "g.html"), "--beam-size", "1"])
    assert code == 1
    assert [json.loads(line)["image"] for line in results.read_text().splitlines()] == [str(photo)]


def test_full_disk_is_one_line_and_keeps_the_lines_written(tmp_path, photos, tiny_checkpoint):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        os.link(photos / "coffee.jpg", folder / f"c{i:02d}.jpg")
    args = ["caption", folder, "--model", tiny_checkpoint, "--beam-size", 1, "--max-length", 4, "--batch-size", 2]
    # /dev/full: every write fails with ENOSPC, to stdout and (below) to a file named by --output
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "showtell", *map(str, args)], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=180)
    one_error_line(out, "showtell: error: <stdout>: cannot write (No space left on device)")
    assert "Exception ignored" not in out.stderr

    # the disk fills up after some records (a file size limit: the same failed write, without root or a tmpfs)
    results = tmp_path / "r.jsonl"

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # rows with tags are ~400 bytes: 4 or 5 fit

    cut = showtell_cli(*args, "--format", "jsonl", "--output", results, preexec_fn=small_disk)
    one_error_line(cut, f"showtell: error: {results}: cannot write (File too large); the lines written before stay")
    text = results.read_text()
    assert len(text) == 2000
    whole = [json.loads(line)["image"] for line in text[: text.rfind("\n")].splitlines()]
    assert whole == [str(folder / f"c{i:02d}.jpg") for i in range(len(whole))] and len(whole) >= 3
    named, again = showtell_many([list(map(str, [*args, "--output", "/dev/full"])),
                                  list(map(str, [*args, "--format", "jsonl", "--output", results, "--resume"]))])
    one_error_line(named, "showtell: error: /dev/full: cannot write (No space left on device)")
    assert again.returncode == 0, again.stderr
    images = [json.loads(line)["image"] for line in results.read_text().splitlines()]
    assert images == [str(folder / f"c{i:02d}.jpg") for i in range(12)]  # each once, in order


def test_a_path_that_starts_with_a_dash_gets_the_way_out(tmp_path, photo, tiny_checkpoint):
    dashed = tmp_path / "-dash.jpg"
    shutil.copy(photo, dashed)
    hint = "a path that starts with '-' goes after `--`: showtell caption [OPTIONS] -- -dash.jpg"
    alone, second, escaped = showtell_many([
        ["caption", "-dash.jpg"], ["caption", str(photo), "-dash.jpg"],
        ["caption", "--model", str(tiny_checkpoint), "--beam-size", "1", "--", "-dash.jpg"]], cwd=tmp_path)
    one_usage_line(alone, "the following arguments are required: PATH", hint)
    one_usage_line(second, "unrecognized arguments: -dash.jpg", hint, "(see showtell caption --help)")
    assert escaped.returncode == 0 and escaped.stdout.startswith("-dash.jpg\t"), escaped.stderr


# ---------------------------------------------------------------------------------------------- 11: training


def _commands(parser, prefix=()):
    """(command words, its parser) for every command and subcommand, ``showtell`` itself first."""
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_every_flag_of_every_command_says_what_it_does(monkeypatch):
    """`showtell X --help`: each option has words of its own, not only "(default ...)", and no line of the help starts
    with a default; every training setting has a flag, typed as its TrainConfig field (a whole number flag refuses
    2.5, a number flag takes 2.5)."""
    import re
    from dataclasses import fields

    from showtell.cli import build_parser
    from showtell.config import TrainConfig

    commands = dict(_commands(build_parser()))
    assert {" ".join(c) for c in commands} >= {"caption", "train", "evaluate", "features", "serve", "export",
                                               "ensemble", "data stats"}
    for words, parser in commands.items():
        for action in parser._actions:
            if action.dest in ("help", "version") or not action.option_strings:
                continue
            text = re.sub(r"\(default[^)]*\)", "", action.help or "").strip()
            assert len(text) > 10, (" ".join(words), action.option_strings, action.help)
        for columns in ("80", "100", "120"):
            monkeypatch.setenv("COLUMNS", columns)
            lines = parser.format_help().splitlines()
            assert not [line for line in lines if line.strip().startswith("(default")], (words, columns)
    train = {a.dest: a for a in commands[("train",)]._actions}
    assert set(train) >= {f.name for f in fields(TrainConfig)}
    assert train["epochs"].type("3") == 3 and train["lr"].type("2.5") == 2.5 and train["cache_dir"].type("x") == "x"
    with pytest.raises(ValueError):
        train["epochs"].type("2.5")
    help_text = commands[("train",)].format_help()
    assert "--limit LIMIT" in help_text and "--batch-norm, --no-batch-norm" in help_text



def test_bad_training_settings_are_one_line_before_any_data_is_read(tmp_path):
    root = tmp_path / "no_data"  # nothing here: a settings error must come before the data's
    root.mkdir()
    tomls = {"str_int.toml": 'batch_size = "64"\n', "str_float.toml": '[train]\nlr = "x"\n',
             "table.toml": "[train]\nepochs = {a = 1}\n", "nan.toml": "lr = nan\n", "bool.toml": "epochs = true\n"}
    for name, text in tomls.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--batch-size", "0"], "batch_size must be 1 or more, got 0"),
        (["--batch-size", "-8"], "batch_size must be 1 or more, got -8"),
        (["--epochs", "-1"], "epochs must be 0 or more, got -1"),
        (["--lr", "nan"], "lr must be a number above 0, got nan"),
        (["--lr", "0"], "lr must be a number above 0, got 0.0"),
        (["--scst-batch-size", "0"], "scst_batch_size must be 1 or more, got 0"),
        (["--limit", "-1"], "limit must be 1 or more, got -1"),
        (["--device", "gpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (["--device", "cuda:99"], "device 'cuda:99': this machine has"),
        (["--epochs", "0", "--scst-epochs", "2"], "the self-critical stage (scst_epochs) needs a trained model"),
        (["--epochs", "0"], "nothing to train: epochs is 0 and no init checkpoint is given"),
        (["--config", tmp_path / "str_int.toml"], f"{tmp_path / 'str_int.toml'}: batch_size must be a whole number, "
                                                  "got '64'"),
        (["--config", tmp_path / "str_float.toml"], f"{tmp_path / 'str_float.toml'}: lr must be a number, got 'x'"),
        (["--config", tmp_path / "table.toml"], f"{tmp_path / 'table.toml'}: epochs must be a whole number, got "
                                                "{'a': 1}"),
        (["--config", tmp_path / "nan.toml"], f"{tmp_path / 'nan.toml'}: lr must be a number above 0, got nan"),
        (["--config", tmp_path / "bool.toml"], f"{tmp_path / 'bool.toml'}: epochs must be a whole number, got True"),
        (["--out", tmp_path / "a_file"], f"{tmp_path / 'a_file'}: is a file; --out names the run folder"),
    ]
    argvs = [["train", "--dataset", "csv", "--root", str(root), "--out", str(tmp_path / "run"),
              *map(str, extra)] for extra, _ in cases]
    for (_, message), out in zip(cases, showtell_many(argvs)):
        one_error_line(out, f"showtell: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*tomls, "a_file", "no_data"])  # no run folder


@pytest.mark.slow
def test_a_run_that_trains_no_epoch_says_so(tmp_path, photos, tiny_checkpoint):
    root = tmp_path / "data"
    (root / "Images").mkdir(parents=True)
    rows = ["image,caption,split"]
    for name, split in (("astronaut", "train"), ("coffee", "train"), ("chelsea", "dev"), ("rocket", "dev")):
        shutil.copy(photos / f"{name}.jpg", root / "Images" / f"{name}.jpg")
        rows.append(f"{name}.jpg,a cat sits on a mat,{split}")
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    run = showtell_cli("train", "--dataset", "csv", "--root", root, "--out", out, "--init", tiny_checkpoint,
                       "--epochs", 0, "--encoder", "efficientnet_lite0", "--cache-dir", tmp_path / "cache",
                       "--min-count", 1, "--no-flip")
    assert run.returncode == 0, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"no epoch trained; the starting model {tiny_checkpoint} scores dev CIDEr "), last
    assert "-1.000" not in run.stderr and "best dev CIDEr" not in run.stderr
    assert (out / "best.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- 13: jsonl rows


def test_jsonl_has_a_row_for_each_failed_photo_and_resume_tries_it_again(tmp_path, photos, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "coffee.jpg", folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    shutil.copy(photos / "rocket.jpg", folder / "c.jpg")
    (tmp_path / "empty.jpg").mkdir()  # a folder named like a photo, given by name
    fresh, earlier = tmp_path / "fresh.jsonl", tmp_path / "earlier.jsonl"
    # an earlier run's file: a.jpg captioned, c.jpg failed then (say it was still being copied)
    earlier.write_text(json.dumps({"image": str(folder / "a.jpg"), "caption": "a cup", "score": -1.0}) + "\n"
                       + json.dumps({"image": str(folder / "c.jpg"), "caption": None, "score": None,
                                     "error": f"{folder / 'c.jpg'}: empty file, not an image"}) + "\n")
    common = ["caption", str(folder), str(tmp_path / "empty.jpg"), "--model", str(tiny_checkpoint), "--format",
              "jsonl", "--beam-size", "1"]
    first, resumed = showtell_many([[*common, "--output", str(fresh)], [*common, "--output", str(earlier), "--resume"]])
    assert first.returncode == 1
    assert first.stderr.splitlines() == [  # each failure once on stderr
        f"showtell: error: {tmp_path / 'empty.jpg'}: a folder with no image files in it, not an image",
        f"showtell: error: {folder / 'b.jpg'}: not an image file (unrecognised format)"]
    rows = [json.loads(line) for line in fresh.read_text().splitlines()]  # and each input once in the file
    assert [r["image"] for r in rows] == [str(tmp_path / "empty.jpg"), *(str(folder / f"{n}.jpg") for n in "abc")]
    assert rows[1]["caption"] and set(rows[1]) == {"image", "caption", "score", "tags"}
    assert rows[2] == {"image": str(folder / "b.jpg"), "caption": None, "score": None,
                       "error": f"{folder / 'b.jpg'}: not an image file (unrecognised format)"}
    assert rows[0]["caption"] is None and rows[0]["error"].endswith("not an image")
    # --resume skips a.jpg (captioned) and tries the failed ones again: c.jpg now gets its caption
    assert resumed.returncode == 1
    rows = [json.loads(line) for line in earlier.read_text().splitlines()]
    assert [r["image"] for r in rows[2:]] == [str(tmp_path / "empty.jpg"), str(folder / "b.jpg"), str(folder / "c.jpg")]
    assert rows[-1]["caption"] and "error" not in rows[-1]
    assert resumed.stderr.splitlines()[-1] == f"showtell: skipped 1 image(s) already in {earlier}"
