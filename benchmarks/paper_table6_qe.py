"""Paper Table VI on our data: full-dimensional descriptors side by side, then with query expansion.

Off the shelf (EfficientNet-Lite0, ImageNet), every head PCA-whitened with a
whitening learned on the *other* datasets: MAC, SPoC, GeM, R-MAC, REMAP
(layers 1+2, α = 1) and REMAP with KL weights (estimated on UKBench objects
0–99, so UKBench is scored on objects 100–149 in every row of this table).
With ``--finetuned DIR`` (the output folder of ``paper_finetune.py``) its
fine-tuned R-MAC and REMAP networks are added.  Then the same with α-QE
(k = 2, α = 3, Radenović et al.), average QE (k = 2) and DBA + α-QE
(``remap_lib.search.expansion``).  One backbone pass per image feeds all off-the-shelf heads.

    python benchmarks/paper_table6_qe.py [--json] [--finetuned runs/paper/finetune]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paper import (SharedBackbone, common_arguments, disjoint_whitening, find_datasets,  # noqa: E402
                    held_out_ukbench, scores_row, write_outputs)
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.describe.extract import select_device  # noqa: E402
from remap_lib.search.expansion import (alpha_query_expansion, average_query_expansion,  # noqa: E402
                                 database_side_augmentation)
from remap_lib.training.klw import estimate_kl_weights  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402

EXPANSIONS = {
    "": lambda q, db: (q, db),
    " + α-QE": lambda q, db: (alpha_query_expansion(q, db, k=2, alpha=3.0), db),
    " + AQE": lambda q, db: (average_query_expansion(q, db, k=2), db),
    " + DBA + α-QE": lambda q, db: (lambda dba: (alpha_query_expansion(q, dba, k=2, alpha=3.0), dba))(
        database_side_augmentation(db, k=2, alpha=3.0)),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p, "table6_qe")
    p.add_argument("--finetuned", default=None, help="paper_finetune.py output folder: add its rmac/ and remap/")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = select_device(args.device)
    benches = []
    train_groups = None
    for b in find_datasets(args.data_root, not args.no_demo, args.only, args.size):
        if b.name == "ukbench":
            train_groups, b = held_out_ukbench(b)
        benches.append(b)
    shared = SharedBackbone(args.backbone, args.weights, args.cache, device)
    models = {
        "MAC": shared.model(ModelConfig(head="mac", layers=[1])),
        "SPoC": shared.model(ModelConfig(head="spoc", layers=[1])),
        "GeM": shared.model(ModelConfig(head="gem", layers=[1])),
        "R-MAC": shared.model(ModelConfig(head="rmac", layers=[1])),
        "REMAP (α = 1)": shared.model(ModelConfig(head="remap", layers=[1, 2])),
    }
    notes = ["off the shelf unless marked fine-tuned; PCA-whitened (learned on the other datasets)."]
    if train_groups is not None:
        klw_model = shared.model(ModelConfig(head="remap", layers=[1, 2]))
        estimate_kl_weights(klw_model, train_groups, input_size=(320, 240), device=str(device),
                            progress=False).apply(klw_model)
        models["REMAP (α = KL)"] = klw_model
        notes.append("KL weights from UKBench objects 0-99; UKBench scored on objects 100-149 in every row.")
    pooled = {label: {} for label in models}
    for b in benches:
        for label, (db, q) in shared.describe_many(b, models, [b.size]).items():
            pooled[label][b.name] = (db[0], q[0])
    if args.finetuned:
        for run, label in (("rmac", "R-MAC fine-tuned"), ("remap", "REMAP fine-tuned")):
            path = Path(args.finetuned) / run / "train" / "model.pt"
            if not path.exists():
                notes.append(f"{path} missing: {label} left out")
                continue
            model = RetrievalModel.load(path).to(device)
            tuned = SharedBackbone.wrap(model.backbone, device)
            pooled[label] = {}
            for b in benches:
                db, q = tuned.describe_many(b, {"m": model}, [b.size], cache=False)["m"]
                pooled[label][b.name] = (db[0], q[0])

    tables = {"full-dimensional": {}, "with query expansion": {}}
    per_query = {}
    for label, per_set in pooled.items():
        for suffix, expand in EXPANSIONS.items():
            if suffix and not label.startswith(("R-MAC", "REMAP", "GeM")):
                continue
            row = {}
            for b in benches:
                w = disjoint_whitening({n: d for n, (d, _) in per_set.items()}, b.name, args.whiten_dim)
                db, q = (x if w is None else w.apply(x) for x in per_set[b.name])
                q, db = expand(q, db)
                r, aps = scores_row(b, db, q)
                row.update(r)
                per_query.update({f"{label}{suffix} | {k}": v for k, v in aps.items()})
            tables["with query expansion" if suffix else "full-dimensional"][label + suffix] = row
    config = {**vars(args), "device": str(device), "sizes": {b.name: b.size for b in benches},
              "expansion": {"α-QE": "k=2, alpha=3", "AQE": "k=2", "DBA": "k=2, alpha=3"}}
    return write_outputs(args.out, "table6_qe", tables, config, per_query, time.perf_counter() - t0, args.json,
                         notes)


if __name__ == "__main__":
    main()
