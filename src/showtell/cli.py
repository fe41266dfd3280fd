"""The `showtell` command. Heavy imports (torch, timm, ...) happen inside the subcommands."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from showtell import __version__
from showtell.config import DEFAULT_ENCODER, MAX_BEAM_SIZE, MAX_LENGTH
from showtell.errors import ShowtellError

MAX_BATCH_SIZE = 256  # images a batch for caption / features


class _UsageError(Exception):
    """A command line argparse refused; main() prints it as one line."""


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with "(default X" kept on the line of the word before it: no help line starts with a default."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        glued = re.sub(r"\S+ \(default(?::? \S+|\S*)", lambda m: m[0].replace(" ", "\xa0"), text)
        return [line.replace("\xa0", " ") for line in super()._split_lines(glued, width)]


class _Parser(argparse.ArgumentParser):
    """argparse, its errors one line (``showtell: error: ...``) in place of the usage block and message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": _HelpFormatter, **kwargs})

    def error(self, message: str):
        raise _UsageError(message, self.prog)


def _count(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` to ``high``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}" if high is not None
                                             else f"must be {low} or more, got {value}")
        return value
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _device_name(text: str) -> str:
    from showtell.config import check_device_name

    try:
        return check_device_name(text)
    except ShowtellError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device ")) from None


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device_name, default="auto",
                   help="auto (default: CUDA when there is a GPU, else the CPU), cpu, cuda, cuda:N or mps; a device "
                        "this machine lacks is an error before any work")


def _device(name: str):
    """The torch device for ``name``: checked to be on this machine before any work (a one-line error if not)."""
    from showtell.devices import resolve_device

    return resolve_device(name)


def _usage_line(message: str, prog: str, argv: list[str]) -> str:
    """argparse's complaint as one line; a path that starts with '-' (taken for an option) gets the way out."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    unknown = message.split(": ", 1)[1].split() if message.startswith("unrecognized arguments: ") else []
    dashed = [a for a in head if a.startswith("-") and len(a) > 1 and (a in unknown or os.path.exists(a))]
    hint = (f"; a path that starts with '-' goes after `--`: showtell {' '.join(head[:1])} [OPTIONS] -- {dashed[0]}"
            if dashed else "")
    if unknown and argv and not argv[0].startswith("-"):  # said by the top parser of the subcommand's arguments
        prog = f"showtell {argv[0]}"
    return f"showtell: error: {message}{hint} (see {prog} --help)"


def _add_dataset_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from showtell.datasets import FORMATS

    p.add_argument("--dataset", choices=FORMATS, required=required,
                   help="caption file format" + ("" if required else " (default flickr8k)"))
    p.add_argument("--root", required=required, help="dataset folder (see the README's Data sets)")
    p.add_argument("--captions", help="caption file (csv/coco/karpathy; found under --root when omitted)")
    p.add_argument("--images", help="image folder (when not the default place under --root)")
    p.add_argument("--split-name", dest="split_name",
                   help="split for all rows of a COCO file or a CSV without a split column")


def _load_corpus(args: argparse.Namespace, always_warn: bool = False):
    """The data set; the captions it skips (images missing) are said the first time it is read on this machine, or
    every time with ``always_warn``."""
    from showtell.datasets import load_corpus

    corpus = load_corpus(args.dataset, args.root, args.captions, args.images, args.split_name)
    msg = corpus.skipped_message() if always_warn else corpus.first_skipped_message()
    if msg:
        print(f"showtell: warning: {msg}", file=sys.stderr)
    return corpus


def cmd_data_stats(args: argparse.Namespace) -> int:
    from showtell.stats import corpus_stats, format_stats

    stats = corpus_stats(_load_corpus(args, always_warn=True), min_count=args.min_count)
    print(format_stats(stats))
    if args.json:
        print(json.dumps(stats))
    return 0


def _done_images(output: str) -> set[str]:
    """Images already in a JSONL results file (for --resume); a torn last line is ignored."""
    done = set()
    try:
        with open(output, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("caption") is not None:
                    done.add(row.get("image"))
    except FileNotFoundError:
        pass
    return done


def _drop_torn_tail(output: str) -> int:
    """Cut a partial last line (a run killed mid-write) so that appended records start on a line of their own.

    Returns the number of bytes cut."""
    try:
        with open(output, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:  # scan back from the end for the last newline, a block at a time
                start = max(pos - 65536, 0)
                f.seek(start)
                block = f.read(pos - start)
                if pos == end and block.endswith(b"\n"):
                    return 0
                cut = block.rfind(b"\n")
                if cut >= 0:
                    f.truncate(start + cut + 1)
                    return end - (start + cut + 1)
                pos = start
            f.truncate(0)
            return end
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise ShowtellError(f"{output}: cannot read ({e.strerror})") from None


# How `caption --format text` writes a path (or caption) on its line; the same form names files in messages.
_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
JSONL_START = b'{"image": '  # every line of --format jsonl starts so (json.dumps keeps the key order)


def one_line(text: str) -> str:
    """``text`` on one line: backslash, TAB, newline, CR as \\\\, \\t, \\n, \\r; bytes that are not UTF-8 as \\xNN."""
    from showtell.fileio import display_name

    return display_name(text.translate(_TEXT_ESCAPES))


def _result_line(r, fmt: str) -> str:
    if fmt == "text":  # path, caption, then confidence and tags when there are any
        extras = r.extras_text()
        return f"{one_line(r.image)}\t{one_line(r.caption)}" + (f"\t{extras}\n" if extras else "\n")
    row = {"image": r.image, "caption": r.caption, "score": None if r.score is None else round(r.score, 4)}
    # json.dumps writes a name that is not UTF-8 with \udcNN escapes: json.loads and os.fsencode give its bytes back
    return json.dumps({**row, "error": r.error} if r.error else {**row, **r.extras()}) + "\n"


def _looks_like_results(path: str, formats: tuple[str, ...]) -> bool:
    """Whether the file at ``path`` is empty or starts like a results file of ours in one of ``formats``: a jsonl
    first line starts with {"image": (or is a torn start of that), a text first line is UTF-8 holding a TAB."""
    with open(path, "rb") as f:
        head = f.read(65536)
    first = head.split(b"\n", 1)[0]
    if not head or "jsonl" in formats and (first.startswith(JSONL_START) or JSONL_START.startswith(head)):
        return True
    try:
        first.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "text" in formats and b"\t" in first and b"\0" not in first


def _check_outputs(args: argparse.Namespace, paths: list[str]) -> None:
    """Refuse, before any work, an --output or --html that would destroy a file: one of the input images (also
    through a hard link or symlink), a folder or a place that cannot be written, or an existing file that is not
    output of ours (--output: a results file, see _looks_like_results, --resume: a jsonl one; --html: a gallery)."""
    from showtell.fileio import check_writable

    targets = [(flag, path) for flag, path in (("--output", args.output), ("--html", args.html)) if path]
    if not targets:
        return
    inodes, missing = set(), set()  # the inputs: the files (by inode), and the paths of those not there
    for p in paths:
        try:
            st = os.stat(p)
            inodes.add((st.st_dev, st.st_ino))
        except OSError:
            missing.add(os.path.realpath(p))
    if args.output and args.html and os.path.realpath(args.output) == os.path.realpath(args.html):
        raise ShowtellError(f"{args.output}: --output and --html name the same file")
    for flag, path in targets:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if (st.st_dev, st.st_ino) in inodes if st else os.path.realpath(path) in missing:
            raise ShowtellError(f"{path}: is one of the input images; {flag} would overwrite it")
        check_writable(path, replace=flag == "--html")
        if not (st and os.path.isfile(path) and st.st_size):
            continue  # new, empty, or not a regular file (/dev/null, a pipe): nothing to lose
        try:
            if flag == "--html":
                from showtell.report import is_gallery

                ours, kind = is_gallery(path), "a showtell gallery"
            elif args.resume:
                ours, kind = _looks_like_results(path, ("jsonl",)), "a showtell jsonl results file"
            else:
                ours, kind = _looks_like_results(path, ("jsonl", "text")), "a showtell results file"
        except OSError as e:
            raise ShowtellError(f"{path}: cannot read ({e.strerror})") from None
        if not ours:
            raise ShowtellError(f"{path}: exists and is not {kind}; {flag} will not "
                                + ("append to" if args.resume and flag == "--output" else "overwrite") + " it")


def _write(out, text: str) -> None:
    """One record out in one write, flushed; a full disk or another write error is one line."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        if out is sys.stdout:  # nothing more can go there, also not at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise ShowtellError(f"{out.name}: cannot write ({e.strerror}); the lines written before stay") from None


def _parts(output: str) -> dict[int, list[str]]:
    """The share files of a caption run under torchrun beside ``output`` (OUTPUT.part-R-of-N), by N, in rank order."""
    import glob
    import re

    found: dict[int, dict[int, str]] = {}
    for path in glob.glob(glob.escape(output) + ".part-*-of-*"):
        m = re.fullmatch(r"\.part-([0-9]+)-of-([0-9]+)", path[len(output):])
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = path
    return {n: [ranks[r] for r in sorted(ranks)] for n, ranks in found.items()}


def _remove_parts(output: str) -> None:
    """Remove every share file beside ``output`` (a run to ``output`` replaced what they were for)."""
    for part in itertools.chain(*_parts(output).values()):
        try:
            os.remove(part)
        except FileNotFoundError:  # another run removed it
            pass


def _join_parts(output: str, world: int, append: bool) -> None:
    """Rank 0 of a caption run of ``world`` processes: their shares in input order (after what --output held, with
    --resume) replace --output in one rename; then every part beside it goes, also those of an abandoned run of
    another number of processes (this run replaced what they were for; --resume refuses to start beside them).
    With --resume a part's line for a photo --output holds a caption for is not joined again: it is left from a
    join that was stopped before it removed the parts, or from a run of one process over them."""
    import shutil

    from showtell.fileio import atomic_path

    try:
        done = _done_images(output) if append else set()
        with atomic_path(output) as tmp, open(tmp, "wb") as joined:
            if append and os.path.exists(output):
                with open(output, "rb") as f:
                    shutil.copyfileobj(f, joined)
            for part in _parts(output).get(world, []):
                with open(part, "rb") as f:
                    joined.writelines(line for line in f if not done or _image_of(line) not in done)
        _remove_parts(output)
    except OSError as e:
        raise ShowtellError(f"{output}: cannot join the shares of the processes ({e.strerror}); they stay in "
                            f"{output}.part-*, and --resume joins them") from None


def _image_of(line: bytes) -> str | None:
    """The image of a jsonl results line (None for a line that is not one)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("image") if isinstance(row, dict) else None


def _barrier(target: str, fmt: str) -> None:
    """Wait for every process of the run; one that died (its machine, a kill) is a one-line error here."""
    import torch.distributed as dist

    try:
        dist.barrier()
    except RuntimeError:  # gloo: "Connection reset by peer"; NCCL: a timeout or a remote error
        raise ShowtellError("another process of this run stopped before its share was done (see its messages); "
                            + _kept(target, fmt)) from None


def _kept(target: str, fmt: str) -> str:
    """What a stopped caption run leaves, and how to go on."""
    return (f"the lines written stay in {one_line(target)}"
            + ("; the same command with --resume continues" if fmt == "jsonl" else ""))


class _Stopped(BaseException):
    """SIGTERM in a caption run under torchrun: it stops every process so when one of them fails. Not an Exception,
    as KeyboardInterrupt is not: no ``except Exception`` on the way (loading a model, a photo) takes it for its own."""


def _raise_stopped(signum, frame) -> None:
    raise _Stopped


def _distributed_caption(args: argparse.Namespace, world: int) -> None:
    """Refuse, before any work, what a caption run of ``world`` processes (torchrun) cannot do."""
    if world > 1 and not args.output:
        raise ShowtellError(f"{world} processes (torchrun) need --output FILE: each writes its share beside it, "
                            "and the first joins them into FILE")
    if world > 1 and (args.html or args.runtime == "onnx"):
        raise ShowtellError(f"{'--html' if args.html else '--runtime onnx'} works in one process, not "
                            f"{world} (torchrun)")
    if world > 1 and os.path.exists(args.output) and not os.path.isfile(args.output):
        raise ShowtellError(f"{args.output}: not a regular file; {world} processes join their shares into one")
    if args.resume:
        other = sorted(n for n in _parts(args.output) if n != world)
        if other:
            raise ShowtellError(f"{args.output}: holds the shares of an interrupted run of {other[0]} processes; "
                                f"resume it with {other[0]} processes, not {world}")


def _caption_share(args: argparse.Namespace, device, paths: list[str], empty_dirs: list, rank: int, world: int,
                   target: str | None) -> int:
    """Caption ``paths`` (this process's share) into ``target`` (--output, its part under torchrun, or stdout); under
    torchrun the first process then joins the parts into --output."""
    if args.resume and _drop_torn_tail(target):
        print(f"showtell: warning: dropped a partial last line of {one_line(target)} (an interrupted write)",
              file=sys.stderr)
    # every share of the run counts: a photo that moved to another share (the inputs changed) is not captioned twice
    shares = [args.output, *_parts(args.output).get(world, [])] if args.resume else []
    done = set().union(*map(_done_images, shares))
    todo = [p for p in paths if p not in done]
    if args.runtime == "onnx":  # onnxruntime + numpy only: torch is never imported
        from showtell.onnx_runtime import load_onnx

        if args.precision:
            raise ShowtellError("--precision is for --runtime torch; an ONNX export runs its encoder in fp32")
        captioner = load_onnx(args.model)
    else:
        from showtell.captioner import load

        captioner = load(args.model, device=device, ground=args.grounding, precision=args.precision)
    try:
        out = open(target, "a" if args.resume else "w", encoding="utf-8") if target else sys.stdout
    except OSError as e:
        raise ShowtellError(f"{target}: cannot write ({e.strerror})") from None
    gallery, failures, warned = [], 0, False
    try:
        results = captioner.iter_caption(todo, beam_size=args.beam_size, max_length=args.max_length,
                                         batch_size=args.batch_size, tags=args.tags)
        for r in itertools.chain(empty_dirs, results):
            if r.error:  # on stderr, and as a row of its own in jsonl, so that every input is there once
                failures += 1
                print(f"showtell: error: {one_line(r.error)}", file=sys.stderr)
            if r.tags_note and not warned and rank == 0:  # the same for every photo: say it once
                print(f"showtell: warning: {r.tags_note}", file=sys.stderr)
                warned = True
            if r.caption is not None or args.format == "jsonl":
                _write(out, _result_line(r, args.format))
            if args.html:
                if not args.attention:
                    r.attention = None
                gallery.append(r)
    finally:
        if out is not sys.stdout:
            try:
                out.close()
            except OSError:  # the write error is being reported already
                pass
    if world > 1:  # every share written: the first process joins them; the others wait, so none is cut off early
        _barrier(target, args.format)
        if rank == 0:
            _join_parts(args.output, world, append=args.resume)
        _barrier(target, args.format)
        import torch.distributed as dist

        dist.destroy_process_group()
    elif args.output and not args.resume:  # the parts of an abandoned torchrun run: this run replaced them
        try:
            _remove_parts(args.output)
        except OSError as e:
            raise ShowtellError(f"{args.output}: cannot remove the parts of an earlier run of several processes "
                                f"beside it ({e.strerror}); the captions were written") from None
    if args.html:  # after the results are out: a failure here loses no caption
        from showtell.report import write_gallery

        try:
            crop = captioner.preprocess.crop_pct if args.runtime == "torch" else 1.0
            write_gallery(args.html, gallery, crop_pct=crop)
        except OSError as e:
            raise ShowtellError(f"{args.html}: cannot write the gallery ({e.strerror}); the captions were "
                                "written") from None
    if len(todo) < len(paths):
        print(f"showtell: skipped {len(paths) - len(todo)} image(s) already in {one_line(target)}"
              + (f" or {one_line(args.output)}" if target != args.output else ""), file=sys.stderr)
    return 1 if failures else 0


def cmd_caption(args: argparse.Namespace) -> int:
    from showtell.images import expand_paths
    from showtell.result import CaptionResult

    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun: each process captions a share
    if args.runtime == "onnx" and args.device not in ("auto", "cpu"):
        raise ShowtellError(f"--device {args.device}: --runtime onnx runs on the CPU")
    device = _device(args.device) if args.runtime == "torch" else None
    paths, empty_dirs = [], []
    for arg in args.paths:
        found = [str(p) for p in expand_paths([arg])]
        if not found and os.path.isdir(arg):
            empty_dirs.append(CaptionResult(arg, error=f"{arg}: a folder with no image files in it, not an image"))
        paths.extend(found)
    if not paths:
        raise ShowtellError("no images found in " + " ".join(args.paths))
    if args.resume and not (args.output and args.format == "jsonl"):
        raise ShowtellError("--resume needs --output FILE with --format jsonl")
    _distributed_caption(args, world)
    _check_outputs(args, paths)
    rank, target = 0, args.output
    if world > 1:  # the process group, and this process's contiguous share of the photos, written beside --output
        from showtell.devices import init_distributed

        rank, world = init_distributed(device)  # never None: --runtime onnx was refused
        paths = paths[rank * len(paths) // world:(rank + 1) * len(paths) // world]
        empty_dirs = empty_dirs if rank == 0 else []
        target = f"{args.output}.part-{rank}-of-{world}"
        signal.signal(signal.SIGTERM, _raise_stopped)  # say what stays when torchrun stops us (another one failed)
    try:
        return _caption_share(args, device, paths, empty_dirs, rank, world, target)
    except (KeyboardInterrupt, _Stopped) as e:  # Ctrl-C, or torchrun stopping us because another process failed
        if not target:
            raise
        stop = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped by torchrun (SIGTERM)"
        print(f"showtell: {stop}; {_kept(target, args.format)}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    finally:
        if world > 1:  # a SIGTERM while exiting (after our message) just ends the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


# What each training setting does, by TrainConfig field (the flag is the name with '-' for '_'); every field has a
# line here (tests/test_cli_probe.py checks it). The data set fields come from _add_dataset_args.
_TRAIN_HELP = {
    "limit": "use only the first N images of each split, for smoke runs (default: all)",
    "min_count": "words seen fewer times in the train captions become <unk>",
    "max_words": "cut longer training captions to this many words",
    "encoder": "frozen image encoder (a showtell.encoders name, e.g. efficientnet_lite2 or efficientnet_lite0+2)",
    "embed_dim": "size of the word embeddings and of the projected image feature",
    "hidden_dim": "size of the LSTM state",
    "num_layers": "stacked LSTM layers",
    "dropout": "dropout on the word embeddings and the LSTM output, 0 to <1",
    "image_dropout": "dropout on the projected image feature, 0 to <1 (default: the same as --dropout)",
    "batch_norm": "BatchNorm after the image projection (the shipped recipe turns it on)",
    "decoder": "show-and-tell (the pooled image starts the LSTM) or attention (Show, Attend and Tell: soft attention "
               "over the encoder's feature map at every word; trains on spatial feature caches)",
    "init": "start from this checkpoint (a model or ensemble) instead of random weights; its vocabulary and model "
            "sizes replace the settings'",
    "epochs": "most cross-entropy epochs (training stops earlier by --patience); 0 with --init: only the "
              "self-critical stage",
    "batch_size": "captions per batch (per process under torchrun)",
    "lr": "Adam learning rate of the cross-entropy stage",
    "lr_decay": "multiply the learning rate by this after every epoch",
    "weight_decay": "Adam weight decay",
    "grad_clip": "clip the gradient norm to this",
    "label_smoothing": "label smoothing of the cross-entropy loss, 0 to <1",
    "flip": "also train on the features of horizontally flipped images",
    "patience": "stop after this many epochs without a better dev CIDEr",
    "seed": "random seed (weights, batch order, dropout)",
    "scst_epochs": "self-critical epochs after cross-entropy (0: none)",
    "scst_lr": "learning rate of the self-critical stage",
    "scst_samples": "captions sampled per image in the self-critical stage",
    "scst_batch_size": "images per batch in the self-critical stage",
    "scst_max_length": "most words in a sampled caption",
    "scst_baseline": "the reward subtracted from a sample's: mean (of the image's other samples) or greedy (its "
                     "greedy caption's)",
    "scst_bleu": "reward = CIDEr-D + this times the sample's sentence BLEU-4",
    "eval_beam_size": "beam width of the dev scoring after each epoch",
    "eval_max_length": "most words in a dev caption",
    "end_to_end": "feed the images through the encoder every batch (random crop and flip) instead of cached "
                  "features; for GPUs",
    "fine_tune": "with --end-to-end, also train the encoder's last stage",
    "cache_dir": "feature cache folder (default: $SHOWTELL_CACHE, else ~/.cache/showtell/features)",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "amp": "mixed precision: fp16 on CUDA, bf16 on CPUs that compute it natively",
    "num_workers": "image loader processes for feature extraction (0: in this process)",
}
_DATASET_FIELDS = ("dataset", "root", "captions", "images", "split_name")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--flip/--no-flip``, ...), default None = not given; its
    argparse type is the field's type (``int | None`` -> int), TrainConfig checks the ranges."""
    from dataclasses import fields

    from showtell.config import TrainConfig, field_types

    for f in fields(TrainConfig):
        if f.name in _DATASET_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = field_types()[f.name][0]
        shown = str(f.default).lower() if kind is bool else f.default
        help_ = _TRAIN_HELP[f.name] + ("" if f.default is None else f" (default {shown})")  # None: the text says
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, type=kind, default=None, help=help_)


def _train_config(args: argparse.Namespace):
    from dataclasses import asdict, fields

    from showtell.config import TrainConfig

    values = asdict(TrainConfig())
    if args.config:
        values.update(TrainConfig.from_toml(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    if not values.get("root"):
        raise ShowtellError("--root is required (or root = ... in the --config file)")
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)  # every setting checked before torch loads, and before any data is read
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ShowtellError(f"{args.out}: is a file; --out names the run folder (made if missing)")
    from showtell.train import Trainer

    Trainer(config, args.out, quiet=args.quiet, resume=args.resume).run()
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from showtell.features import extract_features

    corpus = _load_corpus(args)
    splits = args.splits.split(",")
    for split in splits:
        records = corpus.split(split)[: args.limit] if args.limit else corpus.split(split)
        cache = extract_features([r.image for r in records], args.encoder, args.cache_dir, flip=args.flip,
                                 batch_size=args.batch_size, quiet=args.quiet, spatial=args.spatial)
        print(f"{split}: {len(records)} images -> {cache.path}"
              + (f" ({len(cache.failed)} unreadable)" if cache.failed else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from showtell.captioner import load
    from showtell.decoding import DecodingOptions
    from showtell.evaluate import evaluate_records, format_scores, write_results

    captioner = load(args.model, device=_device(args.device), ground=args.grounding, precision=args.precision)
    corpus = _load_corpus(args)
    records = corpus.split(args.split)[: args.limit] if args.limit else corpus.split(args.split)
    if not records:
        raise ShowtellError(f"dataset has no '{args.split}' images")
    options = DecodingOptions(beam_size=args.beam_size, max_length=args.max_length,
                              length_penalty=args.length_penalty)
    scores, summary, records, captions = evaluate_records(captioner, records, options, args.cache_dir, args.quiet)
    if args.results:
        write_results(args.results, records, captions)
    print(format_scores(scores, summary))
    if args.json:
        print(json.dumps({**scores.values, **summary, "beam_size": args.beam_size, "split": args.split,
                          "skipped": scores.skipped}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    device = _device(args.device)
    from showtell.server import serve

    serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          max_megapixels=args.max_megapixels, device=device, precision=args.precision)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from showtell.export import export_onnx

    record = export_onnx(args.model, args.out, opset=args.opset, quiet=args.quiet)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in record["parity"].items())
    print(f"exported {record['name']} to {args.out} (max abs diff vs torch: {diffs})")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from showtell.checkpoint import fold_checkpoints

    ckpt = fold_checkpoints(args.models, args.out, meta={"name": args.name or Path(args.out).stem},
                             weights=args.weights)
    print(f"wrote {args.out}: an ensemble of {len(ckpt.model.members)} models")
    return 0


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "int8"), default=None,
                   help="int8: the int8 encoder, and the decoder in bf16 where the CPU computes bf16 (about 3-4x "
                        "faster on a CPU with VNNI); fp32 (default: int8 where this CPU runs it, else fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="showtell", description="Show-and-Tell image captioning: caption, train, evaluate, serve.")
    parser.add_argument("--version", action="version", version=f"showtell {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="inspect caption datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    stats = data_sub.add_parser("stats", help="images and captions per split, vocabulary, caption lengths")
    _add_dataset_args(stats)
    stats.add_argument("--min-count", type=_count(1), default=5,
                       help="words seen fewer times in the train captions are left out of the vocabulary (default 5)")
    stats.add_argument("--json", action="store_true", help="also print the numbers as one JSON line at the end")
    stats.set_defaults(func=cmd_data_stats)

    cap = sub.add_parser("caption", help="caption photos (files or folders)")
    cap.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    cap.add_argument("--model", help="checkpoint file (default: the built-in model); --runtime onnx: export folder")
    cap.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                     help="onnx: run a `showtell export` folder with onnxruntime, without torch: the model's own "
                          "captions and tags, no confidence or grounding (default torch)")
    cap.add_argument("--beam-size", type=_count(1, MAX_BEAM_SIZE), default=3,
                     help=f"beam width, 1-{MAX_BEAM_SIZE}; 1 = greedy (default 3)")
    cap.add_argument("--max-length", type=_count(1, MAX_LENGTH), default=20,
                     help=f"most words in a caption, 1-{MAX_LENGTH} (default 20)")
    cap.add_argument("--batch-size", type=_count(1, MAX_BATCH_SIZE), default=32,
                     help=f"images per batch, 1-{MAX_BATCH_SIZE} (default 32)")
    cap.add_argument("--format", choices=("text", "jsonl"), default="text",
                     help="text: path<TAB>caption[<TAB>confidence: c][<TAB>tags: label (p), ...][<TAB>model caption: "
                          "the model's own, where grounding replaced it] lines, one per captioned photo; "
                          "a backslash, TAB, newline or CR in a path is written \\\\, \\t, \\n, \\r and a byte "
                          "that is not UTF-8 as \\xNN (so are paths in messages). jsonl: one JSON object a line, "
                          "{\"image\", \"caption\", \"score\", \"confidence\", \"model_caption\" (where "
                          "grounded), \"tags\": [{\"label\", \"p\"}, ...]}, or for a "
                          "photo that failed {\"image\", \"caption\": null, \"score\": null, \"error\"}; a path "
                          "byte that is not UTF-8 is a \\udcNN escape (Python: os.fsencode() of the name gives the "
                          "bytes back)")
    cap.add_argument("--output", help="write results to this file instead of stdout; an existing file is "
                     "overwritten only if it is empty or a showtell results file (a jsonl first line starts with "
                     "{\"image\": , a text one is UTF-8 with a TAB), never one of the input images. Under torchrun "
                     "(N processes, --output required) process R writes its share to OUTPUT.part-R-of-N and the first "
                     "joins the shares in input order into OUTPUT")
    cap.add_argument("--resume", action="store_true",
                     help="append to --output (a showtell jsonl file), skipping images already captioned in it "
                          "(failed ones are tried again); under torchrun each process continues its OUTPUT.part-R-of-N "
                          "(with the number of processes that wrote them)")
    cap.add_argument("--html", metavar="FILE", help="also write a self-contained HTML gallery (after the results); "
                     "an existing FILE is replaced only if it is a showtell gallery")
    cap.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                     help="with a model of --decoder attention, the gallery shows each word of a caption over the "
                          "photo, lit where the model looked for it (default on; --no-attention: captions only)")
    cap.add_argument("--grounding", action=argparse.BooleanOptionalAction, default=True,
                     help="replace a doubtful caption that a sure ImageNet tag contradicts by one about the tag, the "
                          "model's own kept as model_caption (default on; --no-grounding: always the model's own)")
    cap.add_argument("--tags", type=_count(0, 1000), default=5, metavar="K",
                     help="also give the K most probable ImageNet classes of each photo, 0-1000 (default 5; 0: none)")
    _add_device_arg(cap)
    _add_precision_arg(cap)
    cap.set_defaults(func=cmd_caption)

    srv = sub.add_parser("serve", help="HTTP API and web page for captioning photos")
    srv.add_argument("--model", help="checkpoint file (default: the built-in model)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    srv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image accepted, MiB (default 10)")
    srv.add_argument("--max-megapixels", type=float, default=40.0,
                     help="largest image accepted, million pixels (default 40); bounds decoding memory")
    _add_device_arg(srv)
    _add_precision_arg(srv)
    srv.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="train a captioner; writes best/last checkpoints and logs to --out",
                           description="Train a captioner. Settings come from the flags below, or a TOML file of "
                                       "them (--config; flags win). Without any, a quick recipe; the recipe of the "
                                       "shipped model's members is --config configs/flickr8k.toml.")
    _add_dataset_args(train, required=False)
    train.add_argument("--out", required=True, help="run folder (checkpoints, metrics.csv, plot)")
    train.add_argument("--config", help="TOML file of training settings (flags override it)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from last.safetensors")
    train.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress bars, "
                       "epoch lines or summary; metrics.csv in --out still has every epoch)")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="caption a split and score it (BLEU, METEOR, ROUGE-L, CIDEr)")
    ev.add_argument("--model", help="checkpoint file (default: the built-in model)")
    _add_dataset_args(ev)
    ev.add_argument("--split", default="test", help="split to score: train, dev or test (default test)")
    ev.add_argument("--beam-size", type=_count(1, MAX_BEAM_SIZE), default=3,
                    help=f"beam width, 1-{MAX_BEAM_SIZE}; 1 = greedy (default 3)")
    ev.add_argument("--max-length", type=_count(1, MAX_LENGTH), default=20,
                    help=f"most words in a caption, 1-{MAX_LENGTH} (default 20)")
    ev.add_argument("--length-penalty", type=_finite, default=None,
                    help="rank beams by GNMT length penalty with this alpha (default: by mean log-probability)")
    ev.add_argument("--limit", type=_count(1), help="score only the first N images of the split (default: all)")
    ev.add_argument("--cache-dir", help="feature cache folder (default: $SHOWTELL_CACHE, else "
                    "~/.cache/showtell/features)")
    ev.add_argument("--results", help="also write the captions as COCO-format results JSON to this file")
    ev.add_argument("--json", action="store_true", help="also print the metrics as one JSON line at the end")
    ev.add_argument("--grounding", action=argparse.BooleanOptionalAction, default=True,
                    help="score the captions as `showtell caption` gives them, grounded on sure tags where the "
                         "checkpoint's rule says so (default); --no-grounding: the model's own captions")
    _add_device_arg(ev)
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_precision_arg(ev)
    ev.set_defaults(func=cmd_evaluate)

    feat = sub.add_parser("features", help="extract and cache encoder features")
    _add_dataset_args(feat)
    feat.add_argument("--encoder", default=DEFAULT_ENCODER,
                      help=f"frozen image encoder, as training's --encoder (default {DEFAULT_ENCODER})")
    feat.add_argument("--splits", default="train,dev,test", help="comma-separated splits (default train,dev,test)")
    feat.add_argument("--flip", action="store_true",
                      help="also the horizontally flipped images (training extracts them for the train split unless "
                           "--no-flip)")
    feat.add_argument("--spatial", action="store_true",
                      help="the encoder's last feature maps, for --decoder attention (fp16, 50-80x the disk of pooled "
                           "features), instead of the pooled vectors")
    feat.add_argument("--limit", type=_count(1), help="extract only the first N images of each split (default: all)")
    feat.add_argument("--batch-size", type=_count(1, MAX_BATCH_SIZE), default=32,
                      help=f"images per batch, 1-{MAX_BATCH_SIZE} (default 32)")
    feat.add_argument("--cache-dir", help="feature cache folder (default: $SHOWTELL_CACHE, else "
                      "~/.cache/showtell/features)")
    feat.add_argument("--quiet", action="store_true", help="no progress bars")
    feat.set_defaults(func=cmd_features)

    exp = sub.add_parser("export", help="export a checkpoint for deployment (ONNX + a JSON config)")
    exp.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default onnx)")
    exp.add_argument("--model", help="checkpoint file (default: the built-in model)")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--opset", type=int, default=17, help="ONNX operator set version to export with (default 17)")
    exp.add_argument("--quiet", action="store_true", help="no progress bars")
    exp.set_defaults(func=cmd_export)

    ens = sub.add_parser("ensemble", help="fold checkpoints trained apart into one ensemble checkpoint")
    ens.add_argument("models", nargs="+", help="checkpoint files (same data, vocabulary and encoder)")
    ens.add_argument("--out", required=True, help="ensemble checkpoint to write")
    ens.add_argument("--name", help="model name stored in the checkpoint (default: the file name)")
    ens.add_argument("--weights", choices=("fp32", "fp16", "int8"), default="fp32",
                     help="store the weights as fp32 (default), fp16 (half the size) or int8 (a quarter)")
    ens.set_defaults(func=cmd_ensemble)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: threads that wait sleep instead of spinning, which on a busy CPU made training
    # several times slower (the README's Speed section; benchmarks/threads.py measures it). OMP_WAIT_POLICY=ACTIVE
    # in the environment restores spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Pillow warns about damaged files it can still read ("Truncated File Read"), without naming the file: a
    # multi-line warning per photo in the middle of the results. A file it cannot read is that photo's error line.
    warnings.filterwarnings("ignore", module="PIL")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(one_line(_usage_line(*e.args, argv)), file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ShowtellError as e:
        print(f"showtell: error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("showtell: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
