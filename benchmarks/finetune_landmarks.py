"""Does REMAP learn?  Off-the-shelf versus fine-tuned on landmark photos (issue 12, paper Tables III/IV, Fig. 6).

Six networks, all EfficientNet-Lite0 (ImageNet), each scored off the shelf and
after the same fine-tuning on ``landmarks_fr`` (triplet loss, hard negatives
from the other landmarks, :class:`remap_lib.training.triplet.Trainer`):

===============  ======  ======  =========  ==============
row              head    layers  α init     layer weights
===============  ======  ======  =========  ==============
``mac``          MAC     1       —          —
``gem``          GeM     1       —          —
``rmac``         R-MAC   1       —          —
``remap_ones``   REMAP   1+2     1          —
``remap_kl``     REMAP   1+2     KL         —
``remap_kl_lw``  REMAP   1+2     KL         KL, learned
===============  ======  ======  =========  ==============

Training data: the training landmarks (``--train-groups``, default 0–18) with
the verified pairs of ``remap verify-pairs`` (``--pairs``; ``--pairs none``: every
same-landmark pair).  The FC layer starts as PCA-whitening learned on the
training landmarks (in-domain, as the paper), KL weights are estimated on them.
The held-out validation landmarks (``--val-groups``, default 19–22, Toulon)
are scored before and after training: hyper-parameters are chosen on that
column, never on the evaluation sets.

Each network is scored two ways on every evaluation set: ``FC`` (its whitening
FC: PCA-whitening before training, learned after) and ``raw`` (the pooled
descriptor, L2 only, no whitening).  Evaluation sets: the rParis subset at
1024 px (Easy/Medium/Hard) and the demo set by default; ``--eval-root DIR``
scores every dataset recognised in DIR instead (revisited, Oxford/Paris,
Holidays, UKBench, and any folder of groups other than the training set).

Off-the-shelf networks share one backbone pass per evaluation image.  Every
finished row is kept (``<out>/<row>/result.json``; training resumes from its
checkpoint), so an interrupted run loses nothing.  ``--validation-only`` trains
and scores the validation landmarks only: the hyper-parameter search.

    python benchmarks/finetune_landmarks.py [--json] [--rows remap_kl rmac ...] [--eval-root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _paper import ROOT, Bench, SharedBackbone, find_datasets, scores_row, write_outputs  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import load_dataset, parse_group_range, split_groups  # noqa: E402
from remap_lib.describe.extract import select_device  # noqa: E402
from remap_lib.training.klw import estimate_kl_weights  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402
from remap_lib.training.triplet import TrainConfig, Trainer, check_no_overlap  # noqa: E402

# row -> (label, head, layers, alpha init, layer weights)
ROWS = {
    "mac": ("MAC", "mac", [1], "ones", "none"),
    "gem": ("GeM", "gem", [1], "ones", "none"),
    "rmac": ("R-MAC", "rmac", [1], "ones", "none"),
    "remap_ones": ("REMAP α=1, layers 1+2", "remap", [1, 2], "ones", "none"),
    "remap_kl": ("REMAP KL α, layers 1+2", "remap", [1, 2], "kl", "none"),
    "remap_kl_lw": ("REMAP KL α, layers 1+2, layer weights", "remap", [1, 2], "kl", "kl"),
}
SHARED = ROOT.parent / "shared" / "data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_config(args, row: str) -> ModelConfig:
    _, head, layers, _, layer_weights = ROWS[row]
    return ModelConfig(backbone=args.backbone, weights=args.weights, head=head, layers=layers, levels=args.levels,
                       image_sizes=[args.train_size], layer_weights=layer_weights)


def kl_weights_file(args, train_set, row: str) -> str:
    """The KL weights of ``row``'s layers on the training landmarks (estimated once, shared by rows)."""
    cfg = model_config(args, row)
    path = Path(args.out) / f"klw-{'+'.join(map(str, cfg.layers))}-L{args.levels}.json"
    if not path.exists():
        t = time.perf_counter()
        base = ModelConfig.from_dict({**cfg.to_dict(), "layer_weights": "none"})
        estimate_kl_weights(RetrievalModel(base), train_set, input_size=tuple(args.klw_size), progress=False,
                            device=str(args.device)).save(path)
        print(f"KL weights on {train_set.name}: {time.perf_counter() - t:.0f} s -> {path}", flush=True)
    return str(path)


