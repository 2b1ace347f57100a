"""Retrieval metrics, exactly the standard definitions, as pure NumPy functions.

Conventions
-----------
``ranks`` is an ``(n_queries, n_database)`` integer array: row ``q`` lists
database indices by decreasing similarity to query ``q`` (it may be truncated
to the top-k; relevant images missing from a truncated row count as not
retrieved).  ``gnd`` is a list with one dict per query holding ``"ok"`` (the
relevant indices) and optionally ``"junk"`` (indices ignored: each relevant
image moves up by one place for every junk image ranked before it, as if the
junk were not in the database; see :func:`_positions` for an image listed as
both).

:func:`average_precision` and :func:`mean_average_precision` have the
semantics of revisitop's ``compute_ap`` / ``compute_map`` (Radenović et al.
2018), which everyone's published Oxford/Paris numbers use: AP is the area
under the precision-recall curve by the trapezoidal rule, and queries without
relevant images are left out of the mean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.datasets import REVISITED_PROTOCOLS, revisited_gnd

__all__ = [
    "average_precision",
    "holidays_map",
    "mean_average_precision",
    "mean_precision_at_k",
    "rank_database",
    "recall_at_k",
    "revisited_gnd",
    "revisited_map",
    "ukbench_score",
]


def rank_database(query_desc: np.ndarray, db_desc: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Database indices by decreasing inner product (cosine for L2-normalised rows).

    Ties are broken by the lower database index (stable sort), so rankings are
    deterministic.  Returns ``(n_queries, top_k or n_database)``.
    """
    scores = np.asarray(query_desc, np.float32) @ np.asarray(db_desc, np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :top_k] if top_k is not None else order


def _positions(ranking: np.ndarray, ok, junk) -> np.ndarray:
    """Sorted 0-based positions of the relevant images in ``ranking``, junk discounted.

    revisitop's ``compute_map``, exactly: the positions of the relevant images
    and those of the junk images are found independently in the full ranking,
    and each relevant position is lowered by the number of junk positions
    strictly before it.  When no image is both, this is the position in the
    ranking with the junk removed.  An image listed both as relevant and as
    junk stays a relevant image at its own place (it is not before itself),
    but counts as junk for the relevant images ranked after it: ranking 0..9
    with ok = [0, 3] and junk = [3] gives positions [0, 3] and AP 17/24 =
    0.708 (removing 3 first would give 0.5), and ok = [3, 5], junk = [3] gives
    [3, 4].  Following the reference keeps mAP comparable with every
    published Oxford/Paris number.
    """
    ranking = np.asarray(ranking)
    pos = np.flatnonzero(np.isin(ranking, np.asarray(ok, dtype=ranking.dtype)))
    junk_pos = np.flatnonzero(np.isin(ranking, np.asarray(junk, dtype=ranking.dtype)))
    return pos - np.searchsorted(junk_pos, pos, side="left")  # junk strictly before each positive


