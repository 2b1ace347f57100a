"""Shared fixtures: small real photos from scikit-image, written to a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _openvino_exports_in_a_temporary_folder(tmp_path_factory):
    """OpenVINO exports (engine "auto" on a CPU) go to a temporary REMAP_CACHE_DIR, never to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REMAP_CACHE_DIR", str(tmp_path_factory.mktemp("remap_cache")))
        yield


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Six real photos (scikit-image's data), resized to 128 px on the longer side."""
    from skimage import data as skdata

    out = tmp_path_factory.mktemp("photos")
    for name in ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg",
                 "motorcycle_left.png", "motorcycle_right.png"]:
        with Image.open(Path(skdata.data_dir) / name) as img:
            img = img.convert("RGB")
            img.thumbnail((128, 128))
            img.save(out / (Path(name).stem + ".png"))
    return out


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its real ImageNet weights (offline)."""
    from remap_lib.nets.backbones import build_backbone

    return build_backbone("efficientnet_lite0")


@pytest.fixture
def write_collection(photo_dir):
    """``write(folder, n, longer_side=None)``: ``n`` distinct images, crops of the six photos at varied offsets
    and sizes (optionally resized back to ``longer_side``), for runs long enough to kill, limit or race."""
    import numpy as np

    def write(folder: Path, n: int, longer_side: int | None = None) -> Path:
        folder.mkdir()
        photos = [Image.open(p).convert("RGB") for p in sorted(photo_dir.glob("*.png"))]
        rng = np.random.default_rng(0)
        for i in range(n):
            img = photos[i % len(photos)]
            w, h = img.size
            cw, ch = int(rng.integers(3 * w // 4, w + 1)), int(rng.integers(3 * h // 4, h + 1))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = img.crop((x, y, x + cw, y + ch))
            if longer_side:
                scale = longer_side / max(cw, ch)
                crop = crop.resize((round(cw * scale), round(ch * scale)))
            crop.save(folder / f"img{i:03d}.png")
        return folder

    return write
