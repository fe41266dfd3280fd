"""An attacker's probe of image loading: extreme shapes, decoder crashes on corrupt files, odd Python inputs, memory.

Every file is made here. The rule under test: one image's problem is that image's ImageError (or, for an input of
the wrong Python type, a TypeError before any work), and no image costs unbounded memory.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from showtell.errors import ImageError
from showtell.images import MAX_ASPECT, MAX_SIDE, load_image, prepare

REPO = Path(__file__).resolve().parents[1]


def _photo(w: int = 48, h: int = 32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1).astype(np.uint8))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    return _encoded(Image.new("RGB", (w, h), (200, 30, 30)), "PNG")


def _exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "camera"
    exif[0x011A] = 72.0  # XResolution, a rational
    return exif


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose EXIF (rotate 90) holds XResolution, a rational, as ASCII text: PIL's EXIF transpose raised
    TypeError on it (found by fuzzing), which used to escape load_image and stop a whole batch."""
    jpeg = _encoded(_photo(), "JPEG")
    segment = _exif_segment([(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x011A, 2, 4, b"cam\0")])
    return jpeg[:2] + segment + jpeg[2:]


# ---- 1. extreme aspect ratios -------------------------------------------------------------------------------------

def test_extreme_aspect_is_center_cropped_to_the_limit_before_any_resize(tmp_path):
    (tmp_path / "tall.png").write_bytes(_png(1, 60000))
    assert load_image(tmp_path / "tall.png").size == (1, MAX_ASPECT)
    assert load_image(_png(60000, 1)).size == (MAX_ASPECT, 1)
    stripe = np.zeros((10, 1000), np.uint8)
    stripe[:, 480:520] = 255  # only the middle is white
    cropped = np.asarray(load_image(stripe))
    assert cropped.shape == (10, 40, 3) and cropped.min() == 255
    assert load_image(_photo(400, 100)).size == (400, 100)  # 4:1 is kept whole


def test_the_crop_does_not_change_what_the_model_sees():
    from showtell.encoders import Preprocess, encoder_info

    transform = Preprocess.from_dict(encoder_info("efficientnet_lite0")["preprocess"]).transform(train=False)
    wide = _photo(900, 100)  # 9:1, cropped to 400x100
    before = transform(wide)
    after = transform(load_image(wide))
    assert load_image(wide).size == (400, 100)
    assert (after - before).abs().mean() < 0.02  # normalized units: the same center square, resampled alike


def test_a_side_over_the_limit_is_refused_before_decoding():
    with pytest.raises(ImageError, match=f"too large .*1x{MAX_SIDE + 1} pixels"):
        load_image(_png(1, MAX_SIDE + 1))


