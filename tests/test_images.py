"""Bad and unusual images (remap_lib.images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from remap_lib.images import ImageLoadError, load_image, resize_longer_side, to_tensor


def _photo(size=(60, 40)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_missing_corrupt_and_truncated_files_are_clear_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(tmp_path / "corrupt.jpg")
    buf = io.BytesIO()
    _photo((300, 200)).save(buf, "JPEG", quality=95)
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(tmp_path / "truncated.jpg")


def test_exif_rotation_is_applied(tmp_path):
    img = _photo((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (40, 60)


def test_grayscale_cmyk_palette_become_rgb(tmp_path):
    Image.new("L", (50, 40), 77).save(tmp_path / "gray.png")
    out = np.asarray(load_image(tmp_path / "gray.png"))
    assert out.shape == (40, 50, 3) and (out == 77).all()
    Image.new("CMYK", (50, 40), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB" and np.asarray(out).min() > 240  # no ink = white
    _photo().convert("P").save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").mode == "RGB"


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue
    rgba.save(tmp_path / "alpha.png")
    out = np.asarray(load_image(tmp_path / "alpha.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [255, 0, 0]
    assert np.abs(out[0, 1] - [127, 127, 255]).max() <= 1


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(40, 0).repeat(10, 1)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = np.asarray(load_image(tmp_path / "deep.png"))[0, ::10, 0]
    assert out.tolist() == [0, 128, 255, 4]


def test_float_images_and_nan_are_refused(tmp_path):
    arr = np.full((40, 40), np.nan, dtype=np.float32)
    Image.fromarray(arr, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageLoadError, match="floating-point"):
        load_image(tmp_path / "nan.tif")


def test_pixel_limit_and_too_small_images(tmp_path):
    _photo((100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(tmp_path / "big.png", max_pixels=5000)
    thin = Image.new("RGB", (2000, 40))
    with pytest.raises(ImageLoadError, match="too small or too elongated"):
        resize_longer_side(thin, 1024)
    tiny = Image.new("RGB", (12, 9))
    assert resize_longer_side(tiny, 1024).size == (1024, 768)  # upscaled to the common scale


def test_resize_keeps_aspect_and_to_tensor_range():
    img = resize_longer_side(_photo((400, 300)), 128)
    assert img.size == (128, 96)
    t = to_tensor(img)
    assert t.shape == (3, 96, 128) and t.dtype.is_floating_point and 0 <= t.min() and t.max() <= 1
