"""The math of global descriptors, as small pure tensor functions.

Every function here takes feature maps laid out as ``(N, C, H, W)`` (a batch of
``N`` maps with ``C`` channels) and is vectorised over images, channels and
regions: there is no Python loop over regions at run time.  The ``nn.Module``
wrappers in :mod:`remap_lib.layers.pooling` hold parameters and call these.

Conventions
-----------
* A *box* is ``[x0, y0, x1, y1]`` in feature-map cells, half-open, so the box
  covers ``x[..., y0:y1, x0:x1]``.  Boxes are int64 tensors of shape ``(R, 4)``.
* Descriptors are ``(N, D)``; "L2" always means along the last dimension.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

__all__ = [
    "l2n",
    "clamp_min_passthrough",
    "rmac_regions",
    "roi_max_pool",
    "mac",
    "spoc",
    "spoc_centre_prior",
    "gem",
    "rmac",
    "rmac_boxes",
    "weighted_region_sum",
    "triplet_loss",
    "contrastive_loss",
]


def l2n(x: torch.Tensor, eps: float = 1e-6, dim: int = -1) -> torch.Tensor:
    """L2-normalise ``x`` along ``dim`` (``eps`` keeps an all-zero vector finite)."""
    return x / (x.norm(p=2, dim=dim, keepdim=True) + eps)


class _ClampMinPassthrough(torch.autograd.Function):
    @staticmethod
    def forward(x, bound):
        return x.clamp(min=bound)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bound = inputs
        ctx.save_for_backward(x)
        ctx.bound = bound

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # inside: the identity's gradient; at (or below) the bound: only a gradient whose
        # descent step moves x up, into the feasible set
        passes = (x > ctx.bound) | (grad < 0)
        return torch.where(passes, grad, torch.zeros_like(grad)), None


def clamp_min_passthrough(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``x.clamp(min=bound)`` whose gradient can bring a parameter back from the bound.

    Why: the gradient of ``clamp`` is 0 wherever the bound is active, so a
    constrained parameter that reaches its bound (a region weight α = 0, GeM's
    ``p = 1``) never receives a gradient again and stays there for good, even
    when the loss would like it to grow.  Here the value is exactly
    ``x.clamp(min=bound)``; the gradient is the identity's where ``x > bound``,
    and where ``x <= bound`` it passes only if its descent step (``-grad``)
    points up, back into the feasible set, and is 0 otherwise, so that
    momentum does not build up against the bound.  At the bound this is the
    one-sided derivative from the feasible side: together with a projection
    after each step (:func:`remap_lib.layers.pooling.project_nonnegative_`) it makes
    projected gradient descent.  Without a gradient to record (inference,
    ``torch.no_grad``) it is a plain ``clamp``, which tracers and exporters know.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.clamp(min=bound)
    return _ClampMinPassthrough.apply(x, bound)


# --------------------------------------------------------------------------- regions


def rmac_regions(
    height: int,
    width: int,
    levels: int = 3,
    *,
    full_map: bool = False,
    overlap: float = 0.4,
    return_levels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The rigid multi-scale grid of square regions of R-MAC (Tolias et al. 2016).

    This is the region sampling the REMAP paper's ROI block uses (§III, "the
    overlap between consecutive regions is as close as possible to 40%") and
    the rule of cirtorch's ``rmac``.  At level ``l`` (1-based) the regions are
    squares of side ``w_l = floor(2·min(H, W) / (l + 1))``.  Along the longer
    side, level 1 gets ``n`` regions, ``n`` in 2..7, for which the overlap of
    neighbouring squares ``1 - (long - short) / ((n - 1)·short)`` is closest to
    ``overlap``; every level keeps that excess of ``n - 1`` regions over ``l``.
    The ``i``-th of ``m`` regions along a side of ``s`` cells starts at
    ``floor(i·(s - w_l) / (m - 1))``, so the first touches one border and the
    last the other.  On a 24×32 (or 32×24) map, i.e. a 768×1024 image at
    stride 32, ``levels`` = 2/3/4/5 give 8/20/40/70 regions, the paper's Table I.

    Exact arithmetic, and where this differs from cirtorch: both rules above
    are evaluated exactly (integers, and rationals for the overlap), so the
    grid is what the formula says on every map size.  When two counts ``n``
    are exactly as close to ``overlap`` (one above it, one below), the larger
    count wins: more overlap, no part of the map seen by fewer regions.
    cirtorch computes the same rules in float32, which decides such ties by
    rounding (5×9: we place 3 regions at level 1, cirtorch 2) and can floor a
    start that is an exact integer to the cell before it (2×32 at ``L = 2``:
    ``7·(31/7)`` comes out 30.999998, so its last level-2 column starts at 30
    and column 31 is left out).  On maps of up to 64×64 cells, levels 1–5,
    the two grids differ on 50 of the 4,096 shapes (elongated ones such as
    2×32 or 35×9; no 4:3 map is among them), and there an R-MAC descriptor
    moves by up to about 0.06 (L2 distance, random maps).

    Args:
        height, width: size of the feature map in cells.
        levels: number of scales ``S``; levels ``1..S`` are all included.
        full_map: prepend the whole-map region (what cirtorch's ``rmac`` adds;
            the paper's region counts do not include it).
        overlap: target overlap of neighbouring regions at level 1.
        return_levels: also return each box's level (0 for the full map).

    Returns:
        ``(R, 4)`` int64 tensor of boxes ``[x0, y0, x1, y1]`` (half-open),
        full map first (if asked), then level 1, level 2, ...; within a level
        row-major (top to bottom, left to right).  With ``return_levels``, a
        tuple ``(boxes, levels)`` with ``levels`` an ``(R,)`` int64 tensor.
    """
    if height < 1 or width < 1:
        raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    short, long = min(height, width), max(height, width)
    extra = _extra_regions(short, long, overlap)  # chosen once for all levels
    extra_w = extra if height < width else 0
    extra_h = extra if height > width else 0

    boxes: list[tuple[int, int, int, int]] = []
    box_levels: list[int] = []
    if full_map:
        boxes.append((0, 0, width, height))
        box_levels.append(0)
    for level in range(1, levels + 1):
        wl = 2 * short // (level + 1)
        if wl == 0:  # map too small for this level
            continue
        xs = _region_starts(level + extra_w, width, wl)
        ys = _region_starts(level + extra_h, height, wl)
        boxes.extend((x, y, x + wl, y + wl) for y in ys for x in xs)
        box_levels.extend([level] * (len(xs) * len(ys)))
    boxes_t = torch.tensor(boxes, dtype=torch.long).reshape(-1, 4)
    if return_levels:
        return boxes_t, torch.tensor(box_levels, dtype=torch.long)
    return boxes_t


