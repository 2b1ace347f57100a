"""Retrieval benchmarks as plain data: images, queries and ground truth.

Every reader returns a :class:`RetrievalDataset`: the database images, the
query images (with their crop boxes where the protocol crops them), the ground
truth per protocol in the form :mod:`remap_lib.evaluation.metrics` takes, and a group
label per database image when the dataset has groups (usable as training
pairs).  The protocol is data, not code branches:

=====================  ======================  =============================================
reader                 layout on disk          protocols (``dataset.gnd`` keys)
=====================  ======================  =============================================
:func:`load_revisited`  ``jpg/`` + ``gnd_r*.pkl``  ``easy``/``medium``/``hard``; queries cropped to ``bbx``
:func:`load_oxford_paris`  ``jpg/`` + ``gt/*_{good,ok,junk,query}.txt``  ``map``; cropped queries
:func:`load_holidays`  ``jpg/*.jpg``           ``map``; ``xx00`` image is the query, itself ignored
:func:`load_ukbench`   ``ukbench?????.jpg``    ``ukbench`` (4×R@4) and ``map``; every image a query
:func:`load_folder_groups`  ``root/<group>/*``  ``map``; every image a query, itself ignored
:func:`load_csv_groups`  ``image,group`` CSV   same as folder groups
=====================  ======================  =============================================

Ground truth that names images missing on disk is an error listing them;
``allow_missing=True`` evaluates on the images present and records in
``dataset.dropped`` how many queries and images were left out.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .images import IMAGE_EXTENSIONS, ImageSpec

__all__ = [
    "ImageSpec",
    "MissingImagesError",
    "RetrievalDataset",
    "load_csv_groups",
    "load_dataset",
    "load_demo_set",
    "load_folder_groups",
    "load_holidays",
    "load_oxford_paris",
    "load_revisited",
    "load_ukbench",
    "parse_group_range",
    "revisited_gnd",
    "safe_load_pickle",
    "split_groups",
]

log = logging.getLogger(__name__)

REVISITED_PROTOCOLS = ("easy", "medium", "hard")


def revisited_gnd(gnd: Sequence[dict], protocol: str) -> list[dict]:
    """Easy / Medium / Hard ground truth from revisited entries (``easy``, ``hard``, ``junk``).

    Easy: easy positive, hard and junk ignored.  Medium: easy and hard
    positive, junk ignored.  Hard: hard positive, easy and junk ignored.
    """
    out = []
    for g in gnd:
        easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
        if protocol == "easy":
            out.append({"ok": easy, "junk": junk + hard})
        elif protocol == "medium":
            out.append({"ok": easy + hard, "junk": junk})
        elif protocol == "hard":
            out.append({"ok": hard, "junk": junk + easy})
        else:
            raise ValueError(f"protocol must be one of {REVISITED_PROTOCOLS}, got {protocol!r}")
    return out


class MissingImagesError(FileNotFoundError):
    """The ground truth names images that are not on disk."""


@dataclass
class RetrievalDataset:
    """A retrieval benchmark.

    Attributes:
        name: short name (``"rparis6k"``, ``"ukbench"``, ...).
        images: database images, as :class:`ImageSpec`.
        queries: query images (cropped where the protocol says so).
        gnd: protocol name → one ``{"ok": [...], "junk": [...]}`` per query,
            indices into ``images``.
        groups: group (object / place) of each database image, if known.
        primary: the protocol reported first.
        notes: how the protocol was applied (e.g. "queries not cropped").
        dropped: what ``allow_missing`` left out.
    """

    name: str
    images: list[ImageSpec]
    queries: list[ImageSpec]
    gnd: dict[str, list[dict]]
    groups: list[int] | None = None
    primary: str = "map"
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for protocol, entries in self.gnd.items():
            if len(entries) != len(self.queries):
                raise ValueError(f"{self.name}: {len(self.queries)} queries but {len(entries)} {protocol} entries")
            for e in entries:
                bad = [i for i in list(e["ok"]) + list(e.get("junk", [])) if not 0 <= i < len(self.images)]
                if bad:
                    raise ValueError(f"{self.name}: ground truth indices {bad[:5]} outside 0..{len(self.images) - 1}")

    @property
    def query_is_database(self) -> bool:
        """True when the queries are the database images themselves (UKBench, groups)."""
        return [q.key for q in self.queries] == [i.key for i in self.images]

    def summary(self) -> str:
        return (f"{self.name}: {len(self.images)} database images, {len(self.queries)} queries, "
                f"protocols {', '.join(self.gnd)}" + (f" ({'; '.join(self.notes)})" if self.notes else ""))


# --------------------------------------------------------------------------- safe pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: containers, numbers, strings and NumPy arrays."""

    ALLOWED = {
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "str"), ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"),
        ("builtins", "bytes"), ("collections", "OrderedDict"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles of arrays encode their bytes with it
        ("copyreg", "_reconstructor"), ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: ground-truth pickles may only hold plain data"
        )


