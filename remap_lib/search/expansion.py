"""Re-ranking by expansion: average query expansion, α-QE and database-side augmentation.

Pure NumPy on ``(N, D)`` L2-normalised descriptors; similarities are inner products.

* AQE (Chum et al. 2007): the query is replaced by the mean of itself and its
  top-``k`` database neighbours, re-normalised, and searched again.
* α-QE (Radenović et al. 2018): the same with neighbour ``i`` weighted by
  ``sim_i^α`` (the query itself by 1); ``α = 0`` is AQE.
* DBA (database-side augmentation, Arandjelović & Zisserman 2012; α-weighted
  as in Radenović et al.): every database vector is replaced by the weighted
  mean of itself and its top-``k`` database neighbours, offline.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["alpha_query_expansion", "average_query_expansion", "check_alpha", "database_side_augmentation",
           "qe_alpha", "top_k", "weighted_expansion"]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is a finite number ≥ 0, else a ``ValueError``.

    ``nan`` makes every weight NaN and a negative α turns the weight of a
    neighbour at similarity 0 into infinity; either way the expanded query is
    NaN, which used to surface as "descriptors contain NaN", far from its cause.
    """
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number, 0 or more, got {alpha}")
    return float(alpha)


def qe_alpha(text: str) -> float:
    """argparse type of ``--qe-alpha``: a finite number ≥ 0 (:func:`check_alpha`)."""
    import argparse

    try:
        return check_alpha(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number, 0 or more") from None


def top_k(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, indices)`` of the ``k`` most similar database rows, best first (ties: lower index)."""
    sim = np.asarray(q, np.float32) @ np.asarray(db, np.float32).T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, idx, axis=1), idx


def weighted_expansion(q: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """``L2(q + Σ_i max(sim_i, 0)^α · neighbour_i)`` for ``(n, D)`` queries and ``(n, k, D)`` neighbours."""
    sims = np.asarray(sims, np.float32)
    alpha = check_alpha(alpha)
    weights = np.clip(sims, 0, None) ** alpha if alpha else np.ones_like(sims)
    expanded = np.asarray(q, np.float32) + np.einsum("nk,nkd->nd", weights, np.asarray(neighbours, np.float32))
    return _normalise(expanded).astype(np.float32)


def alpha_query_expansion(q: np.ndarray, db: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """α-QE: ``L2(q + Σ_{i ≤ k} max(sim_i, 0)^α · db_i)``.  ``alpha = 0`` gives average QE."""
    if k < 1:
        return np.asarray(q, np.float32)
    sims, idx = top_k(q, db, k)
    return weighted_expansion(q, np.asarray(db, np.float32)[idx], sims, alpha)


def average_query_expansion(q: np.ndarray, db: np.ndarray, k: int = 2) -> np.ndarray:
    """AQE: the mean of the query and its top-``k`` neighbours, L2-normalised."""
    return alpha_query_expansion(q, db, k, alpha=0.0)


def database_side_augmentation(db: np.ndarray, k: int = 2, alpha: float = 0.0) -> np.ndarray:
    """DBA: each database vector → ``L2(Σ_{i ≤ k+1} w_i · nn_i)`` over itself and its ``k`` neighbours.

    The vector itself is its own first neighbour (weight 1); ``w_i = max(sim_i, 0)^α``
    for the others (``α = 0``: a plain average).
    """
    db = np.asarray(db, np.float32)
    alpha = check_alpha(alpha)
    sims, idx = top_k(db, db, k + 1)
    weights = np.clip(sims, 0, None) ** alpha if alpha else np.ones_like(sims)
    return _normalise(np.einsum("nk,nkd->nd", weights, db[idx])).astype(np.float32)
