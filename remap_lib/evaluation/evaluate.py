"""Methods × datasets → a table of retrieval scores, saved with the configs that made it.

A *method* is a :class:`~remap_lib.config.ModelConfig` (any head, backbone,
layers...) or the colour-histogram baseline (``"colour_histogram"``).  For each
dataset the database and query images are described (cached under
``cache_dir``), ranked by inner product, and scored with every protocol of the
dataset (:mod:`remap_lib.evaluation.metrics`).  Per-query APs are kept: with a dozen
queries a single mAP moves by points, so look at them.

Methods that share backbone weights and input sizes share one backbone pass
(:mod:`remap_lib.describe.shared_pass`): ``remap evaluate -m mac spoc gem rmac remap``
runs the CNN once per image, not five times.  :func:`describe` is the
per-method path; the two agree to float rounding (tests/test_evaluate.py).
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

from ..config import ModelConfig
from ..data.datasets import RetrievalDataset
from ..data.images import DEFAULT_MAX_PIXELS, ImageSpec, load_spec, resize_longer_side
from ..describe.extract import extract_descriptors, load_descriptors
from ..describe.model import RetrievalModel
from ..describe.shared_pass import SharedBackbone, group_by_pass
from .metrics import mean_average_precision, mean_precision_at_k, rank_database, ukbench_score

__all__ = ["COLOUR_HISTOGRAM", "MethodResult", "colour_histograms", "describe", "describe_methods", "evaluate",
           "format_table", "score"]

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

    def run(specs, part):
        out = _cache_folder(cache_dir, dataset, model, precision, part)
        return extract_descriptors(model, specs, out, device=device, on_error="raise", progress=progress,
                                   num_workers=0 if len(specs) < 64 else None, engine=engine,
                                   precision=precision).descriptors

    db = run(dataset.images, "database")
    q = db if dataset.query_is_database else run(dataset.queries, "queries")
    return db, q


def _cache_folder(cache_dir, dataset: RetrievalDataset, model: RetrievalModel, precision: str,
                  part: str) -> Path | None:
    """``cache_dir/<dataset>/<config digest>-<weights fingerprint>[-<precision>]/<part>``: an extraction folder."""
    if cache_dir is None:
        return None
    key = f"{model.config.digest()}-{model.fingerprint()}" + ("" if precision == "f32" else f"-{precision}")
    return Path(cache_dir) / dataset.name / key / part


def _read_cache(folder: Path | None, model: RetrievalModel, specs: list[ImageSpec]) -> np.ndarray | None:
    """The descriptors of a finished extraction folder holding exactly ``specs`` by ``model``, else ``None``."""
    if folder is None or not (folder / "manifest.json").exists():
        return None
    try:
        found = load_descriptors(folder)
    except (OSError, ValueError) as exc:
        log.warning("ignoring the cache %s: %s", folder, exc)
        return None
    same_model = all(found.config.get(k) == v for k, v in model.identity().items() if k != "model")
    if not same_model or found.failed or found.paths != [s.key for s in specs]:
        return None
    return found.descriptors


def _write_cache(folder: Path | None, model: RetrievalModel, specs: list[ImageSpec], rows: np.ndarray,
                 precision: str) -> None:
    """Write ``rows`` as :func:`extract_descriptors` would have (settings, one part, result, manifest),
    so that ``describe``, ``remap extract`` and this module all read it back."""
    if folder is None:
        return
    from ..describe.extract import (
        Descriptors,
        _check_or_write_settings,
        _output_lock,
        _PartWriter,
        _settings,
        _write_result,
    )

    settings = {**_settings(model, DEFAULT_MAX_PIXELS, precision), "sources": {}}
    paths = [s.key for s in specs]
    with _output_lock(folder):
        _check_or_write_settings(folder, settings)
        parts = _PartWriter(folder, max(1, len(paths)))
        for position, (path, row) in enumerate(zip(paths, rows)):
            parts.add(position, path, row)
        parts.flush()
        _write_result(folder, Descriptors(paths, np.asarray(rows, np.float32), [], settings))


def describe_methods(methods: Mapping[str, object], dataset: RetrievalDataset,
                     cache_dir: str | os.PathLike | None = None, device: str = "auto", progress: bool = True,
                     engine: str = "auto", precision: str = "f32") -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{name: (database, queries, seconds)}`` of every method, one backbone pass per group that can share it.

    ``methods`` maps names to :class:`RetrievalModel` or :data:`COLOUR_HISTOGRAM`.
    CNN methods are grouped by :func:`~remap_lib.describe.shared_pass.group_by_pass`
    (backbone weights and input sizes); a group's database and queries each go
    through the backbone once, and every head pools the same maps.  With
    ``cache_dir``, each method's descriptors are read from / written to the
    extraction folder :func:`describe` uses, so the two paths share a cache.
    ``seconds``: the method's share of its group's time.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    models = {}
    for name, method in methods.items():
        if method == COLOUR_HISTOGRAM:
            t = time.perf_counter()
            db, q = describe(COLOUR_HISTOGRAM, dataset, progress=progress)
            out[name] = (db, q, time.perf_counter() - t)
        else:
            models[name] = method
    parts = [("database", dataset.images)] + ([] if dataset.query_is_database else [("queries", dataset.queries)])
    for group in group_by_pass(models):
        t = time.perf_counter()
        found = {name: [_read_cache(_cache_folder(cache_dir, dataset, m, precision, part), m, specs)
                        for part, specs in parts] for name, m in group.items()}
        todo = {name: m for name, m in group.items() if any(x is None for x in found[name])}
        if todo:
            shared = SharedBackbone(next(iter(todo.values())).backbone, device, engine, precision)
            log.info("%s: one backbone pass for %d heads (%s)", dataset.name, len(todo), ", ".join(todo))
            for k, (part, specs) in enumerate(parts):
                rows = shared.describe(specs, todo, progress, f"{dataset.name} {part}: {len(todo)} heads")
                for name, m in todo.items():
                    found[name][k] = rows[name]
                    _write_cache(_cache_folder(cache_dir, dataset, m, precision, part), m, specs, rows[name],
                                 shared.precision)
        seconds = (time.perf_counter() - t) / len(group)
        for name in group:
            db = found[name][0]
            out[name] = (db, found[name][-1] if len(parts) > 1 else db, seconds)
    return {name: out[name] for name in methods}


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
    :class:`RetrievalModel` or :data:`COLOUR_HISTOGRAM`.  Configs with the
    same backbone and weights are built over one backbone, and methods that
    share backbone weights and input sizes share one backbone pass per dataset
    (:func:`describe_methods`); a result's ``seconds`` is its share of that
    pass plus its scoring.  The JSON holds each method's config and digest,
    per-query APs and the datasets' notes.
    """
    for ds_name, dataset in datasets.items():
        if not len(dataset.queries):
            raise ValueError(f"{ds_name} has no queries: nothing to evaluate")
    models = _build_models(methods)
    described = {ds_name: describe_methods(models, dataset, cache_dir, device, progress, engine, precision)
                 for ds_name, dataset in datasets.items()}
    results = []
    for name, method in methods.items():
        for ds_name, dataset in datasets.items():
            t = time.perf_counter()
            db, q, seconds = described[ds_name][name]
            scores = score(dataset, db, q)
            config = (method.to_dict() if isinstance(method, ModelConfig)
                      else method.config.to_dict() if isinstance(method, RetrievalModel) else None)
            results.append(MethodResult(name, ds_name, scores, int(db.shape[1]), seconds + time.perf_counter() - t,
                                        config, list(dataset.notes), (db, q)))
            log.info("%s on %s: %s", name, ds_name,
                     ", ".join(f"{p} {100 * s['map']:.2f}" for p, s in scores.items()))
    if out_dir is not None:
        save_results(results, out_dir)
    return results


def _build_models(methods: Mapping[str, object]) -> dict[str, object]:
    """Configs as models, one backbone built per (backbone, weights) and shared; the rest as they are."""
    backbones: dict = {}
    out = {}
    for name, method in methods.items():
        if isinstance(method, ModelConfig):
            key = (method.backbone, method.weights)
            if key not in backbones:
                from ..nets.backbones import build_backbone

                backbones[key] = build_backbone(*key)
            method = RetrievalModel(method, backbones[key])
        elif method != COLOUR_HISTOGRAM and not isinstance(method, RetrievalModel):
            raise TypeError(f"method {name!r}: expected a ModelConfig, a RetrievalModel or {COLOUR_HISTOGRAM!r}, "
                            f"got {type(method).__name__}")
        out[name] = method
    return out


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
