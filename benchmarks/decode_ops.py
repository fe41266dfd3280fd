"""Per-step cost of the shipped model's decoding, counted in torch ops and host syncs (what bounds it on a GPU).

    python benchmarks/decode_ops.py [--n 256] [--rounds 3] [--features FILE] [--json]

On the CPU, the shipped model (``showtell.load(device="cpu", precision="fp32")``) describes the first ``--n``
Flickr8k test photos from their features, as one batch: ``describe_features(feats, DecodingOptions(beam_size=3,
max_length=20), tags=5)``, i.e. beam search, tags, confidence and grounding. A TorchDispatchMode counts the aten ops
it dispatches:

    ops/step      aten ops between two calls of the model's ``step`` (median): the per-word cost of the loop
    kernels/step  the same without view ops (no kernel launch on a GPU)
    steps         calls of ``step`` in the batch (the own decode and the grounded one)
    ops/batch     aten ops of the whole call
    syncs/batch   what waits for the GPU there: item/bool() of a tensor, tolist/cpu/numpy, nonzero, a boolean mask
                  index, repeat_interleave without output_size (host-to-device copies are not seen on a CPU)
    syncs in loops  of those, the ones inside the decoding loops (``showtell.decoding.run`` up to ``finalize``),
                  where each one stalls the GPU until the host has read the answer
    ms/batch      wall time of the call without the counting, best of ``--rounds``; cpu ms/batch the process's CPU
                  time there (steadier on a shared machine; OMP_WAIT_POLICY=PASSIVE as the CLI, so no spinning)

``--features FILE`` keeps the features (computed when FILE is missing), so runs on two source trees
(``PYTHONPATH=... python benchmarks/decode_ops.py``) share them. Flickr8k from $SHOWTELL_FLICKR8K or ../shared.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch
from _common import cli_environment, corpus
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SCALAR = {aten.item.default, aten.is_nonzero.default, aten._local_scalar_dense.default}
ALWAYS_SYNC = {aten.nonzero.default, aten.nonzero_numpy.default, aten.masked_select.default,
               aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


class Count(TorchDispatchMode):
    """Counts aten ops, non-view ops and host syncs; ``marks`` the op count at each ``step`` of the model."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = self.syncs = self.loop_syncs = 0
        self.kinds: collections.Counter = collections.Counter()
        self.marks: list[tuple[int, int]] = []  # (ops, kernels) so far

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.kernels += not func.is_view
        if func in SCALAR or self.syncing(func, args, kwargs):
            self.syncs += 1
            self.kinds[str(func)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def syncing(func, args, kwargs) -> bool:
        if func in ALWAYS_SYNC:
            return func not in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) \
                or kwargs.get("output_size") is None
        if func is aten.index.Tensor:  # a boolean mask: the result's size is known after a nonzero
            return any(i is not None and i.dtype == torch.bool for i in args[1])
        return False

    def wrap_host_reads(self):
        """Tensor.tolist, .numpy and .cpu read the tensor on the host; on the CPU they dispatch no op that says so."""
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

        def counted(original, name):
            def method(tensor, *args, **kwargs):
                self.syncs += 1
                self.kinds[f"Tensor.{name}"] += 1
                return original(tensor, *args, **kwargs)
            return method
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original, name))
        return lambda: [setattr(torch.Tensor, name, original) for name, original in originals.items()]


def features(captioner, n: int, path: Path | None) -> torch.Tensor:
    if path is not None and path.is_file():
        return torch.load(path)[:n]
    photos = [r.image for r in corpus().split("test")[:n]]
    images = torch.stack([captioner._load(p) for p in photos])
    feats = captioner.features(images)
    if path is not None:
        torch.save(feats, path)
    return feats


def main() -> None:
    cli_environment()
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256, help="photos, one batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--features", type=Path, help="cache of the photos' features")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import showtell
    import showtell.decoding
    from showtell.decoding import DecodingOptions

    captioner = showtell.load(device="cpu", precision="fp32")
    feats = features(captioner, args.n, args.features)
    options = DecodingOptions(beam_size=3, max_length=20)

    def describe():
        return captioner.describe_features(feats, options, tags=5)

    describe()  # warm up
    count = Count()
    model = captioner.decoder
    step = model.step

    def marked(*a, **k):
        count.marks.append((count.ops, count.kernels))
        return step(*a, **k)
    run = showtell.decoding.run

    def loop(model, features, decoder, *args, **kwargs):  # counts the syncs of the loop, before finalize()
        start, finalize = count.syncs, decoder.finalize

        def finalize_marked():
            count.loop_syncs += count.syncs - start
            return finalize()
        decoder.finalize = finalize_marked
        return run(model, features, decoder, *args, **kwargs)
    model.step, showtell.decoding.run = marked, loop
    restore = count.wrap_host_reads()
    try:
        with count:
            describe()
    finally:
        restore()
        del model.step
        showtell.decoding.run = run
    between = list(zip(count.marks, count.marks[1:]))
    wall, cpu = [], []
    for _ in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        describe()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    record = {"photos": len(feats), "ops_per_step": statistics.median(b[0] - a[0] for a, b in between),
              "kernels_per_step": statistics.median(b[1] - a[1] for a, b in between),
              "steps": len(count.marks), "ops_per_batch": count.ops,
              "kernels_per_batch": count.kernels, "syncs_per_batch": count.syncs,
              "syncs_in_loops": count.loop_syncs,
              "ms_per_batch": round(1000 * min(wall), 1),
              "cpu_ms_per_batch": round(1000 * min(cpu), 1), "syncs": dict(count.kinds.most_common())}
    if args.json:
        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
