"""Landmark boxes without hand labels: the RANSAC inliers of verified pairs (Gordo et al. 2016).

Gordo et al. (*Deep Image Retrieval*, ECCV 2016) train their region
proposal network on boxes of the landmark in each training photo, and find
those boxes without anyone drawing them: in a verified matching pair the
inlier keypoints lie on the landmark, so their bounding box in each image is
a box of the landmark.  Here the pairs are the kept pairs of ``remap
verify-pairs`` (:func:`~remap_lib.training.verification.load_pairs`), and
:func:`~remap_lib.training.verification.inlier_boxes` gives the two boxes of a pair
with the same SIFT/RootSIFT + RANSAC homography as the verification.

Merging the boxes of an image.  An image in several pairs gets a box from
each; :func:`merge_boxes` makes one of them, by one of two rules:

* ``"union"`` (the default): the smallest box holding them all.  Each pair's
  box covers only the part of the landmark *both* photos show — the left half
  of a façade with one partner, the portal with another — and the kept pairs
  are already verified (5 to 30 inliers under a plausible homography), so a
  box is seldom wrong but often partial.  The union of the verified parts is
  the estimate of the whole landmark, which is what the proposals should find
  (a region that holds the object, not a piece of it).  Its weakness: one
  wrong pair (inliers on a repeated pattern of the background) widens the box.
* ``"median"``: a consensus box, the coordinate-wise median of the boxes
  (``x0`` the median of the ``x0`` …; a valid box, since every ``x1 ≥ x0``).
  One wrong box among three or more moves no edge beyond the others, but the
  result shrinks towards the part that most partners see.  Use it when the
  pairs are noisy (a web-crawled set without ``--drop-unverified``).

Caching.  Every finished pair is appended to a JSON-lines file (flushed and
fsynced, like the pair verification's cache), keyed by the two image paths and
the :class:`~remap_lib.training.verification.MatchSettings`: an interrupted run resumes
where it stopped and a rerun computes nothing.  Delete the file if the images
change under the same paths.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..data.images import ImageLoadError, ImageSpec
from .pairs import VerifiedPair, load_pairs
from .verification import MatchSettings, _image_features, inlier_boxes

__all__ = ["MERGES", "TrainingBoxes", "merge_boxes", "training_boxes"]

log = logging.getLogger(__name__)

MERGES = ("union", "median")
_CHUNK = 16  # pairs per task of a worker process (a killed run loses at most the chunks in flight)


def merge_boxes(boxes: Iterable[Sequence[float]], how: str = "union") -> np.ndarray:
    """One box ``[x0, y0, x1, y1]`` from several boxes of one image: their ``"union"`` or ``"median"``.

    See the module docstring for the two rules and why union is the default.
    """
    b = np.asarray(list(boxes), dtype=np.float64).reshape(-1, 4)
    if not len(b):
        raise ValueError("no boxes to merge")
    if how == "union":
        return np.concatenate([b[:, :2].min(axis=0), b[:, 2:].max(axis=0)])
    if how == "median":
        return np.median(b, axis=0)
    raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {how!r}")


@dataclass
class TrainingBoxes:
    """What :func:`training_boxes` found.

    Attributes:
        boxes: image path → merged box ``[x0, y0, x1, y1]`` in the image's pixels
            (the upright image as :func:`~remap_lib.data.images.load_spec` reads it).
        pairs: one record per pair: ``a``, ``b`` (paths), ``inliers`` and the
            boxes ``box_a``, ``box_b`` (``None`` when no geometric model was
            found); pairs with an unreadable image are left out.
        failed: unreadable image → reason.
        settings: everything the boxes depend on (match settings, merge rule, …).
        seconds: wall time.
    """

    boxes: dict[str, list[float]]
    pairs: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def boxes_of(self, path: str) -> list[list[float]]:
        """The per-pair boxes of one image that went into its merged box."""
        path = os.path.abspath(path)
        min_inliers = self.settings.get("min_inliers", 0)
        out = []
        for r in self.pairs:
            if r["box_a"] is not None and r["inliers"] >= min_inliers:
                out += [r[f"box_{s}"] for s in ("a", "b") if r[s] == path]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingBoxes":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("boxes"), dict):
            raise ValueError(f"{path} is not a training-boxes file (written by TrainingBoxes.save)")
        return cls(**data)


class _BoxCache:
    """Finished pairs in a JSON-lines file: ``{"a", "b", "settings", "inliers", "box_a", "box_b"}`` a line."""

    def __init__(self, path: str | os.PathLike | None, settings_key: str):
        self.path, self.key, self.records = (Path(path) if path else None), settings_key, {}
        if self.path is None or not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                if r["settings"] == settings_key:
                    self.records[(r["a"], r["b"])] = {k: r[k] for k in ("a", "b", "inliers", "box_a", "box_b")}
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill

    def add(self, record: dict) -> None:
        self.records[(record["a"], record["b"])] = record
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # finish a line cut short by a kill
            f.write((json.dumps({**record, "settings": self.key}, ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def _boxes_of_pairs(chunk: list[tuple[str, str]], settings: MatchSettings) -> tuple[list[dict], dict]:
    """Records of the pairs of ``chunk`` and the unreadable images (in a worker or in this process)."""
    records, failed = [], {}
    for a, b in chunk:
        if a in failed or b in failed:
            continue
        try:
            fa, fb = _image_features(ImageSpec(a), settings), _image_features(ImageSpec(b), settings)
        except ImageLoadError as exc:
            failed[exc.path] = exc.reason
            continue
        box_a, box_b, n = inlier_boxes(fa, fb, settings.ratio, settings.method, settings.ransac_threshold)
        records.append({"a": a, "b": b, "inliers": n,
                        "box_a": None if box_a is None else [round(float(v), 2) for v in box_a],
                        "box_b": None if box_b is None else [round(float(v), 2) for v in box_b]})
    return records, failed


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - comes with scikit-learn
        pass


def training_boxes(pairs: str | os.PathLike | Sequence[VerifiedPair], *, merge: str = "union",
                   min_inliers: int = 5, settings: MatchSettings | None = None,
                   statuses: Sequence[str] = ("kept",), cache: str | os.PathLike | None = None,
                   workers: int | None = None, progress: bool = True) -> TrainingBoxes:
    """A landmark box for every image of the verified pairs: inlier boxes, merged per image.

    Args:
        pairs: a pairs CSV of ``remap verify-pairs`` (its ``statuses`` rows are
            used, by default the kept ones) or :class:`~remap_lib.training.verification.VerifiedPair` s.
        merge: ``"union"`` (default) or ``"median"``, see the module docstring.
        min_inliers: a pair whose recomputed inlier count is lower gives no box
            (RANSAC is re-run here; the count can differ from the CSV's by a few).
        settings: SIFT/RANSAC settings; use those of the verification (default:
            :class:`~remap_lib.training.verification.MatchSettings`, as ``remap verify-pairs``).
        cache: JSON-lines file of finished pairs (resume; see the module docstring).
        workers: processes (default: the CPU cores; ≤ 1: in this process).
    """
    start = time.perf_counter()
    settings = settings or MatchSettings()
    merge_boxes([[0, 0, 1, 1]], merge)  # checks the rule before any work
    if isinstance(pairs, (str, os.PathLike)):
        source = os.fspath(pairs)
        pairs = load_pairs(pairs, statuses)
    else:
        source = None
    groups: dict[tuple[str, str], str] = {}
    for p in pairs:
        a, b = sorted((os.path.abspath(p.query), os.path.abspath(p.positive)))
        if a != b:
            groups.setdefault((a, b), p.group)
    if not groups:
        raise ValueError(f"{source or 'the pairs given'}: no pair of two different images to take boxes from")
    store = _BoxCache(cache, "boxes-" + settings.key())
    todo = sorted((ab for ab in groups if ab not in store.records), key=lambda ab: (groups[ab], ab))
    chunks = [todo[i:i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, len(chunks))
    failed: dict[str, str] = {}
    with tqdm(total=len(todo), desc="inlier boxes", unit="pair", disable=not progress) as bar:
        def handle(result):
            records, bad = result
            for r in records:
                store.add(r)
            failed.update(bad)
            bar.update(len(records))

        work = functools.partial(_boxes_of_pairs, settings=settings)
        if workers <= 1:
            for chunk in chunks:
                handle(work(chunk))
        else:  # spawn: a forked child can deadlock in thread pools (OpenCV, BLAS) the parent used
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
                for result in pool.imap_unordered(work, chunks):
                    handle(result)
    for path, reason in failed.items():
        log.warning("%s: %s", path, reason)

    records = [store.records[ab] for ab in sorted(groups) if ab in store.records]
    per_image: dict[str, list] = {}
    for r in records:
        if r["box_a"] is not None and r["inliers"] >= min_inliers:
            per_image.setdefault(r["a"], []).append(r["box_a"])
            per_image.setdefault(r["b"], []).append(r["box_b"])
    boxes = {path: [round(float(v), 2) for v in merge_boxes(bs, merge)] for path, bs in sorted(per_image.items())}
    record = {"pairs_file": source, "statuses": list(statuses), "pairs": len(groups), "merge": merge,
              "min_inliers": min_inliers, "match": asdict(settings), "cache_key": store.key,
              "images_with_box": len(boxes), "workers": workers}
    return TrainingBoxes(boxes, records, failed, record, time.perf_counter() - start)
