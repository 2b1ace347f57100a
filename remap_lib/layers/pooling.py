"""Thin ``nn.Module`` wrappers over :mod:`remap_lib.layers.functional`.

One module per pooling (MAC, SPoC, GeM, R-MAC, REMAP stream); each maps a
feature map ``(N, C, H, W)`` to ``(N, C)``.  The REMAP stream holds the
learnable, non-negative region weights α (paper §III-B).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import functional as RF

__all__ = ["MAC", "SPoC", "GeM", "RMAC", "RegionWeights", "RemapStream", "project_nonnegative_",
           "REFERENCE_MAP"]

# The feature map of a 1024x768 image at stride 32, on which the paper counts
# its regions (Table I) and learns its region weights.
REFERENCE_MAP = (24, 32)


class MAC(nn.Module):
    def forward(self, x):
        return RF.mac(x)


class SPoC(nn.Module):
    def __init__(self, centre_prior: bool = False):
        super().__init__()
        self.centre_prior = centre_prior

    def forward(self, x):
        return RF.spoc(x, self.centre_prior)

    def extra_repr(self):
        return f"centre_prior={self.centre_prior}"


class GeM(nn.Module):
    """GeM pooling with a learnable exponent ``p``, used as ``max(p, 1)``.

    ``p < 1`` would pool below the mean, so the forward pass uses ``p``
    clamped at 1, with :func:`~remap_lib.layers.functional.clamp_min_passthrough` so
    that an exponent at 1 still grows when the loss asks for it (a plain
    ``clamp`` has no gradient there); :func:`project_nonnegative_` puts ``p``
    back to 1 after a step that took it below.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x):
        return RF.gem(x, RF.clamp_min_passthrough(self.p, 1.0), self.eps)

    @torch.no_grad()
    def project_(self) -> None:
        self.p.clamp_(min=1.0)

    def extra_repr(self):
        return f"p={self.p.item():.4f}"


class RMAC(nn.Module):
    def __init__(self, levels: int = 3, full_map: bool = False):
        super().__init__()
        self.levels, self.full_map = levels, full_map

    def forward(self, x):
        return RF.rmac(x, self.levels, self.full_map)

    def extra_repr(self):
        return f"levels={self.levels}, full_map={self.full_map}"


class RegionWeights(nn.Module):
    """Non-negative learnable weights α, one per region of the reference grid.

    The stored parameter ``raw`` may be pushed below zero by an optimiser step;
    :meth:`forward` always returns ``raw.clamp(min=0)``, and
    :func:`project_nonnegative_` (called after each step by the trainer, or
    registered with :func:`register_nonnegative_projection`) sets ``raw`` back
    into the feasible set: projected gradient descent.  A weight the
    projection left at exactly 0 must be able to grow again, which a plain
    ``clamp`` forbids (its gradient is 0 at the bound); the forward pass uses
    :func:`~remap_lib.layers.functional.clamp_min_passthrough`, whose gradient at 0
    passes when it pushes α up and is 0 when it pushes α down.
    """

    def __init__(self, init: torch.Tensor):
        super().__init__()
        init = torch.as_tensor(init, dtype=torch.float32)
        if init.dim() != 1 or bool((init < 0).any()) or not bool(torch.isfinite(init).all()):
            raise ValueError("region weights must be a finite, non-negative vector")
        self.raw = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        return RF.clamp_min_passthrough(self.raw, 0.0)

    @torch.no_grad()
    def project_(self) -> None:
        self.raw.clamp_(min=0)

    def extra_repr(self):
        return f"regions={self.raw.numel()}"


def project_nonnegative_(module: nn.Module) -> None:
    """Put every constrained parameter inside ``module`` back into its feasible set, in place.

    Every :class:`RegionWeights` to α ≥ 0 and every :class:`GeM` to ``p ≥ 1``;
    call it after each optimiser step (the trainer does) or register it with
    :func:`register_nonnegative_projection`.
    """
    for m in module.modules():
        if isinstance(m, (RegionWeights, GeM)):
            m.project_()


