"""Paper Tables III and IV and Fig. 6 on our data: what fine-tuning does to each design choice.

Six networks, all EfficientNet-Lite0 (ImageNet) fine-tuned the same way with
the triplet loss and hard negatives on UKBench objects 0–99
(:class:`remap_lib.training.triplet.Trainer`; the FC layer initialised by PCA-whitening
of the training images):

=====================  =======  ======  ===========  ======================
run                    head     layers  α init       α trained
=====================  =======  ======  ===========  ======================
``rmac``               R-MAC    1       1            no   (Table III "RMAC")
``rmac_sgd``           R-MAC    1       1            yes  (Table III "RMAC+SGD")
``klw``                REMAP    1       KL           yes  (Table III "KLW")
``mla``                REMAP    1+2     1            no   (Table IV "MLA")
``remap``              REMAP    1+2     KL           yes  (Fig. 6 "REMAP")
``mac``                MAC      1       —            —    (Fig. 6 "MAC")
=====================  =======  ======  ===========  ======================

KL weights are estimated on the training objects only.  Each network is
evaluated before (step 0: α and FC initialised, nothing trained) and after
training on UKBench objects 100–149 (never trained on), the rParis subset (and
any revisited set under ``--data-root``) and the demo set, two ways:

* ``FC``: the network's own end-to-end output (its FC layer, learned on the
  400 training images, a quarter of their number as dimension);
* ``PCA-w``: the network's pooled descriptor PCA-whitened to ``--whiten-dim``
  with a whitening learned on the *other* evaluation sets (as in the
  off-the-shelf tables), full and truncated to 128-D (Fig. 6's D = 128).

On a CPU the run is CPU-sized (the defaults: 240 px training images, 20
updates of 16 triplets, revisited sets evaluated at 768 px, triplet margin
0.5 because the paper's 0.1 gives exactly zero loss on UKBench's hardest
negatives); with a GPU use the paper's settings: ``--train-size 1024
--accumulate 64 --steps 100 --remine-every 3000 --margin 0.1 --amp bf16
--size revisited=1024``.  Every finished network's
numbers are kept in ``<out>/<run>/result.json``, and training resumes from its
checkpoint, so an interrupted run loses nothing.

    python benchmarks/paper_finetune.py [--json] [--runs rmac klw ...] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _paper import (Bench, SharedBackbone, disjoint_whitening, find_datasets, held_out_ukbench,  # noqa: E402
                    scores_row, write_outputs)
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.describe.extract import select_device  # noqa: E402
from remap_lib.data.datasets import split_groups  # noqa: E402
from remap_lib.search.index import truncate_descriptors  # noqa: E402
from remap_lib.training.klw import estimate_kl_weights  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402
from remap_lib.training.triplet import TrainConfig, Trainer  # noqa: E402

# run -> (label, head, layers, alpha init, alpha trained)
RUNS = {
    "rmac": ("R-MAC (α = 1 fixed)", "remap", [1], "ones", False),
    "rmac_sgd": ("R-MAC+SGD (α = 1, learned)", "remap", [1], "ones", True),
    "klw": ("KLW (α = KL, learned)", "remap", [1], "kl", True),
    "mla": ("MLA (layers 1+2, α = 1 fixed)", "remap", [1, 2], "ones", False),
    "remap": ("REMAP (KLW + MLA)", "remap", [1, 2], "kl", True),
    "mac": ("MAC", "mac", [1], "ones", False),
}
TRAIN_GROUPS = range(0, 100)


def evaluation_sets(args) -> list[Bench]:
    benches = find_datasets(args.data_root, not args.no_demo, args.only, args.size_override)
    out = []
    for b in benches:
        if b.name == "ukbench" and not args.train:  # objects 0-99 are the training set
            out.append(held_out_ukbench(b, TRAIN_GROUPS)[1])
        else:
            out.append(b)
    return out


def evaluate_network(model: RetrievalModel, benches: list[Bench], whiten_dim: int, device) -> tuple[dict, dict]:
    """Rows ``{"FC": ..., "PCA-w": ..., "PCA-w 128-D": ...}`` and per-query APs for one network."""
    shared = SharedBackbone.wrap(model.backbone, device)
    pooled = {}
    for b in benches:
        db, q = shared.describe_many(b, {"m": model}, [b.size], cache=False)["m"]
        pooled[b.name] = (db[0], q[0])
    rows, aps = {"FC": {}, f"PCA-w {whiten_dim}-D": {}, "PCA-w 128-D": {}}, {}
    for b in benches:
        db, q = pooled[b.name]
        if model.whiten is not None:
            with torch.inference_mode():
                fc = [model.from_pooled(torch.from_numpy(x).to(device)).cpu().numpy() for x in (db, q)]
            row, ap = scores_row(b, *fc)
            rows["FC"].update(row)
            aps.update({f"FC | {k}": v for k, v in ap.items()})
        w = disjoint_whitening({n: d for n, (d, _) in pooled.items()}, b.name, whiten_dim)
        if w is None:
            continue
        full = [w.apply(x) for x in (db, q)]
        for label, (d, qq) in ((f"PCA-w {whiten_dim}-D", full),
                               ("PCA-w 128-D", [truncate_descriptors(x, min(128, x.shape[1])) for x in full])):
            row, ap = scores_row(b, d, qq)
            rows[label].update(row)
            aps.update({f"{label} | {k}": v for k, v in ap.items()})
    return {k: v for k, v in rows.items() if v}, aps


def run_one(name: str, args, train_set, benches, device) -> dict:
    out = Path(args.out) / name
    done = out / "result.json"
    if done.exists():
        print(f"{name}: already done ({done})", flush=True)
        return json.loads(done.read_text())
    label, head, layers, alpha, train_alpha = RUNS[name]
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = ModelConfig(backbone=args.backbone, weights=args.weights, head=head, layers=layers, levels=4,
                            image_sizes=[args.train_size])
    alpha_init = "ones"
    if alpha == "kl":
        klw_path = out / "klw.json"
        if not klw_path.exists():
            estimate_kl_weights(RetrievalModel(model_cfg), train_set, input_size=(320, 240), device=str(device),
                                progress=False).save(klw_path)
        alpha_init = str(klw_path)
    cfg = TrainConfig(train="ukbench", model=model_cfg, alpha_init=alpha_init, train_alpha=train_alpha,
                      accumulate=args.accumulate, steps=args.steps, remine_every=args.remine_every, lr=args.lr,
                      margin=args.margin, out_dir=str(out / "train"), checkpoint_every=max(1, args.steps // 4), val_every=0,
                      device=str(device), amp=args.amp, seed=args.seed)
    trainer = Trainer(cfg, train_set=train_set, val_set=None)
    trainer.prepare()
    t = time.perf_counter()
    # the untrained state depends only on the initialisation: runs that share it share one evaluation
    before_path = Path(args.out) / f"before-{head}-{'+'.join(map(str, layers))}-{alpha}.json"
    if before_path.exists():
        before = json.loads(before_path.read_text())
    else:
        rows, aps = evaluate_network(copy.deepcopy(trainer.model), benches, args.whiten_dim, device)
        before = {"rows": rows, "aps": aps}
        before_path.write_text(json.dumps(before))
    eval_seconds = time.perf_counter() - t
    t = time.perf_counter()
    history = trainer.run()
    train_seconds = time.perf_counter() - t
    rows, aps = evaluate_network(trainer.model, benches, args.whiten_dim, device)
    losses = [r["loss"] for r in history if "loss" in r]
    result = {"run": name, "label": label, "before": before["rows"], "after": rows,
              "aps_before": before["aps"], "aps_after": aps, "train_config": cfg.to_dict(),
              "fc_dim": trainer.model.output_dim, "loss_first": losses[0], "loss_last": losses[-1],
              "loss_mean_first_quarter": float(np.mean(losses[: max(1, len(losses) // 4)])),
              "loss_mean_last_quarter": float(np.mean(losses[-max(1, len(losses) // 4):])),
              "alpha_after": {k: v.tolist() for k, v in trainer.model.region_weights().items()},
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1)}
    done.write_text(json.dumps(result, indent=1))
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, train {train_seconds:.0f} s, "
          f"eval {eval_seconds:.0f} s", flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--no-demo", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="only these evaluation datasets")
    p.add_argument("--size", dest="size_override", action="append", default=["revisited=768"], metavar="KIND=PX",
                   help="evaluation sizes (default here: revisited sets at 768 px to keep CPU runs short)")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--train", default=None,
                   help="training set with groups (folder of groups, CSV, UKBench layout...); default: UKBench 0-99")
    p.add_argument("--train-groups", default=None, help="LO-HI: only these groups of --train")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--train-size", type=int, default=240, help="training image size (longer side)")
    p.add_argument("--accumulate", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--remine-every", type=int, default=160)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--margin", type=float, default=0.5,
                   help="triplet margin (paper: 0.1, which gives zero loss on UKBench's hardest negatives)")
    p.add_argument("--amp", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whiten-dim", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "runs" / "paper" / "finetune"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = select_device(args.device)
    root = Path(args.data_root)
    from remap_lib.data.datasets import load_dataset, load_ukbench, parse_group_range

    if args.train:  # e.g. a folder of landmark groups, or a CSV of image,group
        train_set = load_dataset(args.train)
        if args.train_groups:
            train_set = split_groups(train_set, parse_group_range(args.train_groups))
    elif (root / "ukbench").is_dir():
        train_set = split_groups(load_ukbench(root / "ukbench"), TRAIN_GROUPS)
    else:
        p.error(f"no training set: pass --train, or put ukbench/ under {root} (objects 0-99 are used)")
    benches = evaluation_sets(args)
    from remap_lib.training.triplet import check_no_overlap

    check_no_overlap(train_set, {b.name: b.dataset for b in benches})  # never evaluate on training images
    results = {name: run_one(name, args, train_set, benches, device) for name in args.runs}

    def table(names, kind):
        rows = {}
        for n in names:
            if n in results:
                r = results[n]
                for when in ("before", "after"):
                    if kind in r[when]:
                        rows[f"{r['label']} — {when}"] = r[when][kind]
        return rows

    w = f"PCA-w {args.whiten_dim}-D"
    tables = {
        "Table III: KL-divergence weighting (FC output)": table(["rmac", "rmac_sgd", "klw"], "FC"),
        f"Table III: KL-divergence weighting ({w})": table(["rmac", "rmac_sgd", "klw"], w),
        "Table IV: multi-layer aggregation (FC output)": table(["rmac", "mla"], "FC"),
        f"Table IV: multi-layer aggregation ({w})": table(["rmac", "mla"], w),
        f"Fig. 6: MAC, R-MAC, REMAP trained the same way ({w})": table(["mac", "rmac", "remap"], w),
        "Fig. 6: ... truncated to 128-D": table(["mac", "rmac", "remap"], "PCA-w 128-D"),
        "Fig. 6: ... FC output": table(["mac", "rmac", "remap"], "FC"),
    }
    tables = {k: v for k, v in tables.items() if v}
    training = {r["label"]: {"loss first/last update": f"{r['loss_first']:.4f} / {r['loss_last']:.4f}",
                             "mean loss first/last quarter": f"{r['loss_mean_first_quarter']:.4f} / "
                                                             f"{r['loss_mean_last_quarter']:.4f}",
                             "FC dim": r["fc_dim"], "train s": r["train_seconds"]} for r in results.values()}
    tables["training"] = training
    per_query = {f"{r['label']} | {when} | {k}": v for r in results.values()
                 for when in ("before", "after") for k, v in r[f"aps_{when}"].items()}
    config = {**vars(args), "device": str(device), "train_set": train_set.summary(),
              "eval": {b.name: b.size for b in benches}}
    notes = [f"trained on {train_set.name} ({len(train_set.images)} images) at {args.train_size} px: {args.steps} updates x "
             f"{args.accumulate} triplets, negatives re-mined every {args.remine_every} triplets, "
             f"triplet margin {args.margin}, lr {args.lr}, {device}."]
    return write_outputs(args.out, "finetune", tables, config, per_query, time.perf_counter() - t0, args.json, notes)


if __name__ == "__main__":
    main()
