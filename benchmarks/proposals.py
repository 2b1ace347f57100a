"""Learned region proposals against R-MAC's rigid grid: Gordo et al. 2016's two figures on our data (issue 14).

(a) Box recall against IoU (Gordo et al., *Deep Image Retrieval*, Fig. 3
middle).  The landmark boxes of the *held-out* landmarks (``landmarks_fr``
groups 19-22, never seen by ``remap train-rpn``): the box of the RANSAC
inliers of every kept verified pair of those groups, merged per image
(:func:`remap_lib.training.landmark_boxes.training_boxes`, the trainer's rule).
Recall at IoU ``t`` = the fraction of these boxes that at least one region
overlaps by IoU ≥ ``t`` (:func:`remap_lib.layers.proposals.recall_curve`), for the
RPN's top-k proposals and for the grid's regions
(:func:`remap_lib.layers.functional.rmac_regions`: S = 4 scales, the default R-MAC,
and every grid region S = 1..5 plus the whole map).  Everything in cells of
the last conv map at ``--box-size`` px (the RPN's training size); the RPN's
proposals are its float boxes (before the rounding to cells that pooling
applies), the grid's are whole cells.  "RPN top-R" takes per image as many
proposals as the S = 4 grid has regions there.

(b) rParis Medium/Hard mAP (Fig. 3 right): R-MAC over the grid (S = 4) and
over the RPN's top k = 8 ... 256 proposals, off the shelf (ImageNet backbone,
the trained RPN) and, with ``--finetuned CKPT``, on a fine-tuned R-MAC
backbone (the RPN is the same: it was trained on the ImageNet maps, so on the
fine-tuned maps it runs off its training distribution).  One backbone pass per
image feeds every row (:class:`remap_lib.describe.shared_pass.SharedBackbone`: the
maps are pooled once per head).  Raw descriptors (pooled, L2; no whitening),
one scale; CPU-sized: ``--size`` 640 px by default (the paper's protocol is 1024).

    python benchmarks/proposals.py [--json] [--rpn runs/train-rpn-landmarks-cpu/model.pt] \\
        [--finetuned runs/finetune_landmarks/rmac/train/model.pt] [--size 640]

Outputs: ``runs/proposals/proposals.{md,csv,json}`` (tables, configuration,
wall time per part, per-query APs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _paper import ROOT, SharedBackbone, combine_scales, find_datasets, scores_row, write_outputs  # noqa: E402
from remap_lib.layers import functional as RF  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import load_dataset, parse_group_range, split_groups  # noqa: E402
from remap_lib.describe.extract import select_device  # noqa: E402
from remap_lib.data.images import ImageSpec, load_spec  # noqa: E402
from remap_lib.training.landmark_boxes import training_boxes  # noqa: E402
from remap_lib.describe.model import RetrievalModel, weights_fingerprint  # noqa: E402
from remap_lib.layers.proposals import recall_curve  # noqa: E402
from remap_lib.training.pairs import load_pairs  # noqa: E402
from remap_lib.training.verification import MatchSettings  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RPN_COMMAND = "remap train-rpn --config configs/train_rpn_landmarks_cpu.yaml"


def held_out_boxes(pairs_csv: str, landmarks: str, groups: str, cache: Path) -> dict[str, list[float]]:
    """Image path → landmark box (pixels) of the images in the kept pairs within ``groups`` of ``landmarks``."""
    part = split_groups(load_dataset(landmarks), parse_group_range(groups))
    paths = {os.path.realpath(spec.path) for spec in part.images}
    pairs = [p for p in load_pairs(pairs_csv)
             if os.path.realpath(p.query) in paths and os.path.realpath(p.positive) in paths]
    if not pairs:
        raise SystemExit(f"{pairs_csv}: no kept pair within groups {groups} of {landmarks}")
    return training_boxes(pairs, merge="union", min_inliers=5, settings=MatchSettings(max_side=1024),
                          cache=cache, workers=1).boxes


def recall_table(shared: SharedBackbone, rpn_model: RetrievalModel, boxes: dict, size: int, ks: list[int],
                 levels: int) -> tuple[dict, dict]:
    """Rows of recall (%) per IoU threshold for the grid and the RPN's top k, and facts about the regions."""
    layer = rpn_model.layers[0]
    rpn = rpn_model.streams[layer].rpn.eval()
    specs = [ImageSpec(p) for p in sorted(boxes)]
    targets, grid_s, grid_all, rpn_props = [], [], [], []
    for positions, maps in shared.passes(specs, [size], [layer], desc="held-out landmarks"):
        fmaps = maps[0][layer]
        for j, i in enumerate(positions):
            width, height = load_spec(specs[i].path).size
            fmap = fmaps[j:j + 1].float()
            h, w = fmap.shape[-2:]
            box = torch.as_tensor(boxes[specs[i].path], dtype=torch.float64) * torch.tensor([w / width, h / height] * 2,
                                                                                          dtype=torch.float64)
            targets.append(box.reshape(1, 4))
            grid_s.append(RF.rmac_regions(h, w, levels))
            grid_all.append(RF.rmac_regions(h, w, 5, full_map=True))
            with torch.no_grad():
                rpn_props.append(rpn.propose(fmap, max(ks))[0][0].cpu())
    rows = {}

    def add(label, proposals, k=None):
        curve = recall_curve(proposals, targets, THRESHOLDS, k)
        rows[label] = {f"IoU≥{t:.1f}": round(100 * r, 1) for t, r in zip(THRESHOLDS, curve)}

    n_s = [len(g) for g in grid_s]
    n_all = [len(g) for g in grid_all]
    add(f"grid S={levels} ({min(n_s)}-{max(n_s)} regions)", grid_s)
    add(f"grid S=1..5 + full map ({min(n_all)}-{max(n_all)} regions)", grid_all)
    add(f"RPN top-R (R = the S={levels} grid's count)", [p[:len(g)] for p, g in zip(rpn_props, grid_s)])
    for k in ks:
        add(f"RPN top-{k}", rpn_props, k)
    facts = {"boxes": len(targets), "grid_regions": [min(n_s), max(n_s)], "grid_all_regions": [min(n_all), max(n_all)],
             "rpn_proposals_mean": round(sum(len(p) for p in rpn_props) / len(rpn_props), 1)}
    return rows, facts


