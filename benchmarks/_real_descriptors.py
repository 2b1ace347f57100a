"""Shared by the index benchmarks: real descriptors of ../shared/data and the demo set, cached.

``real_descriptors(head, data_root, cache)`` describes UKBench (native 320 px),
the revisited Paris subset (1024 px, queries cropped) and the demo set (640 px)
with EfficientNet-Lite0 off the shelf, then learns PCA-whitening on UKBench and the demo
set (never on rParis, which is evaluated) and keeps the first ``dim`` whitened
dimensions (the paper's compact 128-D descriptor).  Returns a dict of arrays and the rParis dataset (for its ground truth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from remap_lib.config import ModelConfig
from remap_lib.data.datasets import load_revisited, load_ukbench
from remap_lib.data.datasets import load_demo_set
from remap_lib.evaluation.evaluate import describe
from remap_lib.layers.whitening import learn_pca_whitening


def real_descriptors(head: str, data_root: Path, cache: Path, dim: int = 128):
    sets = {"ukbench": (load_ukbench(data_root / "ukbench"), 320),
            "rparis6k": (load_revisited(data_root / "rparis6k", "rparis6k"), 1024),
            "demo": (load_demo_set(), 640)}
    layers = [1, 2] if head == "remap" else [1]
    raw = {}
    for name, (ds, size) in sets.items():
        cfg = ModelConfig(head=head, layers=layers, levels=4, image_sizes=[size])
        db, q = describe(cfg, ds, cache / head, progress=False)
        raw[name] = db
        if name == "rparis6k":
            raw["rparis6k_queries"] = q
    pool = np.concatenate([raw[k] for k in ("ukbench", "demo")])
    whitening = learn_pca_whitening(pool, dim)
    out = {k: whitening.apply(v) for k, v in raw.items()}
    return out, sets["rparis6k"][0]
