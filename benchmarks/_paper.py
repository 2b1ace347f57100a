"""Shared by the paper-reproduction scripts (``benchmarks/paper_*.py``, issue 8).

What every experiment needs, in one place:

* :func:`find_datasets` — the benchmarks present under ``--data-root`` (the
  layout of ``../shared/data``: ``ukbench/``, ``rparis6k/``; and, when a user
  has them, ``roxford5k/``, ``holidays/``, ``oxford5k/``, ``paris6k/``) plus
  the embedded demo set, each with the image size it is described at.  So the
  scripts run unchanged on the full benchmarks.
* :class:`SharedBackbone` — :mod:`remap_lib.describe.shared_pass` by backbone name and
  with :class:`Bench` objects: one backbone pass per image feeds many heads at
  once (:meth:`RetrievalModel.pool_maps`), so Tables I and II are ten heads
  over one CNN pass; pooled descriptors are cached on disk per head.
  :func:`check_against_describe` verifies on a few images that this equals
  the normal extraction path.
* :func:`disjoint_whitening` — PCA-whitening of each dataset learned on the
  *other* datasets' database images (never on the images being evaluated).
* :func:`run_heads` — off-the-shelf heads over the cached maps, raw and whitened.
* :func:`scores_row` / :func:`write_outputs` — one row of numbers per method
  (Medium/Hard mAP, 4×R@4, mAP), per-query APs, and the CSV/JSON/markdown
  files with the configuration that produced them.
"""

from __future__ import annotations

import csv
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from remap_lib.describe import shared_pass  # noqa: E402
from remap_lib.nets.backbones import build_backbone  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import (RetrievalDataset, load_dataset, load_folder_groups, load_revisited,  # noqa: E402
                                load_ukbench, parse_group_range, split_groups)
from remap_lib.evaluation.evaluate import describe, score  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402
from remap_lib.layers.whitening import learn_pca_whitening  # noqa: E402

# Longer side each benchmark is described at.  Revisited/Holidays: the paper's
# 1024 px.  UKBench: its native 320 px in ../shared/data (the full set is
# 640×480; 320 keeps it comparable).  Demo set: 640 px (its photos are small).  Folders of groups
# (landmark photos): 1024 px.
DEFAULT_SIZES = {"revisited": 1024, "holidays": 1024, "oxford_paris": 1024, "ukbench": 320, "demo": 640,
                 "groups": 1024}
# What the tables show per dataset: protocol → column label.
COLUMNS = {"easy": "E", "medium": "M", "hard": "H", "ukbench": "4xR@4", "map": "mAP", "all": "mAP"}
MAX_PIXELS = 40_000_000


@dataclass
class Bench:
    """A dataset as the experiments use it."""

    name: str
    dataset: RetrievalDataset
    size: int
    kind: str


def common_arguments(parser, default_out: str) -> None:
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                        help="folder with ukbench/, rparis6k/, roxford5k/, holidays/ ... (any present)")
    parser.add_argument("--no-demo", action="store_true", help="leave out the embedded demo set")
    parser.add_argument("--only", nargs="*", default=None, help="only these datasets (names as printed)")
    parser.add_argument("--size", action="append", default=[], metavar="KIND=PX",
                        help=f"override a description size, e.g. revisited=800 (defaults {DEFAULT_SIZES})")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="'imagenet' or a local checkpoint file")
    parser.add_argument("--whiten-dim", type=int, default=256,
                        help="PCA-whitening dimension (capped by the number of training images - 1)")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "paper" / "cache"),
                        help="pooled-descriptor cache shared by the scripts")
    parser.add_argument("--out", default=str(ROOT / "runs" / "paper" / default_out))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="also print everything as one JSON object")


