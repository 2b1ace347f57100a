"""Paper Table II on our data: which conv layers, alone and combined (off the shelf).

REMAP (α = 1, S = 4 → 40 regions) over layer 1 (the last conv block), 2, 3,
1+2, 1+3 and 1+2+3 — paper numbering, deepest first; for EfficientNet-Lite0
that is the 1280-channel head conv, block 15 (320 ch) and block 14 (192 ch).
A single layer is R-MAC on that layer.  One backbone pass per image feeds all
six heads.  Raw (L2 only) and PCA-whitened (learned on the other datasets).

    python benchmarks/paper_table2_layers.py [--json] [--data-root DIR] [--backbone resnet101 --weights FILE]
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

COMBINATIONS = ([1], [2], [3], [1, 2], [1, 3], [1, 2, 3])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p, "table2_layers")
    p.add_argument("--levels", type=int, default=4)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    benches = find_datasets(args.data_root, not args.no_demo, args.only, args.size)
    shared = SharedBackbone(args.backbone, args.weights, args.cache, select_device(args.device))
    stages = shared.backbone.resolve_layers([1, 2, 3])
    methods = {}
    for layers in COMBINATIONS:
        label = "layer " + "+".join(map(str, layers)) + f" ({', '.join(stages[i - 1] for i in layers)})"
        methods[label] = (ModelConfig(head="remap", layers=layers, levels=args.levels), [1.0])
    tables, per_query, info = run_heads(shared, benches, methods, args.whiten_dim)
    config = {**vars(args), **info, "stages": list(stages),
              "methods": {k: c.to_dict() for k, (c, _) in methods.items()}}
    return write_outputs(args.out, "table2_layers", tables, config, per_query, time.perf_counter() - t0, args.json,
                         notes=[f"{args.backbone} off the shelf; α = 1; S = {args.levels}."])


if __name__ == "__main__":
    main()
