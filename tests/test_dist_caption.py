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
    assert said == ["showtell: error: 2 processes (torchrun) need --output FILE: each writes its share beside it, "
                    "and the first joins them into FILE"] * 2


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_run_resumes_each_share_and_ends_as_one_process_would(tiny_checkpoint, tmp_path):
    one = showtell_cli(*caption_args(tiny_checkpoint, IMAGES, tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    out = tmp_path / "out.jsonl"
    parts = [Path(f"{out}.part-{r}-of-2") for r in range(2)]
    run = subprocess.Popen([*LAUNCH, *caption_args(tiny_checkpoint, IMAGES, out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(p.is_file() and b"\n" in p.read_bytes() for p in parts):
            assert run.poll() is None and time.monotonic() < deadline, "no share got a line"
            time.sleep(0.01)
    finally:
        for pid in [*descendants(run.pid), run.pid]:  # both processes mid-share, and torchrun
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.wait()
    written = sum(p.read_bytes().count(b"\n") for p in parts if p.is_file())
    assert not out.exists() and 1 <= written < 8, written

    # Another number of processes would split the photos differently: refused, naming both numbers.
    one_error_line(showtell_cli(*caption_args(tiny_checkpoint, IMAGES, out, "--resume")),
                   "interrupted run of 2 processes; resume it with 2 processes, not 1")

    resumed = torchrun(*caption_args(tiny_checkpoint, IMAGES, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "showtell: skipped" in resumed.stderr  # a share went on from where it stopped, not from the start
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not any(p.exists() for p in parts)
