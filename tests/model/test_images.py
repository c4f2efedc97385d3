"""Photo decoding: every bad-image kind is built for real and named; expected kinds are converted."""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from facepq_core.errors import BadImage
from opqn_model.images import MIN_SIDE, load_image, load_image_with_note


def _photo(size=(80, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # a smooth gradient plus noise: compresses like a photo, not like flat colour
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([xx * 3, yy * 3, (xx + yy) * 2], axis=-1) % 256
    return Image.fromarray(np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _reason(source) -> str:
    with pytest.raises(BadImage) as info:
        load_image(source)
    return info.value.reason


def test_rgb_jpeg_decodes_to_uint8_rgb_without_note(tmp_path):
    path = _write(tmp_path, "ok.jpg", _encode(_photo(), "JPEG", quality=95))
    image, note = load_image_with_note(path)
    assert image.dtype == np.uint8 and image.shape == (64, 80, 3) and note is None
    assert image.flags.c_contiguous


def test_bytes_and_pathlike_sources_give_the_same_pixels(tmp_path):
    data = _encode(_photo(), "PNG")
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    assert np.array_equal(load_image(data), load_image(path))
    assert np.array_equal(load_image(path), np.asarray(_photo()))


def test_jpeg_cut_in_half_is_truncated(tmp_path):
    data = _encode(_photo((200, 200)), "JPEG", quality=90)
    assert _reason(_write(tmp_path, "half.jpg", data[: len(data) // 2])) == "truncated"


def test_truncation_is_detected_even_when_pil_is_told_to_load_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    jpeg = _encode(_photo((200, 200)), "JPEG", quality=90)
    png = _encode(_photo((200, 200)), "PNG")
    assert _reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert _reason(png[: len(png) // 2]) == "truncated"


def test_png_cut_in_half_is_truncated(tmp_path):
    data = _encode(_photo((200, 200)), "PNG")
    assert _reason(_write(tmp_path, "half.png", data[: len(data) // 2])) == "truncated"


def test_valid_jpeg_header_with_garbage_data_is_corrupt(tmp_path):
    data = _encode(_photo((200, 200)), "JPEG", quality=90)
    scan = data.find(b"\xff\xda")  # keep every header segment up to the scan, then garbage + end marker
    garbage = np.random.default_rng(1).integers(0, 256, len(data) - scan, dtype=np.uint8).tobytes()
    path = _write(tmp_path, "corrupt.jpg", data[: scan + 14] + garbage + b"\xff\xd9")
    assert _reason(path) == "corrupt"


def test_png_with_garbage_image_data_is_corrupt(tmp_path):
    data = bytearray(_encode(_photo((100, 100)), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 10 : idat + 400] = np.random.default_rng(2).integers(0, 256, 390, dtype=np.uint8).tobytes()
    assert _reason(_write(tmp_path, "corrupt.png", bytes(data))) == "corrupt"


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    assert _reason(_write(tmp_path, "notes.jpg", b"this is a shopping list, not a photo\n")) == "not_an_image"


def test_empty_file_is_not_an_image(tmp_path):
    assert _reason(_write(tmp_path, "empty.jpg", b"")) == "not_an_image"


def test_missing_file_and_folder_are_unreadable(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "unreadable"
    assert _reason(tmp_path) == "unreadable"


def test_file_without_read_permission_is_unreadable(tmp_path):
    if os.geteuid() != 0:
        path = _write(tmp_path, "secret.png", _encode(_photo(), "PNG"))
        os.chmod(path, 0)
        assert _reason(path) == "unreadable"
        return
    # Root reads any file: the check runs in a child without the capabilities that let
    # root ignore file permissions (setpriv, util-linux, is on every Debian machine).
    import shutil
    import subprocess
    import sys

    if not shutil.which("setpriv"):
        pytest.fail("running as root needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE for this test")
    path = _write(tmp_path, "secret.png", _encode(_photo(), "PNG"))
    os.chmod(path, 0)
    code = ("import sys\nfrom facepq_core.errors import BadImage\nfrom opqn_model.images import load_image\n"
            "try:\n    load_image(sys.argv[1])\nexcept BadImage as e:\n    print(e.reason)\n")
    out = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code,
                          str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "unreadable", out.stderr


def test_tiny_image_is_refused_and_min_side_is_accepted(tmp_path):
    assert _reason(_write(tmp_path, "tiny.png", _encode(_photo((10, 10)), "PNG"))) == "tiny"
    assert _reason(_write(tmp_path, "thin.png", _encode(_photo((200, MIN_SIDE - 1)), "PNG"))) == "tiny"
    assert load_image(_write(tmp_path, "ok.png", _encode(_photo((MIN_SIDE, MIN_SIDE)), "PNG"))).shape == (32, 32, 3)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_header_is_too_large(tmp_path):
    # a real PNG header claiming 100000 x 100000 pixels (10 G pixels) with a tiny body
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) \
        + _png_chunk(b"IEND", b"")
    assert _reason(_write(tmp_path, "bomb.png", data)) == "too_large"


def test_grey_image_is_converted(tmp_path):
    grey = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    image, note = load_image_with_note(_write(tmp_path, "grey.png", _encode(grey, "PNG")))
    assert note == "converted_grey" and image.shape == (64, 64, 3)
    assert np.array_equal(image[:, :, 0], np.asarray(grey)) and np.array_equal(image[:, :, 2], np.asarray(grey))


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    image16 = Image.fromarray(values)
    path = _write(tmp_path, "deep.png", _encode(image16, "PNG"))
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    image, note = load_image_with_note(path)
    assert note == "converted_16bit"
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    middle = image[32, 0, 0]
    assert 120 <= middle <= 135  # mid-range stays mid-grey (clipping would give 255)
    assert len(np.unique(image[:, :, 0])) > 200  # the full 8-bit range is used


def test_cmyk_jpeg_is_converted(tmp_path):
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red ink-wise
    path = _write(tmp_path, "cmyk.jpg", _encode(cmyk, "JPEG", quality=95))
    assert Image.open(path).mode == "CMYK"
    image, note = load_image_with_note(path)
    assert note == "converted_cmyk"
    red, green, blue = image.reshape(-1, 3).mean(0)
    assert red > 200 and green < 60 and blue < 60


def test_rgba_png_is_composited_over_white(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)  # opaque red left half
    rgba[:, 32:] = (0, 0, 255, 0)  # fully transparent right half
    image, note = load_image_with_note(_write(tmp_path, "alpha.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert note == "converted_rgba"
    assert tuple(image[10, 10]) == (255, 0, 0) and tuple(image[10, 50]) == (255, 255, 255)


def test_palette_images_are_converted(tmp_path):
    palette = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    _, note = load_image_with_note(_write(tmp_path, "pal.png", _encode(palette, "PNG")))
    assert note == "converted_palette"
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    image, note = load_image_with_note(_write(tmp_path, "pal_t.png", _encode(transparent, "PNG", transparency=0)))
    assert note == "converted_rgba" and image.shape == (64, 80, 3)


def test_pgm_and_bmp_and_webp_and_tiff_decode(tmp_path):
    for fmt, ext in (("PPM", "pgm"), ("BMP", "bmp"), ("WEBP", "webp"), ("TIFF", "tif")):
        source = _photo().convert("L") if ext == "pgm" else _photo()
        image = load_image(_write(tmp_path, f"x.{ext}", _encode(source, fmt)))
        assert image.shape == (64, 80, 3), fmt


def test_random_bytes_never_raise_anything_but_bad_image():
    rng = np.random.default_rng(3)
    prefixes = [b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]
    for i in range(60):
        data = prefixes[i % len(prefixes)] + rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
        with pytest.raises(BadImage):
            load_image(data)
