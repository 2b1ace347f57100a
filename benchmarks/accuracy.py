"""Off-the-shelf accuracy of MAC, SPoC, GeM, R-MAC and REMAP on real benchmarks.

Runs on a folder laid out like ``../shared/data`` (``--data-root``):

* ``ukbench/``   UKBench images → 4×Recall@4 and mAP (query itself ignored);
* ``rparis6k/``  (and ``roxford5k/``, when present) revisited layout → Easy / Medium / Hard mAP,
  queries cropped to their boxes.

So it runs unchanged on the full benchmarks.  EfficientNet-Lite0 with its
ImageNet weights, no whitening, α = 1 for REMAP.  UKBench images are described
at their native 320 px (upsampling them to 1024 px adds nothing but time);
revisited sets at 1024 px, the paper's size.

    python benchmarks/accuracy.py                       # ../shared/data, readable tables
    python benchmarks/accuracy.py --json                # ... and one JSON object at the end
    python benchmarks/accuracy.py --data-root /data/benchmarks --out runs/accuracy
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import load_revisited, load_ukbench  # noqa: E402
from remap_lib.evaluation.evaluate import COLOUR_HISTOGRAM, evaluate, format_table  # noqa: E402

HEADS = {"MAC": "mac", "SPoC": "spoc", "GeM": "gem", "R-MAC": "rmac", "REMAP (a=1)": "remap"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--revisited-size", type=int, default=1024)
    p.add_argument("--ukbench-size", type=int, default=320)
    p.add_argument("--out", default=None, help="folder for results.csv/json (and the descriptor cache)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="also print the table as one JSON object")
    args = p.parse_args(argv)

    root = Path(args.data_root)
    if not root.is_dir():
        p.error(f"{root} does not exist; pass --data-root")
    jobs = []  # (dataset name, dataset, image size)
    if (root / "ukbench").is_dir():
        jobs.append(("ukbench", load_ukbench(root / "ukbench"), args.ukbench_size))
    for name in ("rparis6k", "roxford5k"):
        if (root / name).is_dir():
            jobs.append((name, load_revisited(root / name, name), args.revisited_size))
    if not jobs:
        p.error(f"{root} has neither ukbench/ nor rparis6k/ / roxford5k/")

    t0 = time.perf_counter()
    results = []
    for name, dataset, size in jobs:
        print(dataset.summary(), f"at {size} px", flush=True)
        methods = {"colour histogram": COLOUR_HISTOGRAM}
        methods.update({label: ModelConfig(backbone=args.backbone, head=head, image_sizes=[size])
                        for label, head in HEADS.items()})
        cache = Path(args.out) / "descriptors" if args.out else None
        results += evaluate(methods, {name: dataset}, None, cache, args.device, progress=False)
    if args.out:
        from remap_lib.evaluation.evaluate import save_results

        save_results(results, args.out)

    print()
    print(format_table(results))
    table = {}
    for r in results:
        row = table.setdefault(r.method, {})
        for protocol, s in r.scores.items():
            key = f"{r.dataset}/{protocol}"
            row[key] = round(s["score"], 4) if protocol == "ukbench" else round(100 * s["map"], 2)
            if r.dataset != "ukbench":
                row[key + "/aps"] = [None if a != a else round(100 * a, 1) for a in s["aps"]]
    blob = {"backbone": args.backbone, "data_root": str(root), "seconds": round(time.perf_counter() - t0, 1),
            "sizes": {"ukbench": args.ukbench_size, "revisited": args.revisited_size}, "table": table}
    if args.json:
        print(json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
