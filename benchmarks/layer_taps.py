"""Where to tap EfficientNet-Lite's "layers" for REMAP, chosen on the validation landmarks (issue 12, item 3).

The paper's layers are post-ReLU convolution outputs.  EfficientNet-Lite0's
layer 1 (``head``) is read after ReLU6, so many channels saturate at the cap
of 6, and layer 2 (``block15``) is the 320-channel *linear* bottleneck of the
last block (negative values, no ReLU).  Taps (:meth:`FeatureBackbone.tap_module`)
read the same convolutions elsewhere:

* ``head:1``: the head convolution after batch norm, before the cap (region
  maxima of ``head`` are exactly these clipped to [0, 6]);
* ``block15:_bn0``: the last block's 1×1 expansion convolution (1152
  channels) after batch norm, before its ReLU6: the widest map of that block.

Every pair is scored off the shelf as REMAP (α = 1, S = 4) with the streams
concatenated as they are (``layer weights none``: the 1280-channel stream can
drown the other) and with per-layer L2 then weight 1 (``ones``), plus the
single layers, on the held-out validation landmarks of ``landmarks_fr``
(Toulon, groups 19–22: every image a query; the choice is made on this column)
and, for information only, the rParis subset.  One backbone pass feeds every
row (the union of the taps), at 1024 px.

    python benchmarks/layer_taps.py [--json] [--size 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paper import ROOT, Bench, SharedBackbone, find_datasets, run_heads, write_outputs  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import load_dataset, parse_group_range, split_groups  # noqa: E402
from remap_lib.describe.extract import select_device  # noqa: E402

PAIRS = {
    "head + block15 (default: capped, linear)": ["head", "block15"],
    "head:1 + block15 (head before the cap)": ["head:1", "block15"],
    "head + block15:_bn0 (expansion conv)": ["head", "block15:_bn0"],
    "head:1 + block15:_bn0": ["head:1", "block15:_bn0"],
}
SINGLES = {"head alone (capped)": ["head"], "head:1 alone (before the cap)": ["head:1"],
           "block15 alone (linear)": ["block15"], "block15:_bn0 alone": ["block15:_bn0"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--landmarks", default=str(ROOT.parent / "shared" / "data" / "landmarks_fr"))
    p.add_argument("--val-groups", default="19-22")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--size", type=int, default=1024, help="longer side of every image")
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--cache", default=str(ROOT / "runs" / "paper" / "cache"))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "layer_taps"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = select_device(args.device)
    val = split_groups(load_dataset(args.landmarks), parse_group_range(args.val_groups))
    benches = [Bench("landmarks-val", val, args.size, "groups")]
    benches += find_datasets(args.data_root, False, ["rparis6k"], [f"revisited={args.size}"])
    methods = {}
    for label, layers in {**PAIRS, **SINGLES}.items():
        for lw in ("none", "ones") if len(layers) > 1 else ("none",):
            cfg = ModelConfig(head="remap", layers=layers, levels=args.levels, image_sizes=[args.size],
                              layer_weights=lw)
            methods[label + (", per-layer L2" if lw == "ones" else "")] = (cfg, (1.0,))
    shared = SharedBackbone("efficientnet_lite0", "imagenet", args.cache, device)
    tables, per_query, info = run_heads(shared, benches, methods, whiten_dim=256)
    raw = next(iter(tables.values()))
    best = max(raw, key=lambda m: raw[m]["landmarks-val mAP"])
    notes = [f"REMAP α = 1, S = {args.levels}, EfficientNet-Lite0 (ImageNet), {args.size} px; validation landmarks "
             f"{args.val_groups} of {args.landmarks} ({len(val.images)} images, every image a query).",
             f"best on the validation landmarks (raw): {best} ({raw[best]['landmarks-val mAP']}).",
             "the whitened half is learned on the other dataset of the table (rParis for the landmarks and the "
             "reverse): for information, not for the choice."]
    config = {**vars(args), "device": str(device), **info}
    return write_outputs(args.out, "layer_taps", tables, config, per_query, time.perf_counter() - t0, args.json,
                         notes)


if __name__ == "__main__":
    main()
