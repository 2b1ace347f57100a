"""Paper Fig. 5 on our data: multi-scale (Eq. 3) vs single-scale descriptors.

Single scale: the image at its base size (1024 px for the landmark sets).
Multi-scale, paper Eq. 3: ``X = 2·X(base) + 1.4·X(1.25·base)`` (1024 and
1280 px in the paper), each scale whitened before the sum when whitening is
on.  For MAC, R-MAC and REMAP (layers 1+2, α = 1), off the shelf.  One
backbone pass per image and size feeds all heads.

    python benchmarks/paper_fig5_multiscale.py [--json] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paper import (SharedBackbone, common_arguments, find_datasets, run_heads,  # noqa: E402
                    write_outputs)
from remap_lib.config import PAPER_MULTISCALE, ModelConfig  # noqa: E402
from remap_lib.describe.extract import select_device  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p, "fig5_multiscale")
    p.add_argument("--plot", default=None, help="bar chart PNG (default: <out>/fig5_multiscale.png)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    benches = find_datasets(args.data_root, not args.no_demo, args.only, args.size)
    shared = SharedBackbone(args.backbone, args.weights, args.cache, select_device(args.device))
    weights = list(PAPER_MULTISCALE["scale_weights"])
    methods = {}
    for name, cfg in (("MAC", ModelConfig(head="mac", layers=[1])), ("R-MAC", ModelConfig(head="rmac", layers=[1])),
                      ("REMAP 1+2", ModelConfig(head="remap", layers=[1, 2]))):
        methods[f"{name} single-scale"] = (cfg, [1.0])
        methods[f"{name} multi-scale (Eq. 3)"] = (cfg, weights)
    tables, per_query, info = run_heads(shared, benches, methods, args.whiten_dim)
    config = {**vars(args), **info, "scale_weights": weights,
              "methods": {k: c.to_dict() for k, (c, _) in methods.items()}}
    blob = write_outputs(args.out, "fig5_multiscale", tables, config, per_query, time.perf_counter() - t0,
                         args.json, notes=["multi-scale sizes: base and 1.25 x base (paper: 1024 and 1280 px)."])
    _plot(tables, Path(args.plot or Path(args.out) / "fig5_multiscale.png"))
    return blob


def _plot(tables: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(tables.values())[-1]  # the whitened table when there is one
    cols = [c for c in next(iter(rows.values())) if not c.endswith(" E")]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
    heads = [k.replace(" single-scale", "") for k in rows if k.endswith("single-scale")]
    for ax, col in zip(axes[0], cols):
        single = [rows[f"{h} single-scale"][col] for h in heads]
        multi = [rows[f"{h} multi-scale (Eq. 3)"][col] for h in heads]
        x = range(len(heads))
        ax.bar([i - 0.2 for i in x], single, 0.4, label="single-scale")
        ax.bar([i + 0.2 for i in x], multi, 0.4, label="multi-scale")
        ax.set_xticks(list(x), heads, fontsize=8)
        ax.set_title(col, fontsize=9)
        lo = min(single + multi)
        ax.set_ylim(lo * 0.9, max(single + multi) * 1.02)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
