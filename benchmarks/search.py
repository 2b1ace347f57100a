"""Search at scale: flat float32 vs flat PQ 16×8 vs IVF-PQ over up to 1,000,000 descriptors (issue 6).

The database: the real REMAP descriptors of ../shared/data and the demo set
(~1,000 images; PCA-whitened, first 128 dimensions: the paper's compact
descriptor) plus synthetic distractors up to ``--n``, drawn from a Gaussian
with the real descriptors' mean and covariance, L2-normalised
(:func:`remap_lib.index.synthetic_distractors`).  Queries: the real rParis
queries and UKBench images.  For each index: build (train + add) time, bytes of
code per image, single-query latency p50/p99 on this machine, recall@10
against exact search.  IVF-PQ's ``nprobe`` is the smallest whose recall@10 reaches
0.9 of *exact PQ search over the same codes* (an exhaustive scan, nprobe = nlist):
what the inverted file's probing loses.  IVF-PQ quantises residuals, flat PQ the
vectors themselves, so their top-10s also differ by quantisation noise; recall
against flat PQ and against exact float search is reported beside it.

Targets: PQ stores ≤ 16 bytes per image; flat-PQ p50 ≤ 20 ms over 1M; IVF-PQ
p50 ≤ 2 ms with recall@10 ≥ 0.9 of exact PQ.

    python benchmarks/search.py [--n 1000000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from _real_descriptors import real_descriptors  # noqa: E402
from remap_lib.index import RetrievalIndex, synthetic_distractors  # noqa: E402


def _latency(index: RetrievalIndex, queries: np.ndarray, k: int, nprobe: int | None = None):
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k, nprobe=nprobe)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _recall(found: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, reference)]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database size")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"))
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4*sqrt(n))")
    p.add_argument("--train", type=int, default=100_000, help="vectors to train the quantisers")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())

    real, _ = real_descriptors("remap", Path(args.data_root), Path(args.cache))
    base = np.concatenate([real["ukbench"], real["rparis6k"], real["demo"]])
    n_fake = max(0, args.n - len(base))
    t = time.perf_counter()
    db = np.concatenate([base, synthetic_distractors(base, n_fake, seed=0)]) if n_fake else base[:args.n]
    gen_seconds = time.perf_counter() - t
    queries = np.concatenate([real["rparis6k_queries"], real["ukbench"]])[:args.queries]
    paths = [str(i) for i in range(len(db))]
    train = db[np.random.default_rng(0).choice(len(db), min(args.train, len(db)), replace=False)]
    nlist = args.nlist or int(2 ** round(np.log2(4 * np.sqrt(len(db)))))
    k = 10

    rows = {}
    results = {}
    for name, factory in (("flat float32", "Flat"), ("flat PQ 16x8", "PQ16"), (f"IVF{nlist}-PQ 16x8", f"IVF{nlist},PQ16")):
        index = RetrievalIndex(db.shape[1], factory)
        t = time.perf_counter()
        index.train(train)
        index.add(db, paths)
        build = time.perf_counter() - t
        results[name] = index
        rows[name] = {"factory": factory, "build_s": round(build, 2), "bytes_per_image": index.bytes_per_vector()}
        print(f"built {name} over {len(db)} vectors in {build:.1f} s", flush=True)

    exact = results["flat float32"].search(queries, k)[1]
    pq = results["flat PQ 16x8"].search(queries, k)[1]
    ivf_name = f"IVF{nlist}-PQ 16x8"
    ivf_exhaustive = results[ivf_name].search(queries, k, nprobe=nlist)[1]  # exact PQ over the IVF codes
    for name in ("flat float32", "flat PQ 16x8"):
        p50, p99 = _latency(results[name], queries, k)
        rows[name].update({"p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                           "recall@10_vs_exact": round(_recall(results[name].search(queries, k)[1], exact), 4)})
    sweep = []
    chosen = None
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        found = results[ivf_name].search(queries, k, nprobe=nprobe)[1]
        r_pq, r_exact = _recall(found, ivf_exhaustive), _recall(found, exact)
        p50, p99 = _latency(results[ivf_name], queries, k, nprobe)
        sweep.append({"nprobe": nprobe, "recall@10_vs_pq": round(r_pq, 4), "recall@10_vs_exact": round(r_exact, 4),
                      "recall@10_vs_flat_pq": round(_recall(found, pq), 4),
                      "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)})
        if chosen is None and r_pq >= 0.9:
            chosen = sweep[-1]
            break
    chosen = chosen or sweep[-1]
    rows[ivf_name].update({"nprobe": chosen["nprobe"], "p50_ms": chosen["p50_ms"], "p99_ms": chosen["p99_ms"],
                           "recall@10_vs_pq": chosen["recall@10_vs_pq"],
                           "recall@10_vs_flat_pq": chosen["recall@10_vs_flat_pq"],
                           "recall@10_vs_exact": chosen["recall@10_vs_exact"]})
    rows["flat PQ 16x8"]["recall@10_vs_pq"] = 1.0
    targets = {"pq_bytes<=16": rows["flat PQ 16x8"]["bytes_per_image"] <= 16,
               "flat_pq_p50<=20ms": rows["flat PQ 16x8"]["p50_ms"] <= 20,
               "ivfpq_p50<=2ms": rows[ivf_name]["p50_ms"] <= 2,
               "ivfpq_recall>=0.9": rows[ivf_name]["recall@10_vs_pq"] >= 0.9}

    print(f"\n{len(db)} descriptors ({len(base)} real, {n_fake} synthetic, generated in {gen_seconds:.1f} s), "
          f"128-D, {len(queries)} single queries, {faiss.omp_get_max_threads()} threads\n")
    print(f"{'index':22s}{'build s':>9s}{'bytes':>8s}{'p50 ms':>9s}{'p99 ms':>9s}{'R@10 exact':>12s}"
          f"{'R@10 PQ':>10s}   (PQ: exhaustive ADC over the index's own codes)")
    for name, r in rows.items():
        print(f"{name:22s}{r['build_s']:9.1f}{r['bytes_per_image']:8.0f}{r['p50_ms']:9.3f}{r['p99_ms']:9.3f}"
              f"{r['recall@10_vs_exact']:12.3f}{r.get('recall@10_vs_pq', float('nan')):10.3f}")
    print(f"\nIVF nprobe sweep: " + ", ".join(f"{s['nprobe']}: R@10(PQ) {s['recall@10_vs_pq']:.3f} "
                                             f"p50 {s['p50_ms']:.2f} ms" for s in sweep))
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()))
    blob = {"n": len(db), "real": len(base), "synthetic": n_fake, "dim": int(db.shape[1]),
            "threads": faiss.omp_get_max_threads(), "queries": len(queries), "rows": rows, "ivf_sweep": sweep,
            "targets": targets}
    if args.json:
        print(json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
