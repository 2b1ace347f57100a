"""Paper Fig. 8 and Table VII on our data: compact codes as the database grows with distractors.

Queries: the 12 revisited-Paris queries (cropped); database: the 238 rParis
images, then the real distractors we have (600 UKBench and 153 demo images),
then synthetic distractors (Gaussian fitted to the real descriptors,
:func:`remap_lib.search.sources.synthetic_distractors`) up to ``--max-n``.  Methods, all
EfficientNet-Lite0 off the shelf, PCA-whitened (learned on UKBench + demo) and
truncated to 128-D: Fig. 8's REMAP 128-D (flat), REMAP PQ 16×8 (ADC), R-MAC
128-D and R-MAC PQ 16×8; Table VII's compact baselines MAC, SPoC and GeM 128-D.
mAP (Medium and Hard) from the top-1000 of each search.  The PQ codebook is
trained once, on a fixed sample of the largest database, and reused at every size.

    python benchmarks/distractors.py [--max-n 1000000] [--json] [--plot runs/fig8.png]
    python benchmarks/distractors.py --methods "REMAP 128-D" "R-MAC 128-D"   # a subset

Writes ``fig8_table7.csv/.json/.md`` (with the configuration) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _paper import write_outputs  # noqa: E402
from _real_descriptors import real_descriptors  # noqa: E402
from remap_lib.search.index import RetrievalIndex  # noqa: E402
from remap_lib.search.sources import synthetic_distractors  # noqa: E402
from remap_lib.evaluation.metrics import mean_average_precision  # noqa: E402

METHODS = {"REMAP 128-D": ("remap", "Flat"), "REMAP PQ 16x8": ("remap", "PQ16"), "R-MAC 128-D": ("rmac", "Flat"),
           "R-MAC PQ 16x8": ("rmac", "PQ16"), "GeM 128-D": ("gem", "Flat"), "MAC 128-D": ("mac", "Flat"),
           "SPoC 128-D": ("spoc", "Flat")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"))
    p.add_argument("--max-n", type=int, default=1_000_000)
    p.add_argument("--top", type=int, default=1000)
    p.add_argument("--plot", default=str(ROOT / "runs" / "paper" / "fig8_table7" / "fig8.png"))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "runs" / "paper" / "fig8_table7"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    methods = {m: METHODS[m] for m in args.methods}

    descs = {}
    for head in dict.fromkeys(h for h, _ in methods.values()):
        real, rparis = real_descriptors(head, Path(args.data_root), Path(args.cache))
        base = np.concatenate([real["rparis6k"], real["ukbench"], real["demo"]])
        fake = synthetic_distractors(base, max(0, args.max_n - len(base)), seed=0)
        descs[head] = (np.concatenate([base, fake]), real["rparis6k_queries"])
    n_real = len(base)
    sizes = sorted({238, n_real} | {s for s in (10_000, 100_000, 1_000_000) if s <= args.max_n})
    gnd = {p: rparis.gnd[p] for p in ("medium", "hard")}

    table = {m: {} for m in methods}
    for name, (head, factory) in methods.items():
        db, queries = descs[head]
        # one codebook for every size, trained on a fixed sample of the largest database
        train = db[np.random.default_rng(0).choice(len(db), min(100_000, len(db)), replace=False)]
        for n in sizes:
            index = RetrievalIndex(db.shape[1], factory)
            index.train(train)
            index.add(db[:n], [str(i) for i in range(n)])
            ids = index.search(queries, args.top)[1]
            table[name][n] = {p: round(100 * mean_average_precision(ids, g)[0], 2) for p, g in gnd.items()}
            print(f"{name:15s} n={n:>8d}: Medium {table[name][n]['medium']:.2f}  Hard {table[name][n]['hard']:.2f}",
                  flush=True)

    print(f"\nrParis mAP (Medium / Hard) as the database grows (first {n_real} real, then synthetic)\n")
    print(f"{'':16s}" + "".join(f"{n:>16d}" for n in sizes))
    for name in methods:
        print(f"{name:16s}" + "".join(f"{table[name][n]['medium']:>8.1f} /{table[name][n]['hard']:>5.1f}"
                                      for n in sizes))
    if args.plot:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, protocol in zip(axes, ("medium", "hard")):
            for name in methods:
                ax.plot(sizes, [table[name][n][protocol] for n in sizes], marker="o", label=name)
            ax.set_xscale("log")
            ax.axvline(n_real, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("database size (log); dotted: end of real images")
            ax.set_ylabel(f"rParis {protocol} mAP (%)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=90)
        print(f"\nplot: {args.plot}")
    tables = {f"rParis {p.title()} mAP (%) vs database size": {m: {f"{n:,}": table[m][n][p] for n in sizes}
                                                                for m in methods} for p in ("medium", "hard")}
    config = {**vars(args), "sizes": sizes, "real": n_real, "whitening": "PCA-whitening learned on UKBench + demo",
              "pq_training": "one codebook per method, trained on 100k vectors of the largest database"}
    return write_outputs(args.out, "fig8_table7", tables, config, None, time.perf_counter() - t0, args.json,
                         [f"first {n_real} database vectors are real images, the rest synthetic distractors."])

if __name__ == "__main__":
    main()
