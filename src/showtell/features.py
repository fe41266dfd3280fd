"""Feature cache: run the frozen encoder once per image, keep fp16 features on disk.

A cache is a folder holding ``manifest.json``, ``features.npy`` ([images, views, dim] float16,
view 1 = the horizontally flipped image when ``flip``) and ``done.npy`` (which rows are
finished). The folder name is a hash of what the features depend on: encoder, preprocessing,
flip, and each image's path, size and modification time. A cache built another way therefore
never matches, and is never mixed with this one. Extraction writes a batch at a time and marks
it done, so an interrupted run resumes where it stopped. When complete, the manifest records
the SHA-256 of ``features.npy``, checked on every load.

A model that attends over the image (``decoder = "attention"``) needs the encoder's last feature map instead of the
pooled vector: a ``spatial`` cache holds [images, views, grid * grid, dim] float16 (its mean over the positions is
the pooled vector). Spatial is part of the fingerprint and of the folder name, so a pooled cache is never handed
to a model that needs the map (it is extracted anew), and pooled caches keep their names and contents. Disk cost,
fp16: 125 KB a view for efficientnet_lite0 (7 x 7 x 1280), 207 KB for efficientnet_lite2 (9 x 9 x 1280), against
2.5 KB pooled; Flickr8k's 8,091 images with their mirror images take 2.0 GB (lite0) or 3.4 GB (lite2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from showtell.encoders import ENCODER_BATCH, encode
from showtell.errors import ShowtellError
from showtell.fileio import atomic_path, atomic_write_text, sha256_file
from showtell.images import prepare

FORMAT = "showtell-features"
FORMAT_VERSION = 1
CACHE_ENV = "SHOWTELL_CACHE"


def default_cache_dir() -> Path:
    """``$SHOWTELL_CACHE``, else ``$XDG_CACHE_HOME/showtell/features`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "showtell" / "features"


def _fingerprint(encoder: str, preprocess: dict, flip: bool, images: list[Path], precision: str = "fp32",
                 spatial: bool = False) -> str:
    # fp32 pooled caches keep the keys they always had
    variant = {**({} if precision == "fp32" else {"precision": precision}), **({"spatial": True} if spatial else {})}
    h = hashlib.sha256(json.dumps({"encoder": encoder, "preprocess": preprocess, "flip": flip,
                                   "format": FORMAT_VERSION, **variant}, sort_keys=True).encode())
    for p in images:
        try:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


@dataclass
class FeatureCache:
    """Loaded features: ``features[row, view]``; ``rows`` maps image path -> row."""

    path: Path
    manifest: dict
    features: np.ndarray
    rows: dict[str, int]

    @property
    def failed(self) -> dict[str, str]:
        """Images that could not be read: path -> error message."""
        return self.manifest.get("failed", {})

    @property
    def spatial(self) -> bool:
        """Whether the cache holds feature maps [images, views, positions, dim] rather than pooled vectors."""
        return bool(self.manifest.get("spatial", False))

    def row(self, image: str | os.PathLike) -> int:
        return self.rows[str(image)]


def check_spatial(cache: FeatureCache, spatial: bool) -> FeatureCache:
    """``cache`` if it holds what the model needs (feature maps for an attention decoder, pooled vectors otherwise),
    else a one-line ShowtellError: a pooled cache is never used in place of feature maps."""
    if cache.spatial != spatial or cache.features.ndim != (4 if spatial else 3):
        have, want = ("feature maps", "pooled features") if cache.spatial else ("pooled features", "feature maps")
        raise ShowtellError(f"feature cache {cache.path} holds {have}, but the model needs {want}; extract them "
                            f"again (showtell features{' --spatial' if spatial else ''}) or use another --cache-dir")
    return cache


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, images: list[Path], rows: list[int], transform, flip: bool):
        self.images, self.rows, self.transform, self.flip = images, rows, transform, flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        x = prepare(self.images[row], self.transform)
        if isinstance(x, str):
            return row, None, x
        views = [x]
        if self.flip:
            views.append(torch.flip(views[0], dims=[2]))
        return row, torch.stack(views), None


def _collate(items):
    good = [(r, x) for r, x, _ in items if x is not None]
    bad = {r: err for r, _, err in items if err is not None}
    rows = [r for r, _ in good]
    x = torch.stack([x for _, x in good]) if good else None
    return rows, x, bad


def iter_features(encoder, images: list[Path], rows: list[int], flip: bool = False, batch_size: int = 32,
                  num_workers: int = 1, device: str = "cpu",
                  encoder_batch: int = ENCODER_BATCH,
                  spatial: bool = False) -> Iterator[tuple[list[int], torch.Tensor, dict]]:
    """Run ``encoder`` over ``images[rows]`` in batches: yields (rows done, features [b, views, D] on the
    CPU, or with ``spatial`` feature maps [b, views, positions, D], {row: error} for images that could not be
    read). On the CPU the encoder takes ``encoder_batch`` images (views) a pass."""
    encoder = encoder.to(device).eval()
    data = _ImageFiles(images, rows, encoder.preprocess.transform(train=False), flip)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    with torch.inference_mode():
        for done, x, bad in loader:
            feats = torch.empty(0)
            if x is not None:
                b, v = x.shape[:2]
                feats = encode(encoder, x.flatten(0, 1).to(device), encoder_batch, spatial).float().cpu()
                feats = feats.view(b, v, *feats.shape[1:])
            yield done, feats, bad


def _save_done(path: Path, done: np.ndarray) -> None:
    with atomic_path(path / "done.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, done)


def _copy_rows(path: Path, manifest: dict, images: list[Path], done: np.ndarray,
               sources: Sequence[FeatureCache]) -> None:
    """Fill the unfinished rows of the cache at ``path`` that a source cache holds (same encoder, preprocessing,
    flip), and record them done."""
    out = np.load(path / "features.npy", mmap_mode="r+")
    failed = dict(manifest.get("failed", {}))
    wanted = set(manifest["images"])
    for source in sources:
        same = all(source.manifest.get(k) == manifest[k] for k in ("encoder", "preprocess", "flip", "dim"))
        same = same and source.manifest.get("precision", "fp32") == manifest.get("precision", "fp32")
        same = same and source.spatial == manifest.get("spatial", False)
        if not same:
            continue
        pairs = [(i, source.rows[str(p)]) for i, p in enumerate(images) if not done[i] and str(p) in source.rows]
        if pairs:
            rows, src_rows = map(list, zip(*pairs))
            out[rows] = source.features[src_rows]
            done[rows] = True
        failed.update({p: err for p, err in source.failed.items() if p in wanted})
    out.flush()
    del out
    manifest["failed"] = failed
    atomic_write_text(path / "manifest.json", json.dumps(manifest))
    _save_done(path, done)


def _open(path: Path, manifest: dict) -> FeatureCache:
    features = np.load(path / "features.npy", mmap_mode="r")
    rows = {img: i for i, img in enumerate(manifest["images"])}
    return FeatureCache(path, manifest, features, rows)


def _locate(images: list[Path], encoder_name: str, cache_dir, flip: bool, precision: str = "fp32",
            spatial: bool = False) -> tuple[Path, str, dict, dict | None]:
    """The cache folder of these images, its fingerprint, the encoder's info, and the folder's usable manifest
    (None when missing, unreadable or built another way)."""
    from showtell.encoders import encoder_info

    info = encoder_info(encoder_name)
    key = _fingerprint(encoder_name, info["preprocess"], flip, images, precision, spatial)
    variant = ("" if precision == "fp32" else f"-{precision}") + ("-spatial" if spatial else "")
    path = Path(cache_dir or default_cache_dir()) / f"{encoder_name}{variant}{'-flip' if flip else ''}-{key[:16]}"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("fingerprint") != key:
        manifest = None
    return path, key, info, manifest


def _resolve(images: list[str | os.PathLike]) -> list[Path]:
    images = [Path(p).resolve() for p in images]
    if len(set(images)) != len(images):
        raise ShowtellError("feature extraction got the same image twice")
    return images


def find_features(images: list[str | os.PathLike], encoder_name: str, cache_dir: str | os.PathLike | None = None,
                  flip: bool = False, spatial: bool = False) -> FeatureCache | None:
    """The complete, intact cache of exactly these images, or None; extracts nothing."""
    path, _, _, manifest = _locate(_resolve(images), encoder_name, cache_dir, flip, spatial=spatial)
    return _open(path, manifest) if _intact(path, manifest) else None


def _intact(path: Path, manifest: dict | None) -> bool:
    return bool(manifest and manifest.get("complete") and manifest.get("sha256") == sha256_file(path / "features.npy"))


def extract_features(images: list[str | os.PathLike], encoder_name: str, cache_dir: str | os.PathLike | None = None,
                     flip: bool = False, batch_size: int = 32, num_workers: int = 1, device: str = "cpu",
                     quiet: bool = False, encoder=None, reuse: Sequence[FeatureCache] = (),
                     spatial: bool = False) -> FeatureCache:
    """Features of ``images`` from a complete cache, extracting what is missing first.

    ``encoder`` may be passed to reuse a loaded one; otherwise it is created only when needed. An encoder of
    another precision than fp32 (``encoder.precision``, e.g. showtell.quantize's int8 build) has caches of its own.
    Rows found in a ``reuse`` cache (complete, same encoder, precision, preprocessing and flip; e.g. the shares of
    data-parallel ranks) are copied from it instead of extracted. ``spatial``: the encoder's last feature maps
    [images, views, grid * grid, dim] (for an attention decoder), in a cache of their own.
    """
    images = _resolve(images)
    precision = getattr(encoder, "precision", "fp32")
    path, key, info, manifest = _locate(images, encoder_name, cache_dir, flip, precision, spatial)
    if _intact(path, manifest):
        return check_spatial(_open(path, manifest), spatial)
    manifest_path = path / "manifest.json"
    if manifest is not None and manifest.get("complete"):
        manifest = None  # corrupted on disk: rebuild
    n_views = 2 if flip else 1
    if manifest is None:
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": key, "encoder": encoder_name,
                    "precision": precision, "preprocess": info["preprocess"], "flip": flip, "dim": info["feature_dim"],
                    "dtype": "float16", "views": n_views, "images": [str(p) for p in images],
                    "failed": {}, "complete": False, **({"spatial": True, "grid": info["grid"]} if spatial else {})}
        positions = (info["grid"] ** 2,) if spatial else ()
        with atomic_path(path / "features.npy") as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                      shape=(len(images), n_views, *positions, info["feature_dim"])).flush()
        _save_done(path, np.zeros(len(images), dtype=bool))
        atomic_write_text(manifest_path, json.dumps(manifest))

    done = np.load(path / "done.npy")
    if reuse and not done.all():
        _copy_rows(path, manifest, images, done, reuse)
    todo = [int(i) for i in np.flatnonzero(~done)]
    if todo:
        if encoder is None:
            from showtell.encoders import create_encoder
            encoder = create_encoder(encoder_name)
        out = np.load(path / "features.npy", mmap_mode="r+")
        failed = dict(manifest.get("failed", {}))
        bar = tqdm(total=len(images), initial=len(images) - len(todo), desc=f"features {encoder_name}",
                   unit="img", disable=quiet)
        for rows, feats, bad in iter_features(encoder, images, todo, flip, batch_size, num_workers, device,
                                              spatial=spatial):
            if rows:
                out[rows] = feats.numpy().astype(np.float16)
                out.flush()
            for r, err in bad.items():
                failed[str(images[r])] = err
            done[rows + list(bad)] = True
            if bad:
                manifest["failed"] = failed
                atomic_write_text(manifest_path, json.dumps(manifest))
            _save_done(path, done)
            bar.update(len(rows) + len(bad))
        bar.close()
        del out
    manifest["complete"] = True
    manifest["sha256"] = sha256_file(path / "features.npy")
    atomic_write_text(manifest_path, json.dumps(manifest))
    return check_spatial(_open(path, manifest), spatial)


def extract_features_distributed(images: list[str | os.PathLike], encoder_name: str, rank: int, world: int,
                                 cache_dir: str | os.PathLike | None = None, flip: bool = False, num_workers: int = 1,
                                 device: str = "cpu", quiet: bool = False, spatial: bool = False) -> FeatureCache:
    """``extract_features`` under torchrun, called by every rank: each extracts every world-th image into a cache of
    its own (resumable like any cache), then rank 0 joins the shares into the one cache that a single process would
    have built, and every rank loads it. This needs the cache folder on a shared file system."""
    kwargs = dict(encoder_name=encoder_name, cache_dir=cache_dir, flip=flip, device=device, num_workers=num_workers,
                  spatial=spatial)
    if world == 1:
        return extract_features(images, quiet=quiet, **kwargs)
    cache = find_features(images, encoder_name, cache_dir, flip, spatial) if rank == 0 else None
    missing = [cache is None]
    torch.distributed.broadcast_object_list(missing, 0)  # rank 0 decides, so every rank takes one path
    if missing[0]:
        if rank == 0 and not quiet:
            print(f"extracting features on {world} processes", file=sys.stderr, flush=True)
        extract_features(images[rank::world], quiet=quiet or rank != 0, **kwargs)
        torch.distributed.barrier()
        if rank == 0:
            shares = [extract_features(images[r::world], quiet=True, **kwargs) for r in range(world)]
            cache = extract_features(images, quiet=True, reuse=shares, **kwargs)
            for share in shares:
                shutil.rmtree(share.path, ignore_errors=True)
        torch.distributed.barrier()
    return cache or extract_features(images, quiet=True, **kwargs)
