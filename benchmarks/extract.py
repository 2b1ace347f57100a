"""Per-image descriptor time: the backbone alone vs backbone + MAC / R-MAC / REMAP head.

All four are timed in one run, interleaved round-robin (so machine noise hits them
alike), on one 1024×768 image, batch 1, on this machine's CPU (or ``--device cuda``).
Reports the median per-image time of each and the ratio to the backbone alone.

    python benchmarks/extract.py            # readable table
    python benchmarks/extract.py --json     # one JSON object

Target (issue 2): the REMAP head (2 layers, 4 levels = 40 regions) adds at most 5 %.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remap_lib.backbones import build_backbone  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.model import RetrievalModel  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (after 3 warm-up rounds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    backbone = build_backbone(args.backbone).to(device)
    models = {
        "mac": RetrievalModel(ModelConfig(backbone=args.backbone, head="mac"), backbone),
        "rmac": RetrievalModel(ModelConfig(backbone=args.backbone, head="rmac", levels=4), backbone),
        "remap": RetrievalModel(ModelConfig(backbone=args.backbone, head="remap", layers=[1, 2], levels=4),
                                backbone),
    }
    x = torch.rand(1, 3, args.height, args.width, device=device)
    last_layer = backbone.paper_layers[0]
    runs = {"backbone": lambda: backbone(x, [last_layer])}
    runs.update({name: (lambda m=m: m(x)) for name, m in models.items()})

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1000

    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for round_ in range(3 + args.repeats):
            for name, fn in runs.items():
                ms = timed(fn)
                if round_ >= 3:
                    times[name].append(ms)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "backbone": args.backbone,
        "input": f"{args.width}x{args.height}",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "backbone_ms": round(med["backbone"], 2),
        "mac_ms": round(med["mac"], 2),
        "rmac_ms": round(med["rmac"], 2),
        "remap_ms": round(med["remap"], 2),
        "mac_overhead": round(med["mac"] / med["backbone"], 4),
        "rmac_overhead": round(med["rmac"] / med["backbone"], 4),
        "remap_overhead": round(med["remap"] / med["backbone"], 4),
        "remap_target_met": med["remap"] / med["backbone"] <= 1.05,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.backbone} at {result['input']}, batch 1, {device} ({result['threads']} threads), "
              f"median of {args.repeats} interleaved rounds")
        print(f"{'':10s} {'ms/image':>10s} {'vs backbone':>12s}")
        for name in ("backbone", "mac", "rmac", "remap"):
            print(f"{name:10s} {med[name]:10.1f} {med[name] / med['backbone']:12.3f}")
        print(f"REMAP head overhead target (<= 1.05): {'met' if result['remap_target_met'] else 'NOT met'}")
    return result


if __name__ == "__main__":
    main()
