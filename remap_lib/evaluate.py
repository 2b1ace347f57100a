"""Methods × datasets → a table of retrieval scores, saved with the configs that made it.

A *method* is a :class:`~remap_lib.config.ModelConfig` (any head, backbone,
layers...) or the colour-histogram baseline (``"colour_histogram"``).  For each
dataset the database and query images are described (cached and resumable
under ``cache_dir``), ranked by inner product, and scored with every protocol
of the dataset (:mod:`remap_lib.metrics`).  Per-query APs are kept: with a
dozen queries a single mAP moves by points, so look at them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig
from .datasets import RetrievalDataset
from .extract import extract_descriptors
from .images import ImageSpec, load_spec, resize_longer_side
from .metrics import mean_average_precision, mean_precision_at_k, rank_database, ukbench_score
from .model import RetrievalModel

__all__ = ["COLOUR_HISTOGRAM", "MethodResult", "colour_histograms", "describe", "evaluate", "format_table",
           "score"]

log = logging.getLogger(__name__)

COLOUR_HISTOGRAM = "colour_histogram"
PRECISION_KS = (1, 5, 10)


def colour_histograms(specs: list[ImageSpec], bins: int = 8, size: int = 256,
                      progress: bool = False) -> np.ndarray:
    """A non-CNN baseline: joint RGB histograms (``bins``³), Hellinger-mapped and L2-normalised.

    ``sqrt`` of the L1-normalised histogram makes the inner product the
    Bhattacharyya coefficient.  Images are resized to ``size`` px first.
    """
    out = np.zeros((len(specs), bins**3), np.float32)
    for i, spec in enumerate(tqdm(specs, desc="colour histograms", disable=not progress)):
        arr = np.asarray(resize_longer_side(load_spec(spec), size, spec.path), dtype=np.int64) * bins // 256
        codes = (arr[..., 0] * bins + arr[..., 1]) * bins + arr[..., 2]
        h = np.bincount(codes.ravel(), minlength=bins**3).astype(np.float64)
        h = np.sqrt(h / h.sum())
        out[i] = h / np.linalg.norm(h)
    return out


def describe(method, dataset: RetrievalDataset, cache_dir: str | os.PathLike | None = None,
             device: str = "auto", progress: bool = True, backbone=None, engine: str = "auto",
             precision: str = "f32") -> tuple[np.ndarray, np.ndarray]:
    """``(database descriptors, query descriptors)`` of ``dataset`` under ``method``.

    A benchmark image that cannot be read is an error here (evaluation needs
    every image the ground truth names); the message names the file.  The
    cache folder is keyed by the config digest *and* the weights fingerprint
    (and the precision), so a fine-tuned model never reuses its ImageNet twin's
    descriptors.
    """
    if method == COLOUR_HISTOGRAM:
        db = colour_histograms(dataset.images, progress=progress)
        q = db if dataset.query_is_database else colour_histograms(dataset.queries, progress=progress)
        return db, q
    model = method if isinstance(method, RetrievalModel) else RetrievalModel(method, backbone)
    key = f"{model.config.digest()}-{model.fingerprint()}" + ("" if precision == "f32" else f"-{precision}")

    def run(specs, part):
        out = None if cache_dir is None else Path(cache_dir) / dataset.name / key / part
        return extract_descriptors(model, specs, out, device=device, on_error="raise", progress=progress,
                                   num_workers=0 if len(specs) < 64 else None, engine=engine,
                                   precision=precision).descriptors

    db = run(dataset.images, "database")
    q = db if dataset.query_is_database else run(dataset.queries, "queries")
    return db, q


def score(dataset: RetrievalDataset, db: np.ndarray, q: np.ndarray) -> dict[str, dict]:
    """Every protocol of ``dataset``: ``{protocol: {"map", "aps", "mp@k"[, "score"]}}``."""
    if not len(dataset.queries):
        raise ValueError(f"{dataset.name} has no queries: nothing to evaluate")
    if len(db) != len(dataset.images) or len(q) != len(dataset.queries):
        raise ValueError(f"{dataset.name}: descriptors do not match the dataset's images and queries")
    ranks = rank_database(q, db)
    out = {}
    for protocol, gnd in dataset.gnd.items():
        m, aps = mean_average_precision(ranks, gnd)
        mp, _ = mean_precision_at_k(ranks, gnd, PRECISION_KS)
        entry = {"map": m, "aps": aps.tolist(), "mp@k": dict(zip(PRECISION_KS, mp.tolist()))}
        if protocol == "ukbench":
            entry["score"] = ukbench_score(ranks, dataset.groups)
        out[protocol] = entry
    return out


@dataclass
class MethodResult:
    method: str
    dataset: str
    scores: dict
    dim: int
    seconds: float
    config: dict | None = None
    notes: list[str] = field(default_factory=list)
    descriptors: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (db, queries)

    def rows(self) -> list[dict]:
        rows = []
        for protocol, s in self.scores.items():
            row = {"method": self.method, "dataset": self.dataset, "protocol": protocol,
                   "map": round(100 * s["map"], 2)}
            row.update({f"mp@{k}": round(100 * v, 2) for k, v in s["mp@k"].items()})
            row["ukbench_score"] = round(s["score"], 4) if "score" in s else ""
            row.update({"dim": self.dim, "seconds": round(self.seconds, 1)})
            rows.append(row)
        return rows


def evaluate(methods: Mapping[str, object], datasets: Mapping[str, RetrievalDataset],
             out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
             device: str = "auto", progress: bool = True, engine: str = "auto",
             precision: str = "f32") -> list[MethodResult]:
    """Score every method on every dataset; write ``results.csv``/``results.json`` to ``out_dir``.

    ``methods`` maps a display name to a :class:`ModelConfig`, a
    :class:`RetrievalModel` or :data:`COLOUR_HISTOGRAM`.  The JSON holds each
    method's config and digest, per-query APs and the datasets' notes.
    """
    results = []
    backbones: dict = {}
    for name, method in methods.items():
        for ds_name, dataset in datasets.items():
            t = time.perf_counter()
            backbone = None
            if isinstance(method, ModelConfig):
                key = (method.backbone, method.weights)
                if key not in backbones:
                    from .backbones import build_backbone

                    backbones[key] = build_backbone(*key)
                backbone = backbones[key]
            if not len(dataset.queries):
                raise ValueError(f"{ds_name} has no queries: nothing to evaluate")
            db, q = describe(method, dataset, cache_dir, device, progress, backbone, engine, precision)
            scores = score(dataset, db, q)
            config = (method.to_dict() if isinstance(method, ModelConfig)
                      else method.config.to_dict() if isinstance(method, RetrievalModel) else None)
            results.append(MethodResult(name, ds_name, scores, int(db.shape[1]), time.perf_counter() - t,
                                        config, list(dataset.notes), (db, q)))
            log.info("%s on %s: %s", name, ds_name,
                     ", ".join(f"{p} {100 * s['map']:.2f}" for p, s in scores.items()))
    if out_dir is not None:
        save_results(results, out_dir)
    return results


def save_results(results: list[MethodResult], out_dir: str | os.PathLike) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for r in results for row in r.rows()]
    if rows:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    blob = [{"method": r.method, "dataset": r.dataset, "dim": r.dim, "seconds": r.seconds, "config": r.config,
             "config_digest": ModelConfig.from_dict(r.config).digest() if r.config else None,
             "notes": r.notes, "scores": r.scores} for r in results]
    (out / "results.json").write_text(json.dumps(blob, indent=1, default=float))


def format_table(results: list[MethodResult]) -> str:
    """Methods as rows, dataset/protocol as columns (mAP %, UKBench as 4×R@4)."""
    columns: list[tuple[str, str]] = []
    for r in results:
        for protocol in r.scores:
            if (r.dataset, protocol) not in columns:
                columns.append((r.dataset, protocol))
    methods = list(dict.fromkeys(r.method for r in results))
    cell = {}
    for r in results:
        for protocol, s in r.scores.items():
            cell[(r.method, r.dataset, protocol)] = (f"{s['score']:.3f}" if protocol == "ukbench"
                                                     else f"{100 * s['map']:.2f}")
    heads = [f"{d}/{p}" for d, p in columns]
    width = max(len(m) for m in methods) + 2
    lines = [" " * width + "".join(f"{h:>{max(12, len(h) + 2)}s}" for h in heads)]
    for m in methods:
        lines.append(f"{m:<{width}s}" + "".join(
            f"{cell.get((m, d, p), '-'):>{max(12, len(h) + 2)}s}" for (d, p), h in zip(columns, heads)))
    return "\n".join(lines)
