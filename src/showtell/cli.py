"""The `showtell` command. Heavy imports (torch, timm, ...) happen inside the subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from showtell import __version__
from showtell.errors import ShowtellError

FLICKR8K_ENV = "SHOWTELL_FLICKR8K"


def _add_dataset_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from showtell.datasets import FORMATS

    p.add_argument("--dataset", choices=FORMATS, required=required, help="caption file format")
    p.add_argument("--root", required=required, help="dataset folder")
    p.add_argument("--captions", help="caption file (csv/coco/karpathy; found under --root when omitted)")
    p.add_argument("--images", help="image folder (when not the default place under --root)")
    p.add_argument("--split-name", dest="split_name",
                   help="split for all rows of a COCO file or a CSV without a split column")


def _load_corpus(args: argparse.Namespace):
    from showtell.datasets import load_corpus

    corpus = load_corpus(args.dataset, args.root, args.captions, args.images, args.split_name)
    msg = corpus.skipped_message()
    if msg:
        print(f"showtell: warning: {msg}", file=sys.stderr)
    return corpus


def cmd_data_stats(args: argparse.Namespace) -> int:
    from showtell.stats import corpus_stats, format_stats

    stats = corpus_stats(_load_corpus(args), min_count=args.min_count)
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


def cmd_caption(args: argparse.Namespace) -> int:
    from showtell.images import expand_paths

    paths, empty_dirs = [], []
    for arg in args.paths:
        found = [str(p) for p in expand_paths([arg])]
        if not found and os.path.isdir(arg):
            empty_dirs.append(arg)
        paths.extend(found)
    if not paths:
        raise ShowtellError("no images found in " + " ".join(args.paths))
    if args.resume and not (args.output and args.format == "jsonl"):
        raise ShowtellError("--resume needs --output FILE with --format jsonl")
    for arg in empty_dirs:  # e.g. a folder named photo.jpg: say so rather than skip it silently
        print(f"showtell: error: {arg}: a folder with no image files in it, not an image", file=sys.stderr)
    if args.resume and _drop_torn_tail(args.output):
        print(f"showtell: warning: dropped a partial last line of {args.output} (an interrupted write)",
              file=sys.stderr)
    done = _done_images(args.output) if args.resume else set()
    todo = [p for p in paths if p not in done]
    if args.runtime == "onnx":  # onnxruntime + numpy only: torch is never imported
        from showtell.onnx_runtime import load_onnx

        captioner = load_onnx(args.model)
    else:
        from showtell.captioner import load

        captioner = load(args.model)
    try:
        out = open(args.output, "a" if args.resume else "w", encoding="utf-8") if args.output else sys.stdout
    except OSError as e:
        raise ShowtellError(f"{args.output}: cannot write ({e.strerror})") from None
    results, failures = [], len(empty_dirs)
    try:
        for r in captioner.iter_caption(todo, beam_size=args.beam_size, max_length=args.max_length,
                                        batch_size=args.batch_size):
            if r.error:
                failures += 1
                print(f"showtell: error: {r.error}", file=sys.stderr)
                continue
            results.append(r)
            if args.format == "jsonl":
                out.write(json.dumps({"image": r.image, "caption": r.caption, "score": round(r.score, 4)}) + "\n")
            else:
                out.write(f"{r.image}\t{r.caption}\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if args.html:
        from showtell.report import write_gallery

        write_gallery(args.html, results)
    if done:
        print(f"showtell: skipped {len(paths) - len(todo)} image(s) already in {args.output}", file=sys.stderr)
    return 1 if failures else 0


_TYPES = {"str": str, "int": int, "float": float}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--flip/--no-flip``, ...), default None = not given."""
    from dataclasses import fields

    from showtell.config import TrainConfig

    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("dataset", "root", "captions", "images", "split_name"):
            continue  # from _add_dataset_args
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
        else:
            p.add_argument(flag, type=_TYPES[f.type.split(" |")[0]], default=None, help=f"(default {f.default})")


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
    from showtell.train import Trainer

    config = _train_config(args)
    Trainer(config, args.out, quiet=args.quiet, resume=args.resume).run()
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from showtell.features import extract_features

    corpus = _load_corpus(args)
    splits = args.splits.split(",")
    for split in splits:
        records = corpus.split(split)[: args.limit] if args.limit else corpus.split(split)
        cache = extract_features([r.image for r in records], args.encoder, args.cache_dir, flip=args.flip,
                                 batch_size=args.batch_size, quiet=args.quiet)
        print(f"{split}: {len(records)} images -> {cache.path}"
              + (f" ({len(cache.failed)} unreadable)" if cache.failed else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from showtell.captioner import load
    from showtell.decoding import DecodingOptions
    from showtell.evaluate import format_scores, generate, score_records, write_results
    from showtell.features import extract_features

    captioner = load(args.model)
    corpus = _load_corpus(args)
    records = corpus.split(args.split)[: args.limit] if args.limit else corpus.split(args.split)
    if not records:
        raise ShowtellError(f"dataset has no '{args.split}' images")
    cache = extract_features([r.image for r in records], captioner.checkpoint.encoder, args.cache_dir,
                             quiet=args.quiet, encoder=captioner.encoder)
    records = [r for r in records if str(r.image.resolve()) not in cache.failed]
    import torch

    feats = torch.from_numpy(cache.features[[cache.row(r.image.resolve()) for r in records], 0].astype("float32"))
    options = DecodingOptions(beam_size=args.beam_size, max_length=args.max_length,
                              length_penalty=args.length_penalty)
    captions = generate(captioner.model, captioner.vocab, feats, options)
    if args.results:
        write_results(args.results, records, captions)
    scores, summary = score_records(records, captions)
    print(format_scores(scores, summary))
    if args.json:
        print(json.dumps({**scores.values, **summary, "beam_size": args.beam_size, "split": args.split,
                          "skipped": scores.skipped}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from showtell.server import serve

    serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="showtell", description="Show-and-Tell image captioning: caption, train, evaluate, serve.")
    parser.add_argument("--version", action="version", version=f"showtell {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="inspect caption datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    stats = data_sub.add_parser("stats", help="images and captions per split, vocabulary, caption lengths")
    _add_dataset_args(stats)
    stats.add_argument("--min-count", type=int, default=5, help="vocabulary count threshold (default 5)")
    stats.add_argument("--json", action="store_true", help="also print the numbers as one JSON line at the end")
    stats.set_defaults(func=cmd_data_stats)

    cap = sub.add_parser("caption", help="caption photos (files or folders)")
    cap.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    cap.add_argument("--model", help="checkpoint file (default: the built-in model); --runtime onnx: export folder")
    cap.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                     help="onnx: run a `showtell export` folder with onnxruntime, without torch (default torch)")
    cap.add_argument("--beam-size", type=int, default=3, help="beam width; 1 = greedy (default 3)")
    cap.add_argument("--max-length", type=int, default=20, help="most words in a caption (default 20)")
    cap.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    cap.add_argument("--format", choices=("text", "jsonl"), default="text",
                     help="text: path<TAB>caption lines; jsonl: one JSON object a line")
    cap.add_argument("--output", help="write results to this file instead of stdout")
    cap.add_argument("--resume", action="store_true", help="append to --output, skipping images already in it")
    cap.add_argument("--html", metavar="FILE", help="also write a self-contained HTML gallery")
    cap.set_defaults(func=cmd_caption)

    srv = sub.add_parser("serve", help="HTTP API and web page for captioning photos")
    srv.add_argument("--model", help="checkpoint file (default: the built-in model)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image accepted, MiB (default 10)")
    srv.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="train a captioner; writes best/last checkpoints and logs to --out")
    _add_dataset_args(train, required=False)
    train.add_argument("--out", required=True, help="run folder (checkpoints, metrics.csv, plot)")
    train.add_argument("--config", help="TOML file of training settings (flags override it)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from last.safetensors")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="caption a split and score it (BLEU, METEOR, ROUGE-L, CIDEr)")
    ev.add_argument("--model", help="checkpoint file (default: the built-in model)")
    _add_dataset_args(ev)
    ev.add_argument("--split", default="test", help="split to score (default test)")
    ev.add_argument("--beam-size", type=int, default=3)
    ev.add_argument("--max-length", type=int, default=20)
    ev.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha (default: mean log-prob)")
    ev.add_argument("--limit", type=int, help="first N images of the split")
    ev.add_argument("--cache-dir", help="feature cache folder")
    ev.add_argument("--results", help="write COCO-format results JSON here")
    ev.add_argument("--json", action="store_true", help="also print the metrics as one JSON line at the end")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    feat = sub.add_parser("features", help="extract and cache encoder features")
    _add_dataset_args(feat)
    feat.add_argument("--encoder", default=None, help="encoder name (default efficientnet_lite2)")
    feat.add_argument("--splits", default="train,dev,test", help="comma-separated splits")
    feat.add_argument("--flip", action="store_true", help="also the horizontally flipped images")
    feat.add_argument("--limit", type=int)
    feat.add_argument("--batch-size", type=int, default=32)
    feat.add_argument("--cache-dir")
    feat.add_argument("--quiet", action="store_true")
    feat.set_defaults(func=cmd_features)

    exp = sub.add_parser("export", help="export a checkpoint for deployment (ONNX + a JSON config)")
    exp.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default onnx)")
    exp.add_argument("--model", help="checkpoint file (default: the built-in model)")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    exp.add_argument("--quiet", action="store_true")
    exp.set_defaults(func=cmd_export)

    ens = sub.add_parser("ensemble", help="fold checkpoints trained apart into one ensemble checkpoint")
    ens.add_argument("models", nargs="+", help="checkpoint files (same data, vocabulary and encoder)")
    ens.add_argument("--out", required=True, help="ensemble checkpoint to write")
    ens.add_argument("--name", help="model name (default: the file name)")
    ens.add_argument("--weights", choices=("fp32", "fp16", "int8"), default="fp32",
                     help="store the weights as fp32 (default), fp16 (half the size) or int8 (a quarter)")
    ens.set_defaults(func=cmd_ensemble)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: threads that wait sleep instead of spinning. With another busy process on a
    # 2-core CPU, spinning made training 9-21x slower (benchmarks/threads.py); on an idle machine sleeping costs
    # about a fifth. OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "encoder", "") is None and args.command == "features":
        from showtell.encoders import DEFAULT_ENCODER
        args.encoder = DEFAULT_ENCODER
    try:
        return args.func(args)
    except ShowtellError as e:
        print(f"showtell: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("showtell: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
