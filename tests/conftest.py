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
    from remap_lib.backbones import build_backbone

    return build_backbone("efficientnet_lite0")
