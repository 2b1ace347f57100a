"""Pictures of retrieval results (matplotlib, no display needed)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves
import numpy as np

from ..data.datasets import RetrievalDataset
from ..data.images import load_spec, load_thumbnail
from ..evaluation.metrics import rank_database

__all__ = ["ACTIVATION_SUMMARIES", "activation_maps", "kl_weight_map", "plot_distance_histograms", "plot_kl_weights",
           "plot_query_results", "plot_region_grid", "plot_region_scale", "result_status"]

COLOURS = {"ok": "#1a9641", "wrong": "#d7191c", "junk": "#999999"}


def result_status(dataset: RetrievalDataset, protocol: str, query: int, db_index: int) -> str:
    """``"ok"`` (relevant), ``"junk"`` (ignored) or ``"wrong"`` for one retrieved image."""
    g = dataset.gnd[protocol][query]
    if db_index in g["ok"]:
        return "ok"
    return "junk" if db_index in g.get("junk", []) else "wrong"


def _as_image(image):
    """A PIL image as it is, or an :class:`ImageSpec` / path loaded."""
    return image if hasattr(image, "size") else load_spec(image)


def _thumb(spec, size=200):
    return np.asarray(load_thumbnail(spec, size))


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


def plot_distance_histograms(klw, layer: str, regions: Sequence[int] | None = None, bins: int = 30,
                             path: str | os.PathLike | None = None):
    """Paper Fig. 2(a–e): matching vs non-matching distance histograms of chosen regions.

    ``klw`` is a :class:`~remap_lib.training.klw.KLWeights` that still holds its
    distances (fresh from :func:`~remap_lib.training.klw.estimate_kl_weights`).  By
    default the three regions of highest and the two of lowest weight.
    """
    if layer not in klw.distances:
        raise ValueError(f"no distances for layer {layer!r} (they are kept only by a fresh estimate)")
    d_match, d_non = klw.distances[layer]
    w = klw.weights[layer]
    if regions is None:
        order = np.argsort(-w)
        regions = list(order[:3]) + list(order[-2:])
    fig, axes = plt.subplots(1, len(regions), figsize=(3.2 * len(regions), 2.8), squeeze=False)
    for ax, r in zip(axes[0], regions):
        edges = np.linspace(min(d_match[:, r].min(), d_non[:, r].min()), max(d_match[:, r].max(), d_non[:, r].max()),
                            bins + 1)
        ax.hist(d_non[:, r], edges, density=True, alpha=0.6, color="#d7191c", label="non-matching")
        ax.hist(d_match[:, r], edges, density=True, alpha=0.6, color="#1a9641", label="matching")
        ax.set_title(f"region {r}: KL = {w[r]:.2f}", fontsize=9)
        ax.set_xlabel("Euclidean distance", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{layer}: distance distributions per region", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig


def kl_weight_map(weights: np.ndarray, levels: int, height: int, width: int, full_map: bool = False,
                  reference: tuple[int, int] = (24, 32)) -> np.ndarray:
    """Per pixel of an ``height × width`` picture, the mean weight of the reference regions covering it."""
    from ..layers.functional import rmac_regions

    boxes = rmac_regions(*reference, levels, full_map=full_map).numpy().astype(np.float64)
    sy, sx = height / reference[0], width / reference[1]
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for (x0, y0, x1, y1), w in zip(boxes, weights):
        ys, xs = slice(int(round(y0 * sy)), int(round(y1 * sy))), slice(int(round(x0 * sx)), int(round(x1 * sx)))
        total[ys, xs] += w
        count[ys, xs] += 1
    return total / np.maximum(count, 1)


def plot_kl_weights(klw, image=None, path: str | os.PathLike | None = None):
    """Paper Fig. 2(f) and a heat map: each layer's region weights as bars and drawn over an image.

    Bars are coloured by scale, in the colours of :func:`plot_region_grid`, so
    a weight can be traced to the size of its region.
    """
    from matplotlib.patches import Patch

    from ..layers.functional import rmac_regions
    from ..layers.pooling import REFERENCE_MAP

    layers = list(klw.weights)
    levels, full_map = klw.model["levels"], klw.model["full_map"]
    _, scale_of = rmac_regions(*REFERENCE_MAP, levels, full_map=full_map, return_levels=True)
    bar_colours = ["#888888" if lv == 0 else SCALE_COLOURS[(lv - 1) % len(SCALE_COLOURS)] for lv in scale_of.tolist()]
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 3.3 * len(layers)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.4, 1]})
    img = None
    if image is not None:
        img = _as_image(image)
        img = np.asarray(img.resize((512, 384)))
    for row, layer in zip(axes, layers):
        w = klw.weights[layer]
        row[0].bar(np.arange(len(w)), w, color=bar_colours if len(bar_colours) == len(w) else "#2b83ba",
                   edgecolor="#333333", linewidth=0.4)
        row[0].set_title(f"{layer}: KL weight per region", fontsize=9)
        row[0].set_xlabel("region (scale by scale, row by row within a scale)", fontsize=8)
        row[0].legend(handles=[Patch(facecolor=SCALE_COLOURS[(lv - 1) % len(SCALE_COLOURS)], edgecolor="#333333",
                                     label=f"scale {lv}") for lv in range(1, levels + 1)],
                      fontsize=7, ncol=levels, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
        heat = kl_weight_map(w, levels, 384, 512, full_map)
        if img is not None:
            row[1].imshow(img)
            shown = row[1].imshow(heat, alpha=0.55, cmap="inferno")
        else:
            shown = row[1].imshow(heat, cmap="inferno")
        row[1].set_title(f"{layer}: mean weight of the regions covering each point", fontsize=9)
        row[1].set_xticks([])
        row[1].set_yticks([])
        fig.colorbar(shown, ax=row[1], fraction=0.035)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig


def figure_png(fig, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes, and the figure closed.

    For widgets that show a picture (``ipywidgets.Image``): a slider that
    redraws into an Image instead of an ``interact``/``Output`` widget keeps
    notebooks executable headless (papermill/nbclient can hang on the
    Output widget's captured ``clear_output``; nteract/papermill#723).
    """
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# One bright colour per scale (the same in every panel and in the slider), visible on dark and light photos.
SCALE_COLOURS = ("#00c8ff", "#ff9d00", "#8cff00", "#ff3ca0", "#fff000", "#b070ff")


