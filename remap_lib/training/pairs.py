"""Verified training pairs: sampled per group, counted with RANSAC, classified, cached (REMAP §IV-A).

REMAP is fine-tuned on matching pairs of landmark photos chosen like this
(Husain & Bober, §IV-A): *fifty random pairs per landmark class; RANSAC on
SIFT matches; pairs with fewer than 5 inliers (extreme hard examples) or more
than 30 (extreme easy examples) are filtered out*.  Gordo et al. (Deep Image
Retrieval, 2016) clean their web-crawled landmark data the same way: SIFT,
the ratio test and RANSAC within each class, keeping the images verified
against others of their class.

Why both bounds:

* ``inliers < min_inliers`` — *too hard*: the two photos share no part of the
  landmark that can be verified (the other side, the interior, a night view
  against a day view, or an image that does not show the landmark at all:
  web-crawled sets hold ~3 % of those).  As a positive pair it asks the
  network to pull together images with nothing in common: label noise.  5 is
  the first count above the 4 correspondences a homography is fitted from, so
  it is the smallest count that is evidence at all.
* ``inliers > max_inliers`` — *too easy*: near duplicates, crops and re-edits
  of one shot.  Their descriptors are already close, the triplet loss is zero
  and they teach nothing, while taking the place of pairs that would.

:func:`verify_pairs` samples the pairs of a dataset with groups, counts their
inliers (:mod:`remap_lib.training.verification`) in parallel with a resumable
on-disk cache, and classifies them; :func:`load_pairs` reads the CSV it writes.

The pairs CSV (``remap verify-pairs DATASET -o pairs.csv``) has a header and
one row per sampled pair: ``query,positive,group,inliers,status`` — absolute
image paths, the group (landmark) name, the inlier count (empty when an image
could not be read) and ``kept`` / ``too_easy`` / ``too_hard`` / ``failed``.
``pairs.json`` beside it records the settings, the counts per group, the
images dropped by noise cleaning and the unreadable images with the reason.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty
from typing import Iterable, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..data.images import ImageLoadError, ImageSpec
from .verification import _FEATURES, MatchSettings, _image_features, count_inliers

__all__ = [
    "CSV_COLUMNS",
    "PairVerification",
    "VerifiedPair",
    "classify_pairs",
    "load_pairs",
    "sample_pairs",
    "verify_pairs",
]

log = logging.getLogger(__name__)

CSV_COLUMNS = ("query", "positive", "group", "inliers", "status")
STATUSES = ("kept", "too_easy", "too_hard", "failed")


# --------------------------------------------------------------------------- pairs


def classify_pairs(inliers: Iterable[int | None], min_inliers: int = 5, max_inliers: int = 30) -> list[str]:
    """``kept`` (min ≤ inliers ≤ max), ``too_hard`` (< min), ``too_easy`` (> max), ``failed`` (None)."""
    if not 0 <= min_inliers <= max_inliers:
        raise ValueError(f"need 0 <= min_inliers <= max_inliers, got {min_inliers} and {max_inliers}")
    return ["failed" if n is None else "too_hard" if n < min_inliers else "too_easy" if n > max_inliers
            else "kept" for n in inliers]


def sample_pairs(n: int, k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``k`` distinct unordered pairs ``(i, j)``, ``i < j < n``, at random (all of them if there are fewer)."""
    total = n * (n - 1) // 2
    if total <= k:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if 2 * k >= total:
        i, j = np.triu_indices(n, 1)
        pick = np.sort(rng.choice(total, k, replace=False))
        return [(int(i[p]), int(j[p])) for p in pick]
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < k:
        i, j = (int(v) for v in rng.choice(n, 2, replace=False))
        chosen.setdefault((min(i, j), max(i, j)), None)
    return list(chosen)


def _group_rng(seed: int, group: str, purpose: int) -> np.random.Generator:
    """A generator per group, so one group's pairs do not depend on the others."""
    return np.random.default_rng([seed, zlib.crc32(group.encode()), purpose])


@dataclass
class VerifiedPair:
    """Two images of one group and their inlier count (``None``: an image could not be read)."""

    query: str
    positive: str
    group: str
    inliers: int | None
    status: str


