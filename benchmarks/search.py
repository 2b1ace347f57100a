"""Search at scale over up to 10M descriptors: IVF-PQ 16×8, + SQ8 refine (8-bit or fast-scan 4-bit PQ), on disk.

The database: the real REMAP descriptors of ../shared/data and the demo set
(~1,000 images; PCA-whitened, first 128 dimensions: the paper's compact
descriptor) plus synthetic distractors up to ``--n``, one million at a time:

* ``--distractors gaussian`` (issue 6's set): drawn from a Gaussian with the
  real descriptors' mean and covariance, L2-normalised
  (:func:`remap_lib.search.sources.synthetic_distractors`).  After whitening that is
  close to uniform on the sphere: every distractor is an unrelated image, and
  the exact top-10 of a query past its few true matches is the far tail of
  millions of near-orthogonal vectors (cosine ~0.45 at 10M), scattered over
  the inverted lists.  Queries: the real rParis queries and UKBench images.
* ``--distractors clustered``: the same Gaussian draws the *objects*; each
  object has 1-100 photos (log-uniform: half have fewer than 10), its photos
  being the object's direction plus isotropic noise, L2-normalised, at cosine
  ~0.85 to each other (the median of UKBench's same-object pairs here).
  Queries: a new photo (not in the database) of an object picked in
  proportion to its number of photos.

They are written chunk by chunk as a ``remap extract`` folder
(``descriptors.npy``, ``paths.jsonl``, ``manifest.json`` with the SHA-256 of
both, ``extraction.json``) under ``--work``, reused by later runs; the matrix
is never in memory.  Ground truth: exact float32 inner-product top-10, by
brute force over chunks of the file.

Configurations (16 bytes of PQ code an image in each):

* ``ivfpq``: ``IVF{--nlist},PQ16x8``, the PQ distances alone;
* ``refine``: the same with SQ8 codes (128 bytes) re-ranking a shortlist of
  ``k x refine_k`` candidates (faiss ``IndexRefine``);
* ``fastscan``: ``IVF{--fastscan-nlist},PQ32x4fs`` + SQ8: 4-bit PQ, whose
  lookups run 32 codes at a time in SIMD registers, so that a query can scan
  millions of codes and keep a shortlist of thousands for the SQ8 codes;
* ``ondisk``: ``IVF{--nlist},PQ16x8`` with merged on-disk inverted lists.

A single query searches its lists on every thread (IVF ``parallel_mode``,
fast-scan ``implem``; :meth:`RetrievalIndex.search`).

Each configuration is built from the folder exactly as ``remap index build``
does (:meth:`RetrievalIndex.build` / :func:`~remap_lib.search.on_disk.build_on_disk`:
streamed in chunks, trained on ``--train`` random rows, checksum verified) in
a fresh process, so that its peak RSS is its own, and saved; a second fresh
process loads it and searches it one query at a time over a sweep of
``nprobe`` (and ``refine_k``), then times the chosen setting again on one
thread.  Reported: build time, peak RSS of the build,
bytes of code per image (+8 bytes of id in the inverted lists) and bytes of
index files per image (paths included), p50/p99 latency and recall@10 against
exact float search at the operating point: the fastest setting with
recall@10 ≥ 0.9, else the best recall at p50 ≤ 5 ms.  For the on-disk index,
the search process's resident memory after loading and after the queries,
split into its own (anonymous) memory and file-backed pages of the
memory-mapped ``.ivfdata`` (the kernel's page cache: shared, evictable).

Targets (issue 13): with refine, recall@10 ≥ 0.9 at p50 ≤ 5 ms (judged per
refine row); the on-disk index searched memory-mapped with RSS far below its size.

    python benchmarks/search.py --n 10000000 [--distractors gaussian|clustered] [--shards 1 2]
                                [--work runs/search-bench] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from remap_lib.describe.extraction_files import FORMAT as EXTRACTION_FORMAT  # noqa: E402
from remap_lib.search.index import RetrievalIndex  # noqa: E402
from remap_lib.search.on_disk import build_on_disk  # noqa: E402
from remap_lib.search.sources import DescriptorSource, synthetic_distractors  # noqa: E402

K = 10
GEN_CHUNK = 1_000_000
PHOTO_NOISE = 0.42  # clustered: ||noise|| of a photo around its object's unit direction (cosine ~ 1 / (1 + 0.42^2))
SWEEP_NPROBE = (8, 16, 32, 64, 128, 256, 512, 1024)
SWEEP_REFINE = ((16, 32, 64, 128, 256, 512, 1024), (8, 16, 32, 64, 128, 256))  # nprobe x refine_k
SWEEP_FASTSCAN = ((16, 32, 64, 128, 256, 384, 512), (10, 20, 50, 100, 200, 300))  # nprobe x refine_k


def sweep_settings(refine: bool, fast_scan: bool) -> list[dict]:
    """The (nprobe, refine_k) grid a configuration is searched over."""
    if not refine:
        return [{"nprobe": p} for p in SWEEP_NPROBE]
    probes, factors = SWEEP_FASTSCAN if fast_scan else SWEEP_REFINE
    return [{"nprobe": p, "refine_k": r} for p in probes for r in factors]


# ---------------------------------------------------------------------- data
def _base_descriptors(args):
    """Real descriptors (database part, names) and the queries."""
    from _real_descriptors import real_descriptors

    real, _ = real_descriptors("remap", Path(args.data_root), Path(args.cache))
    parts = [("ukbench", real["ukbench"]), ("rparis6k", real["rparis6k"]), ("demo", real["demo"])]
    base = np.concatenate([x for _, x in parts]).astype(np.float32)
    names = [f"real/{name}/{i:05d}" for name, x in parts for i in range(len(x))]
    queries = np.concatenate([real["rparis6k_queries"], real["ukbench"]])[:args.queries].astype(np.float32)
    return base, names, queries


def clustered_distractors(base: np.ndarray, n: int, n_queries: int, seed: int):
    """``n`` photos of synthetic objects (1-100 photos each) and ``n_queries`` new photos of them."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(0, np.log(101), size=n // 8 + 100)).astype(np.int64)  # log-uniform 1..100
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    centres = synthetic_distractors(base, len(sizes), seed=seed)

    def photos(objects):
        x = centres[objects] + PHOTO_NOISE / np.sqrt(base.shape[1]) * rng.standard_normal(
            (len(objects), base.shape[1]), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    rows = np.empty((n, base.shape[1]), np.float32)
    objects = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    for s in range(0, n, 100_000):
        rows[s:s + 100_000] = photos(objects[s:s + 100_000])
    return rows, photos(rng.choice(len(sizes), n_queries, p=sizes / sizes.sum()))


def write_folder(folder: Path, n: int, base: np.ndarray, names: list[str], kind: str, n_queries: int,
                 seed: int = 0) -> float:
    """An extraction folder of ``n`` rows (``base`` first, then distractors), written chunk by chunk.

    ``kind="clustered"`` also writes ``queries.npy`` beside it (new photos of its objects).
    """
    from remap_lib.config import ModelConfig

    manifest_file = folder / "manifest.json"
    if manifest_file.exists() and json.loads(manifest_file.read_text()).get("count") == n:
        return 0.0
    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    manifest_file.unlink(missing_ok=True)
    d = base.shape[1]
    rows_sha, paths_sha = hashlib.sha256(), hashlib.sha256()
    chunks = range(0, n, GEN_CHUNK)
    queries = []
    with open(folder / "descriptors.npy", "wb") as f, open(folder / "paths.jsonl", "wb") as g:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
        for k, start in enumerate(chunks):
            stop = min(start + GEN_CHUNK, n)
            real = base[start:stop]
            n_fake = stop - start - len(real)
            if kind == "gaussian":
                fake = synthetic_distractors(base, n_fake, seed=seed + 1 + k)
            else:  # each chunk its own objects; queries spread over the chunks by their number of photos
                n_q = round(n_queries * stop / n) - round(n_queries * start / n)
                fake, q = clustered_distractors(base, n_fake, n_q, seed=seed + 1 + k)
                queries.append(q)
            rows = np.ascontiguousarray(np.concatenate([real, fake]), dtype=np.float32)
            rows_sha.update(rows.data)
            f.write(rows.data)
            lines = "".join(json.dumps(names[i] if i < len(names) else f"synthetic/{i:09d}.jpg") + "\n"
                            for i in range(start, stop)).encode()
            paths_sha.update(lines)
            g.write(lines)
            print(f"  wrote {stop:,} / {n:,} descriptors", file=sys.stderr, flush=True)
    config = ModelConfig(head="remap", layers=[1, 2], levels=4, image_sizes=[1024])
    extraction = {"format": EXTRACTION_FORMAT, "model": config.to_dict(), "model_digest": config.digest(),
                  "weights_fingerprint": None, "precision": "f32", "sources": {}}
    (folder / "extraction.json").write_text(json.dumps(extraction, indent=2))
    if kind == "clustered":
        np.save(folder / "queries.npy", np.concatenate(queries).astype(np.float32))
    manifest = {"format": EXTRACTION_FORMAT, "count": n, "dim": d, "failed": 0, "model_digest": config.digest(),
                "weights_fingerprint": None, "descriptors_sha256": rows_sha.hexdigest(),
                "paths_sha256": paths_sha.hexdigest()}
    manifest_file.write_text(json.dumps(manifest, indent=2))
    return time.perf_counter() - t


def exact_top_k(folder: Path, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, float]:
    """Exact inner-product top-k of ``queries`` over the folder's rows (brute force, chunk by chunk), cached."""
    cache = folder / f"exact_top{k}_{hashlib.sha256(queries.tobytes()).hexdigest()[:12]}.npy"
    if cache.exists():
        return np.load(cache), 0.0
    t = time.perf_counter()
    source = DescriptorSource.open(folder)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start, rows in source.chunks(GEN_CHUNK):
        s, i = faiss.knn(queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    np.save(cache, best_i)
    return best_i, time.perf_counter() - t


# ---------------------------------------------------------------------- child processes
def _memory() -> dict:
    """Resident memory of this process in MiB: total, peak, anonymous, file-backed."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": fields.get("VmRSS"), "peak_mib": fields.get("VmHWM"), "anon_mib": fields.get("RssAnon"),
            "file_mib": fields.get("RssFile")}


def child_build(task: dict) -> dict:
    before = _memory()
    source = DescriptorSource.open(task["folder"])
    t = time.perf_counter()
    common = dict(nprobe=16, train_size=task["train"], seed=0)
    if task["on_disk"]:
        index = build_on_disk(source, task["out"], task["factory"], shards=task["shards"], **common)
    else:
        index = RetrievalIndex.build(source, task["factory"], refine=task["refine"], **common)
        index.save(task["out"])
    seconds = time.perf_counter() - t
    files = [task["out"]] + ([f"{task['out']}.ivfdata"] if task["on_disk"] else [])
    return {"build_s": round(seconds, 1), "memory_before_mib": before, "memory_after": _memory(),
            "code_bytes": index.bytes_per_vector(), "file_bytes": sum(os.path.getsize(f) for f in files),
            "ivfdata_bytes": os.path.getsize(files[1]) if task["on_disk"] else 0}


def _time_single_queries(index, queries: np.ndarray, setting: dict) -> tuple[list[float], list[np.ndarray]]:
    """Search ``queries`` one at a time with ``setting``: milliseconds and top-K ids of each."""
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        _, ids = index.search(q[None], K, **setting)
        times.append((time.perf_counter() - t) * 1000)
        found.append(ids[0])
    return times, found


def child_search(task: dict) -> dict:
    queries, exact = np.load(task["queries"]), np.load(task["exact"])
    idle = _memory()
    t = time.perf_counter()
    index = RetrievalIndex.load(task["out"])
    load_s = time.perf_counter() - t
    loaded = _memory()
    settings = task["sweep"]
    index.search(queries[:5], K, nprobe=settings[0]["nprobe"])  # warm-up
    index.search(queries[:1], K, **settings[0])
    first_query = _memory()
    sweep = []
    for setting in settings:
        times, found = _time_single_queries(index, queries, setting)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)]))
        sweep.append({**setting, "p50_ms": round(float(np.percentile(times, 50)), 3),
                      "p99_ms": round(float(np.percentile(times, 99)), 3), "recall@10": round(recall, 4)})
    after = _memory()
    chosen = operating_point(sweep)
    setting = {key: chosen[key] for key in ("nprobe", "refine_k") if key in chosen}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the same setting on one core: what spreading a query's lists gains
    times, _ = _time_single_queries(index, queries, setting)
    faiss.omp_set_num_threads(threads)
    return {"load_s": round(load_s, 2), "memory_idle": idle, "memory_loaded": loaded,
            "memory_after_first_query": first_query, "memory_after_queries": after, "sweep": sweep,
            "chosen": chosen, "p50_ms_one_thread": round(float(np.percentile(times, 50)), 3)}


def _run_child(kind: str, task: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(task)], stdout=subprocess.PIPE,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def operating_point(sweep: list[dict], recall: float = 0.9, p50_ms: float = 5.0) -> dict:
    """The fastest setting with recall ≥ ``recall``; else the best recall at p50 ≤ ``p50_ms``; else the best."""
    good = [s for s in sweep if s["recall@10"] >= recall]
    if good:
        return min(good, key=lambda s: s["p50_ms"])
    fast = [s for s in sweep if s["p50_ms"] <= p50_ms] or sweep
    return max(fast, key=lambda s: (s["recall@10"], -s["p50_ms"]))


# ---------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database size")
    p.add_argument("--distractors", choices=["gaussian", "clustered"], default="gaussian",
                   help="unrelated images (issue 6's set) or photos of objects (see above)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"), help="real descriptors (cached)")
    p.add_argument("--work", default=str(ROOT / "runs" / "search-bench"), help="descriptor folders and indexes")
    p.add_argument("--nlist", type=int, default=4096, help="IVF lists (4096: ~2,400 vectors a list at 10M)")
    p.add_argument("--fastscan-nlist", type=int, default=1024,
                   help="IVF lists of the fast-scan row (fewer, longer lists: it scans more codes a query)")
    p.add_argument("--train", type=int, default=200_000, help="random vectors the quantisers are trained on")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--shards", type=int, nargs="+", default=[2], help="on-disk builds with these shard counts")
    p.add_argument("--configs", nargs="+", default=["ivfpq", "refine", "fastscan", "ondisk"],
                   choices=["ivfpq", "refine", "fastscan", "ondisk"])
    p.add_argument("--keep", action="store_true", help="keep the index files")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.distractors == "clustered" and args.n <= 2000:
        p.error("--distractors clustered needs --n above 2000 (the real descriptors come first)")
    if args.child:
        kind, task = args.child
        print(json.dumps((child_build if kind == "build" else child_search)(json.loads(task))))
        return {}

    work = Path(args.work)
    folder = work / f"desc-{args.distractors}-{args.n}"
    base, names, queries = _base_descriptors(args)
    gen_s = write_folder(folder, args.n, base[:args.n], names, args.distractors, args.queries)
    if args.distractors == "clustered":
        queries = np.load(folder / "queries.npy")
    exact, exact_s = exact_top_k(folder, queries)
    np.save(folder / "search-queries.npy", queries)
    np.save(folder / "search-exact.npy", exact)
    factory = f"IVF{args.nlist},PQ16x8"
    configs = []
    if "ivfpq" in args.configs:
        configs.append((f"IVF{args.nlist}-PQ16x8", dict(factory=factory, refine=None, on_disk=False, shards=1)))
    if "refine" in args.configs:
        configs.append((f"IVF{args.nlist}-PQ16x8 + SQ8", dict(factory=factory, refine="SQ8", on_disk=False,
                                                              shards=1)))
    if "fastscan" in args.configs:
        configs.append((f"IVF{args.fastscan_nlist}-PQ32x4fs + SQ8",
                        dict(factory=f"IVF{args.fastscan_nlist},PQ32x4fs", refine="SQ8", on_disk=False, shards=1)))
    if "ondisk" in args.configs:
        for shards in args.shards:
            configs.append((f"IVF{args.nlist}-PQ16x8 on disk/{shards}",
                            dict(factory=factory, refine=None, on_disk=True, shards=shards)))

    rows, searched_on_disk = {}, False
    for name, cfg in configs:
        slug = name.replace(" ", "").replace("/", "-").replace("+", "-")
        out = work / f"index-{args.distractors}-{args.n}-{slug}.remap"
        task = {**cfg, "folder": str(folder), "out": str(out), "train": args.train}
        print(f"building {name} over {args.n:,} vectors", file=sys.stderr, flush=True)
        row = {"factory": cfg["factory"], "refine": cfg["refine"], "on_disk": cfg["on_disk"],
               "shards": cfg["shards"], **_run_child("build", task)}
        if not (cfg["on_disk"] and searched_on_disk):  # on-disk builds of any shard count are the same index
            print(f"searching {name}", file=sys.stderr, flush=True)
            sweep = sweep_settings(cfg["refine"] is not None, "fs" in cfg["factory"])
            result = _run_child("search", {"out": str(out), "queries": str(folder / "search-queries.npy"),
                                           "exact": str(folder / "search-exact.npy"), "sweep": sweep})
            row.update(result)
            searched_on_disk |= cfg["on_disk"]
        rows[name] = row
        if not args.keep:
            for f in (out, Path(f"{out}.ivfdata")):
                f.unlink(missing_ok=True)

    disk_row = next((r for r in rows.values() if r["on_disk"] and "chosen" in r), None)
    targets = {}
    for name, r in rows.items():
        if r["refine"]:
            c = r["chosen"]
            targets[f"{name}: recall@10>=0.9 at p50<=5ms"] = c["recall@10"] >= 0.9 and c["p50_ms"] <= 5
    if disk_row:
        own = disk_row["memory_after_queries"]["anon_mib"] - disk_row["memory_idle"]["anon_mib"]
        targets["on disk: own RSS < 10% of index files"] = own * 2**20 < 0.1 * disk_row["file_bytes"]

    print(f"\n{args.n:,} descriptors ({len(base):,} real, {max(0, args.n - len(base)):,} synthetic "
          f"{args.distractors}; written in "
          f"{gen_s:.0f} s, 0 = reused), 128-D, {len(queries)} single queries, exact top-10 by brute force in "
          f"{exact_s:.0f} s (0 = reused), {faiss.omp_get_max_threads()} threads, train {args.train:,}\n")
    print(f"{'configuration':28s}{'build s':>9s}{'peak RSS':>10s}{'code B':>8s}{'file B':>8s}{'nprobe':>8s}"
          f"{'refine_k':>9s}{'p50 ms':>8s}{'p99 ms':>8s}{'R@10':>7s}{'1-core p50':>11s}")
    for name, r in rows.items():
        c = r.get("chosen", {})
        code = r["code_bytes"] + 8  # + the id each inverted list keeps
        print(f"{name:28s}{r['build_s']:9.1f}{r['memory_after']['peak_mib']:8.0f}Mi{code:8.0f}"
              f"{r['file_bytes'] / args.n:8.1f}{c.get('nprobe', '-'):>8}{c.get('refine_k', '-'):>9}"
              f"{c.get('p50_ms', float('nan')):8.2f}{c.get('p99_ms', float('nan')):8.2f}"
              f"{c.get('recall@10', float('nan')):7.3f}{r.get('p50_ms_one_thread', float('nan')):11.2f}")
    print("  (code B: bytes of code per image + 8-byte id; file B: index files per image, paths included; "
          "operating point: fastest with R@10 >= 0.9, else best R@10 at p50 <= 5 ms; 1-core p50: the same "
          "setting with faiss on one thread, i.e. without spreading a query's lists over the threads)")
    for name, r in rows.items():
        if "sweep" in r:
            keys = ("nprobe", "refine_k")
            print(f"\n{name} sweep: " + "; ".join(
                "/".join(str(s[k]) for k in keys if k in s) + f" R {s['recall@10']:.3f} p50 {s['p50_ms']:.2f}"
                for s in r["sweep"]))
    if disk_row:
        m = disk_row
        print(f"\non-disk search process (MiB, anonymous + file-backed): before loading "
              f"{m['memory_idle']['anon_mib']:.0f} + {m['memory_idle']['file_mib']:.0f}; loaded "
              f"{m['memory_loaded']['anon_mib']:.0f} + {m['memory_loaded']['file_mib']:.0f}; after one query "
              f"{m['memory_after_first_query']['anon_mib']:.0f} + {m['memory_after_first_query']['file_mib']:.0f}; "
              f"after all {sum(1 for _ in m['sweep']) * len(queries)} queries "
              f"{m['memory_after_queries']['anon_mib']:.0f} + {m['memory_after_queries']['file_mib']:.0f}; "
              f"index files {m['file_bytes'] / 2**20:.0f} MiB (.ivfdata {m['ivfdata_bytes'] / 2**20:.0f} MiB)")
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()))
    blob = {"n": args.n, "distractors": args.distractors, "real": len(base), "synthetic": max(0, args.n - len(base)),
            "dim": int(base.shape[1]),
            "threads": faiss.omp_get_max_threads(), "queries": len(queries), "train": args.train,
            "nlist": args.nlist, "fastscan_nlist": args.fastscan_nlist, "generate_s": round(gen_s, 1),
            "exact_s": round(exact_s, 1), "rows": rows, "targets": targets}
    if args.json:
        print(json.dumps(blob))
    return blob


if __name__ == "__main__":
    main()
