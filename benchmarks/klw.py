"""Does KL weighting help off the shelf?  R-MAC (α = 1) vs REMAP with KL weights (issue 4).

KL weights are estimated on UKBench objects 0–99 (matching pairs within an
object, non-matching across objects) and evaluated, with no training, on
UKBench objects 100–149 (disjoint from the KL images) and on the revisited
Paris set.  Rows:

* R-MAC: layer 1, α = 1 (all regions equal);
* REMAP, layer 1, KL: one stream with KL weights;
* REMAP, layers 1+2, α = 1: two streams, uniform weights (multi-layer alone);
* REMAP, layers 1+2, KL: two streams with KL weights (the paper's descriptor, untrained).

    python benchmarks/klw.py                      # ../shared/data
    python benchmarks/klw.py --json --data-root DIR --direction symmetric
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remap_lib.nets.backbones import build_backbone  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import load_revisited, load_ukbench, split_groups  # noqa: E402
from remap_lib.evaluation.evaluate import evaluate, format_table  # noqa: E402
from remap_lib.training.klw import estimate_kl_weights  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--direction", default="match_nonmatch", choices=("match_nonmatch", "nonmatch_match", "symmetric"))
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--klw-size", default="320x240", help="input size for KL estimation (UKBench is 320x240)")
    p.add_argument("--out", default=None, help="folder for results.csv/json and klw.json")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    root = Path(args.data_root)
    t0 = time.perf_counter()

    ukbench = load_ukbench(root / "ukbench")
    n_objects = len(set(ukbench.groups))
    train = split_groups(ukbench, range(0, 100))
    test = split_groups(ukbench, range(100, n_objects))
    datasets = {"ukbench[100-]": (test, 320)}
    if (root / "rparis6k").is_dir():
        datasets["rparis6k"] = (load_revisited(root / "rparis6k", "rparis6k"), 1024)

    backbone = build_backbone("efficientnet_lite0")
    w, h = (int(v) for v in args.klw_size.split("x"))
    two = RetrievalModel(ModelConfig(head="remap", layers=[1, 2], levels=args.levels), backbone)
    klw = estimate_kl_weights(two, train, input_size=(w, h), direction=args.direction, progress=False)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        klw.save(Path(args.out) / "klw.json")
    for layer, weights in klw.weights.items():
        print(f"KL weights {layer}: min {weights.min():.2f} mean {weights.mean():.2f} max {weights.max():.2f} "
              f"({klw.settings['matching_pairs']} matching / {klw.settings['nonmatching_pairs']} non-matching pairs)")

    results = []
    for ds_name, (dataset, size) in datasets.items():
        def model(layers, head="remap", kl=False):
            m = RetrievalModel(ModelConfig(head=head, layers=layers, levels=args.levels, image_sizes=[size]), backbone)
            if kl:
                m.set_region_weights({layer: klw.weights[layer] for layer in m.layers})
            return m

        methods = {"R-MAC (layer 1, a=1)": model([1], "rmac"),
                   "REMAP layer 1, KL": model([1], kl=True),
                   "REMAP layers 1+2, a=1": model([1, 2]),
                   "REMAP layers 1+2, KL": model([1, 2], kl=True)}
        results += evaluate(methods, {ds_name: dataset}, None, None, progress=False)
    if args.out:
        from remap_lib.evaluation.evaluate import save_results

        save_results(results, args.out)
    print()
    print(format_table(results))
    table: dict[str, dict] = {}
    for r in results:  # one row per method, columns from every dataset
        table.setdefault(r.method, {}).update(
            {f"{r.dataset}/{p}": (round(s["score"], 4) if p == "ukbench" else round(100 * s["map"], 2))
             for p, s in r.scores.items()})
    for r in results:
        if r.dataset == "rparis6k":
            table[r.method]["rparis6k/hard/aps"] = [None if a != a else round(100 * a, 1) for a in r.scores["hard"]["aps"]]
    blob = {"klw": klw.settings, "seconds": round(time.perf_counter() - t0, 1), "table": table}
    if args.json:
        print(json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