def _peak_rss_mib(code: str) -> tuple[float, float]:
    """(peak RSS before, after) running ``code`` in a fresh Python, in MiB."""
    script = textwrap.dedent(f"""
        import resource
        from showtell.images import load_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        {code}
        print(before / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    return before, after


def test_sixteen_bit_decode_needs_a_few_bytes_a_pixel_and_keeps_the_range(tmp_path):
    side = 4000
    values = (np.add.outer(np.arange(side), np.arange(side)) * 8 + 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "big16.png", compress_level=1)
    before, after = _peak_rss_mib(f"load_image({str(tmp_path / 'big16.png')!r})")
    # 2 (16-bit pixels) + 2 (scaled) + 1 (8-bit grey), then the 4-byte RGB result; float64 copies took 20 B/px
    assert (after - before) * 2**20 / side**2 < 10
    small = values[::50, ::50]
    img = np.asarray(load_image(Image.fromarray(small)))[:, :, 0].astype(int)
    lo, hi = int(small.min()), int(small.max())
    assert img.min() == 0 and img.max() == 255
    assert np.abs(img - (small.astype(float) - lo) * 255 / (hi - lo)).max() <= 1


@pytest.mark.slow
def test_cli_captions_extreme_images_under_a_memory_limit(tmp_path, tiny_checkpoint, photos):
    """1x60000 and 60000x1 PNGs of a few hundred bytes once took the CLI past 6 GiB (and a MemoryError traceback
    lost every caption); a normal run needs about 1 GiB of data segment."""
    import resource

    (tmp_path / "tall.png").write_bytes(_png(1, 60000))
    (tmp_path / "wide.png").write_bytes(_png(60000, 1))
    (tmp_path / "bad_exif.jpg").write_bytes(corrupt_exif_jpeg())
    limit = 3 * 2**30

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    files = [tmp_path / "tall.png", tmp_path / "wide.png", photos / "coffee.jpg", tmp_path / "bad_exif.jpg"]
    proc = subprocess.run([sys.executable, "-m", "showtell", "caption", "--model", str(tiny_checkpoint),
                           *map(str, files)], capture_output=True, text=True, preexec_fn=cap_memory, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    captioned = dict(line.split("\t")[:2] for line in proc.stdout.splitlines())  # path, caption[, tags]
    assert set(captioned) == {str(f) for f in files[:3]} and all(captioned.values())
    assert proc.stderr.strip().splitlines() == [f"showtell: error: {files[3]}: cannot decode image "
                                                "(bad operand type for abs(): 'str')"]


# ---- 2. decoders raising anything ---------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [struct.error("unpack requires a buffer of 4 bytes"), TypeError("bad operand"),
                                   IndexError("tuple index out of range"), NotImplementedError(),
                                   ZeroDivisionError("division by zero"), MemoryError(), RecursionError()])
def test_any_decoder_exception_is_that_images_error(monkeypatch, tmp_path, error):
    path = tmp_path / "odd.jpg"
    path.write_bytes(_encoded(_photo(), "JPEG"))

    def raise_it(*args, **kwargs):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", raise_it)
    with pytest.raises(ImageError, match=r"odd\.jpg: (cannot decode|not enough memory)"):
        load_image(path)


def test_interrupts_are_not_turned_into_image_errors(monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ImageFile.ImageFile, "load", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_image(_encoded(_photo(), "PNG"))


def truncated_qoi() -> bytes:  # PIL's QOI decoder raised IndexError
    data = _encoded(_photo(), "QOI")
    return data[: len(data) // 2]


def dds_with_unknown_pixel_format() -> bytes:  # PIL's DDS reader raised NotImplementedError
    data = bytearray(_encoded(_photo(), "DDS"))
    struct.pack_into("<I", data, 80, 0x200000)  # the pixel format's flags
    return bytes(data)


@pytest.mark.parametrize("make", [corrupt_exif_jpeg, truncated_qoi, dds_with_unknown_pixel_format])
def test_files_that_crashed_pillow_are_image_errors(make):
    data = make()
    with pytest.raises(ImageError, match=f"^<{len(data)} bytes>: cannot decode image"):
        load_image(data)


def test_a_failing_transform_is_that_images_error():
    def transform(img):
        raise RuntimeError("out of luck")

    assert prepare(_encoded(_photo(), "PNG"), transform).endswith("cannot prepare image (RuntimeError: out of luck)")
    assert prepare(b"junk", transform).endswith("not an image file (unrecognised format)")


def _seeds() -> dict[str, bytes]:
    photo = _photo(24, 16)
    exif = _exif().tobytes()
    grey16 = Image.fromarray((np.arange(24 * 16).reshape(16, 24) * 150).astype(np.uint16))
    rgba = photo.convert("RGBA")
    rgba.putalpha(100)
    frames = [photo, photo.rotate(90), photo.rotate(180)]
    return {
        "exif.jpg": _encoded(photo, "JPEG", exif=exif),
        "progressive.jpg": _encoded(photo, "JPEG", progressive=True, quality=80),
        "grey.jpg": _encoded(photo.convert("L"), "JPEG"),
        "cmyk.jpg": _encoded(photo.convert("CMYK"), "JPEG"),
        "rgb.png": _encoded(photo, "PNG", exif=exif),
        "rgba.png": _encoded(rgba, "PNG"),
        "grey16.png": _encoded(grey16, "PNG"),
        "palette.png": _encoded(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "raw.tif": _encoded(photo, "TIFF", exif=exif),
        "lzw.tif": _encoded(photo, "TIFF", compression="tiff_lzw"),
        "packbits.tif": _encoded(photo, "TIFF", compression="packbits"),
        "jpeg.tif": _encoded(photo, "TIFF", compression="jpeg"),
        "grey16.tif": _encoded(grey16, "TIFF"),
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "img.webp": _encoded(photo, "WEBP"),
        "img.bmp": _encoded(photo, "BMP"),
        "img.qoi": _encoded(photo, "QOI"),
        "img.dds": _encoded(photo, "DDS"),
    }


SEEDS = _seeds()
EXIF_TAGS = [0x0112, 0x010F, 0x011A, 0x011B, 0x0128, 0x0131, 0x8769, 0x8825, 0x9003, 0x927C, 0xA002, 0x0201]


def _exif_segment(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A JPEG APP1 Exif segment holding one IFD of (tag, type, count, 4-byte value) entries, made up at will."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    body = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def _png_exif_chunk(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))


def _mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, *args in ops:
        at = args[0] % (len(out) + 1) if args and isinstance(args[0], int) else 0
        if op == "flip" and out:
            out[at % len(out)] ^= 1 << args[1]
        elif op == "set" and out:
            out[at % len(out)] = args[1]
        elif op == "truncate":
            del out[at:]
        elif op == "delete":
            del out[at:at + args[1]]
        elif op == "insert":
            out[at:at] = args[1]
        elif op == "exif":  # after a JPEG's SOI, or as a PNG chunk after IHDR; elsewhere just bytes
            segment = _exif_segment(args[0])
            if out[:2] == b"\xff\xd8":
                out[2:2] = segment
            elif out[:4] == b"\x89PNG":
                out[33:33] = _png_exif_chunk(segment[10:])
            else:
                out[:0] = segment
    return bytes(out)


position = st.integers(0, 2**20)
exif_entries = st.lists(st.tuples(st.sampled_from(EXIF_TAGS), st.integers(0, 13), st.integers(0, 2**32 - 1)
                                  | st.integers(0, 4), st.binary(min_size=4, max_size=4)), max_size=6)
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(0, 7)),
    st.tuples(st.just("set"), position, st.integers(0, 255)),
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("delete"), position, st.integers(1, 64)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("exif"), exif_entries),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SEEDS)), st.lists(mutation, min_size=1, max_size=4))
def test_fuzzed_files_load_as_bounded_rgb_or_raise_image_error(seed, ops):
    data = _mutate(SEEDS[seed], ops)
    try:
        img = load_image(data)
    except ImageError as e:
        assert str(e).startswith(f"<{len(data)} bytes>: ")
        return
    w, h = img.size
    assert img.mode == "RGB" and 1 <= w * h <= Image.MAX_IMAGE_PIXELS
    assert max(w, h) <= MAX_ASPECT * min(w, h) and max(w, h) <= MAX_SIDE


def test_unmutated_seeds_all_load():
    for name, data in SEEDS.items():
        assert load_image(data).size in ((24, 16), (16, 24)), name  # exif.jpg says: rotate


# ---- 3. Python input types ----------------------------------------------------------------------------------------

def test_numpy_arrays_are_images():
    rgb = np.asarray(_photo())
    as_pil = np.asarray(load_image(Image.fromarray(rgb)))
    assert np.array_equal(np.asarray(load_image(rgb)), as_pil)
    assert np.array_equal(np.asarray(load_image(rgb[:, ::-1])), as_pil[:, ::-1])  # a strided view
    assert np.array_equal(np.asarray(load_image(rgb / 255.0)), as_pil)  # float in [0, 1]
    assert np.array_equal(np.asarray(load_image(rgb.astype(np.float32) / 255)), as_pil)
    grey = rgb[:, :, 0]
    assert np.array_equal(np.asarray(load_image(grey)), np.repeat(grey[:, :, None], 3, axis=2))
    assert np.array_equal(np.asarray(load_image(grey[:, :, None])), np.asarray(load_image(grey)))
    rgba = np.dstack([rgb, np.zeros_like(grey)])  # fully transparent: white, like a PNG
    assert np.asarray(load_image(rgba)).min() == 255


@pytest.mark.parametrize("array, message", [
    (np.full((4, 4, 3), 200.0), r"float array values must lie in \[0, 1\], found \[200, 200\]"),
    (np.full((4, 4), np.nan), r"float array values must lie in \[0, 1\]"),
    (np.zeros((4, 4), np.int64), "dtype uint8 .* or float"),
    (np.zeros((4, 4), bool), "dtype uint8 .* or float"),
    (np.zeros((3, 4, 4, 3), np.uint8), "shape HxW, HxWx1, HxWx3"),
    (np.zeros((4, 4, 2), np.uint8), "shape HxW, HxWx1, HxWx3"),
    (np.zeros((0, 4, 3), np.uint8), "no pixels"),
])
def test_unusable_arrays_are_image_errors_naming_the_array(array, message):
    with pytest.raises(ImageError, match=rf"^<array {'x'.join(map(str, array.shape))} {array.dtype}>: .*{message}"):
        load_image(array)


def test_bytes_like_inputs_are_image_files():
    data = _encoded(_photo(), "PNG")
    expected = np.asarray(load_image(data))
    for src in (bytearray(data), memoryview(data)):
        assert np.array_equal(np.asarray(load_image(src)), expected)
    with pytest.raises(ImageError, match="<0 bytes>: empty upload"):
        load_image(bytearray())


@pytest.mark.parametrize("src", [5, {"image": "a.jpg"}, None, [1, 2, 3]])
def test_other_types_are_type_errors_naming_the_accepted_ones(src):
    with pytest.raises(TypeError, match="path, bytes, bytearray, memoryview, PIL image or numpy array"):
        load_image(src)


def test_a_torch_tensor_is_refused_with_the_way_to_convert_it():
    import torch

    with pytest.raises(TypeError, match=r"not torch\.Tensor.*to_pil_image"):
        load_image(torch.zeros(3, 8, 8))


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    import showtell

    return showtell.load(tiny_checkpoint)


def test_a_broken_image_between_good_ones_is_only_its_own_error(captioner, photos):
    good = photos / "chelsea.jpg"
    results = captioner.caption([good, corrupt_exif_jpeg(), good.read_bytes()], beam_size=2)
    assert [r.ok for r in results] == [True, False, True]
    assert results[0].caption and results[0].caption == results[2].caption
    assert "cannot decode image" in results[1].error


def test_caption_takes_an_array_or_buffer_as_one_image(captioner, photos):
    import torch

    data = (photos / "chelsea.jpg").read_bytes()
    array = np.asarray(load_image(data))
    by_path = captioner.caption(photos / "chelsea.jpg", beam_size=2)
    for one in (array, bytearray(data), memoryview(data), Image.fromarray(array)):
        results = captioner.caption(one, beam_size=2)
        assert len(results) == 1 and results[0].caption == by_path[0].caption, type(one)
    assert len(captioner.caption(iter([data, data]), beam_size=1)) == 2  # an iterator is a list of images
    with pytest.raises(TypeError, match="torch.Tensor"):
        captioner.caption(torch.zeros(3, 8, 8))


def test_caption_refuses_a_list_with_a_non_image_before_any_work(captioner, photos, monkeypatch):
    loaded = []
    monkeypatch.setattr(type(captioner), "_load", lambda self, src: loaded.append(src))
    with pytest.raises(TypeError, match="not int"):
        captioner.caption([photos / "chelsea.jpg"] * 20 + [5], batch_size=4)
    assert loaded == []


def test_postscript_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    """Pillow opens EPS files by running Ghostscript; an upload must never start a program."""
    import subprocess

    def no_programs(*args, **kwargs):
        raise AssertionError(f"a program was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", no_programs)
    monkeypatch.setattr(subprocess, "check_call", no_programs)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    for src in (eps, tmp_path / "x.eps"):
        if isinstance(src, Path):
            src.write_bytes(eps)
        with pytest.raises(ImageError, match="unrecognised format"):
            load_image(src)
