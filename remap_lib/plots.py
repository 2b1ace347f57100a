"""Pictures of retrieval results (matplotlib, no display needed)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves
import numpy as np

from .datasets import RetrievalDataset
from .images import load_spec
from .metrics import rank_database

__all__ = ["plot_query_results", "result_status"]

COLOURS = {"ok": "#1a9641", "wrong": "#d7191c", "junk": "#999999"}


def result_status(dataset: RetrievalDataset, protocol: str, query: int, db_index: int) -> str:
    """``"ok"`` (relevant), ``"junk"`` (ignored) or ``"wrong"`` for one retrieved image."""
    g = dataset.gnd[protocol][query]
    if db_index in g["ok"]:
        return "ok"
    return "junk" if db_index in g.get("junk", []) else "wrong"


def _thumb(spec, size=200):
    img = load_spec(spec)
    img.thumbnail((size, size))
    return np.asarray(img)


def plot_query_results(dataset: RetrievalDataset, results: dict[str, tuple[np.ndarray, np.ndarray]],
                       queries: Sequence[int], top_k: int = 5, protocol: str | None = None,
                       path: str | os.PathLike | None = None):
    """One row per (query, method): the query, then its top-k, framed green when correct (paper Fig. 9).

    Args:
        results: method name → ``(database descriptors, query descriptors)``.
        queries: query indices to show.
        protocol: ground truth used for the frames (default: the dataset's primary).
        path: save the figure there (PNG); the figure is returned either way.
    """
    protocol = protocol or dataset.primary
    rows = [(q, m) for q in queries for m in results]
    fig, axes = plt.subplots(len(rows), top_k + 1, figsize=(1.9 * (top_k + 1), 1.9 * len(rows)), squeeze=False)
    cache: dict[int, np.ndarray] = {}
    for r, (q, method) in enumerate(rows):
        db, qd = results[method]
        ranking = rank_database(qd[q:q + 1], db, top_k)[0]
        scores = qd[q] @ db[ranking].T
        ax = axes[r, 0]
        ax.imshow(_thumb(dataset.queries[q]))
        ax.set_title(f"query {q}", fontsize=8)
        ax.set_ylabel(method, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for c, (i, s) in enumerate(zip(ranking, scores), start=1):
            if i not in cache:
                cache[i] = _thumb(dataset.images[i])
            ax = axes[r, c]
            ax.imshow(cache[i])
            colour = COLOURS[result_status(dataset, protocol, q, int(i))]
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(f"#{c}  {s:.2f}", fontsize=8, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{dataset.name}: top {top_k} per method (green: correct, red: wrong, grey: ignored)",
                 fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig
