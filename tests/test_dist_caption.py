"""`showtell caption` under torchrun: each process captions a contiguous share of the photos into
OUTPUT.part-R-of-N, and the first joins the shares in input order into OUTPUT; --resume continues every share.
Two gloo processes on the CPU against one process, with a tiny random checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_bad_inputs import one_error_line, showtell_cli

IMAGES = REPO / "examples" / "images"  # 8 photos
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "showtell"]


def caption_args(model: Path, folder: Path, output: Path, *extra: str) -> list[str]:
    return ["caption", str(folder), "--model", str(model), "--format", "jsonl", "--output", str(output),
            "--batch-size", "1", *extra]


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids + [d for k in kids for d in descendants(k)]


def test_two_processes_write_the_lines_of_one_and_a_failed_photo_once(tiny_checkpoint, tmp_path):
    folder = tmp_path / "archive"
    shutil.copytree(IMAGES, folder)
    (folder / "damaged.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # in the middle of the sorted order
    one = showtell_cli(*caption_args(tiny_checkpoint, folder, tmp_path / "one.jsonl"))
    (tmp_path / "two.jsonl.part-1-of-3").write_text("")  # left by an abandoned run of 3 processes
    two = torchrun(*caption_args(tiny_checkpoint, folder, tmp_path / "two.jsonl"))
    assert one.returncode == 1 and two.returncode != 0  # a photo failed
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows if "error" in r] == ["damaged.jpg"] and len(rows) == 9
    said = [line for line in two.stderr.splitlines() if line.startswith("showtell: error:")]
    assert len(said) == 1 and "damaged.jpg" in said[0], two.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "one.jsonl", "two.jsonl"]  # the parts went


def test_two_processes_refuse_stdout_in_one_line_each(tiny_checkpoint):
    out = torchrun("caption", str(IMAGES), "--model", str(tiny_checkpoint))
    said = [line for line in out.stderr.splitlines() if line.startswith("showtell: error:")]
    assert out.returncode != 0 and out.stdout == ""
    # each process says it, unless torchrun stopped it first (it stops the others when one fails)
    assert said in [["showtell: error: 2 processes (torchrun) need --output FILE: each writes its share beside it, "
                     "and the first joins them into FILE"] * n for n in (1, 2)], out.stderr


def local_rank(pid: int) -> int | None:
    """The LOCAL_RANK torchrun gave the process ``pid`` (None: not a worker)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"LOCAL_RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_one_killed_process_leaves_the_other_share_and_a_resume_ends_as_one_process_would(tiny_checkpoint, tmp_path):
    one = showtell_cli(*caption_args(tiny_checkpoint, IMAGES, tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    out = tmp_path / "out.jsonl"
    parts = [Path(f"{out}.part-{r}-of-2") for r in range(2)]
    run = subprocess.Popen([*LAUNCH, *caption_args(tiny_checkpoint, IMAGES, out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (parts[1].is_file() and b"\n" in parts[1].read_bytes()):
            assert run.poll() is None and time.monotonic() < deadline, "the second share got no line"
            time.sleep(0.01)
        os.kill(next(pid for pid in descendants(run.pid) if local_rank(pid) == 1), signal.SIGKILL)
        _, stderr = run.communicate(timeout=120)  # torchrun stops the other process and fails
    finally:
        run.kill()
    written = [p.read_bytes().count(b"\n") if p.is_file() else 0 for p in parts]
    assert run.returncode != 0 and not out.exists() and 1 <= written[1] < 4, written
    # The process that was stopped says what it leaves: by torchrun's SIGTERM, or by the lost connection when it
    # was already waiting for the other's share.
    said = [line for line in stderr.splitlines() if line.startswith("showtell:")]
    assert len(said) == 1 and said[0].endswith(f"the lines written stay in {parts[0]}; the same command with "
                                               "--resume continues"), stderr[-3000:]
    assert "showtell/cli.py" not in stderr, stderr[-3000:]  # torchrun's own traceback, but none from showtell

    # Another number of processes would split the photos differently: refused, naming both numbers.
    one_error_line(showtell_cli(*caption_args(tiny_checkpoint, IMAGES, out, "--resume")),
                   "interrupted run of 2 processes; resume it with 2 processes, not 1")

    resumed = torchrun(*caption_args(tiny_checkpoint, IMAGES, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "showtell: skipped" in resumed.stderr  # the killed share went on from where it stopped
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not any(p.exists() for p in parts)


def test_a_resume_after_the_photos_changed_captions_each_photo_once(tiny_checkpoint, tmp_path):
    """A killed run of 2 wrote the first share of 8 photos; then a photo came first in the folder, which moves one
    photo of that share into the second: that process finds it in the first's part and does not caption it again."""
    folder = tmp_path / "archive"
    shutil.copytree(IMAGES, folder)
    shutil.copy(IMAGES / "horse.jpg", folder / "0000.jpg")  # sorts first
    one = showtell_cli(*caption_args(tiny_checkpoint, folder, tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    lines = (tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    Path(f"{out}.part-0-of-2").write_text("".join(lines[1:5]))  # the old first share: the 4 photos after 0000.jpg
    resumed = torchrun(*caption_args(tiny_checkpoint, folder, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(out.read_text().splitlines(keepends=True)) == sorted(lines) and len(lines) == 9


def test_a_join_stopped_before_it_removed_the_parts_is_not_joined_twice(tmp_path):
    """--output was replaced by the joined shares, then the run stopped before it removed them: a --resume joins
    only what --output lacks (a photo that failed there and was captioned again stays, as after one process)."""
    from showtell.cli import _join_parts

    rows = [{"image": f"p{i}.jpg", "caption": f"caption {i}", "score": -1.0} for i in range(6)]
    failed = {"image": "p2.jpg", "caption": None, "score": None, "error": "p2.jpg: truncated"}

    def line(row: dict) -> str:
        return json.dumps(row) + "\n"

    out = tmp_path / "out.jsonl"
    out.write_text("".join(map(line, [*rows[:2], failed, *rows[3:]])))
    Path(f"{out}.part-0-of-2").write_text(line(rows[0]) + line(rows[2]))  # p2 captioned again by this --resume
    Path(f"{out}.part-1-of-2").write_text(line(rows[3]))
    _join_parts(str(out), 2, append=True)
    assert out.read_text() == "".join(map(line, [*rows[:2], failed, *rows[3:], rows[2]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_one_process_to_the_output_of_an_abandoned_run_removes_its_parts(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    for r in range(2):
        Path(f"{out}.part-{r}-of-2").write_text("")
    done = showtell_cli(*caption_args(tiny_checkpoint, IMAGES, out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"] and len(out.read_text().splitlines()) == 8
    # so a later --resume, of any number of processes, finds only the finished output: nothing left to caption
    again = showtell_cli(*caption_args(tiny_checkpoint, IMAGES, out, "--resume"))
    assert again.returncode == 0 and "skipped 8 image(s)" in again.stderr, again.stderr
