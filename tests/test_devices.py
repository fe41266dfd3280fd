"""--device for caption, evaluate and serve, and showtell.load(device=...): the same names and the same resolver as
training (auto = CUDA when there is a GPU, else the CPU); a GPU this machine lacks is one line before any work."""

from __future__ import annotations

import pytest
import torch

import showtell
from showtell.cli import main
from showtell.devices import resolve_device
from showtell.errors import ShowtellError


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_is_cuda_with_a_gpu_and_the_cpu_without(monkeypatch, no_gpu, tiny_checkpoint):
    assert resolve_device("auto") == torch.device("cpu")
    assert showtell.load(tiny_checkpoint).device == torch.device("cpu")  # load's default is auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ShowtellError, match="'cuda:2': this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_load_on_a_missing_gpu_or_a_bad_name_fails_before_reading_the_checkpoint(no_gpu, tmp_path):
    missing = tmp_path / "never-read.safetensors"  # the device is checked first: no complaint about this file
    with pytest.raises(ShowtellError, match="'cuda': this machine has 0 CUDA device"):
        showtell.load(missing, device="cuda")
    with pytest.raises(ShowtellError, match="device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        showtell.load(missing, device="gpu")


def test_caption_device_cpu_captions_and_cuda_without_a_gpu_is_one_line(no_gpu, tiny_checkpoint, photos, capsys,
                                                                       tmp_path):
    photo = str(photos / "coffee.jpg")
    assert main(["caption", photo, "--model", str(tiny_checkpoint), "--device", "cpu", "--tags", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(photo + "\t")
    for argv in (["caption", photo, "--output", str(tmp_path / "out.txt")],
                 ["evaluate", "--dataset", "flickr8k", "--root", str(tmp_path / "no-data")],
                 ["serve", "--port", "0"]):
        assert main([*argv, "--model", str(tiny_checkpoint), "--device", "cuda"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert err == ["showtell: error: device 'cuda': this machine has 0 CUDA device(s)"], argv
    assert not (tmp_path / "out.txt").exists()  # refused before any work


def test_a_device_name_that_is_none_of_ours_is_a_usage_line(capsys):
    assert main(["caption", "x.jpg", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu0'" in err[0]


def test_more_processes_on_a_machine_than_gpus_is_one_line_before_the_process_group(monkeypatch):
    """torchrun --nproc_per_node 3 on a machine with 2 GPUs: the third process says so (not CUDA's 'invalid device
    ordinal'), before it joins the group."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    from showtell.devices import init_distributed

    with pytest.raises(ShowtellError, match=r"process 2 of this machine \(LOCAL_RANK\) has no GPU of its own: the "
                                            r"machine has 2; start at most 2 processes on it"):
        init_distributed(torch.device("cuda"))