def rparis_rows(shared: SharedBackbone, bench, rpn_model: RetrievalModel, ks: list[int], levels: int,
                prefix: str) -> tuple[dict, dict]:
    """Medium/Hard (and Easy) mAP of grid R-MAC and RPN R-MAC with each k, from one backbone pass."""
    layer = rpn_model.layers[0]
    base = {**rpn_model.config.to_dict(), "whitening": False, "image_sizes": [bench.size], "scale_weights": [1.0]}
    models = {f"{prefix}grid R-MAC S={levels}": shared.model(ModelConfig.from_dict(
        {**base, "regions": "grid", "levels": levels}))}
    for k in ks:
        m = shared.model(ModelConfig.from_dict({**base, "proposals": k}))
        m.streams[layer].rpn.load_state_dict(rpn_model.streams[layer].rpn.state_dict())
        models[f"{prefix}RPN R-MAC k={k}"] = m
    got = shared.describe_many(bench, models, [bench.size], cache=False)
    rows, per_query = {}, {}
    for label, (db, q) in got.items():
        row, aps = scores_row(bench, combine_scales(db), combine_scales(q))
        rows[label] = row
        per_query.update({f"{label} | {c}": v for c, v in aps.items()})
    return rows, per_query


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rpn", default=str(ROOT / "runs" / "train-rpn-landmarks-cpu" / "model.pt"),
                   help="a regions: rpn model.pt of `remap train-rpn`")
    p.add_argument("--finetuned", default=None, help="a fine-tuned R-MAC model.pt: also score on its backbone")
    p.add_argument("--pairs", default=str(ROOT / "runs" / "landmarks_pairs.csv"))
    p.add_argument("--landmarks", default=str(ROOT.parent / "shared" / "data" / "landmarks_fr"))
    p.add_argument("--val-groups", default="19-22", help="held-out landmarks (the RPN never trained on them)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--size", type=int, default=640, help="longer side of the rParis images (paper: 1024)")
    p.add_argument("--box-size", type=int, default=None, help="longer side for the recall (default: the RPN's)")
    p.add_argument("--ks", default="8,16,32,64,128,256", help="proposal counts")
    p.add_argument("--levels", type=int, default=4, help="grid scales S of the R-MAC compared with")
    p.add_argument("--skip-map", action="store_true", help="only the box recall")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "proposals"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.rpn).is_file():
        raise SystemExit(f"no RPN checkpoint at {args.rpn}; train one with `{RPN_COMMAND}` "
                         "(it writes runs/train-rpn-landmarks-cpu/model.pt), or pass --rpn FILE")
    if args.finetuned and not Path(args.finetuned).is_file():
        raise SystemExit(f"no fine-tuned checkpoint at {args.finetuned} (e.g. benchmarks/finetune_landmarks.py "
                         "writes runs/finetune_landmarks/rmac/train/model.pt)")
    ks = [int(k) for k in args.ks.split(",")]
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    device = select_device(args.device)
    rpn_model = RetrievalModel.load(args.rpn).to(device).eval()
    if rpn_model.config.regions != "rpn" or not bool(rpn_model.streams[rpn_model.layers[0]].rpn.trained):
        raise SystemExit(f"{args.rpn} holds no trained RPN (regions: {rpn_model.config.regions}); `{RPN_COMMAND}`")
    box_size = args.box_size or rpn_model.config.image_sizes[0]
    shared = SharedBackbone(rpn_model.config.backbone, "imagenet", None, device)
    notes = []
    if weights_fingerprint(shared.backbone) != weights_fingerprint(rpn_model.backbone):
        notes.append(f"the RPN of {args.rpn} was trained on another backbone than ImageNet's; rows pool its "
                     "proposals on the ImageNet maps all the same")

    t = time.perf_counter()
    boxes = held_out_boxes(args.pairs, args.landmarks, args.val_groups, Path(args.out) / "boxes.cache.jsonl")
    seconds["held-out boxes (SIFT + RANSAC)"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    recall, facts = recall_table(shared, rpn_model, boxes, box_size, ks, args.levels)
    seconds["box recall"] = round(time.perf_counter() - t, 1)
    tables = {f"box recall (%) of the held-out landmarks {args.val_groups} ({facts['boxes']} boxes), "
              f"{box_size} px": recall}
    best = {label: row["IoU≥0.5"] for label, row in recall.items()}
    grid_label = next(iter(recall))
    notes.append(f"IoU ≥ 0.5: {grid_label} {best[grid_label]} %, "
                 + ", ".join(f"{label} {v} %" for label, v in best.items() if label.startswith("RPN")))

    per_query = {}
    if not args.skip_map:
        bench = find_datasets(args.data_root, False, ["rparis6k"], [f"revisited={args.size}"])[0]
        t = time.perf_counter()
        rows, aps = rparis_rows(shared, bench, rpn_model, ks, args.levels, "")
        seconds["rParis, ImageNet backbone"] = round(time.perf_counter() - t, 1)
        per_query.update(aps)
        tables[f"rParis mAP (raw, {args.size} px), ImageNet backbone"] = rows
        if args.finetuned:
            t = time.perf_counter()
            tuned = RetrievalModel.load(args.finetuned)
            if tuned.config.backbone != rpn_model.config.backbone:
                raise SystemExit(f"{args.finetuned} holds a {tuned.config.backbone} backbone, the RPN was trained "
                                 f"on {rpn_model.config.backbone} maps")
            ft_shared = SharedBackbone.wrap(tuned.backbone, device)
            rows, aps = rparis_rows(ft_shared, bench, rpn_model, ks, args.levels, "fine-tuned ")
            seconds["rParis, fine-tuned backbone"] = round(time.perf_counter() - t, 1)
            per_query.update(aps)
            tables[f"rParis mAP (raw, {args.size} px), fine-tuned backbone ({args.finetuned})"] = rows
            notes.append("fine-tuned rows: the RPN was trained on the ImageNet maps; it proposes on the fine-tuned "
                         "maps without retraining (train-rpn `checkpoint:` would train it on them)")
        else:
            notes.append("no --finetuned checkpoint given: off-the-shelf rows only")
    notes.append("rParis descriptors are raw (pooled, L2, one scale, no whitening), EfficientNet-Lite0, "
                 f"{args.size} px on a CPU (the paper's protocol: 1024 px)")
    notes.append("wall time per part (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    config = {**vars(args), "ks": ks, "box_size": box_size, "device": str(device), "thresholds": THRESHOLDS,
              "rpn_model": rpn_model.identity(), "recall_facts": facts, "seconds_per_part": seconds}
    return write_outputs(args.out, "proposals", tables, config, per_query, time.perf_counter() - t0, args.json, notes)


if __name__ == "__main__":
    main()
