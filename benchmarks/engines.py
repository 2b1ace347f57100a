"""CPU inference engines side by side: torch vs OpenVINO, f32 vs bf16 (issue 18).

Speed: images per second of ``engine.describe`` (backbone + head) for
EfficientNet-Lite0 REMAP (layers 1+2, 40 regions), batch 1, one random image
per size (longer side 320 / 640 / 1024, 4:3), every engine timed round-robin
in one process so machine noise hits them alike:

    torch f32 · torch channels_last · torch bf16 (autocast) · openvino f32 · openvino bf16

OpenVINO's one-off costs are reported apart: the export (trace + convert, once
for every size), the compilation per precision, the start-up from the disk
cache, and the first call on a shape not seen before.

End to end (``--rparis DIR``, default ``../shared/data/rparis6k`` when present):
every rParis photo (database at 1024 px, queries cropped to their boxes: every
shape they have) described by each engine from a cold start (export and
compilation counted), then scored with :func:`remap_lib.evaluation.evaluate.score`
(Easy / Medium / Hard mAP); the demo set (640 px) likewise.  Images are decoded
once beforehand, so the times are the model's.

    python benchmarks/engines.py                 # readable tables
    python benchmarks/engines.py --json          # one JSON object
    python benchmarks/engines.py --quick         # 320 + 640 px, 3 rounds, 8 rParis images, no mAP
    python benchmarks/engines.py --sizes 1024 --repeats 20 --rparis ""   # speed table only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remap_lib.describe import engine as E  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import load_dataset  # noqa: E402
from remap_lib.describe.engine import create_engine  # noqa: E402
from remap_lib.evaluation.evaluate import score  # noqa: E402
from remap_lib.describe.extract import scaled_sizes  # noqa: E402
from remap_lib.data.images import load_spec, resize_longer_side  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402

RUNNERS = ("torch f32", "torch channels_last", "torch bf16", "openvino f32", "openvino bf16")
E2E_RUNNERS = ("torch f32", "openvino f32", "openvino bf16")


def make_runners(model, names) -> tuple[dict, dict]:
    """``{name: describe function}`` and the one-off costs of each (seconds)."""
    runners, costs = {}, {}
    for name in names:
        engine, precision = name.split(" ")
        t = time.perf_counter()
        if engine == "openvino":
            E._COMPILED.clear()
            eng = create_engine(model, "openvino", precision, cache_dir=False)
            eng.compiled()
        elif precision == "channels_last":
            cl = copy.deepcopy(model)  # its own weights: the OpenVINO engines keep theirs
            cl.backbone.to(memory_format=torch.channels_last)
            eng = create_engine(cl, "torch")
            runners[name] = (lambda e: lambda x: e.describe([x.contiguous(memory_format=torch.channels_last)]))(eng)
            costs[name] = time.perf_counter() - t
            continue
        else:
            eng = create_engine(model, "torch", precision)
        if eng.precision != precision and precision in E.PRECISIONS:
            print(f"note: {name} runs {eng.precision} on this machine", file=sys.stderr)
        runners[name] = (lambda e: lambda x: e.describe([x]))(eng)
        costs[name] = time.perf_counter() - t
    return runners, costs


def speed(model, sizes, repeats: int) -> dict:
    runners, startup = make_runners(model, RUNNERS)
    # the export alone (once for every size) and the start-up from the disk cache
    E._COMPILED.clear()
    t = time.perf_counter()
    E.export_openvino(model.backbone, model.layers)
    export_s = time.perf_counter() - t
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        create_engine(model, "openvino", cache_dir=tmp).compiled()  # writes the cache
        E._COMPILED.clear()
        t = time.perf_counter()
        create_engine(model, "openvino", cache_dir=tmp).compiled()
        from_disk_s = time.perf_counter() - t
    rows = []
    with torch.inference_mode():
        for size in sizes:
            x = torch.rand(1, 3, size * 3 // 4, size)
            first = {}
            for name, fn in runners.items():
                t = time.perf_counter()
                fn(x)
                first[name] = (time.perf_counter() - t) * 1000
            times = {name: [] for name in runners}
            for round_ in range(1 + repeats):  # one more warm-up round
                for name, fn in runners.items():
                    t = time.perf_counter()
                    fn(x)
                    if round_:
                        times[name].append((time.perf_counter() - t) * 1000)
            for name in runners:
                ms = statistics.median(times[name])
                rows.append({"size": f"{size}x{size * 3 // 4}", "engine": name, "ms": round(ms, 1),
                             "images_per_s": round(1000 / ms, 2), "first_call_ms": round(first[name], 1),
                             "min_ms": round(min(times[name]), 1)})
    return {"rows": rows, "startup_s": {k: round(v, 2) for k, v in startup.items()},
            "openvino_export_s": round(export_s, 2), "openvino_start_from_disk_cache_s": round(from_disk_s, 2)}


def load_inputs(specs, size: int, limit: int | None):
    """Decoded, resized images as uint8 ``(3, H, W)`` tensors (decoding is not what is timed)."""
    out = []
    for spec in specs[:limit]:
        img = load_spec(spec)
        img = resize_longer_side(img, scaled_sizes(max(img.size), [size], False)[0], spec.path)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    return out


def describe_all(model, name: str, inputs: list[torch.Tensor]) -> tuple[np.ndarray, dict]:
    """Descriptors of ``inputs`` (batch 1) by a cold engine, and the seconds: start-up, describing, total."""
    engine, precision = name.split(" ")
    t0 = time.perf_counter()
    E._COMPILED.clear()
    eng = create_engine(model, engine, precision, cache_dir=False)
    if engine == "openvino":
        eng.compiled()
    t1 = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for img in inputs:
            rows.append(eng.describe([img[None].float().div_(255.0)])[0].numpy())
    t2 = time.perf_counter()
    return np.stack(rows), {"startup_s": round(t1 - t0, 2), "describe_s": round(t2 - t1, 2),
                            "total_s": round(t2 - t0, 2), "images_per_s": round(len(inputs) / (t2 - t0), 2)}


def end_to_end(model, dataset, size: int, limit: int | None) -> dict:
    db_in = load_inputs(dataset.images, size, limit)
    q_in = [] if limit else load_inputs(dataset.queries, size, None)
    shapes = {tuple(t.shape[1:]) for t in db_in + q_in}
    out = {"dataset": dataset.name, "size": size, "images": len(db_in) + len(q_in), "shapes": len(shapes),
           "engines": {}}
    reference = None
    for name in E2E_RUNNERS:
        d, times = describe_all(model, name, db_in + q_in)
        entry = dict(times)
        if reference is None:
            reference = d
        else:
            entry["max_abs_diff_vs_torch"] = float(np.abs(d - reference).max())
            cos = (d * reference).sum(1)
            entry["cosine_vs_torch"] = {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}
        if not limit:
            scores = score(dataset, d[:len(db_in)], d[len(db_in):])
            entry["map"] = {p: round(100 * s["map"], 2) for p, s in scores.items()}
        out["engines"][name] = entry
        print(f"  {dataset.name} {name}: {times['total_s']:.1f} s", file=sys.stderr, flush=True)
    return out


def print_tables(result: dict) -> None:
    print(f"{result['backbone']} {result['head']} (layers {', '.join(result['layers'])}), batch 1, "
          f"{result['torch_threads']} torch threads, OpenVINO {result['openvino']}, {result['cpu']}")
    print(f"load average (other processes on this machine) {result['load_average_before']} before, "
          f"{result['load_average_after']} after")
    if result["speed"]:
        print_speed(result["speed"])
    print_end_to_end(result["end_to_end"])


def print_speed(s: dict) -> None:
    print(f"OpenVINO export (trace + convert, serves every size): {s['openvino_export_s']:.1f} s; start-up "
          f"export+compile f32 {s['startup_s']['openvino f32']:.1f} s, bf16 {s['startup_s']['openvino bf16']:.1f} s; "
          f"from the disk cache {s['openvino_start_from_disk_cache_s']:.1f} s\n")
    sizes = list(dict.fromkeys(r["size"] for r in s["rows"]))
    cell = {(r["size"], r["engine"]): r for r in s["rows"]}
    width = 22
    print("images/s (median ms; × torch f32)".ljust(12))
    print(f"{'size':<10}" + "".join(f"{n:>{width}}" for n in RUNNERS))
    for size in sizes:
        base = cell[(size, "torch f32")]["ms"]
        cells = [cell[(size, n)] for n in RUNNERS]
        print(f"{size:<10}" + "".join(f"{c['images_per_s']:>7.2f} ({c['ms']:>6.0f}; {base / c['ms']:>4.1f}×)".rjust(width)
                                      for c in cells))
    print("\nfirst call on a new shape, ms:")
    for size in sizes:
        print(f"{size:<10}" + "".join(f"{cell[(size, n)]['first_call_ms']:>{width}.0f}" for n in RUNNERS))


def print_end_to_end(runs: list[dict]) -> None:
    for e2e in runs:
        print(f"\n{e2e['dataset']}: {e2e['images']} images at {e2e['size']} px in {e2e['shapes']} shapes, "
              "cold start (export + compile counted)")
        protocols = next(iter(e2e["engines"].values())).get("map", {})
        print(f"{'engine':<16}{'start-up s':>11}{'total s':>9}{'img/s':>8}{'min cos':>9}{'max|Δ|':>10}"
              + "".join(f"{'mAP ' + p:>{max(12, len(p) + 6)}}" for p in protocols))
        for name, e in e2e["engines"].items():
            cos = e.get("cosine_vs_torch", {}).get("min")
            diff = e.get("max_abs_diff_vs_torch")
            print(f"{name:<16}{e['startup_s']:>11.1f}{e['total_s']:>9.1f}{e['images_per_s']:>8.2f}"
                  + (f"{cos:>9.5f}" if cos is not None else f"{'-':>9}")
                  + (f"{diff:>10.1e}" if diff is not None else f"{'-':>10}")
                  + "".join(f"{e['map'][p]:>{max(12, len(p) + 6)}.2f}" for p in protocols))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--head", default="remap")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640, 1024], help="longer sides (4:3)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per size (after one warm-up round)")
    default_rparis = ROOT.parent / "shared" / "data" / "rparis6k"
    p.add_argument("--rparis", default=str(default_rparis) if default_rparis.is_dir() else "",
                   help="revisited-Paris folder for the end-to-end run ('' to skip)")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                   help="the speed table (default on; --no-speed for the end-to-end runs only)")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True,
                   help="also the demo set end to end (default on)")
    p.add_argument("--limit", type=int, default=None, help="end to end on the first N database images, no mAP")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="--sizes 320 640 --repeats 3 --limit 8 --no-demo")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.limit, args.demo = [320, 640], 3, args.limit or 8, False
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)

    import openvino

    torch.manual_seed(0)
    model = RetrievalModel(ModelConfig(backbone=args.backbone, head=args.head, layers=[1, 2]))
    result = {"backbone": args.backbone, "head": args.head, "layers": model.layers,
              "torch": torch.__version__, "openvino": openvino.__version__.split("-")[0],
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cpu_capabilities": E._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
              "command": " ".join(sys.argv), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    result["speed"] = speed(model, args.sizes, args.repeats) if args.speed else None
    result["end_to_end"] = []
    if args.rparis:
        dataset = load_dataset(args.rparis)
        result["end_to_end"].append(end_to_end(model, dataset, 1024, args.limit))
    if args.demo:
        result["end_to_end"].append(end_to_end(model, load_dataset("demo"), 640, args.limit))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result)
    return result


if __name__ == "__main__":
    main()