def average_precision(positions: np.ndarray, n_relevant: int) -> float:
    """AP from the sorted 0-based positions of the relevant images that were retrieved.

    revisitop's trapezoidal rule: the ``j``-th relevant image (0-based) found at
    position ``r`` contributes ``(P_before + P_at) / 2 · 1/n_relevant`` with
    ``P_before = j / r`` (``1`` when ``r = 0``) and ``P_at = (j + 1) / (r + 1)``.
    """
    if n_relevant <= 0:
        raise ValueError("AP is undefined without relevant images")
    pos = np.asarray(positions, dtype=np.float64)
    j = np.arange(len(pos), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        before = np.where(pos == 0, 1.0, j / pos)
    at = (j + 1) / (pos + 1)
    return float(((before + at) / 2).sum() / n_relevant)


def _check(ranks, gnd):
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (n_queries, n_database), got shape {ranks.shape}")
    if len(gnd) != ranks.shape[0]:
        raise ValueError(f"{ranks.shape[0]} ranked queries but {len(gnd)} ground-truth entries")
    for i, g in enumerate(gnd):
        if not isinstance(g, dict) or "ok" not in g:
            raise ValueError(f"ground truth of query {i} must be a dict with an 'ok' list, got {g!r:.80}")
    return ranks


def mean_average_precision(ranks: np.ndarray, gnd: Sequence[dict]) -> tuple[float, np.ndarray]:
    """``(mAP, aps)``: ``aps[q]`` is the AP of query ``q`` (NaN when it has no relevant image).

    The mean is over queries with at least one relevant image (revisitop);
    ``nan`` if there are none.
    """
    ranks = _check(ranks, gnd)
    aps = np.full(len(gnd), np.nan)
    for q, g in enumerate(gnd):
        ok, junk = list(g["ok"]), list(g.get("junk", []))
        if ok:
            aps[q] = average_precision(_positions(ranks[q], ok, junk), len(ok))
    valid = ~np.isnan(aps)
    return (float(aps[valid].mean()) if valid.any() else float("nan")), aps


def mean_precision_at_k(ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10)):
    """``(mP@k per k, P@k per query and k)``, revisitop's variant.

    As in revisitop, the cut-off for a query is ``min(k, position of its last
    retrieved relevant image)`` so that a query with fewer than ``k`` relevant
    images can still score 1.  Queries without relevant images are NaN and
    left out of the mean.
    """
    ranks = _check(ranks, gnd)
    prs = np.full((len(gnd), len(ks)), np.nan)
    for q, g in enumerate(gnd):
        ok, junk = list(g["ok"]), list(g.get("junk", []))
        if not ok:
            continue
        pos = _positions(ranks[q], ok, junk) + 1  # 1-based
        for j, k in enumerate(ks):
            if len(pos) == 0:
                prs[q, j] = 0.0
                continue
            cut = min(int(pos.max()), k)
            prs[q, j] = (pos <= cut).sum() / cut
    valid = ~np.isnan(prs[:, 0])
    mean = prs[valid].mean(0) if valid.any() else np.full(len(ks), np.nan)
    return mean, prs


def revisited_map(ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """mAP, per-query APs and mP@k for Easy, Medium and Hard (revisitop's protocol)."""
    result = {}
    for protocol in REVISITED_PROTOCOLS:
        g = revisited_gnd(gnd, protocol)
        m, aps = mean_average_precision(ranks, g)
        mp, _ = mean_precision_at_k(ranks, g, ks)
        result[protocol] = {"map": m, "aps": aps, "mp@k": dict(zip(ks, mp.tolist()))}
    return result


def holidays_map(ranks: np.ndarray, gnd: Sequence[dict], query_db_index: Sequence[int]) -> tuple[float, np.ndarray]:
    """INRIA Holidays mAP: the query image itself (also in the database) is ignored."""
    _check(ranks, gnd)
    g = [{"ok": [i for i in e["ok"] if i != qi], "junk": list(e.get("junk", [])) + [qi]}
         for e, qi in zip(gnd, query_db_index)]
    return mean_average_precision(ranks, g)


def recall_at_k(ranks: np.ndarray, gnd: Sequence[dict], k: int) -> float:
    """Mean over queries of (relevant images in the top ``k``) / (relevant images).

    Junk is removed from the ranking first.  (This is the UKBench-style recall;
    the "at least one hit" rate used in place recognition is a different metric.)
    """
    ranks = _check(ranks, gnd)
    values = []
    for q, g in enumerate(gnd):
        ok = list(g["ok"])
        if ok:
            pos = _positions(ranks[q], ok, list(g.get("junk", [])))
            values.append((pos < k).sum() / len(ok))
    return float(np.mean(values)) if values else float("nan")


def ukbench_score(ranks: np.ndarray, groups: Sequence[int]) -> float:
    """UKBench score, 4 × Recall@4: mean number of the query's group in its top 4 (itself included).

    Every database image is a query (row ``q`` of ``ranks`` ranks the whole
    database for image ``q``); ``groups[i]`` is the object of image ``i``.
    """
    ranks = np.asarray(ranks)
    groups = np.asarray(groups)
    if ranks.shape[0] != len(groups):
        raise ValueError(f"UKBench ranks every image: {len(groups)} images but {ranks.shape[0]} rows")
    top4 = groups[ranks[:, :4]]
    return float((top4 == groups[:, None]).sum(1).mean())
