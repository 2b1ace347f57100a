"""The main job (``make demo`` / ``remap demo``): the demo benchmark end to end, offline.

1. build the embedded demo set from packaged photographs (:mod:`remap_lib.data.demo_data`);
2. describe it with EfficientNet-Lite0 off the shelf under MAC, SPoC, GeM,
   R-MAC and REMAP (two layers, 40 regions, α = 1 until KL weights exist), and
   a colour-histogram baseline; the five heads share one backbone pass
   (:func:`~remap_lib.evaluation.evaluate.evaluate` groups them, :mod:`remap_lib.describe.shared_pass`);
3. print the table (mAP %, overall and per challenge) and save it as CSV/JSON
   with the configs, plus a picture of queries with their top results framed
   green when correct (the paper's Fig. 9).

Outputs go to ``runs/demo-<timestamp>/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..data.datasets import load_demo_set
from ..evaluation.evaluate import COLOUR_HISTOGRAM, MethodResult, evaluate, format_table

__all__ = ["demo_methods", "run_demo"]

DEMO_IMAGE_SIZE = 640  # the demo photos are stored at 640 px; larger would only upsample


def demo_methods(image_size: int = DEMO_IMAGE_SIZE) -> dict:
    """The methods compared by the main job, all on EfficientNet-Lite0 off the shelf."""
    sizes = [image_size]
    return {
        "colour histogram": COLOUR_HISTOGRAM,
        "MAC": ModelConfig(head="mac", image_sizes=sizes),
        "SPoC": ModelConfig(head="spoc", image_sizes=sizes),
        "GeM": ModelConfig(head="gem", image_sizes=sizes),
        "R-MAC": ModelConfig(head="rmac", levels=4, image_sizes=sizes),
        "REMAP (a=1)": ModelConfig(head="remap", layers=[1, 2], levels=4, image_sizes=sizes),
    }


def run_demo(out_dir: str | os.PathLike | None = None, image_size: int = DEMO_IMAGE_SIZE,
             progress: bool = True, engine: str = "auto", precision: str = "f32") -> list[MethodResult]:
    """Run the main job; returns the results and writes them to ``out_dir``.

    ``engine``/``precision``: how the backbone passes run (:func:`remap_lib.describe.engine.create_engine`).
    """
    out = Path(out_dir) if out_dir is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    dataset = load_demo_set()
    print(dataset.summary())
    results = evaluate(demo_methods(image_size), {"demo": dataset}, out, cache_dir=out / "descriptors",
                       progress=progress, engine=engine, precision=precision)
    print("\nmAP (%) on the demo set, overall and by challenge:\n")
    print(format_table(results))

    from .plots import plot_query_results

    shown = {r.method: r.descriptors for r in results if r.method in ("R-MAC", "REMAP (a=1)")}
    aps = np.array(results[-1].scores["all"]["aps"])
    queries = sorted(np.argsort(aps)[:2].tolist() + np.argsort(-aps)[:1].tolist())  # two hardest, one easy
    fig = plot_query_results(dataset, shown, queries, top_k=6, path=out / "queries.png")
    fig.clf()
    print(f"\nresults: {out / 'results.csv'}, {out / 'results.json'}; picture: {out / 'queries.png'}")
    return results
