"""Reading user images robustly, and resizing them for the network.

Every image goes through :func:`load_image`, which either returns an 8-bit RGB
``PIL.Image`` in its upright orientation or raises :class:`ImageLoadError`
naming the file and the reason.  The handling of unusual inputs, all logged:

===================  =====================================================
input                handling
===================  =====================================================
missing / unreadable error
corrupt, truncated   error (a truncated JPEG is *not* silently grey-filled)
EXIF orientation     applied (the photo is rotated upright first)
grayscale, 1-bit     replicated to RGB
palette              converted (through RGBA when it has transparency)
alpha (RGBA, LA)     composited onto white (transparent areas read as white)
CMYK, YCbCr, LAB     converted to RGB by PIL
16/32-bit integer    rescaled from the full range of its bit depth to 8 bits
floating point       error (no agreed range; convert the file first)
too many pixels      error above ``max_pixels`` (decompression-bomb guard)
too small            error when the shorter side after resizing is < 32 px
HEIC, RAW, SVG...    listed from folders, error unless this Pillow reads
                     the format (:data:`OTHER_IMAGE_EXTENSIONS`)
===================  =====================================================
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "OTHER_IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageSpec",
    "load_spec",
    "load_thumbnail",
    "list_images",
    "load_image",
    "pixels_to_tensor",
    "resize_longer_side",
    "to_pixels",
    "to_tensor",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
# Image formats a folder may hold that Pillow reads only with an optional
# codec or plugin (HEIC, AVIF, JPEG 2000...) or not at all (camera RAW, SVG,
# EXR).  Folders list them too, so that the files the loader cannot read are
# reported as failed instead of being skipped silently; :func:`load_image`
# refuses them by suffix unless this Pillow registers a decoder for it (a
# RAW file must not be read as the small TIFF preview inside it).
OTHER_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".psd", ".svg", ".svgz", ".dng",
                          ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".exr", ".hdr")
DEFAULT_MAX_PIXELS = 200_000_000
MIN_SIDE = 32  # one feature-map cell at stride 32


class ImageLoadError(ValueError):
    """An image that cannot be used, with its path and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ImageSpec:
    """An image to describe: a file, optionally cropped (``box`` in pixels) and rotated.

    ``box`` is ``(x0, y0, x1, y1)`` in the upright image; ``rotate`` is a
    counter-clockwise angle in degrees (multiples of 90), applied first.
    """

    path: str
    box: tuple[float, float, float, float] | None = None
    rotate: int = 0

    @property
    def key(self) -> str:
        """A string naming this exact input (used to resume extractions)."""
        key = self.path
        if self.rotate:
            key += f"|rot={self.rotate}"
        if self.box is not None:
            key += "|crop=" + ",".join(f"{v:.2f}" for v in self.box)
        return key


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursively), sorted, by extension.

    Broken symbolic links with an image extension are listed too, and so are
    files of the :data:`OTHER_IMAGE_EXTENSIONS` formats, so that the
    extraction reports them as failed (with their target, or the format)
    instead of silently describing fewer images than the folder shows.
    File names need not be valid UTF-8: they come back as ``os.fsdecode``
    gives them (undecodable bytes as lone surrogates), which opens the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    suffixes = IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in suffixes and (p.is_file() or (p.is_symlink() and not p.exists())))


def _unreadable_format(path) -> str | None:
    """Why ``path`` is not decoded, judged by its suffix alone, or ``None`` to try it.

    Only :data:`OTHER_IMAGE_EXTENSIONS` are judged: such a file is tried when
    this Pillow registers a decoder for its suffix (a codec built in, or a
    plugin such as pillow-heif that was registered), and refused otherwise.
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in OTHER_IMAGE_EXTENSIONS:
        return None
    Image.init()
    if Image.registered_extensions().get(suffix) in Image.OPEN:
        return None
    return (f"unsupported image format ({suffix}): the image loader (Pillow) has no decoder for it; "
            f"convert the file to JPEG or PNG")


def _to_rgb(img: Image.Image, path) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        bits = 16 if mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 32
        log.info("%s: %d-bit image rescaled to 8 bits", path, bits)
        arr = np.clip(arr.astype(np.float64) * (255.0 / (2**bits - 1)), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        raise ImageLoadError(path, "floating-point images are not supported; save it as 8- or 16-bit")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        log.info("%s: alpha channel composited onto white", path)
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode not in ("L", "1"):
        log.info("%s: %s image converted to RGB", path, mode)
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an upright 8-bit RGB image, or raise :class:`ImageLoadError`."""
    if not os.path.isfile(path):
        if os.path.islink(path):
            raise ImageLoadError(path, f"broken symbolic link (to {os.readlink(path)})")
        raise ImageLoadError(path, "file not found")
    unreadable = _unreadable_format(path)
    if unreadable:
        raise ImageLoadError(path, unreadable)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(
                    path, f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}; raise the limit "
                    "if the file is trusted"
                )
            img.load()  # decode now, so corrupt or truncated data fails here
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, path)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file PIL can identify (corrupt or unsupported)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, f"cannot decode ({exc}); the file may be truncated or corrupt") from None


def resize_longer_side(img: Image.Image, size: int, path="<image>") -> Image.Image:
    """Resize keeping the aspect ratio so that the longer side is ``size`` pixels.

    Resizes in both directions; whether small images are enlarged at all is the
    caller's choice (:func:`remap_lib.describe.extract.scaled_sizes`).  Raises
    :class:`ImageLoadError` if the shorter side would be under 32 pixels (less
    than one feature cell).
    """
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if min(new) < MIN_SIDE:
        raise ImageLoadError(
            path, f"{w}x{h} image is too small or too elongated: resized to {new[0]}x{new[1]}, "
            f"its shorter side is under {MIN_SIDE} pixels"
        )
    if new == (w, h):
        return img
    return img.resize(new, Image.BILINEAR)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float32 in ``[0, 1]``."""
    return pixels_to_tensor(to_pixels(img))


def to_pixels(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8: the image's pixels, a quarter of the bytes of its tensor.

    Loader workers fall back to handing these over through a pipe when they
    cannot place a tensor in shared memory; :func:`pixels_to_tensor` then
    gives exactly the tensor :func:`to_tensor` would have.
    """
    return np.asarray(img, dtype=np.uint8)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """:func:`to_pixels`'s array → ``(3, H, W)`` float32 in ``[0, 1]`` (copied: the input may be read-only)."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def load_spec(spec: "ImageSpec | str", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an :class:`ImageSpec`: the upright image, rotated, then cropped to its box."""
    if not isinstance(spec, ImageSpec):
        spec = ImageSpec(os.fspath(spec))
    img = load_image(spec.path, max_pixels)
    if spec.rotate % 360:
        if spec.rotate % 90:
            raise ImageLoadError(spec.path, f"rotation must be a multiple of 90 degrees, got {spec.rotate}")
        img = img.rotate(spec.rotate, expand=True)
    if spec.box is not None:
        x0, y0, x1, y1 = spec.box
        w, h = img.size
        box = (max(0, round(x0)), max(0, round(y0)), min(w, round(x1)), min(h, round(y1)))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise ImageLoadError(spec.path, f"crop box {spec.box} lies outside the {w}x{h} image")
        img = img.crop(box)
    return img


def load_thumbnail(spec: "ImageSpec | str", size: int) -> Image.Image:
    """:func:`load_spec`, shrunk to fit a ``size`` × ``size`` box (for figures and browsers)."""
    img = load_spec(spec)
    img.thumbnail((size, size))
    return img