def _extra_regions(short: int, long: int, overlap: float) -> int:
    """Regions beyond one at level 1 along the longer side (see :func:`rmac_regions`), in exact arithmetic."""
    if short == long:
        return 0
    target = Fraction(overlap).limit_denominator(10**6)  # 0.4 -> 2/5, so that ties are ties

    def error(n: int) -> Fraction:  # |overlap of n squares of side `short` spread over `long` - target|
        return abs(1 - Fraction(long - short, n - 1) / short - target)

    return min(range(2, 8), key=lambda n: (error(n), -n)) - 1  # ties: the larger n


def _region_starts(n_regions: int, side: int, wl: int) -> list[int]:
    """Starts of ``n_regions`` squares of side ``wl`` spread evenly over ``side`` cells.

    cirtorch's ``floor(wl2 + i·b) - wl2`` with ``wl2 = floor(wl/2 - 1)`` and
    step ``b = (side - wl) / (n - 1)``; ``wl2`` is an integer, so this is
    ``floor(i·b)``, computed here in integers.
    """
    if n_regions == 1:
        return [0]
    return [i * (side - wl) // (n_regions - 1) for i in range(n_regions)]


def _check_intervals(start: torch.Tensor, end: torch.Tensor, n: int) -> None:
    if bool((end - start < 1).any()) or bool((start < 0).any()) or bool((end > n).any()):
        raise ValueError(f"every box must be non-empty and inside the {n}-cell side of the map")


def _range_max_table(x: torch.Tensor, longest: int) -> torch.Tensor:
    """Sparse table for range-maximum queries along the last dim of ``x``.

    ``table[k, ..., i]`` is the max of the ``2**k`` values ``x[..., i:i + 2**k]``
    (``-inf`` past the end), for ``2**k <= longest``.  Building it costs
    ``log2(longest)`` elementwise maxima; any interval of length ``L`` is then
    covered by two overlapping runs of length ``2**floor(log2 L)``, so its max
    is two gathers away (:func:`_interval_start_runs`).  Everything is
    differentiable.  Returns ``(K + 1, *x.shape)``.
    """
    n = x.shape[-1]
    tables = [x]
    for j in range(1, int(math.log2(longest)) + 1):
        half = 2 ** (j - 1)
        prev = tables[-1]
        tables.append(torch.maximum(prev[..., :-half], prev[..., half:]))
    return torch.stack([F.pad(t, (0, n - t.shape[-1]), value=float("-inf")) for t in tables])


def _interval_start_runs(start: torch.Tensor, end: torch.Tensor):
    """Table level and the two run starts that cover each interval ``[start, end)``."""
    k = torch.floor(torch.log2((end - start).double())).long()
    return k, start, end - (1 << k)


def roi_max_pool(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Max-pool every channel inside every box: the ROI block ζ of the paper (§III).

    ``(N, C, H, W)`` × ``(R, 4)`` → ``(N, R, C)``.  The max over a rectangle is
    the max over its rows of the max over its columns, so the pooling runs as
    two vectorised range-maximum queries (:func:`_range_max_table`), one per
    axis, with no loop over regions.  Differentiable: the gradient reaches the
    arg-max cell of each region.
    """
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) feature maps, got shape {tuple(x.shape)}")
    boxes = boxes.to(device=x.device, dtype=torch.long).reshape(-1, 4)
    x0, y0, x1, y1 = boxes.unbind(-1)
    _check_intervals(x0, x1, x.shape[-1])
    _check_intervals(y0, y1, x.shape[-2])

    # Pass 1, along the columns, once per distinct column range (a grid's boxes
    # share them: 14 ranges for the 40 boxes of 4 levels): (U, N, C, H).
    cols, col_of_box = torch.unique(boxes[:, 0::2], dim=0, return_inverse=True)
    k, a, b = _interval_start_runs(cols[:, 0], cols[:, 1])
    table = _range_max_table(x, int((cols[:, 1] - cols[:, 0]).max()))
    col_max = torch.maximum(table[k, ..., a], table[k, ..., b]).permute(1, 2, 0, 3)  # (N, C, U, H)
    # Pass 2, along the rows: box r reads the rows y0[r]:y1[r] of its column range.
    k, a, b = _interval_start_runs(y0, y1)
    table = _range_max_table(col_max, int((y1 - y0).max()))
    pooled = torch.maximum(table[k, :, :, col_of_box, a], table[k, :, :, col_of_box, b])  # (R, N, C)
    return pooled.permute(1, 0, 2)


# --------------------------------------------------------------------------- global pooling


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum Activations of Convolutions (Tolias et al.): spatial max, ``(N, C)``."""
    return x.amax(dim=(-2, -1))


def spoc_centre_prior(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Babenko & Lempitsky's centre prior for SPoC: a Gaussian over the map.

    ``w(y, x) = exp(-((y - yc)² + (x - xc)²) / (2σ²))`` with ``σ`` one third of
    the distance from the centre to the closest border, cell centres at integer
    coordinates.  Returns ``(H, W)``.
    """
    yc, xc = (height - 1) / 2, (width - 1) / 2
    sigma = max(min(height, width) / 2, 0.5) / 3
    ys = torch.arange(height, device=device, dtype=dtype or torch.float32)
    xs = torch.arange(width, device=device, dtype=dtype or torch.float32)
    d2 = (ys[:, None] - yc) ** 2 + (xs[None, :] - xc) ** 2
    return torch.exp(-d2 / (2 * sigma**2))


def spoc(x: torch.Tensor, centre_prior: bool = False) -> torch.Tensor:
    """Sum-pooling of convolutional features (SPoC, Babenko & Lempitsky 2015): ``(N, C)``.

    With ``centre_prior`` each cell is weighted by :func:`spoc_centre_prior`,
    which favours objects near the middle of the photo.
    """
    if centre_prior:
        x = x * spoc_centre_prior(x.shape[-2], x.shape[-1], x.device, x.dtype)
    return x.sum(dim=(-2, -1))


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling (Radenović et al.): ``(mean(x^p))^(1/p)``, ``(N, C)``.

    ``p = 1`` is average pooling, ``p → ∞`` approaches MAC.  Activations are
    clamped at ``eps`` first, so negative responses count as zero.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def weighted_region_sum(regions: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``W(r) = Σ_i α_i r(i)``: the REMAP stream's weighted sum (§III-B).

    ``(N, R, C)`` × ``(R,)`` → ``(N, C)``.
    """
    if alpha.shape != regions.shape[1:2]:
        raise ValueError(f"{regions.shape[1]} regions but {alpha.numel()} region weights")
    return torch.einsum("nrc,r->nc", regions, alpha.to(regions.dtype))


def rmac(x: torch.Tensor, levels: int = 3, full_map: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Regional MAC: regions → max-pool → L2 → sum → L2, ``(N, C)``.

    The regions are :func:`rmac_regions` of the map's own size, so the same
    function serves any image size.  (Tolias et al. whiten each region before
    the sum; here, as in the end-to-end R-MAC of Gordo et al., whitening is the
    shared FC layer applied to the aggregated vector.)
    """
    boxes = rmac_regions(x.shape[-2], x.shape[-1], levels, full_map=full_map)
    regions = l2n(roi_max_pool(x, boxes), eps)
    return l2n(regions.sum(dim=1), eps)


def rmac_boxes(x: torch.Tensor, boxes, eps: float = 1e-6) -> torch.Tensor:
    """R-MAC over regions of each image's own: max-pool → L2 → sum → L2, ``(N, C)``.

    ``boxes[n]`` is an ``(R_n, 4)`` int64 tensor of boxes (the conventions
    above) of image ``n``; the count may differ from image to image.  This is
    the pooling of learned region proposals (Gordo et al. 2016), which are
    found per image (:mod:`remap_lib.layers.proposals`); with the grid of
    :func:`rmac_regions` for every image it equals :func:`rmac`.  The loop runs
    over images; the regions of an image are pooled in one vectorised
    :func:`roi_max_pool` call.
    """
    if x.dim() != 4 or len(boxes) != x.shape[0]:
        raise ValueError(f"need (N, C, H, W) maps and one box tensor per image, got shape {tuple(x.shape)} "
                         f"and {len(boxes)} box tensors")
    pooled = [l2n(roi_max_pool(x[n:n + 1], b), eps).sum(dim=1) for n, b in enumerate(boxes)]
    return l2n(torch.cat(pooled), eps)


# --------------------------------------------------------------------------- losses


def triplet_loss(q: torch.Tensor, m: torch.Tensor, n: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Paper Eq. 2: ``L = 0.5 · max(0, margin + ‖q − m‖² − ‖q − n‖²)``, averaged over the batch.

    ``q``, ``m``, ``n``: ``(B, D)`` descriptors of queries, matching and non-matching images.
    """
    d_pos = (q - m).pow(2).sum(-1)
    d_neg = (q - n).pow(2).sum(-1)
    return 0.5 * torch.clamp(margin + d_pos - d_neg, min=0).mean()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, match: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """Contrastive loss (Radenović et al.): ``0.5·d²`` for matches, ``0.5·max(0, margin − d)²`` otherwise.

    ``match`` is 1 for matching pairs and 0 for non-matching ones; averaged over the batch.
    """
    d = (a - b).pow(2).sum(-1).clamp(min=1e-12).sqrt()
    match = match.to(d.dtype)
    return (0.5 * match * d.pow(2) + 0.5 * (1 - match) * torch.clamp(margin - d, min=0).pow(2)).mean()