@dataclass
class PairVerification:
    """What :func:`verify_pairs` found.

    Attributes:
        pairs: every sampled pair, classified (``status`` in ``kept``,
            ``too_easy``, ``too_hard``, ``failed``).
        dropped: images the noise cleaning dropped (verified against no other
            image of their group): ``{"path", "group", "best_inliers", "tried"}``,
            ``tried`` counting the images it was matched against (its own
            tries and those of the images that drew it as a partner).
        failed: unreadable image → reason.
        settings: everything the result depends on.
        seconds: wall time.
    """

    pairs: list[VerifiedPair]
    dropped: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def kept(self) -> list[VerifiedPair]:
        return [p for p in self.pairs if p.status == "kept"]

    def counts(self, group: str | None = None) -> dict[str, int]:
        """``sampled`` and one count per status (of one group, or all)."""
        pairs = [p for p in self.pairs if group is None or p.group == group]
        out = {"sampled": len(pairs)}
        out.update({s: sum(p.status == s for p in pairs) for s in STATUSES})
        return out

    def per_group(self) -> dict[str, dict[str, int]]:
        """:meth:`counts` per group, with ``images`` and ``dropped`` images."""
        images = self.settings.get("group_sizes", {})
        out = {}
        for g in images:
            out[g] = {"images": images[g], **self.counts(g), "dropped": sum(d["group"] == g for d in self.dropped)}
        return out

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the pairs CSV (:data:`CSV_COLUMNS`, absolute paths) and a JSON beside it (``.json``).

        The CSV has one row per sampled pair; :func:`load_pairs` returns the
        ``kept`` ones.  The JSON holds the settings, counts per group, the
        images dropped by noise cleaning and the unreadable ones with reasons.
        """
        path = Path(path)
        side = path.with_suffix(".json")
        if side == path:
            raise ValueError(f"{path}: name the pairs file .csv (the report goes to the .json beside it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for p in self.pairs:
                writer.writerow([os.path.abspath(p.query), os.path.abspath(p.positive), p.group,
                                 "" if p.inliers is None else p.inliers, p.status])
        os.replace(tmp, path)
        report = {"settings": self.settings, "seconds": round(self.seconds, 1), "counts": self.counts(),
                  "per_group": self.per_group(), "dropped": self.dropped,
                  "failed": [{"path": p, "reason": r} for p, r in sorted(self.failed.items())]}
        side.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path, side


def load_pairs(path: str | os.PathLike, statuses: Sequence[str] | None = ("kept",)) -> list[VerifiedPair]:
    """The pairs of a CSV written by :meth:`PairVerification.save` (by default the ``kept`` ones).

    Columns (header required): ``query,positive`` and optionally ``group``,
    ``inliers``, ``status``; relative image paths are read relative to the
    CSV's folder.  A hand-written CSV without a ``status`` column counts as all
    kept.  ``statuses=None`` returns every row.  A pair is unordered: either
    image can serve as the query (anchor) of a triplet.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist (write one with `remap verify-pairs`)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"query", "positive"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs a header with 'query' and 'positive' columns "
                             f"(as written by `remap verify-pairs`), got {reader.fieldnames}")
        rows = list(reader)
    out = []
    for line, r in enumerate(rows, 2):
        status = (r.get("status") or "kept").strip()
        if status not in STATUSES:
            raise ValueError(f"{path}:{line}: unknown status {status!r} (one of {', '.join(STATUSES)})")
        if statuses is not None and status not in statuses:
            continue
        text = (r.get("inliers") or "").strip()
        try:
            inliers = int(text) if text else None
        except ValueError:
            raise ValueError(f"{path}:{line}: inliers {text!r} is not an integer") from None
        if not (r["query"] or "").strip() or not (r["positive"] or "").strip():
            raise ValueError(f"{path}:{line}: a pair needs both a query and a positive image")
        a, b = (str(p if p.is_absolute() else path.parent / p) for p in (Path(r["query"]), Path(r["positive"])))
        out.append(VerifiedPair(a, b, (r.get("group") or "").strip(), inliers, status))
    return out


