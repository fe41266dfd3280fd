import json

import numpy as np
import pytest
import torch

from showtell.features import extract_features


class CountingEncoder(torch.nn.Module):
    """The real lite0 encoder, counting the images it sees; it can be told to fail after N batches."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        from showtell.encoders import create_encoder

        self.inner = create_encoder("efficientnet_lite0")
        self.preprocess, self.feature_dim = self.inner.preprocess, self.inner.feature_dim
        self.seen, self.batches, self.fail_after = 0, 0, fail_after

    def forward(self, x):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        self.batches += 1
        self.seen += len(x)
        return self.inner(x)

    def feature_map(self, x):
        self.seen += len(x)
        return self.inner.feature_map(x)


@pytest.fixture(scope="module")
def images(photos):
    return sorted(photos.iterdir()) * 1  # 4 real photos


def test_cache_is_reused_and_keyed_by_how_it_was_made(images, tmp_path):
    first = CountingEncoder()
    cache = extract_features(images, "efficientnet_lite0", tmp_path, batch_size=2, encoder=first, quiet=True)
    assert first.seen == 4 and cache.features.shape == (4, 1, 1280) and cache.features.dtype == np.float16
    again = CountingEncoder()
    same = extract_features(images, "efficientnet_lite0", tmp_path, encoder=again, quiet=True)
    assert again.seen == 0 and same.path == cache.path
    np.testing.assert_array_equal(same.features, cache.features)
    # another encoder, another preprocessing record, flips or another image list: never the same cache
    assert extract_features(images, "efficientnet_lite2", tmp_path, quiet=True).path != cache.path
    flipped = extract_features(images, "efficientnet_lite0", tmp_path, flip=True, quiet=True)
    assert flipped.path != cache.path and flipped.features.shape == (4, 2, 1280)
    assert not np.array_equal(flipped.features[:, 0], flipped.features[:, 1])
    np.testing.assert_allclose(flipped.features[:, 0].astype(np.float32), cache.features[:, 0].astype(np.float32),
                               atol=2e-2)
    assert extract_features(images[:3], "efficientnet_lite0", tmp_path, quiet=True).path != cache.path
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["encoder"] == "efficientnet_lite0" and manifest["preprocess"]["size"] == 224
    assert manifest["complete"] and len(manifest["sha256"]) == 64


def test_changed_image_or_corrupt_cache_is_rebuilt(images, tmp_path):
    import shutil

    local = [tmp_path / p.name for p in images]
    for src, dst in zip(images, local):
        shutil.copy(src, dst)
    cache = extract_features(local, "efficientnet_lite0", tmp_path / "c", quiet=True)
    feats = np.load(cache.path / "features.npy", mmap_mode="r+")
    feats[0] = 0  # corrupt the stored features: the manifest's SHA-256 no longer matches
    feats.flush()
    del feats
    enc = CountingEncoder()
    rebuilt = extract_features(local, "efficientnet_lite0", tmp_path / "c", encoder=enc, quiet=True)
    assert enc.seen == 4 and np.abs(rebuilt.features[0]).sum() > 0
    local[1].write_bytes(images[2].read_bytes())  # a photo replaced on disk: a new cache
    assert extract_features(local, "efficientnet_lite0", tmp_path / "c", quiet=True).path != cache.path


def test_interrupted_extraction_resumes_without_redoing_work(images, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        extract_features(images, "efficientnet_lite0", tmp_path, batch_size=1, num_workers=0,
                         encoder=CountingEncoder(fail_after=3), quiet=True)
    resumed = CountingEncoder()
    cache = extract_features(images, "efficientnet_lite0", tmp_path, batch_size=1, num_workers=0, encoder=resumed,
                             quiet=True)
    assert resumed.seen == 1  # only the one image not finished before the interruption
    fresh = extract_features(images, "efficientnet_lite0", tmp_path / "fresh", batch_size=1, quiet=True)
    np.testing.assert_array_equal(cache.features, fresh.features)


def test_unreadable_images_are_recorded_not_fatal(images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    cache = extract_features([images[0], bad], "efficientnet_lite0", tmp_path / "c", quiet=True)
    assert list(cache.failed) == [str(bad.resolve())] and "bad.jpg" in cache.failed[str(bad.resolve())]


def test_shares_extracted_apart_join_into_the_whole_cache_without_reextracting(images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    files = [*images, bad]
    shares = [extract_features(files[r::2], "efficientnet_lite0", tmp_path / "c", quiet=True) for r in range(2)]
    joiner = CountingEncoder()
    joined = extract_features(files, "efficientnet_lite0", tmp_path / "c", encoder=joiner, reuse=shares, quiet=True)
    assert joiner.seen == 0 and joined.manifest["complete"]
    assert list(joined.failed) == [str(bad.resolve())]
    whole = extract_features(files, "efficientnet_lite0", tmp_path / "direct", quiet=True)
    assert joined.path.name == whole.path.name  # the same cache one process would have built
    np.testing.assert_array_equal(joined.features, whole.features)
    # a share of another encoder or view set is never copied from
    flipped = extract_features(files[:2], "efficientnet_lite0", tmp_path / "f", flip=True, quiet=True)
    counting = CountingEncoder()
    extract_features(files[:2], "efficientnet_lite0", tmp_path / "g", encoder=counting, reuse=[flipped], quiet=True)
    assert counting.seen == 2


def test_spatial_cache_holds_feature_maps_apart_from_the_pooled_cache(images, tmp_path):
    from showtell.errors import ShowtellError
    from showtell.features import check_spatial

    pooled = extract_features(images, "efficientnet_lite0", tmp_path, flip=True, quiet=True)
    counting = CountingEncoder()
    maps = extract_features(images, "efficientnet_lite0", tmp_path, flip=True, quiet=True, spatial=True,
                            encoder=counting)
    # a pooled cache is never taken for feature maps: the maps are extracted into a folder of their own
    assert counting.seen == 8 and maps.path != pooled.path and maps.path.name.startswith("efficientnet_lite0-spatial")
    assert maps.spatial and not pooled.spatial and maps.manifest["grid"] == 7
    assert maps.features.shape == (4, 2, 49, 1280) and maps.features.dtype == np.float16
    assert maps.features[0].nbytes == 2 * 125_440  # 125 KB a view on disk (fp16 7 x 7 x 1280)
    np.testing.assert_allclose(maps.features.astype(np.float32).mean(2), pooled.features.astype(np.float32),
                               atol=2e-2)  # the mean of the map is the pooled vector
    again = CountingEncoder()  # the pooled cache is as it was: found again, nothing extracted
    assert extract_features(images, "efficientnet_lite0", tmp_path, flip=True, quiet=True, encoder=again).path \
        == pooled.path and again.seen == 0
    with pytest.raises(ShowtellError, match=r"holds pooled features, but the model needs feature maps; extract"):
        check_spatial(pooled, spatial=True)
    with pytest.raises(ShowtellError, match=r"holds feature maps, but the model needs pooled features"):
        check_spatial(maps, spatial=False)
