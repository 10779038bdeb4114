"""One image at a time: every odd input becomes a clean R x R RGB JPEG or a reasoned rejection."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_prep import images as imgs
from tests.data_helpers import bad_and_odd_images, exif_rotated_jpeg, jpeg_bytes, photo, png_bytes

ZOO = bad_and_odd_images()


def _open(jpg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG"
    return img


@pytest.mark.parametrize("name", sorted(ZOO))
def test_each_zoo_input_becomes_an_rgb_square_jpeg_or_a_reasoned_skip(name):
    data, reason = ZOO[name]
    if reason is None:
        out = _open(imgs.process_bytes(data, resolution=24, quality=90))
        assert out.size == (24, 24) and out.mode == "RGB"
    else:
        with pytest.raises(imgs.ImageRejected, match=reason):
            imgs.process_bytes(data, resolution=24)


def test_exif_orientation_is_applied_before_cropping():
    img = imgs.decode(exif_rotated_jpeg())
    assert img.size == (20, 40)  # stored 40x20, shown rotated
    arr = np.asarray(img).astype(int)
    assert arr[2, 10, 0] > 200 and arr[2, 10, 2] < 60  # top is red
    assert arr[37, 10, 2] > 200 and arr[37, 10, 0] < 60  # bottom is blue


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    arr = np.asarray(imgs.decode(png_bytes(grey)))
    assert arr.shape == (8, 8, 3) and abs(int(arr[0, 0, 0]) - 128) <= 1


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(imgs.decode(png_bytes(clear)))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    assert np.asarray(imgs.decode(png_bytes(pal, transparency=0)))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_keeps_its_colours():
    red = Image.new("RGB", (16, 16), (220, 30, 30)).convert("CMYK")
    out = io.BytesIO()
    red.save(out, "JPEG", quality=95)
    r, g, b = np.asarray(imgs.decode(out.getvalue()))[8, 8].astype(int)
    assert r > 180 and g < 80 and b < 80


def test_center_crop_keeps_the_middle_of_a_wide_image():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # white middle third, black sides
    out = np.asarray(_open(imgs.process_bytes(png_bytes(Image.fromarray(arr)), resolution=16))).astype(int)
    assert out.mean() > 230


def test_max_side_keeps_aspect_ratio_within_bounds():
    out = _open(imgs.process_bytes(jpeg_bytes(photo(400, 200)), resolution=32, max_side=96))
    assert out.size == (96, 48)
    tall = _open(imgs.process_bytes(jpeg_bytes(photo(30, 900)), resolution=32, max_side=96))
    assert min(tall.size) == 30 and max(tall.size) <= 96  # never upscaled; the long side's ends are cut
    small = _open(imgs.process_bytes(jpeg_bytes(photo(20, 20)), resolution=32, max_side=96))
    assert small.size == (20, 20)


@pytest.mark.parametrize(("w", "h"), [(1000, 700), (700, 1000), (64, 64), (20, 5000)])
def test_output_size_contract(w, h):
    ow, oh = imgs.output_size(w, h, 64, 160)
    assert max(ow, oh) <= 160
    assert min(ow, oh) >= min(64, w, h)
    assert imgs.output_size(w, h, 64, None) == (64, 64)


def test_large_jpeg_uses_draft_decoding_and_matches_full_decode():
    data = jpeg_bytes(photo(1600, 1200, 9))
    fast = np.asarray(_open(imgs.process_bytes(data, resolution=64, quality=95))).astype(float)
    full = imgs.encode_jpeg(imgs.crop_resize(imgs.decode(data), 64), 95)
    assert np.abs(fast - np.asarray(_open(full)).astype(float)).mean() < 4.0


def test_quality_changes_the_encoding():
    data = jpeg_bytes(photo(128, 128, 10))
    assert len(imgs.process_bytes(data, 64, quality=50)) < len(imgs.process_bytes(data, 64, quality=98))


def test_array_sources_accept_grey_and_rgb_and_reject_others():
    assert _open(imgs.process_array(np.zeros((8, 8), np.uint8), 16)).size == (16, 16)
    assert _open(imgs.process_array(np.zeros((8, 8, 3), np.uint8), 16)).mode == "RGB"
    with pytest.raises(imgs.ImageRejected):
        imgs.process_array(np.zeros((8, 8), np.float32), 16)
