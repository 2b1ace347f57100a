"""The query browser (notebook 5): seconds per widget change, before and after issue 15, in one run.

Before, every change of the scales, layers or weighting widget described the
whole dataset again with each head it touched: a backbone pass per head
(``describe``).  Now the browser runs the backbone once when it is built, keeps
the feature maps, and a change only re-pools them
(:class:`remap_lib.describe.shared_pass.FeatureMaps`).  This script builds the browser
on the demo set at 320 px and walks through a sequence of widget changes, each
to a setting not seen yet (so nothing comes from the browser's cache):

* **now**: the browser's own call (``set_scales`` / ``_set``), end to end:
  re-pooling, scoring and the HTML, the median of ``--repeats`` runs (the new
  settings are dropped from the cache before each repeat);
* **before**: ``describe`` of each head the change touched, with the same
  engine, as the browser did until issue 15 (once: it is slow).

The KL weighting uses synthetic region weights (seeded): their values do not
change the time.  Target: at most 1 s per change.

Wall-clock seconds depend on what else runs on the machine; the CPU seconds
this process spent on a change (``time.process_time``, summed over its
threads) much less so: on an idle machine with one torch thread they are the
wall time.  Both are shown.
On a machine shared by other jobs, run with ``--threads 1``: more torch
threads than free cores make every parallel region wait for a descheduled
thread (measured here under 4x oversubscription: 10-90 s with 2 threads
against 2-3 s with 1 for the same pooling).

    python benchmarks/browser.py                 # readable table
    python benchmarks/browser.py --threads 1     # on a busy machine
    python benchmarks/browser.py --json          # also one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remap_lib.nets.backbones import build_backbone  # noqa: E402
from remap_lib.app.browser import QueryBrowser  # noqa: E402
from remap_lib.data.datasets import load_dataset  # noqa: E402
from remap_lib.evaluation.evaluate import describe  # noqa: E402
from remap_lib.training.klw import KLWeights  # noqa: E402
from remap_lib.layers.pooling import region_count  # noqa: E402

TARGET_SECONDS = 1.0
# (label, what the browser is told); each leads to a setting not shown before.
CHANGES = [
    ("weighting uniform -> KL (S = 4)", lambda b: b._set(weighting="KL")),
    ("layers 1+2 -> 1", lambda b: b._set(layers="1")),
    ("scales 4 -> 3", lambda b: b.set_scales(3)),
    ("scales 3 -> 5", lambda b: b.set_scales(5)),
    ("layers 1 -> 1+2", lambda b: b._set(layers="1+2")),
    ("scales 5 -> 2", lambda b: b.set_scales(2)),
]


def synthetic_kl_weights(backbone, levels: int = 4, seed: int = 0) -> KLWeights:
    """Positive region weights of the right shape for layers 1 and 2 (timing only)."""
    rng = np.random.default_rng(seed)
    weights = {layer: rng.uniform(0.1, 2.0, region_count(levels)).astype(np.float32)
               for layer in backbone.resolve_layers([1, 2])}
    return KLWeights(weights, {"backbone": backbone.name, "levels": levels, "full_map": False}, {"synthetic": True})


def timed(fn) -> tuple[float, float]:
    """``(wall-clock seconds, CPU seconds of this process)`` of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="demo")
    p.add_argument("--size", type=int, default=320, help="longer side of the images (the notebook's 320)")
    p.add_argument("--engine", default="auto", help="auto (OpenVINO on a CPU), torch, openvino")
    p.add_argument("--precision", default="f32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed re-pools per change (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = load_dataset(args.dataset)
    backbone = build_backbone("efficientnet_lite0")
    kl = synthetic_kl_weights(backbone)
    describe_kw = dict(device=args.device, progress=False, engine=args.engine, precision=args.precision)

    t = time.perf_counter()
    browser = QueryBrowser(ds, image_size=args.size, kl_weights=kl, backbone=backbone, engine=args.engine,
                           precision=args.precision, device=args.device)
    build = time.perf_counter() - t
    t = time.perf_counter()
    for head in ("rmac", "remap"):  # the first view, as the browser built it before
        describe(browser.model(head), ds, None, **describe_kw)
    build_before = time.perf_counter() - t
    rows = [{"change": "build and first view", "heads": 2, "before_s": build_before, "now_s": build}]
    print(f"{ds.summary()}\n{len(ds.images) + len(ds.queries)} images at {args.size} px; {browser.maps}")
    print(f"{'change':34s} {'heads':>5s} {'before (s)':>11s} {'now (s)':>9s} {'now CPU (s)':>12s} "
          f"{'speed-up':>9s}")
    print(f"{rows[0]['change']:34s} {2:5d} {build_before:11.2f} {build:9.2f} {'':12s}   "
          "(one backbone pass, maps kept)")

    for label, change in CHANGES:
        seen = set(browser.cache)
        runs = [timed(lambda: change(browser))]
        new = [key for key in browser.cache if key not in seen]
        for _ in range(args.repeats - 1):  # the same change again: forget what it pooled, redraw
            for key in new:
                del browser.cache[key]
            runs.append(timed(browser.refresh))
        times, cpu = [w for w, _ in runs], [c for _, c in runs]
        t = time.perf_counter()
        for head, *_ in new:
            describe(browser.model(head), ds, None, **describe_kw)
        before = time.perf_counter() - t
        now, now_cpu = statistics.median(times), statistics.median(cpu)
        rows.append({"change": label, "heads": len(new), "before_s": before, "now_s": now, "now_cpu_s": now_cpu,
                     "now_all_s": times})
        print(f"{label:34s} {len(new):5d} {before:11.2f} {now:9.3f} {now_cpu:12.3f} {before / now:8.0f}x",
              flush=True)

    worst = max(r["now_s"] for r in rows[1:])
    worst_cpu = max(r["now_cpu_s"] for r in rows[1:])
    verdict = "met" if worst <= TARGET_SECONDS else "NOT met"
    print(f"\nslowest change now {worst:.3f} s ({worst_cpu:.3f} CPU s, load average {os.getloadavg()[0]:.1f}): "
          f"target <= {TARGET_SECONDS:.0f} s per change {verdict} "
          f"(engine {args.engine}, {torch.get_num_threads()} torch threads, {platform.machine()})")
    blob = {"benchmark": "browser", "dataset": ds.name, "images": len(ds.images) + len(ds.queries),
            "size": args.size, "engine": args.engine, "precision": args.precision, "device": args.device,
            "threads": torch.get_num_threads(), "maps_mb": round(browser.maps.nbytes / 2**20, 1),
            "rows": rows, "slowest_change_s": worst, "slowest_change_cpu_s": worst_cpu, "target_s": TARGET_SECONDS,
            "target_met": worst <= TARGET_SECONDS}
    if args.json:
        print(json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
