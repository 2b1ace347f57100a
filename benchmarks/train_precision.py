"""CPU training in bf16 and channels_last against float32: the same loss curve, faster? (issue 18, item 5)

Runs the same short fine-tuning several times from the same start (same seed,
same triplets: hard negatives are mined with the OpenVINO f32 engine, so every
variant mines the same ones), changing only how the training forward and
backward passes compute:

* ``f32``: float32, contiguous tensors (the default);
* ``channels_last``: ``TrainConfig(channels_last=True)``;
* ``bf16``: ``TrainConfig(amp="bf16")``, torch.autocast on the CPU;
* ``bf16+channels_last``: both.

Reports seconds per triplet (median over updates, the first update left out),
the speed-up over f32, and how far each loss curve is from f32's (largest
absolute and relative difference per update).  Default data: 4 landmarks of
``landmarks_fr`` at 320 px.

    python benchmarks/train_precision.py [--json] [--steps 8] [--size 320]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.training.triplet import TrainConfig, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"f32": (None, False), "channels_last": (None, True), "bf16": ("bf16", False),
            "bf16+channels_last": ("bf16", True)}


def run(args, name: str, out: Path) -> dict:
    amp, channels_last = VARIANTS[name]
    cfg = TrainConfig(train=args.train, train_groups=args.groups, model=ModelConfig(head="remap", layers=[1, 2],
                      levels=4, image_sizes=[args.size]), whitening_init="pca", accumulate=args.accumulate,
                      steps=args.steps, remine_every=args.accumulate * args.steps, lr=args.lr,
                      out_dir=str(out / name), checkpoint_every=args.steps, val_every=0, device="cpu", amp=amp,
                      channels_last=channels_last, seed=0, engine="auto")
    trainer = Trainer(cfg)
    trainer.prepare()
    t = time.perf_counter()
    history = trainer.run()
    rows = [r for r in history if "loss" in r]
    return {"losses": [r["loss"] for r in rows], "seconds": round(time.perf_counter() - t, 1),
            "seconds_per_triplet": float(np.median([r["seconds_per_triplet"] for r in rows[1:]] or
                                                   [rows[0]["seconds_per_triplet"]]))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=str(ROOT.parent / "shared" / "data" / "landmarks_fr"))
    p.add_argument("--groups", default="0-3")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if "f32" not in args.variants:
        args.variants.insert(0, "f32")
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(args, name, Path(tmp)) for name in args.variants}
    ref = np.array(results["f32"]["losses"])
    for name, r in results.items():
        losses = np.array(r["losses"])
        r["speedup"] = round(results["f32"]["seconds_per_triplet"] / r["seconds_per_triplet"], 2)
        r["max_abs_loss_diff"] = float(np.abs(losses - ref).max())
        r["max_rel_loss_diff"] = float((np.abs(losses - ref) / np.maximum(np.abs(ref), 1e-8)).max())
    print(f"{args.steps} updates x {args.accumulate} triplets at {args.size} px on {args.train} groups {args.groups}; "
          f"{torch.get_num_threads()} threads; CPU bf16 support: {bf16}")
    print(f"{'variant':<20} {'s/triplet':>10} {'speed-up':>9} {'max |Δloss|':>12} {'max rel':>8}  losses")
    for name, r in results.items():
        print(f"{name:<20} {r['seconds_per_triplet']:>10.3f} {r['speedup']:>8.2f}x {r['max_abs_loss_diff']:>12.4f} "
              f"{r['max_rel_loss_diff']:>8.3f}  {' '.join(f'{x:.4f}' for x in r['losses'])}")
    blob = {"config": vars(args), "cpu_bf16": bf16, "threads": torch.get_num_threads(), "results": results}
    if args.json:
        print(json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
