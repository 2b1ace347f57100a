"""Paper Table I on our data: number of regions (S = 2…5 → 8/20/40/70) vs accuracy.

REMAP off the shelf (layers 1+2, α = 1) with the region grid at S = 2, 3, 4, 5
scales; one backbone pass per image feeds all four heads.  Every dataset
present under ``--data-root`` (``../shared/data``: UKBench, the rParis subset;
the full Revisited Oxford/Paris, Holidays when present) and the demo set.
Two tables: L2-normalised only, and PCA-whitened with a whitening learned on
the *other* datasets.  Also the R-MAC (layer 1) rows, for reference.

    python benchmarks/paper_table1_regions.py [--json] [--data-root DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paper import (SharedBackbone, common_arguments, find_datasets, run_heads,  # noqa: E402
                    write_outputs)
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.describe.extract import select_device  # noqa: E402
from remap_lib.layers.functional import rmac_regions  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p, "table1_regions")
    p.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4, 5])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    benches = find_datasets(args.data_root, not args.no_demo, args.only, args.size)
    shared = SharedBackbone(args.backbone, args.weights, args.cache, select_device(args.device))
    methods = {}
    for s in args.scales:
        r = len(rmac_regions(24, 32, s))
        methods[f"REMAP 1+2, S={s} (r={r})"] = (ModelConfig(head="remap", layers=[1, 2], levels=s), [1.0])
    for s in args.scales:
        r = len(rmac_regions(24, 32, s))
        methods[f"R-MAC 1, S={s} (r={r})"] = (ModelConfig(head="rmac", layers=[1], levels=s), [1.0])
    tables, per_query, info = run_heads(shared, benches, methods, args.whiten_dim)
    config = {**vars(args), **info, "methods": {k: c.to_dict() for k, (c, _) in methods.items()}}
    return write_outputs(args.out, "table1_regions", tables, config, per_query, time.perf_counter() - t0, args.json,
                         notes=["r = number of regions on a 4:3 (24×32) map; α = 1 (no KL weights)."])


if __name__ == "__main__":
    main()
