"""Fine-tuning, before vs after: REMAP vs R-MAC trained the same way (issue 5).

Both start from EfficientNet-Lite0 (ImageNet), get an FC layer initialised by
PCA-whitening of the training images, and are fine-tuned with the triplet loss
and hard negatives on UKBench objects 0–99; evaluated before (after the
whitening init, step 0) and after on UKBench objects 100–149 (4×R@4, mAP) and
on the revisited Paris set (Easy/Medium/Hard, at --eval-size).  REMAP starts
from KL weights estimated on the training objects (the paper's KLW) unless
--alpha ones.  On a CPU keep the images small and the run short (defaults);
on a GPU use --size 1024 --accumulate 64 --steps 100 --remine-every 3000 --amp bf16.

    python benchmarks/finetune.py [--json] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import load_revisited, load_ukbench, split_groups  # noqa: E402
from remap_lib.evaluation.evaluate import describe, score  # noqa: E402
from remap_lib.training.klw import estimate_kl_weights  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402
from remap_lib.training.triplet import TrainConfig, Trainer  # noqa: E402


def _scores(model, datasets, eval_size, device):
    out = {}
    for name, ds in datasets.items():
        sizes = model.config.image_sizes
        if name != "ukbench-test":
            model.config.image_sizes = [eval_size]
        s = score(ds, *describe(model, ds, None, device, progress=False))
        model.config.image_sizes = sizes
        if "ukbench" in s:
            out[f"{name}/4xR@4"] = round(s["ukbench"]["score"], 4)
            out[f"{name}/mAP"] = round(100 * s["map"]["map"], 2)
        else:
            out.update({f"{name}/{p}": round(100 * s[p]["map"], 2) for p in ("easy", "medium", "hard")})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--size", type=int, default=240, help="training image size (longer side)")
    p.add_argument("--eval-size", type=int, default=1024, help="rParis evaluation size")
    p.add_argument("--accumulate", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--remine-every", type=int, default=320)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", choices=("kl", "ones"), default="kl")
    p.add_argument("--amp", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/finetune-bench")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    root = Path(args.data_root)
    ukbench = load_ukbench(root / "ukbench")
    train_set = split_groups(ukbench, range(0, 100))
    evals = {"ukbench-test": split_groups(ukbench, range(100, len(set(ukbench.groups))))}
    if (root / "rparis6k").is_dir():
        evals["rparis6k"] = load_revisited(root / "rparis6k", "rparis6k")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)

    rows, t_start = {}, time.perf_counter()
    for label, head, layers in (("REMAP (layers 1+2)", "remap", [1, 2]), ("R-MAC (layer 1)", "rmac", [1])):
        out = Path(args.out) / head
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        model_cfg = ModelConfig(head=head, layers=layers, levels=4, image_sizes=[args.size])
        alpha_init = "ones"
        if head == "remap" and args.alpha == "kl":
            klw = estimate_kl_weights(RetrievalModel(model_cfg), train_set, input_size=(320, 240), progress=False)
            klw.save(out / "klw.json")
            alpha_init = str(out / "klw.json")
        cfg = TrainConfig(train="ukbench", model=model_cfg, alpha_init=alpha_init, accumulate=args.accumulate,
                          steps=args.steps, remine_every=args.remine_every, lr=args.lr, out_dir=str(out / "run"),
                          checkpoint_every=args.steps, val_every=0, device=device, amp=args.amp)
        trainer = Trainer(cfg, train_set=train_set, val_set=None)
        trainer.prepare()
        before = _scores(trainer.model, evals, args.eval_size, device)
        t = time.perf_counter()
        history = trainer.run()
        train_seconds = time.perf_counter() - t
        after = _scores(trainer.model, evals, args.eval_size, device)
        losses = [r["loss"] for r in history if "loss" in r]
        rows[label] = {"before": before, "after": after, "dim": trainer.model.output_dim,
                       "loss_first": losses[0], "loss_last": losses[-1],
                       "seconds_per_triplet": round(train_seconds / (args.steps * args.accumulate), 3),
                       "peak_memory_mb": max(r.get("peak_memory_mb", 0) for r in history)}
        print(f"{label}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; {rows[label]['seconds_per_triplet']} s/triplet",
              flush=True)

    cols = list(next(iter(rows.values()))["before"])
    print(f"\nfine-tuned on UKBench objects 0-99 at {args.size} px, {args.steps} updates x {args.accumulate} "
          f"triplets, {device}\n")
    print(f"{'':28s}" + "".join(f"{c:>20s}" for c in cols))
    for label, r in rows.items():
        for when in ("before", "after"):
            print(f"{label + ' ' + when:28s}" + "".join(f"{r[when][c]:>20}" for c in cols))
    blob = {"device": device, "size": args.size, "steps": args.steps, "accumulate": args.accumulate,
            "seconds": round(time.perf_counter() - t_start, 1), "rows": rows}
    if args.json:
        print(json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