def _feature_map_size(image, map_size: tuple[int, int] | None) -> tuple[int, int]:
    """``(height, width)`` in cells of the map the image gives at stride 32 (or ``map_size``)."""
    w, h = image.size
    return map_size or (max(1, round(h / 32)), max(1, round(w / 32)))


def plot_region_scale(image, levels: int, level: int, ax=None, map_size: tuple[int, int] | None = None,
                      highlight: int | None = None):
    """The regions of one scale (``level``) of the ``levels``-scale R-MAC grid, over the image.

    Every region of the scale is a translucent fill, so a point covered by
    several overlapping squares is darker; one region (``highlight``: its
    index within the scale, default the one nearest the centre) is outlined,
    so its size reads at a glance.  The grid is the one of the map the image gives at
    stride 32 (``map_size`` overrides, e.g. ``(24, 32)`` for the paper's
    1024×768 input), scaled to the picture.
    """
    from matplotlib.patches import Rectangle

    from ..layers.functional import rmac_regions

    img = _as_image(image)
    w, h = img.size
    mh, mw = _feature_map_size(img, map_size)
    boxes, lv = rmac_regions(mh, mw, levels, return_levels=True)
    mine = boxes[lv == level].tolist()
    if not mine:
        raise ValueError(f"scale {level} is not in the {levels}-scale grid of a {mh}x{mw} map")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5 * h / w))
    ax.imshow(np.asarray(img))
    colour = SCALE_COLOURS[(level - 1) % len(SCALE_COLOURS)]
    sx, sy = w / mw, h / mh
    for x0, y0, x1, y1 in mine:
        ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, facecolor=colour, alpha=0.2,
                               edgecolor=colour, lw=1))
    if highlight is None:  # the region nearest the centre of the map
        highlight = int(np.argmin([abs(a + c - mw) + abs(b + d - mh) for a, b, c, d in mine]))
    x0, y0, x1, y1 = mine[highlight]
    for lw, edge in ((5, "black"), (2.5, colour)):  # a dark halo keeps the outline visible on light photos
        ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, lw=lw,
                               edgecolor=edge))
    side = mine[0][2] - mine[0][0]
    ax.set_title(f"scale {level} of {levels}: {len(mine)} regions of {side}x{side} cells", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def plot_region_grid(image, levels: int, map_size: tuple[int, int] | None = None, axes=None,
                     path: str | os.PathLike | None = None):
    """The R-MAC grid of ``levels`` scales, one panel per scale (:func:`plot_region_scale`).

    All scales in one picture are 8 to 70 overlapping outlines, an unreadable
    mesh from S = 3 on; one panel per scale shows each scale's size, count and
    overlap.  Returns the figure.
    """
    from ..layers.functional import rmac_regions

    img = _as_image(image)
    mh, mw = _feature_map_size(img, map_size)
    if axes is None:
        w, h = img.size
        fig, axes = plt.subplots(1, levels, figsize=(3.6 * levels, 3.6 * h / w + 0.6), squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    for level, ax in zip(range(1, levels + 1), axes):
        plot_region_scale(img, levels, level, ax, (mh, mw))
    total = len(rmac_regions(mh, mw, levels))
    fig.suptitle(f"S = {levels} scales: {total} regions on a {mh}x{mw} feature map (one region of each scale "
                 "outlined)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig


ACTIVATION_SUMMARIES = ("max", "mean", "l2")


def activation_maps(model, image, size: int = 512, summary: str = "l2") -> dict[str, np.ndarray]:
    """Per layer of ``model``, one number per feature-map cell summarising its channels (paper Fig. 3).

    ``summary``:

    * ``"l2"`` (default): the L2 norm of the cell's channel vector — how much
      the cell contributes to a max- or sum-pooled descriptor;
    * ``"mean"``: the mean over channels (CroW's spatial weight, Kalantidis et al. 2016);
    * ``"max"``: the maximum over channels.  Uninformative for a layer capped
      by ReLU6 (EfficientNet-Lite's layer 1): nearly every cell has some
      channel at the cap of 6, so the map is flat.
    """
    import torch

    from ..data.images import resize_longer_side, to_tensor

    if summary not in ACTIVATION_SUMMARIES:
        raise ValueError(f"summary must be one of {ACTIVATION_SUMMARIES}, got {summary!r}")
    img = _as_image(image)
    x = to_tensor(resize_longer_side(img, size))[None].to(model.device)
    with torch.no_grad():
        maps = model.feature_maps(x)
    reduce = {"max": lambda m: m.amax(0), "mean": lambda m: m.mean(0), "l2": lambda m: m.norm(dim=0)}[summary]
    return {layer: reduce(m[0].float()).cpu().numpy() for layer, m in maps.items()}


def proposal_regions(model, image, size: int = 512, k: int = 256, levels: int = 4) -> dict:
    """The learned proposals of a ``regions: rpn`` model and the R-MAC grid of one image, for drawing.

    ``image`` (a PIL image, an :class:`~remap_lib.data.images.ImageSpec` or a path)
    is described at ``size`` px (longer side) as extraction does; the map of
    the model's layer gives the top-``k`` proposals (best first,
    :meth:`~remap_lib.layers.proposals.ProposalNetwork.propose`) and the ``levels``-scale
    grid (:func:`~remap_lib.layers.functional.rmac_regions`), both returned in the
    pixels of ``image`` as given.  Returns ``{"image", "proposals" (K, 4),
    "scores" (K,), "grid" (R, 4), "map_size" (h, w), "trained", "size", "levels"}``;
    ``trained`` says whether the RPN was ever trained (an untrained one
    proposes at random: label its pictures so).  Slice ``proposals[:k]`` for
    fewer: the top-k of a smaller k are the first k of these.
    """
    import torch

    from ..data.images import resize_longer_side, to_tensor
    from ..layers.functional import rmac_regions

    img = _as_image(image)
    layer = model.layers[0]
    stream = model.streams[layer]
    if not hasattr(stream, "rpn"):
        raise ValueError(f"this model pools the {model.config.regions} regions, not learned proposals "
                         "(a regions: rpn model of `remap train-rpn`)")
    x = to_tensor(resize_longer_side(img.convert("RGB"), size))[None].to(model.device)
    with torch.no_grad():
        fmap = model.feature_maps(x)[layer]
        boxes, scores = stream.rpn.propose(fmap, k)[0]
    h, w = fmap.shape[-2:]
    scale = torch.tensor([img.size[0] / w, img.size[1] / h] * 2, dtype=torch.float64)
    return {"image": img, "proposals": boxes.cpu().double() * scale, "scores": scores.cpu(),
            "grid": rmac_regions(h, w, levels).double() * scale, "map_size": (int(h), int(w)),
            "trained": bool(stream.rpn.trained), "size": size, "levels": levels}


def plot_proposals_vs_grid(regions: dict, k: int, target=None, path: str | os.PathLike | None = None):
    """R-MAC's rigid grid (left) and the RPN's top-``k`` proposals (right) over the image (Gordo et al. Fig. 3).

    ``regions`` from :func:`proposal_regions`.  The grid is drawn scale by
    scale (the regions of one size share a colour, as in
    :func:`plot_region_grid`): translucent fills and faint outlines, with one
    region per scale outlined boldly, so the 40 squares read as four scales
    rather than a mesh of lines.  The proposals are outlined from the best
    (opaque, thick) to the ``k``-th (faint); ``target``, a box
    ``[x0, y0, x1, y1]`` in the image's pixels (e.g. a landmark box of
    :mod:`remap_lib.training.landmark_boxes`), is drawn dashed in white on both.
    An untrained RPN is said so in the title.  Returns the figure.
    """
    from matplotlib.patches import Rectangle

    img = regions["image"]
    w, h = img.size
    props = regions["proposals"][:k].tolist()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5 * h / w + 0.8))
    grid = regions["grid"].tolist()
    sizes = sorted({(round(x1 - x0), round(y1 - y0)) for x0, y0, x1, y1 in grid}, reverse=True)
    outlined = set()
    for x0, y0, x1, y1 in grid:  # scale by scale: a fill each, the first region of a scale outlined boldly
        scale = sizes.index((round(x1 - x0), round(y1 - y0)))
        colour = SCALE_COLOURS[scale % len(SCALE_COLOURS)]
        bold = scale not in outlined
        outlined.add(scale)
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, alpha=0.06, lw=0))
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                    lw=2.5 if bold else 0.7, alpha=1.0 if bold else 0.35))
    for i, (x0, y0, x1, y1) in enumerate(props):  # best first: opaque and thick, fading to the k-th
        fade = 1 - i / len(props)
        axes[1].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=SCALE_COLOURS[1],
                                    lw=0.6 + 2.4 * fade, alpha=0.25 + 0.75 * fade))
    for ax, title in (
            (axes[0], f"grid, S = {regions['levels']}: {len(grid)} regions in {len(sizes)} sizes"),
            (axes[1], f"RPN: top {len(props)} proposals (k = {k})" + ("" if regions["trained"]
                                                             else " (UNTRAINED RPN: random proposals)"))):
        ax.imshow(np.asarray(img))
        if target is not None:
            x0, y0, x1, y1 = (float(v) for v in target)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=2, ls="--"))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    mh, mw = regions["map_size"]
    fig.suptitle(f"regions on the {mh}x{mw} map of a {regions['size']} px image", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig
