"""Caption dataset readers: one function a format, all returning a :class:`Corpus`.

Every reader checks that each image exists; captions of missing images are skipped and reported
(``Corpus.missing_images``, ``Corpus.skipped_captions``), never silently kept. A malformed file
raises :class:`DataError` naming the file and the line or field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from showtell.errors import DataError

SPLITS = ("train", "dev", "test")
FORMATS = ("flickr8k", "csv", "coco", "karpathy")


@dataclass(frozen=True)
class CaptionRecord:
    """One image, its reference captions and the split it belongs to."""

    image: Path
    captions: tuple[str, ...]
    split: str


@dataclass
class Corpus:
    """What a reader found: the records, and what it had to skip."""

    records: list[CaptionRecord]
    missing_images: list[str] = field(default_factory=list)
    skipped_captions: int = 0
    source: str = ""

    def split(self, name: str) -> list[CaptionRecord]:
        return [r for r in self.records if r.split == name]

    def skipped_message(self) -> str | None:
        if not self.skipped_captions:
            return None
        names = ", ".join(self.missing_images[:5]) + (" ..." if len(self.missing_images) > 5 else "")
        return (f"skipped {self.skipped_captions} caption(s) of {len(self.missing_images)} missing "
                f"image(s): {names}")

    def first_skipped_message(self) -> str | None:
        """``skipped_message()`` the first time this data set (its caption file and what it skips) is read on this
        machine, None after that: a marker under ``$XDG_CACHE_HOME/showtell/notices`` (``~/.cache/...``) records
        that it was said. Where the marker cannot be written, every time."""
        msg = self.skipped_message()
        if not msg:
            return None
        key = hashlib.sha256(f"{os.path.abspath(self.source)}\0{msg}".encode()).hexdigest()[:32]
        marker = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "showtell" / "notices" / key
        if marker.exists():
            return None
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{self.source}: {msg}\n", encoding="utf-8")
        except OSError:
            pass
        return msg


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _read_json(path: Path) -> object:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _listing(image_dir: Path) -> set[str]:
    """Relative paths of the files under ``image_dir`` (one directory walk instead of a stat each)."""
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    names = set()
    for dirpath, _, files in os.walk(image_dir):
        rel = os.path.relpath(dirpath, image_dir)
        names.update(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files)
    return names


def _assemble(items: dict[str, dict], image_dir: Path, source: str) -> Corpus:
    """Turn {relative image name: {"captions": [...], "split": str}} into a Corpus, skipping missing files."""
    present = _listing(image_dir)
    records, missing, skipped = [], [], 0
    for name, item in items.items():
        if name in present:
            records.append(CaptionRecord(image_dir / name, tuple(item["captions"]), item["split"]))
        else:
            missing.append(name)
            skipped += len(item["captions"])
    return Corpus(records, missing, skipped, source)


def hash_split(name: str, dev: float = 0.05, test: float = 0.05) -> str:
    """A stable train/dev/test assignment from the image name, for data without a split."""
    u = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64
    return "dev" if u < dev else "test" if u < dev + test else "train"


# --- Flickr8k as distributed -------------------------------------------------------------------

FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")


def read_flickr8k(root: str | Path) -> Corpus:
    """Flickr8k: ``root/Flicker8k_Dataset`` (or Flickr8k_Dataset, Images) and ``root/Flickr8k_text``.

    Uses Flickr8k.token.txt (``<image>#<n>\\t<caption>`` lines) and the standard
    Flickr_8k.{train,dev,test}Images.txt split; captioned images in no split file get split
    "unassigned".
    """
    root = Path(root)
    image_dir = next((root / d for d in FLICKR8K_IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise DataError(f"{root}: no image folder (expected one of {', '.join(FLICKR8K_IMAGE_DIRS)})")
    text_dir = root / "Flickr8k_text" if (root / "Flickr8k_text").is_dir() else root

    split_of: dict[str, str] = {}
    for split in SPLITS:
        path = text_dir / f"Flickr_8k.{split}Images.txt"
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if "\t" in name or "#" in name:
                raise DataError(f"{path}:{lineno}: expected one image file name a line, got {line[:60]!r}")
            if split_of.setdefault(name, split) != split:
                raise DataError(f"{path}:{lineno}: {name} is in both the {split_of[name]} and {split} splits")

    token_file = text_dir / "Flickr8k.token.txt"
    captions: dict[str, list[str]] = defaultdict(list)
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_read_text(token_file).splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_, _ = key.rpartition("#")
        if not sep or not hash_ or not name or not caption.strip():
            raise DataError(f"{token_file}:{lineno}: expected '<image>#<n><TAB><caption>', got {line[:60]!r}")
        if key in seen:
            raise DataError(f"{token_file}:{lineno}: caption id {key} repeats line {seen[key]}")
        seen[key] = lineno
        captions[name].append(caption.strip())
    if not captions:
        raise DataError(f"{token_file}: no captions")

    no_caption = [n for n in split_of if n not in captions]
    if no_caption:
        raise DataError(f"{token_file}: no captions for {len(no_caption)} image(s) of the split files, "
                        f"e.g. {no_caption[0]}")
    # Captioned images outside the three split files are kept as split "unassigned".
    items = {n: {"captions": c, "split": split_of.get(n, "unassigned")} for n, c in captions.items()}
    return _assemble(items, image_dir, str(root))


# --- CSV / Kaggle captions.txt -----------------------------------------------------------------

IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "file", "path")
CAPTION_COLUMNS = ("caption", "comment", "text", "sentence")


def read_csv(captions_file: str | Path, image_dir: str | Path, split: str | None = None) -> Corpus:
    """A CSV with an image column and a caption column, and optionally a split column.

    Covers Kaggle's Flickr8k ``captions.txt`` (``image,caption``) and Flickr30k ``results.csv``
    (``image_name| comment_number| comment``); the delimiter (``, | ; TAB``) is detected. Without a
    split column every row gets ``split`` when given, else a stable hash split (90/5/5 by image).
    """
    path = Path(captions_file)
    text = _read_text(path)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file, expected a header line with image and caption columns")
    try:
        sniffed = csv.Sniffer().sniff(lines[0], delimiters=",|;\t")
        delimiter, space = sniffed.delimiter, sniffed.skipinitialspace
    except csv.Error:
        delimiter, space = ",", False
    # the delimiter and spaces after it come from the header; quoting stays the standard one ("a ""quoted""
    # word", as Python's csv module, pandas and spreadsheets write it), which a header without quotes cannot show
    reader = csv.reader(lines, delimiter=delimiter, skipinitialspace=space)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except csv.Error as e:
        raise DataError(f"{path}:1: {e}") from None

    def column(options: tuple[str, ...], what: str, required: bool = True) -> int | None:
        for opt in options:
            if opt in header:
                return header.index(opt)
        if required:
            raise DataError(f"{path}:1: no {what} column in header {header} (expected one of {', '.join(options)})")
        return None

    ci, cc = column(IMAGE_COLUMNS, "image"), column(CAPTION_COLUMNS, "caption")
    cs = column(("split",), "split", required=False)
    items: dict[str, dict] = {}
    rows = enumerate(reader, 2)
    while True:
        try:
            lineno, row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(ci, cc, cs or 0):
            raise DataError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        name, caption = row[ci].strip(), row[cc].strip()
        if not name or not caption:
            raise DataError(f"{path}:{lineno}: empty image name or caption")
        row_split = row[cs].strip().lower() if cs is not None else (split or hash_split(name))
        row_split = "train" if row_split == "restval" else "dev" if row_split in ("val", "valid") else row_split
        item = items.setdefault(name, {"captions": [], "split": row_split})
        if item["split"] != row_split:
            raise DataError(f"{path}:{lineno}: {name} is in both the {item['split']} and {row_split} splits")
        item["captions"].append(caption)
    if not items:
        raise DataError(f"{path}: no caption rows")
    return _assemble(items, Path(image_dir), str(path))


# --- MS-COCO captions JSON ---------------------------------------------------------------------

def _field(obj: object, key: str, kind: type | tuple, where: str) -> object:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


def read_coco(captions_json: str | Path, image_dir: str | Path, split: str = "train") -> Corpus:
    """MS-COCO captions (``captions_train2014.json`` shape: images + annotations); split given by the caller."""
    path = Path(captions_json)
    data = _read_json(path)
    images = _field(data, "images", list, str(path))
    annotations = _field(data, "annotations", list, str(path))
    name_of: dict[int, str] = {}
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = _field(img, "id", (int, str), where)
        if image_id in name_of:
            raise DataError(f"{where}: duplicate image id {image_id}")
        name_of[image_id] = _field(img, "file_name", str, where)
    items: dict[str, dict] = {}
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        image_id = _field(ann, "image_id", (int, str), where)
        caption = _field(ann, "caption", str, where).strip()
        if image_id not in name_of:
            raise DataError(f"{where}: image_id {image_id} is not in 'images'")
        if caption:
            items.setdefault(name_of[image_id], {"captions": [], "split": split})["captions"].append(caption)
    if not items:
        raise DataError(f"{path}: no captions in 'annotations'")
    return _assemble(items, Path(image_dir), str(path))


# --- Karpathy split JSON -----------------------------------------------------------------------

def read_karpathy(dataset_json: str | Path, image_root: str | Path) -> Corpus:
    """Karpathy's ``dataset_{coco,flickr8k,flickr30k}.json``: images[].filename, filepath, split,
    sentences[].raw. Images are looked up at ``image_root/filepath/filename`` (or
    ``image_root/filename`` when there is no filepath); 'restval' counts as train, 'val' as dev."""
    path = Path(dataset_json)
    data = _read_json(path)
    images = _field(data, "images", list, str(path))
    items: dict[str, dict] = {}
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        filename = _field(img, "filename", str, where)
        filepath = img.get("filepath", "") if isinstance(img, dict) else ""
        if not isinstance(filepath, str):
            raise DataError(f"{where}: field 'filepath' must be a string")
        split = _field(img, "split", str, where)
        split = {"restval": "train", "val": "dev"}.get(split, split)
        sentences = _field(img, "sentences", list, where)
        caps = [_field(s, "raw", str, f"{where}.sentences[{j}]").strip() for j, s in enumerate(sentences)]
        if not any(caps):
            raise DataError(f"{where}: no sentences for {filename}")
        name = f"{filepath}/{filename}" if filepath else filename
        if name in items:
            raise DataError(f"{where}: duplicate image {name}")
        items[name] = {"captions": [c for c in caps if c], "split": split}
    if not items:
        raise DataError(f"{path}: no images")
    return _assemble(items, Path(image_root), str(path))


# --- one entry point for the CLI ----------------------------------------------------------------

def _find(root: Path, patterns: tuple[str, ...], what: str) -> Path:
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(f"{root}: several {what} files ({', '.join(f.name for f in found)}); pass --captions")
    raise DataError(f"{root}: no {what} file found; pass --captions")


def load_corpus(fmt: str, root: str | Path, captions: str | Path | None = None,
                images: str | Path | None = None, split: str | None = None) -> Corpus:
    """Read a dataset by format name. ``captions``/``images`` override where the files are looked for."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if fmt == "flickr8k":
        return read_flickr8k(root)
    if fmt == "csv":
        cap = Path(captions) if captions else _find(root, ("captions.txt", "captions.csv", "results.csv", "*.csv"),
                                                    "caption CSV")
        img = Path(images) if images else next(
            (root / d for d in ("Images", "images", "flickr30k_images") if (root / d).is_dir()), root)
        return read_csv(cap, img, split)
    if fmt == "coco":
        cap = Path(captions) if captions else _find(root, ("annotations/captions_*.json", "captions_*.json"),
                                                    "COCO captions JSON")
        return read_coco(cap, Path(images) if images else root, split or "train")
    if fmt == "karpathy":
        cap = Path(captions) if captions else _find(root, ("dataset_*.json",), "Karpathy dataset_*.json")
        return read_karpathy(cap, Path(images) if images else root)
    raise DataError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMATS)})")
