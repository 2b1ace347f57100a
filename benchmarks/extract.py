"""Per-image descriptor time: the backbone alone vs backbone + MAC / R-MAC / REMAP head.

All four are timed in one run, interleaved round-robin (so machine noise hits them
alike), on one 1024×768 image, batch 1, on this machine's CPU (or ``--device cuda``).
Reports the median per-image time of each and the ratio to the backbone alone.

    python benchmarks/extract.py            # readable table
    python benchmarks/extract.py --json     # one JSON object
    python benchmarks/extract.py --distributed [--images 64 --size 640 --engine torch]

Target (issue 2): the REMAP head (2 layers, 4 levels = 40 regions) adds at most 5 %.

``--distributed`` times whole ``remap extract`` commands (start-up, model build
and merge included) on a folder of generated photos: one process with all
threads, one process with one thread, and ``torchrun --nproc_per_node 2`` (one
thread each, gloo), and reports images per second of each (issue 13).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remap_lib.nets.backbones import build_backbone  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (after 3 warm-up rounds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--distributed", action="store_true", help="time remap extract with 1 and 2 processes")
    p.add_argument("--images", type=int, default=64, help="--distributed: number of photos")
    p.add_argument("--size", type=int, default=640, help="--distributed: longer side of the photos")
    p.add_argument("--engine", default="torch", help="--distributed: inference engine of the runs")
    args = p.parse_args(argv)
    if args.distributed:
        return distributed(args)

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


def _photos(folder: Path, n: int, size: int) -> None:
    """``n`` distinct photos (crops of scikit-image's), longer side ``size``, 4:3."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    names = ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    photos = [Image.open(Path(skdata.data_dir) / n).convert("RGB") for n in names]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.7, 1)), int(h * rng.uniform(0.7, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img.crop((x, y, x + cw, y + ch)).resize((size, size * 3 // 4)).save(folder / f"p{i:04d}.jpg")


def distributed(args) -> dict:
    repo = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="remap-bench-"))
    try:
        (work / "photos").mkdir()
        _photos(work / "photos", args.images, args.size)
        common = ["extract", str(work / "photos"), "--engine", args.engine, "-q", "--workers", "0",
                  "--image-size", str(args.size)]
        cli = [sys.executable, "-m", "remap_lib.app.cli"]
        runs = {
            "1 process, all threads": ({}, cli),
            "1 process, 1 thread": ({"OMP_NUM_THREADS": "1"}, cli),
            "2 processes (torchrun), 1 thread each": (
                {"OMP_NUM_THREADS": "1"},
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                 "-m", "remap_lib.app.cli"]),
        }
        rows = {}
        for k, (name, (env, cmd)) in enumerate(runs.items()):
            out = work / f"out{k}"
            t = time.perf_counter()
            subprocess.run(cmd + common + ["-o", str(out)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(repo), **env})
            wall = time.perf_counter() - t
            rows[name] = {"seconds": round(wall, 2), "images_per_s": round(args.images / wall, 2)}
        base = rows["1 process, all threads"]["images_per_s"]
        for row in rows.values():
            row["vs_1_process"] = round(row["images_per_s"] / base, 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"images": args.images, "size": f"{args.size}x{args.size * 3 // 4}", "engine": args.engine,
              "cores": os.cpu_count(), "device": "cpu", "runs": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"remap extract of {args.images} photos at {result['size']}, engine {args.engine}, "
              f"{os.cpu_count()} cores; whole commands (start-up, model build, merge included)")
        print(f"{'':40s} {'seconds':>8s} {'img/s':>8s} {'vs 1 process':>13s}")
        for name, row in rows.items():
            print(f"{name:40s} {row['seconds']:8.1f} {row['images_per_s']:8.2f} {row['vs_1_process']:13.3f}")
    return result


if __name__ == "__main__":
    main()
