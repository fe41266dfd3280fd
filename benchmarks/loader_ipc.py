"""What loading photos in processes costs the captioning process, photo by photo: the figure that bounds a GPU.

    python benchmarks/loader_ipc.py [--n 640] [--batch-size 256] [--workers N] [--rounds 3]

Where a GPU runs the model, the captioning process's own CPU time is the limit: every photo decoded in a loading
process crosses a pipe back to it, and it pickles the task, unpickles the result and stacks the batch in Python,
under one interpreter lock with the decoding loop. This times four ways of handing the built-in model's photos over
from ``--workers`` processes (default: one a core, at most 8), with ``showtell.loader.load_ahead``:

- ``float_tensor_per_photo``: the normalized float32 tensor of each photo, one task a photo (before);
- ``uint8_tensor_per_photo``: its uint8 pixels as a tensor (a quarter of the bytes);
- ``numpy_per_photo``: the same pixels as a numpy array (plain bytes on the pipe, not torch's shared-memory file
  handover);
- ``numpy_chunked``: numpy, and a batch goes over in one task a process (``Captioner.picklable_load``, what
  ``iter_caption`` does now).

Each consumer ends with the batch stacked, ready to go to the device; the uint8 ways leave normalization to the
device (``Captioner.features``). ``normalize_cpu_us_per_photo`` is what normalizing costs where the device is this
CPU: work the loading threads did before and ``features`` does now. Photos: the first ``--n`` Flickr8k test photos,
each way ``--rounds`` times in turn. Reported per way: photos/s (wall) and the captioning process's CPU microseconds
a photo (``time.process_time``: all its threads), the medians of the rounds; the ratios are those of
``numpy_chunked`` to ``float_tensor_per_photo``. On a machine with few cores the loading processes compete with this
one, so read the ratios of one run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import torch
from _common import cli_environment, corpus, emit

import showtell
from showtell.images import prepare
from showtell.loader import default_workers, load_ahead, process_pool


def ways(captioner, batch_size: int, workers: int) -> dict:
    """name -> (load, chunk, batch from the loaded items)."""
    pre = captioner.preprocess
    normalized = functools.partial(prepare, transform=pre.transform())
    uint8 = functools.partial(prepare, transform=pre.pixels())
    return {
        "float_tensor_per_photo": (normalized, 1, torch.stack),
        "uint8_tensor_per_photo": (uint8, 1, torch.stack),
        "numpy_per_photo": (captioner.picklable_load(), 1, captioner._stack),
        "numpy_chunked": (captioner.picklable_load(), math.ceil(batch_size / workers), captioner._stack),
    }


def run(pool, photos: list, batch_size: int, load, chunk: int, stack) -> tuple[float, float]:
    """(photos/s, CPU microseconds of this process a photo)."""
    batches = [photos[i:i + batch_size] for i in range(0, len(photos), batch_size)]
    wall, cpu = time.perf_counter(), time.process_time()
    for _, loaded in load_ahead(batches, load, pool=pool, chunk=chunk):
        assert not any(isinstance(x, str) for x in loaded), loaded
        batch = stack(loaded)
        assert batch.dtype in (torch.float32, torch.uint8) and batch.shape[1] == 3
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(photos) / wall, cpu / len(photos) * 1e6


def main() -> None:
    cli_environment()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=640, help="Flickr8k test photos")
    p.add_argument("--batch-size", type=int, default=256, help="photos a batch (256: the GPU check's)")
    p.add_argument("--workers", type=int, default=None, help="loading processes (default: one a core, at most 8)")
    p.add_argument("--rounds", type=int, default=3, help="times each way runs, in turn with the others")
    args = p.parse_args()
    workers = args.workers or default_workers()
    photos = [str(r.image) for r in corpus().split("test")[: args.n]]
    captioner = showtell.load(device="cpu")  # its preprocessing and load functions; the model is not run
    contenders = ways(captioner, args.batch_size, workers)
    pool = process_pool(workers)
    run(pool, photos[: args.batch_size], args.batch_size, *contenders["numpy_chunked"])  # warm the file cache
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, way in contenders.items():
            timings[name].append(run(pool, photos, args.batch_size, *way))
    pool.shutdown()
    pixels = torch.stack([captioner.load(p) for p in photos[: args.batch_size]])
    start = time.process_time()
    for _ in range(args.rounds):
        captioner.preprocess.normalize(pixels)
    normalize_us = (time.process_time() - start) / (args.rounds * len(pixels)) * 1e6
    result = {name: {"photos_per_s": round(statistics.median(t[0] for t in ts), 1),
                     "parent_cpu_us_per_photo": round(statistics.median(t[1] for t in ts))}
              for name, ts in timings.items()}
    before, now = result["float_tensor_per_photo"], result["numpy_chunked"]
    emit({"photos": len(photos), "batch_size": args.batch_size, "workers": workers, "rounds": args.rounds,
          "size": captioner.preprocess.size, **result, "normalize_cpu_us_per_photo": round(normalize_us),
          "speedup_photos_per_s": round(now["photos_per_s"] / before["photos_per_s"], 2),
          "parent_cpu_ratio": round(now["parent_cpu_us_per_photo"] / before["parent_cpu_us_per_photo"], 2)})


if __name__ == "__main__":
    main()
