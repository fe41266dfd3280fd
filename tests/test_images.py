import os

import pytest
from badimages import make_catalogue
from PIL import Image

from showtell.errors import ImageError
from showtell.images import expand_paths, load_image


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_catalogue(tmp_path_factory.mktemp("bad"))


def test_catalogue_each_loads_as_rgb_or_fails_naming_the_file(catalogue):
    for name, (path, expected) in catalogue.items():
        if name == "no_permission.jpg" and os.geteuid() == 0:
            expected = "ok"  # root reads any file
        if expected == "ok":
            img = load_image(path)
            assert img.mode == "RGB" and img.width >= 1, name
        else:
            with pytest.raises(ImageError, match=name.replace(".", r"\.")):
                load_image(path)


def test_conversions_keep_content(catalogue):
    sixteen = load_image(catalogue["sixteen_bit.png"][0])
    assert sixteen.getextrema()[0] == (0, 255)  # scaled, not clipped to white
    rotated = load_image(catalogue["exif_rotated.jpg"][0])
    assert rotated.size == (64, 96)  # EXIF orientation applied
    rgba = load_image(catalogue["rgba.png"][0])
    assert rgba.mode == "RGB"


def test_bytes_and_pil_inputs(catalogue):
    data = catalogue["grayscale.jpg"][0].read_bytes()
    assert load_image(data).mode == "RGB"
    assert load_image(Image.new("L", (4, 4))).mode == "RGB"
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"GIF89a garbage")


def test_missing_file():
    with pytest.raises(ImageError, match="nope.jpg: no such file"):
        load_image("nope.jpg")


def test_expand_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg"):
        Image.new("RGB", (2, 2)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in expand_paths([tmp_path])] == ["a.PNG", "b.jpg", "c.jpeg"]
    assert expand_paths([tmp_path / "x.jpg"]) == [tmp_path / "x.jpg"]