def find_datasets(data_root: str | Path, demo: bool = True, only=None, size_overrides=(),
                  group_folders: bool = False, exclude=()) -> list[Bench]:
    """The benchmarks under ``data_root`` (see the module docstring), each with its description size.

    ``group_folders``: also every other sub-folder that reads as a folder of groups (one folder
    per object or landmark, scored with each image as a query), described at the "groups" size.
    ``exclude``: folders never scored (e.g. the training set), compared by real path.
    """
    sizes = dict(DEFAULT_SIZES)
    for item in size_overrides:
        kind, _, px = item.partition("=")
        if kind not in sizes or not px.isdigit():
            raise SystemExit(f"--size {item!r}: expected KIND=PX with KIND in {sorted(sizes)}")
        sizes[kind] = int(px)
    root = Path(data_root)
    found: list[Bench] = []
    if (root / "ukbench").is_dir():
        found.append(Bench("ukbench", load_ukbench(root / "ukbench"), sizes["ukbench"], "ukbench"))
    for name in ("rparis6k", "roxford5k"):
        if (root / name).is_dir():
            found.append(Bench(name, load_revisited(root / name, name), sizes["revisited"], "revisited"))
    for name, kind in (("holidays", "holidays"), ("oxford5k", "oxford_paris"), ("paris6k", "oxford_paris")):
        if (root / name).is_dir():
            found.append(Bench(name, load_dataset(str(root / name)), sizes[kind], kind))
    if group_folders:
        known = {"ukbench", "rparis6k", "roxford5k", "holidays", "oxford5k", "paris6k"}
        skip = {Path(e).resolve() for e in exclude}
        for sub in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            if sub.name in known or sub.resolve() in skip or not any(c.is_dir() for c in sub.iterdir()):
                continue
            try:
                ds = load_folder_groups(sub)
            except (ValueError, OSError) as exc:
                print(f"{sub}: not a folder of groups ({exc}); skipped", flush=True)
                continue
            found.append(Bench(sub.name, ds, sizes["groups"], "groups"))
    if demo:
        found.append(Bench("demo", load_dataset("demo"), sizes["demo"], "demo"))
    if only:
        found = [b for b in found if b.name in only]
    if not found:
        raise SystemExit(f"no dataset found under {root} (and the demo set left out)")
    return found


def held_out_ukbench(bench: Bench, train_groups: range | str = range(100),
                     test_groups: range | str | None = None) -> tuple[RetrievalDataset, Bench]:
    """UKBench split for experiments that learn from it: ``(training groups, the scored ones as "ukbench-test")``.

    By default objects 0–99 train (KL weights, fine-tuning) and 100 onwards
    are scored, never trained on.  Either part can be given as a range or as
    ``"LO-HI"`` (inclusive, e.g. ``"0-49"``); the test part defaults to every
    object after the training ones.  A dataset without all the objects the
    split names is refused with the size it needs (a 100-object folder
    cannot hold out objects 100 onwards).
    """
    train = parse_group_range(train_groups) if isinstance(train_groups, str) else train_groups
    have = len(set(bench.dataset.groups or ()))
    if test_groups is None:
        test, scored = range(max(train) + 1, have), "the objects after them"
    else:
        test = parse_group_range(test_groups) if isinstance(test_groups, str) else test_groups
        scored = f"objects {min(test)}-{max(test)}" if len(test) else "no object"
    needed = max([*train, *test, max(train) + 1]) + 1  # at least one scored object
    if have < needed or not len(test):
        raise ValueError(
            f"{bench.name} has {have} objects; training on objects {min(train)}-{max(train)} and scoring on "
            f"{scored} needs at least {needed} (the full UKBench has 2550); use a smaller training range, "
            f"e.g. '0-{max(0, have // 2 - 1)}'")
    if set(train) & set(test):
        raise ValueError(f"the training objects {min(train)}-{max(train)} and the scored objects "
                         f"{min(test)}-{max(test)} overlap")
    return split_groups(bench.dataset, train), Bench("ukbench-test", split_groups(bench.dataset, test), bench.size,
                                                     bench.kind)


