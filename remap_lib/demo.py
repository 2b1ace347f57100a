"""A first look: describe a few real photographs that ship with scikit-image.

The set holds a real two-view pair (scikit-image's Middlebury stereo
``motorcycle_left``/``motorcycle_right``), a generated second view of
``chelsea`` (a crop with a small rotation and a brightness change, so the
match is known by construction) and unrelated photos.  Each pair should be
more similar to its partner than to anything else, for every head.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .config import HEADS, ModelConfig
from .extract import extract_descriptors
from .model import RetrievalModel

__all__ = ["demo_images", "run_demo"]

PHOTOS = ["motorcycle_left.png", "motorcycle_right.png", "chelsea.png", "astronaut.png",
          "coffee.png", "rocket.jpg"]


def demo_images(workdir: str | os.PathLike) -> list[str]:
    """Paths of the demo photos; the generated chelsea view is written to ``workdir``."""
    from PIL import Image, ImageEnhance
    from skimage import data as skdata

    src = Path(skdata.data_dir)
    paths = [str(src / name) for name in PHOTOS]
    with Image.open(src / "chelsea.png") as img:
        w, h = img.size
        view = img.convert("RGB").crop((int(0.1 * w), int(0.05 * h), int(0.85 * w), int(0.95 * h)))
        view = view.rotate(8, resample=Image.BILINEAR, expand=False)
        view = ImageEnhance.Brightness(view).enhance(0.7)
    out = Path(workdir) / "chelsea_view.png"
    view.save(out)
    paths.insert(3, str(out))
    return paths


def run_demo(image_size: int = 512, out_dir: str | os.PathLike | None = None, heads=HEADS) -> dict:
    """Describe the demo photos with every head and print each cosine-similarity matrix."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_images(tmp)
        names = [Path(p).stem for p in paths]
        for head in heads:
            model = RetrievalModel(ModelConfig(head=head, image_sizes=[image_size]))
            desc = extract_descriptors(model, paths, progress=False, num_workers=0).descriptors
            sim = desc @ desc.T
            results[head] = sim
            print(f"\n{head.upper()} ({model.output_dim}-d, {model.config.backbone}, layers "
                  f"{','.join(model.layers)}): cosine similarity")
            width = max(len(n) for n in names)
            print(" " * width + "".join(f"{n[:9]:>10s}" for n in names))
            for n, row in zip(names, sim):
                print(f"{n:>{width}s}" + "".join(f"{v:10.3f}" for v in row))
            nearest = [names[j] for j in np.argsort(-sim, axis=1)[:, 1]]
            print("nearest other image: " + ", ".join(f"{a}->{b}" for a, b in zip(names, nearest)))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "demo_similarity.npz", names=np.array(names), **results)
        print(f"\nsaved {out / 'demo_similarity.npz'}")
    return results