def register_nonnegative_projection(optimizer: torch.optim.Optimizer, module: nn.Module):
    """Project α ≥ 0 (and GeM's p ≥ 1) after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: project_nonnegative_(module))


@functools.lru_cache(maxsize=256)
def _regions_and_weight_index(
    height: int, width: int, levels: int, full_map: bool, reference: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of an ``height × width`` map and, for each, the reference region whose α it uses.

    When the map's grid has the reference's layout (per level the same number
    of region rows and columns: every map of the reference's aspect ratio, or
    its transpose), region ``k`` uses α ``k``: both grids are listed level by
    level in row-major order, so this is the one-to-one mapping, also on small
    maps such as 6×8 where rounding moves region centres.  Other maps use, per
    region, the α of the reference-grid region of the same level whose centre,
    in coordinates normalised to the map, is nearest.  A portrait map is
    compared with the transposed reference grid, so both a 24×32 and a 32×24
    map use every α exactly once (an identity mapping up to transposition).
    """
    boxes, levels_of = RF.rmac_regions(height, width, levels, full_map=full_map, return_levels=True)
    ref_h, ref_w = reference
    if (height > width) != (ref_h > ref_w) and height != width:
        ref_h, ref_w = ref_w, ref_h
        transposed = True
    else:
        transposed = False
    ref_boxes, ref_levels = RF.rmac_regions(ref_h, ref_w, levels, full_map=full_map, return_levels=True)

    def centres(b, h, w):
        return torch.stack([(b[:, 0] + b[:, 2]) / (2 * w), (b[:, 1] + b[:, 3]) / (2 * h)], 1).double()

    if _grid_layout(boxes, levels_of) == _grid_layout(ref_boxes, ref_levels):
        index = torch.arange(len(boxes))
    else:
        c, rc = centres(boxes, height, width), centres(ref_boxes, ref_h, ref_w)
        dist = torch.cdist(c, rc)
        dist[levels_of[:, None] != ref_levels[None, :]] = float("inf")
        index = dist.argmin(1)
    if transposed:  # index into the (un-transposed) reference ordering
        _, order = _transpose_order(ref_h, ref_w, levels, full_map)
        index = order[index]
    return boxes, index


def _grid_layout(boxes: torch.Tensor, levels_of: torch.Tensor) -> list[tuple[int, int, int]]:
    """Per level: ``(level, distinct region rows, distinct region columns)``."""
    return [(int(lv), len(set(boxes[levels_of == lv, 1].tolist())), len(set(boxes[levels_of == lv, 0].tolist())))
            for lv in sorted(set(levels_of.tolist()))]


def _transpose_order(height: int, width: int, levels: int, full_map: bool):
    """For the grid of a ``height × width`` map, the index of each box's transpose in the ``width × height`` grid."""
    boxes = RF.rmac_regions(height, width, levels, full_map=full_map)
    t_boxes = RF.rmac_regions(width, height, levels, full_map=full_map)
    lookup = {tuple(b): i for i, b in enumerate(t_boxes.tolist())}
    order = torch.tensor([lookup[(y0, x0, y1, x1)] for x0, y0, x1, y1 in boxes.tolist()])
    return boxes, order


def region_count(levels: int, full_map: bool = False, reference: tuple[int, int] = REFERENCE_MAP) -> int:
    """Number of regions (and of α weights) on the reference map."""
    return len(RF.rmac_regions(*reference, levels, full_map=full_map))


class RemapStream(nn.Module):
    """One REMAP stream: ROI max-pool → L2 per region → Σ α_i r_i (paper §III-B).

    ``P(x; l, α) = W(L2(ζ(f_l(x))); α)``.  α lives on the reference grid
    (:data:`REFERENCE_MAP`, the paper's 1024×768 input); maps of other sizes
    reuse it through :func:`_regions_and_weight_index`.

    Args:
        levels: scales S of the region grid.
        alpha: initial weights (length :func:`region_count`), e.g. KL-divergences;
            ``None`` means ones, i.e. R-MAC's uniform sum.
        full_map: include the whole-map region.
    """

    def __init__(self, levels: int = 4, alpha: torch.Tensor | None = None, full_map: bool = False,
                 reference: tuple[int, int] = REFERENCE_MAP):
        super().__init__()
        self.levels, self.full_map, self.reference = levels, full_map, tuple(reference)
        n = region_count(levels, full_map, self.reference)
        alpha = torch.ones(n) if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha.shape != (n,):
            raise ValueError(
                f"{levels} levels give {n} regions on the {self.reference} reference map, "
                f"but {tuple(alpha.shape)} region weights were given"
            )
        self.alpha = RegionWeights(alpha)

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised region vectors ``(N, R, C)`` of this map (the KLW input)."""
        boxes, _ = _regions_and_weight_index(x.shape[-2], x.shape[-1], self.levels, self.full_map,
                                             self.reference)
        return RF.l2n(RF.roi_max_pool(x, boxes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, index = _regions_and_weight_index(x.shape[-2], x.shape[-1], self.levels, self.full_map,
                                             self.reference)
        alpha = self.alpha()[index.to(x.device)]
        return RF.weighted_region_sum(self.regions(x), alpha)

    def extra_repr(self):
        return f"levels={self.levels}, full_map={self.full_map}, reference={self.reference}"