class SharedBackbone(shared_pass.SharedBackbone):
    """:class:`remap_lib.describe.shared_pass.SharedBackbone` as the paper scripts call it: by name, with a :class:`Bench`.

    One CNN pass per image feeds every head; :meth:`describe_many` returns
    pooled vectors per size (before whitening) and caches them per head under
    ``<cache>/pooled/<bench>-<N>/`` (config digest, weights fingerprint, sizes).
    """

    def __init__(self, backbone: str, weights: str, cache_dir: str | Path | None, device: torch.device,
                 built=None, engine: str = "auto", precision: str = "f32"):
        super().__init__(built if built is not None else build_backbone(backbone, weights), device, engine, precision,
                         cache_dir=None if cache_dir is None else Path(cache_dir) / "pooled", weights=weights,
                         max_pixels=MAX_PIXELS)

    @classmethod
    def wrap(cls, backbone, device: torch.device, engine: str = "auto") -> "SharedBackbone":
        """Over an already built (e.g. fine-tuned) backbone; nothing cached (its scripts pass ``cache=False``)."""
        return cls(backbone.name, "trained", None, device, built=backbone, engine=engine)

    def describe_many(self, bench: Bench, models: dict[str, RetrievalModel], sizes: list[int], cache: bool = True):
        """``{label: (database (S, N, D), queries (S, Nq, D))}`` pooled, before whitening."""
        return self.pool_dataset(bench.dataset, models, sizes, cache=cache, name=bench.name)


def combine_scales(per_scale: np.ndarray, scale_weights=(1.0,), whitening=None) -> np.ndarray:
    """Paper Eq. 3 on pooled descriptors: ``L2(Σ_s w_s · X_s)``, ``X_s`` whitened if asked.

    The same as :meth:`RetrievalModel.multiscale` (which whitens each scale, then sums).
    """
    total = 0
    for w, x in zip(scale_weights, per_scale):
        total = total + w * (whitening.apply(x) if whitening is not None else x)
    return (total / np.linalg.norm(total, axis=1, keepdims=True)).astype(np.float32)


def check_against_describe(shared: SharedBackbone, bench: Bench, config: ModelConfig, n: int = 3) -> float:
    """Largest difference between :meth:`SharedBackbone.describe_many` and :func:`describe` on ``n`` images."""
    idx = list(range(min(n, len(bench.dataset.images))))
    small = RetrievalDataset(bench.name + "-check", [bench.dataset.images[i] for i in idx],
                             [bench.dataset.images[i] for i in idx], {"map": [{"ok": [i], "junk": []} for i in idx]})
    model = shared.model(ModelConfig.from_dict({**config.to_dict(), "image_sizes": [bench.size]}))
    direct, _ = describe(model, small, None, str(shared.device), progress=False, engine=shared.engine)
    pooled = shared.pool(small.images, {"m": model}, [bench.size])["m"]
    return float(np.abs(direct - combine_scales(pooled)).max())


def disjoint_whitening(raw_db: dict[str, np.ndarray], name: str, dim: int):
    """PCA-whitening for dataset ``name``, learned on the *other* datasets' database descriptors.

    Never on the images being evaluated; ``None`` when there is no other dataset.
    """
    others = [d for other, d in raw_db.items() if other != name]
    if not others:
        return None
    pool = np.concatenate(others)
    return learn_pca_whitening(pool, min(dim, len(pool) - 1, pool.shape[1]))


