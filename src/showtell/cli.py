"""The `showtell` command. Heavy imports (torch, timm, ...) happen inside the subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
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
