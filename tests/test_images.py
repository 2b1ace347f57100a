"""Bad and unusual images (remap_lib.data.images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from remap_lib.data.images import ImageLoadError, load_image, resize_longer_side, to_tensor


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


# ---------------------------------------------------------------------- issue 25, item 8a
def test_formats_the_loader_cannot_read_are_listed_and_refused_by_suffix(tmp_path):
    """A .heic (no decoder here) and a .dng (TIFF inside: must not be read as its preview) are refused,
    with the format in the reason; a folder lists them, and still ignores files that are not images."""
    from remap_lib.data.images import list_images

    (tmp_path / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    _photo((300, 200)).save(tmp_path / "raw.dng", "TIFF")  # PIL would decode this content as a TIFF
    _photo().save(tmp_path / "plain.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert list_images(tmp_path) == [str(tmp_path / n) for n in ("phone.HEIC", "plain.png", "raw.dng")]
    with pytest.raises(ImageLoadError, match=r"unsupported image format \(\.heic\).*convert the file to JPEG"):
        load_image(tmp_path / "phone.HEIC")
    with pytest.raises(ImageLoadError, match=r"unsupported image format \(\.dng\)"):
        load_image(tmp_path / "raw.dng")


def test_formats_this_pillow_can_decode_are_read(tmp_path):
    from PIL import features

    if not features.check("jpg_2000"):
        pytest.skip("this Pillow has no JPEG 2000 codec")
    img = _photo((64, 48))
    img.save(tmp_path / "a.jp2", irreversible=False)  # lossless
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.jp2")), np.asarray(img))


def test_pixels_become_exactly_the_tensor_of_the_image():
    """The pipe fallback of loader workers sends uint8 pixels; the tensor made of them must be the same."""
    import torch

    from remap_lib.data.images import pixels_to_tensor, to_pixels

    img = _photo((97, 61))
    pixels = to_pixels(img)
    assert pixels.dtype == np.uint8 and pixels.shape == (61, 97, 3)
    pixels.setflags(write=False)  # as a pickled array may arrive
    t = pixels_to_tensor(pixels)
    expected = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    assert torch.equal(t, expected) and torch.equal(to_tensor(img), expected)