def train_config(args, train_set, row: str) -> TrainConfig:
    alpha = kl_weights_file(args, train_set, row) if ROWS[row][3] == "kl" else "ones"
    return TrainConfig(train=args.train, train_groups=args.train_groups, pairs=args.pairs, val=args.train,
                       val_groups=args.val_groups, model=model_config(args, row), alpha_init=alpha,
                       whitening_init="pca", loss="triplet", margin=args.margin, lr=args.lr,
                       accumulate=args.accumulate, steps=args.steps, remine_every=args.remine_every,
                       seed=args.seed, out_dir=str(Path(args.out) / row / "train"),
                       checkpoint_every=max(1, args.steps // 6), val_every=args.val_every or args.steps,
                       device=str(args.device),
                       engine=args.engine)


def score_models(models: dict[str, RetrievalModel], benches: list[Bench], device) -> dict[str, tuple[dict, dict]]:
    """``{name: (rows {"FC"|"raw": {column: value}}, per-query APs)}``; one backbone pass per shared backbone."""
    out = {name: ({"FC": {}, "raw": {}}, {}) for name in models}
    by_backbone: dict[int, dict[str, RetrievalModel]] = {}
    for name, m in models.items():
        by_backbone.setdefault(id(m.backbone), {})[name] = m
    for group in by_backbone.values():
        shared = SharedBackbone.wrap(next(iter(group.values())).backbone, device)
        for b in benches:
            pooled = shared.describe_many(b, group, [b.size], cache=False)
            for name, m in group.items():
                db, q = pooled[name][0][0], pooled[name][1][0]  # one scale
                rows, aps = out[name]
                for kind, (d, qq) in (("raw", (db, q)), ("FC", [_fc(m, x, device) for x in (db, q)])):
                    row, ap = scores_row(b, d, qq)
                    rows[kind].update(row)
                    aps.update({f"{kind} | {k}": v for k, v in ap.items()})
    return out


def _fc(model: RetrievalModel, pooled: np.ndarray, device) -> np.ndarray:
    with torch.inference_mode():
        return model.from_pooled(torch.from_numpy(pooled).to(device)).cpu().numpy()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=str(SHARED / "landmarks_fr"), help="folder of landmark groups")
    p.add_argument("--train-groups", default="0-18")
    p.add_argument("--val-groups", default="19-22", help="held-out landmarks: the hyper-parameter column")
    p.add_argument("--pairs", default=str(ROOT / "runs" / "landmarks_pairs.csv"),
                   help="verified pairs from `remap verify-pairs` ('none': every same-landmark pair)")
    p.add_argument("--eval-root", default=None,
                   help="score every dataset recognised in this folder (default: the rParis subset and the demo set)")
    p.add_argument("--no-demo", action="store_true")
    p.add_argument("--size", dest="size_override", action="append", default=[], metavar="KIND=PX",
                   help="evaluation sizes (default revisited=1024, groups=1024, demo=640, ukbench=320)")
    p.add_argument("--validation-only", action="store_true",
                   help="train and score the validation landmarks only (the hyper-parameter search)")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--levels", type=int, default=4, help="region grid scales (R-MAC and REMAP)")
    p.add_argument("--train-size", type=int, default=320, help="training image size (longer side)")
    p.add_argument("--klw-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    p.add_argument("--accumulate", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--remine-every", type=int, default=480)
    p.add_argument("--lr", type=float, default=1e-4, help="chosen on the validation landmarks (1e-3 overfits)")
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=0, help="validation every N updates (default: at the end only)")
    p.add_argument("--engine", default="auto", help="where pools and validation are described (train.engine)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "finetune_landmarks"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    args.device = select_device(args.device)
    if args.pairs.lower() == "none":
        args.pairs = None
    elif not Path(args.pairs).is_file():
        p.error(f"--pairs {args.pairs}: no such file; make it with `remap verify-pairs {args.train} -o {args.pairs} "
                "--drop-unverified`, or pass --pairs none (every same-landmark pair)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set = split_groups(load_dataset(args.train), parse_group_range(args.train_groups))
    if args.validation_only:
        benches = []
    elif args.eval_root:
        benches = find_datasets(args.eval_root, not args.no_demo, None, args.size_override, group_folders=True,
                                exclude=[args.train])
    else:
        benches = find_datasets(SHARED, not args.no_demo, ["rparis6k", "demo"], args.size_override)
    check_no_overlap(train_set, {b.name: b.dataset for b in benches})  # never score training images

    # 1. every row's initial state (α, PCA-whitening FC on the training landmarks), or its finished result
    results, trainers = {}, {}
    for row in args.rows:
        done = out / row / "result.json"
        if done.exists():
            results[row] = json.loads(done.read_text())
            print(f"{row}: done before ({done})", flush=True)
            continue
        t = time.perf_counter()
        trainer = Trainer(train_config(args, train_set, row))
        trainer.prepare()
        trainers[row] = (trainer, time.perf_counter() - t)
        print(f"{row}: initialised in {time.perf_counter() - t:.0f} s ({len(trainer.train_set.images)} training "
              f"images, {len(trainer.pairs)} ordered pairs)", flush=True)

    # 2. off the shelf: one backbone pass shared by every row not yet scored
    before_path = out / "before.json"
    before = json.loads(before_path.read_text()) if before_path.exists() else {}
    todo = {row: tr.model for row, (tr, _) in trainers.items() if row not in before and tr.step == 0}
    if todo and benches:
        t = time.perf_counter()
        import copy

        models = {row: copy.deepcopy(m) for row, m in todo.items()}
        backbone = next(iter(models.values())).backbone
        for m in models.values():  # the same ImageNet weights: one pass
            m.backbone = backbone
        for row, (rows, aps) in score_models(models, benches, args.device).items():
            before[row] = {"rows": rows, "aps": aps}
        before_path.write_text(json.dumps(before))
        print(f"off the shelf, {len(models)} networks: {time.perf_counter() - t:.0f} s", flush=True)

    # 3. fine-tune and score each row
    for row, (trainer, init_seconds) in trainers.items():
        t = time.perf_counter()
        history = trainer.run()
        train_seconds = time.perf_counter() - t
        t = time.perf_counter()
        after = score_models({row: trainer.model}, benches, args.device)[row] if benches else ({}, {})
        eval_seconds = time.perf_counter() - t
        losses = [r["loss"] for r in history if "loss" in r]
        spt = [r["seconds_per_triplet"] for r in history if "seconds_per_triplet" in r]
        vals = [r["val_map"] for r in history if r.get("val_map") is not None]
        val_curve = {r["step"]: r["val_map"] for r in history if r.get("val_map") is not None}
        result = {"row": row, "label": ROWS[row][0], "before": before.get(row, {}).get("rows", {}),
                  "after": after[0], "aps_before": before.get(row, {}).get("aps", {}), "aps_after": after[1],
                  "val_map_before": vals[0] if vals else None, "val_map_after": vals[-1] if len(vals) > 1 else None,
                  "val_map_by_update": val_curve,
                  "loss_first": losses[0], "loss_last": losses[-1],
                  "loss_mean_first_quarter": float(np.mean(losses[: max(1, len(losses) // 4)])),
                  "loss_mean_last_quarter": float(np.mean(losses[-max(1, len(losses) // 4):])),
                  "seconds_per_triplet": round(float(np.median(spt)), 3), "init_seconds": round(init_seconds, 1),
                  "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
                  "peak_rss_mb": round(peak_rss_mb(), 1), "fc_dim": trainer.model.output_dim,
                  "training_images": len(trainer.train_set.images), "ordered_pairs": int(len(trainer.pairs)),
                  "train_config": trainer.cfg.to_dict()}
        if trainer.model.layer_weights is not None:
            result["layer_weights_after"] = trainer.model.layer_weights().detach().tolist()
        (out / row).mkdir(parents=True, exist_ok=True)
        (out / row / "result.json").write_text(json.dumps(result, indent=1))
        results[row] = result
        print(f"{row}: val mAP {result['val_map_before']} -> {result['val_map_after']}, loss {losses[0]:.4f} -> "
              f"{losses[-1]:.4f}; init {init_seconds:.0f} s, train {train_seconds:.0f} s "
              f"({result['seconds_per_triplet']} s/triplet), eval {eval_seconds:.0f} s, "
              f"peak RSS {result['peak_rss_mb']:.0f} MiB", flush=True)
        del trainer

    tables = {}
    for kind, title in (("FC", "whitened (FC: PCA-whitening of the training landmarks, then fine-tuned)"),
                        ("raw", "not whitened (pooled, L2)")):
        table = {}
        for row in args.rows:
            r = results[row]
            for when in ("before", "after"):
                if r[when].get(kind):
                    table[f"{r['label']} — {'off the shelf' if when == 'before' else 'fine-tuned'}"] = r[when][kind]
        if table:
            tables[f"rParis and others, {title}"] = table
    tables["validation landmarks and training"] = {
        results[row]["label"]: {
            "val mAP before": results[row]["val_map_before"], "val mAP after": results[row]["val_map_after"],
            "loss first/last": f"{results[row]['loss_first']:.4f} / {results[row]['loss_last']:.4f}",
            "s/triplet": results[row]["seconds_per_triplet"],
            "wall s (init+train+eval)": round(results[row]["init_seconds"] + results[row]["train_seconds"]
                                              + results[row]["eval_seconds"]),
            "peak RSS MiB": results[row]["peak_rss_mb"]} for row in args.rows}
    per_query = {f"{results[row]['label']} | {when} | {k}": v for row in args.rows
                 for when in ("before", "after") for k, v in results[row][f"aps_{when}"].items()}
    config = {k: (str(v) if k == "device" else v) for k, v in vars(args).items()}
    config.update(train_set=train_set.summary(), eval={b.name: b.size for b in benches},
                  threads=torch.get_num_threads(), cpus=os.cpu_count())
    notes = [f"trained on {args.train} groups {args.train_groups} at {args.train_size} px: {args.steps} updates x "
             f"{args.accumulate} triplets, negatives re-mined every {args.remine_every} triplets, margin "
             f"{args.margin}, lr {args.lr}, pairs {args.pairs or 'all same-landmark pairs'}; validation landmarks "
             f"{args.val_groups}; {args.device}."]
    return write_outputs(out, "finetune_landmarks", tables, config, per_query, time.perf_counter() - t0, args.json,
                         notes)


if __name__ == "__main__":
    main()