class _PairCache:
    """Inlier counts in a JSON-lines file, one line per finished pair, flushed and fsynced.

    A line is ``{"a": key, "b": key, "settings": MatchSettings.key(), "inliers": n}``
    (``a`` < ``b``: a pair is unordered); lines of other settings and a
    half-written last line (a killed run) are ignored.
    """

    def __init__(self, path: str | os.PathLike | None, settings_key: str):
        self.path, self.key, self.counts = (Path(path) if path else None), settings_key, {}
        if self.path is None or not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                if r["settings"] == settings_key:
                    self.counts[(r["a"], r["b"])] = int(r["inliers"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill

    def add(self, a: str, b: str, inliers: int) -> None:
        self.counts[(a, b)] = inliers
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # finish a line cut short by a kill
            f.write((json.dumps({"a": a, "b": b, "settings": self.key, "inliers": inliers},
                                ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def _verify_group(group: str, specs: list[ImageSpec], job: dict, cached: dict, emit) -> None:
    """All the work of one group, in one process (so each image's SIFT is computed once).

    Noise cleaning first if asked (every image against up to ``clean_tries``
    random others of the group, in rounds, until one pair has ≥ ``min_inliers``
    inliers), then ``pairs_per_group`` random pairs of the images left.  Calls
    ``emit`` with ``("pair", key_a, key_b, inliers)`` for each pair counted,
    ``("failed", path, reason)`` for each unreadable image and finally
    ``("group", group, dropped, [(spec_a, spec_b, inliers or None), ...])``.
    """
    settings: MatchSettings = job["settings"]
    counts, failed = dict(cached), {}
    _FEATURES.clear()

    def count(s: ImageSpec, t: ImageSpec) -> int | None:
        a, b = sorted((s, t), key=lambda x: x.key)
        if (a.key, b.key) in counts:
            return counts[(a.key, b.key)]
        if a.path in failed or b.path in failed:
            return None
        try:
            fa, fb = _image_features(a, settings), _image_features(b, settings)
        except ImageLoadError as exc:
            failed[exc.path] = exc.reason
            emit(("failed", exc.path, exc.reason))
            return None
        n, _ = count_inliers(fa, fb, settings.ratio, settings.method, settings.ransac_threshold)
        counts[(a.key, b.key)] = n
        emit(("pair", a.key, b.key, n))
        return n

    dropped = []
    if job["drop_unverified"]:
        rng = _group_rng(job["seed"], group, 1)
        partners = {s.key: [specs[j] for j in rng.permutation(len(specs)) if specs[j].key != s.key][:job["clean_tries"]]
                    for s in specs}
        verified, best, tested = set(), {s.key: 0 for s in specs}, {s.key: set() for s in specs}
        for r in range(job["clean_tries"]):
            for s in specs:
                if s.key in verified or s.path in failed or r >= len(partners[s.key]):
                    continue
                t = partners[s.key][r]
                n = count(s, t)
                if n is None:
                    continue
                for u, v in ((s, t), (t, s)):
                    best[u.key] = max(best[u.key], n)
                    tested[u.key].add(v.key)
                if n >= job["min_inliers"]:
                    verified.update((s.key, t.key))
        dropped = [{"path": s.path, "group": group, "best_inliers": best[s.key], "tried": len(tested[s.key])}
                   for s in specs if s.key not in verified and s.path not in failed]
    gone = {d["path"] for d in dropped} | set(failed)
    left = [s for s in specs if s.path not in gone]
    sampled = []
    for i, j in sample_pairs(len(left), job["pairs_per_group"], _group_rng(job["seed"], group, 0)):
        a, b = sorted((left[i], left[j]), key=lambda x: x.key)
        sampled.append((a, b, count(a, b)))
    emit(("group", group, dropped, sampled))


def _worker(share: list, job: dict, cached: dict, queue) -> None:
    """A worker process: its groups one after the other, every message through ``queue``."""
    cv2.setNumThreads(1)  # one process per core already
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - comes with scikit-learn
        pass
    try:
        for group, specs in share:
            _verify_group(group, specs, job, cached, queue.put)
        queue.put(("done",))
    except BaseException:
        import traceback

        queue.put(("error", traceback.format_exc()))
        raise


def _run_groups(members: dict[str, list[ImageSpec]], job: dict, cache: _PairCache, workers: int,
                progress: bool) -> tuple[dict, dict]:
    """``{group: (dropped, sampled)}`` and ``{unreadable path: reason}``, groups spread over processes."""
    results, failed = {}, {}
    total = None if job["drop_unverified"] else sum(
        min(job["pairs_per_group"], len(s) * (len(s) - 1) // 2) for s in members.values())
    with tqdm(total=total, desc="verify pairs", unit="pair", disable=not progress) as bar:
        def handle(msg):
            if msg[0] == "pair":
                cache.add(*msg[1:])
                bar.update()
            elif msg[0] == "failed":
                failed.setdefault(msg[1], msg[2])
            elif msg[0] == "group":
                results[msg[1]] = (msg[2], msg[3])
                bar.set_postfix_str(f"{len(results)}/{len(members)} groups")

        workers = min(workers, len(members))
        if workers <= 1:
            for group, specs in members.items():
                _verify_group(group, specs, job, cache.counts, handle)
            return results, failed
        # the largest groups first, each to the least loaded worker; spawn, because a forked child
        # deadlocks in the thread pools (OpenCV, BLAS) the parent may already have used
        shares, loads = [[] for _ in range(workers)], [0] * workers
        for group, specs in sorted(members.items(), key=lambda kv: -len(kv[1])):
            w = loads.index(min(loads))
            shares[w].append((group, specs))
            loads[w] += len(specs) + job["pairs_per_group"]
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(share, job, cache.counts, queue), daemon=True) for share in shares]
        try:
            for p in procs:
                p.start()
            done = 0
            while done < len(procs):
                try:
                    msg = queue.get(timeout=2.0)
                except Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a verify-pairs worker died (exit code {dead[0].exitcode})") from None
                    continue
                if msg[0] == "done":
                    done += 1
                elif msg[0] == "error":
                    raise RuntimeError(f"a verify-pairs worker failed:\n{msg[1]}")
                else:
                    handle(msg)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
    return results, failed


def _group_names(dataset) -> list[str]:
    """A name per image's group: the folder name when each group is one folder, else the group id."""
    folders: dict[int, set] = {}
    for spec, g in zip(dataset.images, dataset.groups):
        folders.setdefault(g, set()).add(Path(spec.path).parent.name)
    names = {g: next(iter(f)) for g, f in folders.items() if len(f) == 1}
    if len(names) == len(folders) and len(set(names.values())) == len(names):
        return [names[g] for g in dataset.groups]
    return [str(g) for g in dataset.groups]


def verify_pairs(dataset, *, pairs_per_group: int = 50, min_inliers: int = 5, max_inliers: int = 30,
                 drop_unverified: bool = False, clean_tries: int = 10, seed: int = 0,
                 settings: MatchSettings | None = None, cache: str | os.PathLike | None = None,
                 workers: int | None = None, progress: bool = True) -> PairVerification:
    """Sample matching pairs per group, count their RANSAC inliers, keep ``min ≤ inliers ≤ max``.

    Args:
        dataset: a :class:`~remap_lib.data.datasets.RetrievalDataset` with groups,
            or a path for :func:`~remap_lib.data.datasets.load_dataset`.
        pairs_per_group: random distinct unordered pairs per group (paper:
            50; all of them when a group has fewer).
        min_inliers, max_inliers: the bounds of a kept pair (paper: 5 and 30).
        drop_unverified: noise cleaning first: match every image against up to
            ``clean_tries`` random others of its group; the images with no
            pair of ≥ ``min_inliers`` inliers are dropped (``result.dropped``)
            before the pairs are sampled, so that the pairs are not spent on
            images that match nothing (and kept pairs never use them).
        seed: the pairs of a group are drawn from ``(seed, group name)``.
        settings: :class:`MatchSettings` (image size, ratio, model, threshold).
        cache: JSON-lines file of finished counts: a killed run resumes, a
            rerun computes nothing (lines of other settings are ignored;
            delete it if images change under the same paths).
        workers: processes, each taking whole groups (default: the CPU cores;
            ≤ 1: in this process).
    """
    from ..data.datasets import load_dataset

    start = time.perf_counter()
    settings = settings or MatchSettings()
    classify_pairs([], min_inliers, max_inliers)  # checks the bounds before any work
    if pairs_per_group < 1 or clean_tries < 1:
        raise ValueError(f"pairs_per_group and clean_tries must be at least 1, got {pairs_per_group}, {clean_tries}")
    if not hasattr(dataset, "images"):
        dataset = load_dataset(os.fspath(dataset))
    if not dataset.groups:
        raise ValueError(f"{dataset.name} has no groups (landmarks / objects): nothing to pair; use a folder of "
                         "<group>/<image> sub-folders, a CSV of image,group, UKBench or Holidays")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    members: dict[str, list[ImageSpec]] = {}
    for spec, g in zip(dataset.images, _group_names(dataset)):
        members.setdefault(g, []).append(spec)
    job = {"settings": settings, "pairs_per_group": pairs_per_group, "min_inliers": min_inliers,
           "drop_unverified": drop_unverified, "clean_tries": clean_tries, "seed": seed}
    results, failed = _run_groups(members, job, _PairCache(cache, settings.key()), workers, progress)
    pairs, dropped = [], []
    for g in members:  # group order, whichever worker finished first
        group_dropped, sampled = results[g]
        dropped += group_dropped
        statuses = classify_pairs([n for _, _, n in sampled], min_inliers, max_inliers)
        pairs += [VerifiedPair(a.path, b.path, g, n, s) for (a, b, n), s in zip(sampled, statuses)]
    for path, reason in failed.items():
        log.warning("%s: %s", path, reason)
    record = {"dataset": dataset.name, "images": len(dataset.images),
              "group_sizes": {g: len(s) for g, s in members.items()}, "pairs_per_group": pairs_per_group,
              "min_inliers": min_inliers, "max_inliers": max_inliers, "drop_unverified": drop_unverified,
              "clean_tries": clean_tries if drop_unverified else None, "seed": seed, "match": asdict(settings),
              "cache_key": settings.key(), "workers": workers, "opencv": cv2.__version__}
    return PairVerification(pairs, dropped, failed, record, time.perf_counter() - start)
