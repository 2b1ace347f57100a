"""Learned region proposals (Gordo et al. 2016): an RPN on the last conv map in place of R-MAC's rigid grid.

R-MAC pools a rigid multi-scale grid of regions (:func:`~remap_lib.layers.functional.rmac_regions`),
whose cells rarely align with the object and often hold only background.
Gordo et al. (*Deep Image Retrieval*, ECCV 2016) learn where the object is
instead: a region proposal network (RPN, Ren et al.'s Faster R-CNN) on the
convolutional map, trained on landmark boxes found without hand labels
(:mod:`remap_lib.training.landmark_boxes`); its top-k proposals are pooled as R-MAC's
regions were: ROI max-pool → L2 per region → sum → L2, then the whitening FC
and L2 of :class:`~remap_lib.describe.model.RetrievalModel`, unchanged.  A model asks for
it with ``ModelConfig(head="rmac", regions="rpn", proposals=k)``; the grid
stays the default.

The network is torchvision's: ``RPNHead`` (3×3 conv, ReLU, 1×1 objectness and
box deltas per anchor), ``RegionProposalNetwork``'s anchor matching
(IoU ≥ 0.7 positive, < 0.3 negative, the best anchor of each box positive
too), sampling (256 anchors an image, at most half positive) and loss (binary
cross-entropy + smooth L1), ``BoxCoder`` for the deltas and
``torchvision.ops`` for clipping, size filtering and NMS.  Two things differ
from Faster R-CNN:

* Coordinates are feature-map cells, the unit of R-MAC's regions: the RPN
  neither knows nor needs the image size, and a proposal is pooled on the map
  it was found on.  Anchors (:class:`CellAnchorGenerator`) are centred on the
  cells and their sides (``rpn_anchor_sizes``) are given in cells.
* A 1×1 convolution first reduces the map to ``rpn_width`` (256) channels:
  torchvision's head keeps its input width, and a 3×3 conv of 1280 → 1280
  channels (EfficientNet-Lite0's head map) would hold 15 M weights, four times
  the backbone; 1280 → 256 → 256 holds 0.9 M.

The rule for boxes outside the map or degenerate (:func:`select_proposals`)
    1. boxes with a non-finite coordinate or score are dropped;
    2. every box is clipped to the map, ``0 ≤ x ≤ W``, ``0 ≤ y ≤ H``
       (``torchvision.ops.clip_boxes_to_image``): a box partly outside keeps
       its part inside;
    3. boxes narrower or lower than ``min_size`` cells *after clipping* are
       dropped (``torchvision.ops.remove_small_boxes``).  This drops the
       degenerate ones (``x1 ≤ x0`` or ``y1 ≤ y0``) and those wholly outside
       the map (clipped to zero width or height).  ``min_size`` is at least 1;
    4. NMS (``torchvision.ops.nms``, IoU ``rpn_nms``, 0.7), highest objectness
       first; the top ``k`` are kept;
    5. for pooling, each edge moves to the nearest cell boundary,
       ``floor(v + 0.5)`` (:func:`snap_to_cells`).  A clipped box at least one
       cell wide stays inside the map and covers at least one cell, so
       :func:`~remap_lib.layers.functional.roi_max_pool` accepts every box.
    An image none of whose boxes survives is pooled over the whole map (one
    region: MAC), so it still gets a descriptor.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes

from . import functional as RF

__all__ = ["CellAnchorGenerator", "ProposalNetwork", "ProposalRMAC", "ProposalsNotTrainedError", "anchor_grid",
           "box_recall", "recall_curve", "select_proposals", "snap_to_cells"]

PRE_NMS_TOP_N = 6000  # the best-scored boxes NMS looks at (Faster R-CNN's test setting)


class ProposalsNotTrainedError(RuntimeError):
    """The model pools learned proposals, but its region proposal network was never trained."""


# --------------------------------------------------------------------------- anchors


class CellAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` in feature-map cells.

    Every cell of a map gets ``len(sizes) × len(aspect_ratios)`` anchors of
    side ``s`` cells and height/width ratio ``r`` (``w = s/√r``, ``h = s·√r``,
    area ``s²``), centred on the cell's centre ``(x + 0.5, y + 0.5)``.  Ordered
    as torchvision orders them (cells row-major; per cell ratio-major, size
    minor), which is the order of ``RPNHead``'s outputs after
    ``concat_box_prediction_layers``.  Two departures from torchvision's
    class, both because the unit is a cell rather than a pixel: the base
    anchors are not rounded to whole units (a 2-cell anchor of ratio 0.5 would
    round to a square), and the centres are the cells' centres rather than
    their top-left corners (torchvision's ``x · stride``).
    """

    def __init__(self, sizes: Sequence[float] = (2.0, 4.0, 8.0, 16.0, 32.0),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)):
        super().__init__((tuple(float(s) for s in sizes),), (tuple(float(r) for r in aspect_ratios),))

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # torchvision's, not rounded

    @property
    def per_cell(self) -> int:
        return self.num_anchors_per_location()[0]

    def cells(self, height: int, width: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(H·W·A, 4)`` anchors ``[x0, y0, x1, y1]`` of an ``H × W`` map, in cells."""
        device = torch.device("cpu") if device is None else torch.device(device)
        self.set_cell_anchors(dtype, device)
        one = torch.ones((), dtype=torch.int64, device=device)
        return self.grid_anchors([[int(height), int(width)]], [[one, one]])[0] + 0.5

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """torchvision's interface: the anchors of the (single) map, once per image of the batch."""
        fmap = feature_maps[0]
        anchors = self.cells(fmap.shape[-2], fmap.shape[-1], fmap.device, fmap.dtype)
        return [anchors for _ in image_list.image_sizes]


def anchor_grid(height: int, width: int, sizes: Sequence[float] = (2.0, 4.0, 8.0, 16.0, 32.0),
                aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> torch.Tensor:
    """The anchors of an ``height × width`` map in cells (:class:`CellAnchorGenerator`), ``(H·W·A, 4)``."""
    return CellAnchorGenerator(sizes, aspect_ratios).cells(height, width)


# --------------------------------------------------------------------------- selecting proposals


def select_proposals(boxes: torch.Tensor, scores: torch.Tensor, map_size: tuple[int, int], k: int,
                     nms_threshold: float = 0.7, min_size: float = 1.0,
                     pre_nms_top_n: int | None = PRE_NMS_TOP_N) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` proposals of one map: drop non-finite, clip, drop small, NMS (the module's rule).

    Args:
        boxes: ``(A, 4)`` float boxes ``[x0, y0, x1, y1]`` in cells (decoded anchors).
        scores: ``(A,)`` objectness (logits or probabilities: only the order matters).
        map_size: ``(H, W)`` of the map in cells.
        k: proposals kept at most.
        nms_threshold: IoU above which a lower-scored box is suppressed.
        min_size: boxes narrower or lower than this (cells), after clipping, are dropped (≥ 1).
        pre_nms_top_n: only the best-scored this many boxes go to NMS (``None``: all).

    Returns ``(boxes (R, 4), scores (R,))``, ``R ≤ k``, by decreasing score; the
    boxes are clipped floats (:func:`snap_to_cells` makes them poolable).
    """
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1 cell, got {min_size}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"need (A, 4) boxes and (A,) scores, got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    ok = torch.isfinite(scores) & torch.isfinite(boxes).all(dim=1)
    boxes, scores = boxes[ok], scores[ok]
    if pre_nms_top_n is not None and len(scores) > pre_nms_top_n:
        top = scores.topk(pre_nms_top_n).indices
        boxes, scores = boxes[top], scores[top]
    boxes = clip_boxes_to_image(boxes, (int(map_size[0]), int(map_size[1])))
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores = boxes[keep], scores[keep]
    keep = nms(boxes, scores, nms_threshold)[:k]
    return boxes[keep], scores[keep]


def snap_to_cells(boxes: torch.Tensor) -> torch.Tensor:
    """Float boxes in cells → int64 boxes for :func:`~remap_lib.layers.functional.roi_max_pool`: each edge to the nearest boundary.

    ``floor(v + 0.5)`` (halves up, so a box shifted by whole cells snaps the
    same way).  A box clipped to the map and at least one cell wide and high
    (what :func:`select_proposals` keeps) stays inside the map and covers at
    least one cell.
    """
    return torch.floor(boxes + 0.5).to(torch.long)


def box_recall(proposals: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], iou: float = 0.5,
               k: int | None = None) -> float:
    """The fraction of target boxes that one of the first ``k`` proposals of their image overlaps by IoU ≥ ``iou``.

    ``proposals[n]``: ``(R_n, 4)`` boxes of image ``n``, best first (or a
    grid: any order); ``targets[n]``: ``(B_n, 4)`` boxes, same units.  Gordo et
    al.'s Fig. 3 (middle) plots this against ``iou`` for the RPN and the grid.
    """
    return recall_curve(proposals, targets, (iou,), k)[0]


def recall_curve(proposals: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                 k: int | None = None) -> list[float]:
    """:func:`box_recall` at every IoU of ``thresholds``, each overlap computed once (Gordo et al. Fig. 3, middle).

    Returns one recall per threshold, in their order: the fraction of target
    boxes whose best IoU with the first ``k`` proposals of their image is at
    least the threshold.  A target of an image without proposals counts as
    missed at every threshold (its best IoU is taken as -1, below any threshold).
    """
    best = []
    for p, t in zip(proposals, targets):
        p = torch.as_tensor(p, dtype=torch.float64).reshape(-1, 4)[:k]
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 4)
        missed = torch.full((len(t),), -1.0, dtype=torch.float64)
        best.append(box_iou(t, p).max(dim=1).values if len(p) and len(t) else missed)
    best = torch.cat(best) if best else torch.zeros(0, dtype=torch.float64)
    if not len(best):
        raise ValueError("no target boxes")
    return [float((best >= t).double().mean()) for t in thresholds]


# --------------------------------------------------------------------------- the network


class ProposalNetwork(nn.Module):
    """A region proposal network on one feature map, in cells (see the module docstring).

    Args:
        channels: channels of the map.
        anchor_sizes, aspect_ratios: the anchors (:class:`CellAnchorGenerator`).
        width: channels after the 1×1 reduction (the width of ``RPNHead``).
        nms_threshold, min_size: the selection (:func:`select_proposals`).
        fg_iou, bg_iou, anchors_per_image, positive_fraction: training targets
            and sampling, torchvision's (and Faster R-CNN's) defaults.

    The buffer ``trained`` is set by the trainer (:mod:`remap_lib.training.rpn`);
    :class:`ProposalRMAC` refuses to pool with an untrained network.
    """

    def __init__(self, channels: int, anchor_sizes: Sequence[float] = (2.0, 4.0, 8.0, 16.0, 32.0),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), width: int = 256,
                 nms_threshold: float = 0.7, min_size: float = 1.0, fg_iou: float = 0.7, bg_iou: float = 0.3,
                 anchors_per_image: int = 256, positive_fraction: float = 0.5):
        super().__init__()
        anchors = CellAnchorGenerator(anchor_sizes, aspect_ratios)
        self.reduce = nn.Conv2d(channels, width, kernel_size=1)
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(width, anchors.per_cell), fg_iou, bg_iou, anchors_per_image, positive_fraction,
            pre_nms_top_n={"training": PRE_NMS_TOP_N, "testing": PRE_NMS_TOP_N},
            post_nms_top_n={"training": 256, "testing": 256}, nms_thresh=nms_threshold)
        self.rpn.min_size = min_size
        self.nms_threshold, self.min_size = nms_threshold, min_size
        self.register_buffer("trained", torch.tensor(False))

    @property
    def anchors(self) -> CellAnchorGenerator:
        return self.rpn.anchor_generator

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness logits ``(N, H·W·A)`` and decoded boxes ``(N, H·W·A, 4)`` (cells) for maps ``(N, C, H, W)``."""
        logits, deltas = self.rpn.head([self.reduce(x)])
        objectness, deltas = concat_box_prediction_layers(logits, deltas)
        n, (h, w) = x.shape[0], x.shape[-2:]
        anchors = self.anchors.cells(h, w, x.device, deltas.dtype)
        boxes = self.rpn.box_coder.decode(deltas, [anchors] * n)
        return objectness.reshape(n, -1), boxes.reshape(n, -1, 4)

    @torch.no_grad()
    def propose(self, x: torch.Tensor, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per map: ``(boxes (R, 4), scores (R,))``, the top-``k`` proposals in cells by :func:`select_proposals`.

        Scores are objectness probabilities.  When no box survives, the whole
        map (score 0) stands in, so that every image gets a region.
        """
        objectness, boxes = self(x)
        h, w = x.shape[-2:]
        out = []
        for b, s in zip(boxes, objectness.sigmoid()):
            b, s = select_proposals(b.float(), s.float(), (h, w), k, self.nms_threshold, self.min_size)
            if not len(b):
                b, s = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=x.device), torch.zeros(1, device=x.device)
            out.append((b, s))
        return out

    def loss(self, x: torch.Tensor, targets: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's RPN losses for maps ``(N, C, H, W)`` and target boxes (``(B_n, 4)`` cells per map).

        ``{"objectness": BCE over the sampled anchors, "box": smooth L1 of the
        positive anchors' deltas}``; a map with no target box is all background.
        """
        if len(targets) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} maps but {len(targets)} target box sets")
        logits, deltas = self.rpn.head([self.reduce(x)])
        objectness, deltas = concat_box_prediction_layers(logits, deltas)
        anchors = [self.anchors.cells(x.shape[-2], x.shape[-1], x.device, deltas.dtype)] * x.shape[0]
        targets = [{"boxes": torch.as_tensor(t, dtype=deltas.dtype, device=x.device).reshape(-1, 4)} for t in targets]
        labels, matched = self.rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = self.rpn.box_coder.encode(matched, anchors)
        objectness_loss, box_loss = self.rpn.compute_loss(objectness, deltas, labels, regression_targets)
        return {"objectness": objectness_loss, "box": box_loss}


class ProposalRMAC(nn.Module):
    """R-MAC over learned proposals: the top-``k`` boxes of an RPN → ROI max-pool → L2 → sum → L2.

    The stream of ``ModelConfig(head="rmac", regions="rpn")``: ``(N, C, H, W)``
    → ``(N, C)`` like :class:`~remap_lib.layers.pooling.RMAC`, with each image's own
    regions (:func:`~remap_lib.layers.functional.rmac_boxes`).  ``k`` can be changed
    after building (``RetrievalModel.set_proposal_count``).
    """

    def __init__(self, channels: int, k: int = 256, **rpn_options):
        super().__init__()
        self.rpn = ProposalNetwork(channels, **rpn_options)
        self.k = k

    @classmethod
    def from_config(cls, channels: int, config) -> "ProposalRMAC":
        return cls(channels, config.proposals, anchor_sizes=config.rpn_anchor_sizes,
                   aspect_ratios=config.rpn_aspect_ratios, width=config.rpn_width,
                   nms_threshold=config.rpn_nms, min_size=config.rpn_min_size)

    def regions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The int64 boxes ``(R_n, 4)`` pooled for each map (:func:`snap_to_cells` of the proposals)."""
        return [snap_to_cells(b) for b, _ in self.rpn.propose(x, self.k)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.rpn.trained):
            raise ProposalsNotTrainedError(
                "this model pools learned region proposals (regions: rpn), but its region proposal network "
                "was never trained: train it with `remap train-rpn` (remap_lib.training.rpn) and load the "
                "model.pt it writes")
        return RF.rmac_boxes(x, self.regions(x))

    def extra_repr(self):
        return f"k={self.k}"