def safe_load_pickle(path: str | os.PathLike):
    """Load a pickle of plain data; anything that could run code is refused."""
    data = Path(path).read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"{path} is not a readable pickle ({exc})") from exc


# --------------------------------------------------------------------------- helpers


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in (".jpg", ".jpeg", ".png", ".JPG"):
        p = folder / f"{stem}{ext}"
        if p.exists():
            return p
    return None


def _subset(dataset_name: str, images: list[Path | None], names: list[str], queries: list[Path | None],
            qnames: list[str], gnd: dict[str, list[dict]], allow_missing: bool):
    """Drop missing images (if allowed) and remap the ground truth to the images kept.

    Returns ``(kept images, indices of the kept queries, remapped gnd, dropped counts)``.
    """
    missing_db = [n for n, p in zip(names, images) if p is None]
    missing_q = [n for n, p in zip(qnames, queries) if p is None]
    if not missing_db and not missing_q:
        return images, list(range(len(queries))), gnd, {}
    listed = ", ".join((missing_q + missing_db)[:10])
    if not allow_missing:
        raise MissingImagesError(
            f"{dataset_name}: {len(missing_q)} query and {len(missing_db)} database images named by the "
            f"ground truth are missing (e.g. {listed}). Put them in place, or pass allow_missing=True "
            "(--allow-missing) to evaluate on the images present."
        )
    new_index = {}
    for i, p in enumerate(images):
        if p is not None:
            new_index[i] = len(new_index)
    keep_q = [i for i, p in enumerate(queries) if p is not None]
    new_gnd = {
        protocol: [{"ok": [new_index[i] for i in entries[q]["ok"] if i in new_index],
                    "junk": [new_index[i] for i in entries[q].get("junk", []) if i in new_index]}
                   for q in keep_q]
        for protocol, entries in gnd.items()
    }
    dropped = {"queries": len(missing_q), "images": len(missing_db)}
    log.warning("%s: evaluating without %d missing queries and %d missing database images",
                dataset_name, dropped["queries"], dropped["images"])
    return [p for p in images if p is not None], keep_q, new_gnd, dropped


# --------------------------------------------------------------------------- readers


def _check_box(bbx, where: str) -> None:
    """A query box must be 4 finite numbers ``x0, y0, x1, y1`` with ``x0 < x1`` and ``y0 < y1``."""
    try:
        values = [float(v) for v in bbx]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bbx {bbx!r} is not a list of numbers") from None
    if len(values) != 4:
        raise ValueError(f"{where}: bbx has {len(values)} values {values}; need 4 (x0, y0, x1, y1)")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: bbx {values} is not finite")
    if not (values[0] < values[2] and values[1] < values[3]):
        raise ValueError(f"{where}: bbx {values} is empty (need x0 < x1 and y0 < y1)")


