"""Which rule combines the paired encoder's two ImageNet heads best? Hit rates of each rule on labelled photos.

    python scripts/tag_heads.py tests/data/ood/objects.csv [--model FILE | --encoder NAME]

The CSV has columns ``image,object,imagenet``: an image path (found under ``--images``, else next to the CSV or in
its ``images/`` folder, else from the current folder), what is in it in words, and the acceptable ImageNet-1k class
indices, space-separated; empty where ImageNet-1k has no class for it (such photos are counted, not scored). Each
photo is encoded once; every rule of ``showtell.tags.Tagger`` (``mean_prob``, ``mean_logit``, and each head alone)
reads the same features. Prints one JSON line: per rule, the share of scored photos whose most probable class is
acceptable (top1) and whose three most probable classes hold an acceptable one (top3), and the photos that could
not be read.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def read_rows(path: Path, images: Path | None) -> list[tuple[Path, str, set[int]]]:
    rows = []
    folders = [f for f in (images, path.parent, path.parent / "images") if f is not None]
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                classes = {int(c) for c in row["imagenet"].split()}
                image = Path(row["image"])
            except (KeyError, TypeError, ValueError) as e:
                sys.exit(f"{path}:{n}: needs image,object,imagenet (class indices, space-separated): {e}")
            if not all(0 <= c < 1000 for c in classes):
                sys.exit(f"{path}:{n}: imagenet must hold class indices 0..999, got {row['imagenet']!r}")
            image = next((f / image for f in folders if (f / image).exists()), image)
            rows.append((image, row.get("object", ""), classes))
    if not rows:
        sys.exit(f"{path}: no rows")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="image,object,imagenet")
    parser.add_argument("--images", type=Path, help="folder of the images (default: the CSV's, or its images/)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="the encoder of this checkpoint (default: the built-in model's)")
    source.add_argument("--encoder", help="a registered encoder name instead of a checkpoint's")
    args = parser.parse_args(argv)

    import torch

    from showtell.captioner import load
    from showtell.encoders import create_encoder, encode
    from showtell.errors import ImageError, ShowtellError
    from showtell.images import load_image
    from showtell.tags import Tagger, create_tagger

    rows = read_rows(args.csv, args.images)
    unscored = sum(not classes for _, _, classes in rows)
    rows = [row for row in rows if row[2]]
    try:
        encoder = create_encoder(args.encoder) if args.encoder else load(args.model).encoder
        tagger = create_tagger(encoder)
    except ShowtellError as e:
        sys.exit(f"tag_heads: {e}")
    transform = encoder.preprocess.transform(train=False)
    images, wanted, unreadable = [], [], {}
    for image, _, classes in rows:
        try:
            images.append(transform(load_image(image)))
            wanted.append(classes)
        except ImageError as e:
            unreadable[str(image)] = str(e)
    if not images:
        sys.exit("no readable photos")
    with torch.inference_mode():
        feats = encode(encoder, torch.stack(images))
        report = {}
        for rule in tagger.rules:
            top3 = Tagger(list(zip(tagger.names, tagger.heads)), rule)(feats).topk(3, dim=-1).indices.tolist()
            report[rule] = {"top1": round(sum(t[0] in w for t, w in zip(top3, wanted)) / len(wanted), 4),
                            "top3": round(sum(bool(set(t) & w) for t, w in zip(top3, wanted)) / len(wanted), 4)}
    print(json.dumps({"encoder": encoder.name, "default_rule": tagger.rule, "photos": len(wanted),
                      "no_imagenet_class": unscored, "rules": report, "unreadable": unreadable}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
