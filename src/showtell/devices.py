"""Where the work runs: the torch device a name asks for, and the process group under torchrun."""

from __future__ import annotations

import datetime
import os

import torch

from showtell.config import check_device_name
from showtell.errors import ShowtellError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device ``name`` means: auto = CUDA when there is a GPU, else the CPU; cpu; cuda; cuda:N; mps. A device
    this machine does not have is a one-line ShowtellError, before anything is loaded onto it."""
    if isinstance(name, torch.device):
        name = str(name)
    if check_device_name(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ShowtellError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ShowtellError(f"device {name!r}: no Apple MPS device on this machine")
    return device


def mixed_precision(enabled: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """Whether to autocast on ``device``, and to what: fp16 on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16/AMX:
    ~1.7x here), else off."""
    if device.type == "cuda":
        return enabled, torch.float16
    return enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported(), torch.bfloat16


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (WORLD_SIZE > 1). On a CUDA ``device`` each
    process takes the GPU of its LOCAL_RANK and NCCL joins gloo; on the CPU (also of a machine with GPUs) gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        # CPU tensors (loss sums, token counts, the run state) go through gloo also where NCCL carries the gradients;
        # each process takes the GPU of its LOCAL_RANK; the long timeout covers feature extraction and the
        # barrier where the first process waits for the others' shares of a photo archive.
        gpu = device.type == "cuda"
        backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
        if gpu:
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= gpus:
                raise ShowtellError(f"process {local} of this machine (LOCAL_RANK) has no GPU of its own: the machine "
                                    f"has {gpus}; start at most {gpus} processes on it (--nproc_per_node) or use "
                                    "--device cpu")
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)