def load_revisited(root: str | os.PathLike, name: str | None = None, *, crop_queries: bool = True,
                   allow_missing: bool = False) -> RetrievalDataset:
    """Revisited Oxford / Paris (Radenović et al. 2018): ``root/jpg/`` and ``root/gnd_<name>.pkl``.

    Easy / Medium / Hard protocols; queries are cropped to their ``bbx``
    (standard) unless ``crop_queries=False``, which the result's ``notes`` say.
    """
    root = Path(root)
    pkls = sorted(root.glob("gnd_*.pkl")) if name is None else [root / f"gnd_{name}.pkl"]
    if not pkls or not pkls[0].exists():
        raise FileNotFoundError(f"{root} has no gnd_<name>.pkl (e.g. gnd_roxford5k.pkl, gnd_rparis6k.pkl)")
    if len(pkls) > 1:
        raise ValueError(f"{root} has several ground-truth files ({', '.join(p.name for p in pkls)}); "
                         "name the one to use")
    pkl = pkls[0]
    name = name or pkl.stem.removeprefix("gnd_")
    cfg = safe_load_pickle(pkl)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{pkl}: expected a dict with 'imlist', 'qimlist' and 'gnd' (revisitop format)")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{pkl}: {len(cfg['qimlist'])} queries but {len(cfg['gnd'])} gnd entries")
    if not cfg["qimlist"]:
        raise ValueError(f"{pkl}: the query list is empty: nothing to evaluate")
    for i, g in enumerate(cfg["gnd"]):
        if not isinstance(g, dict) or not {"easy", "hard", "junk", "bbx"} <= set(g):
            raise ValueError(f"{pkl}: gnd[{i}] must have 'easy', 'hard', 'junk' and 'bbx'")
        _check_box(g["bbx"], f"{pkl}: query {i} ({cfg['qimlist'][i]})")
    jpg = root / "jpg"
    images = [_find_image(jpg, n) for n in cfg["imlist"]]
    queries = [_find_image(jpg, n) for n in cfg["qimlist"]]
    raw = [{"easy": list(map(int, g["easy"])), "hard": list(map(int, g["hard"])),
            "junk": list(map(int, g["junk"])), "bbx": [float(v) for v in g["bbx"]]} for g in cfg["gnd"]]
    gnd = {p: revisited_gnd(raw, p) for p in ("easy", "medium", "hard")}
    images, keep_q, gnd, dropped = _subset(name, images, list(cfg["imlist"]), queries, list(cfg["qimlist"]),
                                           gnd, allow_missing)
    qspecs = [ImageSpec(str(queries[q]), tuple(raw[q]["bbx"]) if crop_queries else None) for q in keep_q]
    notes = [] if crop_queries else ["queries NOT cropped to their bounding boxes (non-standard)"]
    return RetrievalDataset(name, [ImageSpec(str(p)) for p in images], qspecs, gnd, None, "medium", notes,
                            dropped)