def run_heads(shared: SharedBackbone, benches: list[Bench], methods: dict, whiten_dim: int,
              check: bool = True) -> tuple[dict, dict, dict]:
    """Evaluate off-the-shelf heads, one backbone pass per image and size for all of them.

    ``methods``: label → ``(ModelConfig, scale_weights)``; ``scale_weights``
    of length 2 means paper Eq. 3 over sizes ``[size, 1.25·size]`` (1280/1024).
    Returns ``(tables, per_query_aps, info)`` where ``tables`` has a "raw"
    (L2 only) and a "PCA-whitened" table, rows = methods, columns = dataset
    protocols.
    """
    multiscale = any(len(w) > 1 for _, w in methods.values())
    pooled: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    queries: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    info = {"sizes": {}, "check_max_abs_diff": {}}
    models = {label: shared.model(cfg) for label, (cfg, _) in methods.items()}
    for bench in benches:
        sizes = [bench.size, round(bench.size * 1.25)] if multiscale else [bench.size]
        info["sizes"][bench.name] = sizes
        print(f"{bench.dataset.summary()}; sizes {sizes}", flush=True)
        if check:
            cfg0 = next(iter(methods.values()))[0]
            info["check_max_abs_diff"][bench.name] = diff = check_against_describe(shared, bench, cfg0)
            if diff > 1e-4:
                raise RuntimeError(f"shared-pass pooling differs from describe() by {diff:.2e} on {bench.name}")
        got = shared.describe_many(bench, models, sizes)
        for label, (cfg, weights) in methods.items():
            db, q = got[label]
            pooled[label][bench.name], queries[label][bench.name] = db[: len(weights)], q[: len(weights)]
    tables = {"raw (L2 only)": {}, f"PCA-whitened ({whiten_dim}-D, learned on the other datasets)": {}}
    raw_t, white_t = tables.values()
    per_query = {}
    for label, (cfg, weights) in methods.items():
        raw_t[label], white_t[label] = {}, {}
        first_scale_db = {name: x[0] for name, x in pooled[label].items()}
        for bench in benches:
            db, q = pooled[label][bench.name], queries[label][bench.name]
            row, aps = scores_row(bench, combine_scales(db, weights), combine_scales(q, weights))
            raw_t[label].update(row)
            per_query.update({f"raw | {label} | {k}": v for k, v in aps.items()})
            w = disjoint_whitening(first_scale_db, bench.name, whiten_dim)
            if w is not None:
                row, aps = scores_row(bench, combine_scales(db, weights, w), combine_scales(q, weights, w))
                white_t[label].update(row)
                per_query.update({f"whitened | {label} | {k}": v for k, v in aps.items()})
    if not any(white_t.values()):
        del tables[next(k for k in tables if k.startswith("PCA"))]
    return tables, per_query, info


def scores_row(bench: Bench, db: np.ndarray, q: np.ndarray) -> tuple[dict, dict]:
    """``({column: number}, {column: per-query APs})`` for one method on one dataset."""
    s = score(bench.dataset, db, q)
    row, aps = {}, {}
    for protocol, entry in s.items():
        label = COLUMNS.get(protocol, protocol)
        if bench.name == "demo" and protocol not in ("all",):
            continue  # the per-challenge protocols live in `remap evaluate`; one number here
        col = f"{bench.name} {label}"
        if protocol == "ukbench":
            row[col] = round(entry["score"], 3)
        else:
            row[col] = round(100 * entry["map"], 2)
            if bench.name != "ukbench":
                aps[col] = [None if a != a else round(100 * a, 1) for a in entry["aps"]]
    return row, aps


def format_markdown(rows: dict[str, dict], title: str | None = None) -> str:
    cols = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| method | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join("" if r.get(c) is None else f"{r[c]}" for c in cols) + " |")
    return "\n".join(lines)


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_outputs(out_dir: str | Path, name: str, tables: dict[str, dict[str, dict]], config: dict,
                  per_query: dict | None = None, seconds: float | None = None, as_json: bool = False,
                  notes: list[str] | None = None) -> dict:
    """Write ``<name>.csv`` (one line per table row), ``<name>.json`` and ``<name>.md``; print the tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = {"experiment": name, "config": config, "environment": environment(),
            "seconds": None if seconds is None else round(seconds, 1), "tables": tables,
            "per_query_ap": per_query or {}, "notes": notes or []}
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "method", "column", "value"])
        for table, rows in tables.items():
            for method, row in rows.items():
                for col, value in row.items():
                    w.writerow([table, method, col, value])
    (out / f"{name}.json").write_text(json.dumps(blob, indent=1))
    md = "\n\n".join(format_markdown(rows, title) for title, rows in tables.items())
    if notes:
        md += "\n\n" + "\n".join(f"- {n}" for n in notes)
    (out / f"{name}.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nwritten: {out / name}.csv/.json/.md" + (f"  ({seconds:.0f} s)" if seconds else ""))
    if as_json:
        print(json.dumps(blob))
    return blob