def load_oxford_paris(root: str | os.PathLike, name: str | None = None, *, crop_queries: bool = True,
                      allow_missing: bool = False) -> RetrievalDataset:
    """Original Oxford5k / Paris6k: ``root/jpg/*.jpg`` and ``root/gt/<query>_{good,ok,junk,query}.txt``.

    Relevant = good + ok, junk ignored; the database is every image in ``jpg/``.
    """
    root = Path(root)
    gt = root / "gt" if (root / "gt").is_dir() else root
    qfiles = sorted(gt.glob("*_query.txt"))
    if not qfiles:
        raise FileNotFoundError(f"{gt} has no *_query.txt ground-truth files (Oxford5k / Paris6k layout)")
    jpg = root / "jpg"
    if not jpg.is_dir():
        raise FileNotFoundError(f"{root} has no jpg/ folder")
    names = sorted(p.stem for p in jpg.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    index = {n: i for i, n in enumerate(names)}
    queries, qnames, boxes, entries = [], [], [], []
    unknown: list[str] = []

    def read(stem: str, kind: str) -> list[str]:
        f = gt / f"{stem}_{kind}.txt"
        if not f.exists():
            raise FileNotFoundError(f"missing ground-truth file {f}")
        return [line.strip() for line in f.read_text().splitlines() if line.strip()]

    for qf in qfiles:
        stem = qf.name.removesuffix("_query.txt")
        fields = qf.read_text().split()
        if len(fields) != 5:
            raise ValueError(f"{qf}: expected 'image x0 y0 x1 y1', got {' '.join(fields)!r}")
        qname = re.sub(r"^oxc1_", "", fields[0])
        ok = read(stem, "good") + read(stem, "ok")
        junk = read(stem, "junk")
        unknown += [n for n in ok + junk if n not in index]
        entries.append({"ok": [index[n] for n in ok if n in index], "junk": [index[n] for n in junk if n in index]})
        queries.append(_find_image(jpg, qname))
        qnames.append(qname)
        boxes.append(tuple(float(v) for v in fields[1:]))
    if unknown and not allow_missing:
        raise MissingImagesError(
            f"{root}: the ground truth names {len(set(unknown))} images not in jpg/ (e.g. "
            f"{', '.join(sorted(set(unknown))[:10])}); pass allow_missing=True to evaluate without them"
        )
    dropped = {"images": len(set(unknown))} if unknown else {}
    images = [_find_image(jpg, n) for n in names]
    images, keep_q, gnd, dropped_q = _subset(root.name, images, names, queries, qnames, {"map": entries},
                                             allow_missing)
    dropped.update({k: dropped.get(k, 0) + v for k, v in dropped_q.items()})
    qspecs = [ImageSpec(str(queries[q]), boxes[q] if crop_queries else None) for q in keep_q]
    notes = [] if crop_queries else ["queries NOT cropped to their bounding boxes (non-standard)"]
    return RetrievalDataset(name or root.name, [ImageSpec(str(p)) for p in images], qspecs, gnd, None, "map",
                            notes, dropped)


def load_holidays(root: str | os.PathLike, *, rotations: str | os.PathLike | None = None) -> RetrievalDataset:
    """INRIA Holidays: ``root/jpg/*.jpg`` (or ``root/*.jpg``) named ``GGGGNN.jpg``.

    Images sharing the first four digits show the same scene; the ``GGGG00``
    image is the query and is ignored in its own ranking.  About 5 % of the
    photos are stored sideways; ``rotations`` is a text file of ``name degrees``
    lines (counter-clockwise) that fixes them, the usual practice (the list
    itself is not shipped with remap; results say whether one was applied).
    """
    root = Path(root)
    jpg = root / "jpg" if (root / "jpg").is_dir() else root
    files = sorted(p for p in jpg.glob("*.jpg") if re.fullmatch(r"\d{6}", p.stem))
    if not files:
        raise FileNotFoundError(f"{jpg} has no Holidays images (NNNNNN.jpg)")
    fix: dict[str, int] = {}
    if rotations is not None:
        for n, line in enumerate(Path(rotations).read_text().splitlines(), 1):
            if line.strip():
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) % 90:
                    raise ValueError(f"{rotations}:{n}: expected 'image_name degrees' (multiple of 90)")
                fix[Path(parts[0]).stem] = int(parts[1]) % 360
    unknown = sorted(set(fix) - {p.stem for p in files})
    if unknown:
        log.warning("%s: %d rotation fixes name images not in %s (e.g. %s)", rotations, len(unknown), jpg,
                    ", ".join(unknown[:5]))
    images = [ImageSpec(str(p), None, fix.get(p.stem, 0)) for p in files]
    group_ids = [p.stem[:4] for p in files]
    labels = {g: i for i, g in enumerate(sorted(set(group_ids)))}
    groups = [labels[g] for g in group_ids]
    qidx = [i for i, p in enumerate(files) if p.stem.endswith("00")]
    gnd = [{"ok": [j for j in range(len(files)) if groups[j] == groups[q] and j != q], "junk": [q]} for q in qidx]
    applied = sum(1 for im in images if im.rotate)
    notes = [f"{applied} rotation fixes applied"] if rotations is not None else ["no rotation fixes applied"]
    return RetrievalDataset("holidays", images, [images[q] for q in qidx], {"map": gnd}, groups, "map", notes)


def _group_dataset(name: str, specs: list[ImageSpec], labels: list[str]) -> RetrievalDataset:
    ids = {g: i for i, g in enumerate(sorted(set(labels)))}
    groups = [ids[g] for g in labels]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    gnd = [{"ok": [j for j in members[g] if j != i], "junk": [i]} for i, g in enumerate(groups)]
    return RetrievalDataset(name, specs, list(specs), {"map": gnd}, groups, "map")


def _add_ukbench_protocol(ds: RetrievalDataset) -> RetrievalDataset:
    """UKBench's own protocol (4×R@4, the query counted among its relevant images) beside ``map``."""
    ds.gnd["ukbench"] = [{"ok": e["ok"] + e["junk"], "junk": []} for e in ds.gnd["map"]]
    ds.primary = "ukbench"
    return ds


def load_ukbench(root: str | os.PathLike, *, allow_missing: bool = False) -> RetrievalDataset:
    """UKBench: ``ukbenchNNNNN.jpg``, four consecutive images per object, every image a query.

    Protocols: ``ukbench`` (score 4×R@4, the query itself counted as in the
    original benchmark) and ``map`` (query ignored).  Incomplete groups are an
    error unless ``allow_missing``.
    """
    root = Path(root)
    folder = root / "full" if (root / "full").is_dir() else root
    files = sorted(p for p in folder.glob("ukbench*.jpg") if re.fullmatch(r"ukbench\d{5}", p.stem))
    if not files:
        raise FileNotFoundError(f"{folder} has no ukbenchNNNNN.jpg images")
    numbers = [int(p.stem[7:]) for p in files]
    by_group: dict[int, list[int]] = {}
    for i, n in enumerate(numbers):
        by_group.setdefault(n // 4, []).append(i)
    incomplete = [g for g, m in by_group.items() if len(m) != 4]
    if incomplete and not allow_missing:
        raise MissingImagesError(
            f"{folder}: {len(incomplete)} UKBench objects do not have all 4 images (e.g. object "
            f"{incomplete[0]}); pass allow_missing=True to evaluate on the complete ones"
        )
    keep = [i for i, n in enumerate(numbers) if n // 4 not in set(incomplete)]
    specs = [ImageSpec(str(files[i])) for i in keep]
    ds = _add_ukbench_protocol(_group_dataset("ukbench", specs, [f"{numbers[i] // 4:05d}" for i in keep]))
    if incomplete:
        ds.dropped = {"images": len(files) - len(keep), "queries": len(files) - len(keep)}
    return ds


def load_folder_groups(root: str | os.PathLike, name: str | None = None) -> RetrievalDataset:
    """Users' data: ``root/<group>/<image>``; every image is a query, its group the relevant set."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    specs, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(sub.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                specs.append(ImageSpec(str(f)))
                labels.append(sub.name)
    if not specs:
        raise FileNotFoundError(f"{root} has no <group>/<image> sub-folders with images")
    return _group_dataset(name or root.name, specs, labels)


def load_csv_groups(csv_path: str | os.PathLike, name: str | None = None, *,
                    allow_missing: bool = False) -> RetrievalDataset:
    """Users' data: a CSV with ``image,group`` columns (paths relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" BOM
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "group"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: needs a header with 'image' and 'group' columns")
        rows = [(r["image"], r["group"]) for r in reader]
    paths = [(csv_path.parent / img) if not os.path.isabs(img) else Path(img) for img, _ in rows]
    missing = [str(p) for p in paths if not p.exists()]
    if missing and not allow_missing:
        raise MissingImagesError(f"{csv_path}: {len(missing)} listed images are missing (e.g. "
                                 f"{', '.join(missing[:10])}); pass allow_missing=True to skip them")
    keep = [i for i, p in enumerate(paths) if p.exists()]
    ds = _group_dataset(name or csv_path.stem, [ImageSpec(str(paths[i])) for i in keep],
                        [rows[i][1] for i in keep])
    if missing:
        ds.dropped = {"images": len(missing), "queries": len(missing)}
    return ds


def load_dataset(spec: str, *, crop_queries: bool = True, allow_missing: bool = False,
                 rotations: str | os.PathLike | None = None) -> RetrievalDataset:
    """Guess the layout of a folder (or CSV) and read it, passing each reader the options it has.

    ``spec`` is a path; a ``gnd_*.pkl`` means revisited, ``gt/*_query.txt``
    original Oxford/Paris, ``ukbench*.jpg`` UKBench, six-digit jpgs Holidays, a
    ``.csv`` a CSV of groups, sub-folders a folder of groups.  ``"demo"`` is
    the embedded demo set.  ``crop_queries`` applies to the Oxford/Paris
    layouts, ``allow_missing`` to those and UKBench and CSVs, ``rotations`` to Holidays.
    """
    if spec == "demo":
        return load_demo_set()
    path = Path(spec)
    if path.suffix.lower() == ".csv":
        return load_csv_groups(path, allow_missing=allow_missing)
    if not path.exists():
        raise FileNotFoundError(f"dataset {spec} does not exist")
    if list(path.glob("gnd_*.pkl")):
        return load_revisited(path, crop_queries=crop_queries, allow_missing=allow_missing)
    if list(path.glob("gt/*_query.txt")) or list(path.glob("*_query.txt")):
        return load_oxford_paris(path, crop_queries=crop_queries, allow_missing=allow_missing)
    if list(path.glob("ukbench*.jpg")) or list(path.glob("full/ukbench*.jpg")):
        return load_ukbench(path, allow_missing=allow_missing)
    if any(re.fullmatch(r"\d{6}", p.stem) for p in list(path.glob("*.jpg")) + list(path.glob("jpg/*.jpg"))):
        return load_holidays(path, rotations=rotations)
    return load_folder_groups(path)


def split_groups(dataset: RetrievalDataset, groups: Sequence[int]) -> RetrievalDataset:
    """The sub-dataset of the given groups (every image a query), e.g. UKBench objects 0–99."""
    if dataset.groups is None:
        raise ValueError(f"{dataset.name} has no groups")
    wanted = set(groups)
    keep = [i for i, g in enumerate(dataset.groups) if g in wanted]
    specs = [dataset.images[i] for i in keep]
    ds = _group_dataset(f"{dataset.name}[{len(wanted)} groups]", specs,
                        [f"{dataset.groups[i]:06d}" for i in keep])
    return _add_ukbench_protocol(ds) if "ukbench" in dataset.gnd else ds


def without_images(dataset: RetrievalDataset, keys) -> RetrievalDataset:
    """The group dataset without the images whose :attr:`ImageSpec.key` is in ``keys`` (e.g. noise
    that geometric verification dropped); every image stays a query, groups keep their names."""
    if dataset.groups is None:
        raise ValueError(f"{dataset.name} has no groups")
    keys = set(keys)
    keep = [i for i, spec in enumerate(dataset.images) if spec.key not in keys]
    return _group_dataset(dataset.name, [dataset.images[i] for i in keep],
                          [f"{dataset.groups[i]:06d}" for i in keep])


def parse_group_range(spec: str) -> range:
    """``"LO-HI"`` (inclusive, e.g. ``"0-99"``: UKBench's first 100 objects) as a ``range``."""
    try:
        lo, hi = (int(v) for v in spec.split("-"))
    except ValueError:
        raise ValueError(f"group range must look like LO-HI (e.g. 0-99), got {spec!r}") from None
    return range(lo, hi + 1)


def load_demo_set(root: str | os.PathLike | None = None, build: bool = True):
    """The demo set as a :class:`RetrievalDataset` (built first by :mod:`remap_lib.data.demo_data` if needed).

    The reader lives here with the other readers; ``demo_data`` only builds
    the folder (``jpg/`` and ``gnd.json``), so the import runs one way.
    """
    from .demo_data import CHALLENGES, build_demo_set, default_demo_dir

    root = Path(root) if root is not None else default_demo_dir()
    if build:
        build_demo_set(root)
    meta_path = root / "gnd.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no demo set in {root}; build it with `remap demo-data`")
    meta = json.loads(meta_path.read_text())
    kinds = meta["kinds"]
    images = [ImageSpec(str(root / "jpg" / f"{n}.jpg")) for n in meta["imlist"]]
    queries = [ImageSpec(str(root / "jpg" / f"{n}.jpg")) for n in meta["qimlist"]]
    gnd = {"all": [{"ok": e["ok"], "junk": []} for e in meta["gnd"]]}
    for challenge in ("multiview",) + CHALLENGES:
        gnd[challenge] = [{"ok": [i for i in e["ok"] if kinds[i] == challenge],
                           "junk": [i for i in e["ok"] if kinds[i] != challenge]} for e in meta["gnd"]]
    return RetrievalDataset("demo", images, queries, gnd, meta["groups"], "all",
                            ["built from packaged photos; see data/cache/demo/provenance.json"])
