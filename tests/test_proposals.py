"""Learned region proposals (remap_lib.layers.proposals, landmark_boxes, train_rpn; Gordo et al. 2016)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from remap_lib.layers import functional as RF
from remap_lib.training import landmark_boxes as LB
from remap_lib.training import pairs as P
from remap_lib.training import verification as V
from remap_lib.config import PAPER_MULTISCALE, ModelConfig
from remap_lib.describe.model import RetrievalModel
from remap_lib.layers.proposals import (CellAnchorGenerator, ProposalNetwork, ProposalRMAC, ProposalsNotTrainedError,
                                 anchor_grid, box_recall, recall_curve, select_proposals,
                                 snap_to_cells)


@pytest.fixture(scope="module")
def random_lite0():
    from remap_lib.nets.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", weights="random")


def _rpn_config(**kw) -> ModelConfig:
    return ModelConfig(head="rmac", regions="rpn", weights="random", rpn_width=16,
                       rpn_anchor_sizes=[1, 2, 4], **kw)


# --------------------------------------------------------------------------- config


def test_configs_without_proposals_keep_their_digests_and_old_checkpoints_load(tmp_path, random_lite0):
    # digests computed before regions / proposals / rpn_* existed (commit b664456)
    old = {
        "9bb2ecd06d68": ModelConfig(),
        "a8585f5be0c6": ModelConfig(head="rmac"),
        "19cff5b9acd8": ModelConfig(head="gem", levels=3, image_sizes=[512]),
        "0399f1797852": ModelConfig(head="remap", layer_weights="kl"),
        "1df5ef282391": ModelConfig(head="rmac", whitening=True, dim=512, **PAPER_MULTISCALE),
        "3a61bb4e4abf": ModelConfig(head="mac", backbone="resnet50", upscale=True),
    }
    for digest, config in old.items():
        assert config.digest() == digest, config
    rpn = ModelConfig(head="rmac", regions="rpn")
    assert rpn.digest() != ModelConfig(head="rmac").digest()
    assert ModelConfig(head="rmac", regions="rpn", proposals=64).digest() != rpn.digest()

    # a checkpoint written before the new keys existed: its config lacks them, and it loads unchanged
    model = RetrievalModel(ModelConfig(head="rmac", levels=2, weights="random"), backbone=random_lite0)
    model.save(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    for key in ("regions", "proposals", "rpn_anchor_sizes", "rpn_aspect_ratios", "rpn_width", "rpn_nms",
                "rpn_min_size", "layer_weights"):
        del blob["config"][key]
    torch.save(blob, tmp_path / "old.pt")
    loaded = RetrievalModel.load(tmp_path / "old.pt")
    assert loaded.config.regions == "grid" and loaded.config.digest() == model.config.digest()
    assert set(loaded.state_dict()) == set(model.state_dict())  # no new tensors in grid models
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_rpn_regions_config_is_checked():
    with pytest.raises(ValueError, match="use head 'rmac'"):
        ModelConfig(head="remap", regions="rpn")
    with pytest.raises(ValueError, match="give one layer"):
        ModelConfig(head="rmac", regions="rpn", layers=[1, 2])
    with pytest.raises(ValueError, match="regions must be one of"):
        ModelConfig(head="rmac", regions="selective_search")
    with pytest.raises(ValueError, match="rpn_min_size must be at least 1"):
        ModelConfig(head="rmac", regions="rpn", rpn_min_size=0.5)
    with pytest.raises(ValueError, match="proposals must be a whole number"):
        ModelConfig(head="rmac", regions="rpn", proposals=0)


# --------------------------------------------------------------------------- anchors and box encoding


def test_anchors_are_torchvisions_in_cells_centred_on_the_cells():
    sizes, ratios = (2.0, 4.0), (0.25, 1.0, 4.0)  # at stride 32 torchvision's rounding to pixels is exact here
    mine = CellAnchorGenerator(sizes, ratios).cells(3, 5)
    assert mine.shape == (3 * 5 * 6, 4)
    theirs = AnchorGenerator(((64, 128),), ((0.25, 1.0, 4.0),))(
        ImageList(torch.zeros(1, 3, 96, 160), [(96, 160)]), [torch.zeros(1, 8, 3, 5)])[0]
    # torchvision centres anchors on the cells' top-left corners (x * stride), we on their centres
    assert torch.allclose(mine * 32 - 16, theirs, atol=1e-4)

    a = anchor_grid(4, 6, sizes=(2.0,), aspect_ratios=(0.5,))  # not rounded: 2.83 x 1.41 cells
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    assert torch.allclose(w, torch.full_like(w, 2 * math.sqrt(2)), atol=1e-5)
    assert torch.allclose(h, torch.full_like(h, math.sqrt(2)), atol=1e-5)
    assert torch.allclose(w * h, torch.full_like(w, 4.0), atol=1e-5)  # area = size²
    centres = (a[:, :2] + a[:, 2:]) / 2
    assert centres[0].tolist() == [0.5, 0.5] and centres[1].tolist() == [1.5, 0.5]  # row-major cells
    assert centres[-1].tolist() == [5.5, 3.5]


def test_box_encoding_round_trips_and_zero_deltas_decode_to_the_anchors():
    net = ProposalNetwork(8, anchor_sizes=(2.0, 4.0), aspect_ratios=(0.5, 1.0, 2.0), width=8)
    anchors = net.anchors.cells(6, 8)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(len(anchors), 2, generator=g) * torch.tensor([8.0, 6.0])
    wh = 0.5 + torch.rand(len(anchors), 2, generator=g) * 6
    boxes = torch.cat([xy, xy + wh], dim=1)
    deltas = net.rpn.box_coder.encode([boxes], [anchors])[0]
    back = net.rpn.box_coder.decode(deltas, [anchors]).reshape(-1, 4)
    assert (back - boxes).abs().max() < 1e-4
    assert deltas.abs().max() > 0.5  # the boxes really differ from the anchors

    with torch.no_grad():
        net.rpn.head.bbox_pred.weight.zero_()
        net.rpn.head.bbox_pred.bias.zero_()
        objectness, decoded = net(torch.rand(2, 8, 6, 8))
    assert objectness.shape == (2, len(anchors)) and decoded.shape == (2, len(anchors), 4)
    assert torch.allclose(decoded[1], anchors, atol=1e-5)


# --------------------------------------------------------------------------- a tiny RPN learns


def _rectangles(g: torch.Generator, n: int, size: int = 16):
    """``n`` maps of noise with one bright rectangle (4-8 cells a side) each, and the rectangles."""
    images, boxes = [], []
    for _ in range(n):
        w, h = (int(v) for v in torch.randint(4, 9, (2,), generator=g))
        x0, y0 = int(torch.randint(0, size - w + 1, (1,), generator=g)), int(torch.randint(0, size - h + 1, (1,), generator=g))
        img = 0.1 * torch.rand(1, 1, size, size, generator=g)
        img[..., y0:y0 + h, x0:x0 + w] += 1.0
        images.append(img)
        boxes.append(torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32))
    return torch.cat(images), boxes


def _box_filters(img: torch.Tensor) -> torch.Tensor:
    """A fixed feature extractor: the image and its means over 3/5/9-cell squares, rows and columns."""
    feats = [img]
    for k in (3, 5, 9):
        for kh, kw in ((k, k), (1, k), (k, 1)):
            feats.append(F.avg_pool2d(img, (kh, kw), 1, (kh // 2, kw // 2), count_include_pad=True))
    return torch.cat(feats, dim=1)


def _found_in_top5(net, images, boxes) -> list[float]:
    proposals = net.propose(_box_filters(images), 5)
    return [float(box_iou(b, p).max()) for (p, _), b in zip(proposals, boxes)]


def test_a_tiny_rpn_learns_to_find_the_bright_rectangle():
    torch.manual_seed(0)
    train_images, train_boxes = _rectangles(torch.Generator().manual_seed(0), 24)
    new_images, new_boxes = _rectangles(torch.Generator().manual_seed(1), 16)
    x = _box_filters(train_images)
    net = ProposalNetwork(x.shape[1], anchor_sizes=(4.0, 8.0), aspect_ratios=(0.5, 1.0, 2.0), width=32)
    before = _found_in_top5(net, train_images, train_boxes)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        losses = net.loss(x, train_boxes)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    after = _found_in_top5(net, train_images, train_boxes)
    held_out = _found_in_top5(net, new_images, new_boxes)
    assert sum(i >= 0.5 for i in before) <= 8  # untrained: the top 5 are arbitrary anchors (3 of 24 found)
    assert min(after) >= 0.5, after  # every training rectangle is among the top 5 proposals
    assert sum(i >= 0.5 for i in held_out) >= 14, held_out  # and most rectangles never seen
    assert np.mean(after) > 0.7


# --------------------------------------------------------------------------- the rule for boxes


def test_boxes_outside_the_map_or_degenerate_are_clipped_or_dropped():
    nan = float("nan")
    boxes = torch.tensor([
        [1.0, 1.0, 4.0, 3.0],     # 0 inside: kept as is
        [-2.0, -1.0, 3.0, 2.0],   # 1 partly outside: clipped to [0, 0, 3, 2]
        [9.0, 1.0, 12.0, 4.0],    # 2 wholly right of the map: clipped to zero width, dropped
        [5.0, 1.0, 4.0, 3.0],     # 3 x1 < x0: dropped
        [2.0, 2.0, 2.5, 5.0],     # 4 half a cell wide: dropped
        [7.5, 0.0, 9.0, 3.0],     # 5 half a cell wide once clipped: dropped
        [nan, 0.0, 3.0, 3.0],     # 6 not a box: dropped
        [0.0, 3.0, 2.0, 5.0],     # 7 NaN score: dropped
        [1.0, 1.0, 4.0, 3.2],     # 8 overlaps box 0 by IoU 0.91 with a lower score: suppressed
        [6.0, 4.0, 10.0, 9.0],    # 9 beyond the lower right corner: clipped to [6, 4, 8, 6]
    ])
    scores = torch.tensor([0.9, 0.8, 0.99, 0.98, 0.97, 0.96, 0.95, nan, 0.85, 0.7])
    kept, kept_scores = select_proposals(boxes, scores, (6, 8), k=10, nms_threshold=0.7, min_size=1.0)
    assert kept.tolist() == [[1.0, 1.0, 4.0, 3.0], [0.0, 0.0, 3.0, 2.0], [6.0, 4.0, 8.0, 6.0]]
    assert kept_scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert select_proposals(boxes, scores, (6, 8), k=2)[0].tolist() == kept[:2].tolist()  # top k by score
    # a stricter minimum drops the 2-cell-high boxes too (here: all)
    assert select_proposals(boxes, scores, (6, 8), k=10, min_size=2.5)[0].tolist() == []
    with pytest.raises(ValueError, match="at least 1 cell"):
        select_proposals(boxes, scores, (6, 8), k=10, min_size=0.5)

    # edges to the nearest cell boundary, halves up; every kept box is poolable
    assert snap_to_cells(torch.tensor([[0.5, 1.49, 2.5, 3.51]])).tolist() == [[1, 1, 3, 4]]
    x = torch.rand(1, 3, 6, 8)
    snapped = snap_to_cells(torch.tensor([[0.0, 0.0, 1.0, 1.0], [6.6, 4.7, 8.0, 6.0], [0.2, 0.3, 1.6, 1.5]]))
    assert snapped.tolist() == [[0, 0, 1, 1], [7, 5, 8, 6], [0, 0, 2, 2]]
    assert RF.roi_max_pool(x, snapped).shape == (1, 3, 3)

    # an image none of whose proposals survives is pooled over the whole map
    net = ProposalNetwork(4, anchor_sizes=(1.0,), aspect_ratios=(1.0,), width=4, min_size=100.0)
    (b, s), = net.propose(torch.rand(1, 4, 5, 7), 8)
    assert b.tolist() == [[0.0, 0.0, 7.0, 5.0]] and s.tolist() == [0.0]


# --------------------------------------------------------------------------- pooling


def test_pooling_k_proposals_equals_a_per_box_max_by_hand():
    torch.manual_seed(3)
    stream = ProposalRMAC(8, k=6, anchor_sizes=(1.0, 2.0, 4.0), aspect_ratios=(0.5, 1.0, 2.0), width=8)
    for p in stream.rpn.parameters():  # a network with opinions: scores and deltas far from zero
        torch.nn.init.normal_(p, std=0.3)
    stream.rpn.trained.fill_(True)
    x = torch.rand(3, 8, 6, 9)
    regions = stream.regions(x)
    assert [len(r) for r in regions] == [6, 6, 6]
    assert len({tuple(map(tuple, r.tolist())) for r in regions}) == 3  # each image its own boxes
    expected = []
    for n, boxes in enumerate(regions):
        total = torch.zeros(8)
        for x0, y0, x1, y1 in boxes.tolist():
            assert 0 <= x0 < x1 <= 9 and 0 <= y0 < y1 <= 6
            v = torch.tensor([max(float(x[n, c, i, j]) for i in range(y0, y1) for j in range(x0, x1))
                              for c in range(8)])
            total += v / v.norm()
        expected.append(total / total.norm())
    with torch.no_grad():
        assert torch.allclose(stream(x), torch.stack(expected), atol=1e-5)
    # the boxes are the snapped top-k proposals, best first
    props = stream.rpn.propose(x, 6)
    assert all(torch.equal(r, snap_to_cells(b)) for r, (b, _) in zip(regions, props))
    assert all(bool((s[:-1] >= s[1:]).all()) for _, s in props)
    # with the grid's boxes for every image, the per-image pooling is R-MAC's
    grid = RF.rmac_regions(6, 9, 3)
    assert torch.allclose(RF.rmac_boxes(x, [grid] * 3), RF.rmac(x, 3), atol=1e-6)


def test_box_recall_counts_targets_found_by_the_top_k():
    proposals = [torch.tensor([[0.0, 0, 2, 2], [4, 4, 8, 8]]), torch.tensor([[0.0, 0, 1, 1]])]
    targets = [torch.tensor([[4.0, 4, 8, 9]]), torch.tensor([[5.0, 5, 6, 6]])]
    assert box_recall(proposals, targets, 0.5) == 0.5
    assert box_recall(proposals, targets, 0.5, k=1) == 0.0
    assert box_recall(proposals, targets, 0.95) == 0.0


def test_recall_curve_by_hand():
    # best IoU of each target: [4,4,8,9] vs [4,4,8,8] = 16/20 = 0.8; [5,5,6,6] = 0; [0,0,2,1] vs [0,0,1,1] = 1/2
    proposals = [torch.tensor([[0.0, 0, 2, 2], [4, 4, 8, 8]]), torch.tensor([[0.0, 0, 1, 1]])]
    targets = [torch.tensor([[4.0, 4, 8, 9]]), torch.tensor([[5.0, 5, 6, 6], [0, 0, 2, 1]])]
    thresholds = (0.3, 0.5, 0.8, 0.9)
    assert recall_curve(proposals, targets, thresholds) == pytest.approx([2 / 3, 2 / 3, 1 / 3, 0.0])
    # top 1: image 1 keeps only [0,0,2,2], which misses its target
    assert recall_curve(proposals, targets, thresholds, k=1) == pytest.approx([1 / 3, 1 / 3, 0.0, 0.0])
    assert recall_curve(proposals, targets, thresholds) == pytest.approx(
        [box_recall(proposals, targets, t) for t in thresholds])
    # an image without proposals: its targets are missed (they still count)
    assert recall_curve([torch.zeros(0, 4)] + proposals[1:], targets, (0.5,)) == pytest.approx([1 / 3])
    with pytest.raises(ValueError, match="no target boxes"):
        recall_curve(proposals, [torch.zeros(0, 4), torch.zeros(0, 4)])


# --------------------------------------------------------------------------- the model


def test_model_with_rpn_regions_saves_loads_and_extracts(tmp_path, random_lite0, photo_dir):
    from remap_lib.describe.extract import extract_descriptors

    torch.manual_seed(4)
    model = RetrievalModel(_rpn_config(proposals=8, image_sizes=[128]), backbone=random_lite0)
    x = torch.rand(2, 3, 96, 128)
    with pytest.raises(ProposalsNotTrainedError, match="remap train-rpn"):
        with torch.no_grad():
            model(x)
    stream = model.streams["head"]
    for p in stream.rpn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    stream.rpn.trained.fill_(True)
    with torch.no_grad():
        d = model(x)
    assert d.shape == (2, 1280) and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)
    assert any(k.startswith("streams.head.rpn.rpn.head.") for k in model.state_dict())

    model.save(tmp_path / "rpn.pt")
    loaded = RetrievalModel.load(tmp_path / "rpn.pt")
    assert loaded.config == model.config and loaded.fingerprint() == model.fingerprint()
    with torch.no_grad():
        assert torch.equal(loaded(x), d)
    boxes, scores = loaded.proposals(x[:1])[0]
    assert len(boxes) == 8 and float(boxes[:, 2].max()) <= 128 and float(boxes[:, 3].max()) <= 96

    loaded.set_proposal_count(2)
    assert loaded.config.proposals == 2 and loaded.config.digest() != model.config.digest()
    with torch.no_grad():
        assert not torch.allclose(loaded(x), d, atol=1e-3)

    # extraction takes it like any other model, and records its identity
    desc = extract_descriptors(model, str(photo_dir), tmp_path / "desc", device="cpu", engine="torch",
                               num_workers=0, progress=False)
    assert desc.descriptors.shape == (6, 1280)
    assert desc.config["model_digest"] == model.config.digest()


# --------------------------------------------------------------------------- boxes from verified pairs


def _rgb(name: str) -> np.ndarray:
    from skimage import data as skdata

    with Image.open(Path(skdata.data_dir) / name) as img:
        return np.asarray(img.convert("RGB"))


H_WARP = np.array([[0.85, -0.18, 60.0],
                   [0.12, 0.90, 25.0],
                   [2.0e-4, -1.5e-4, 1.0]])


def _warp_rectangle(img: np.ndarray, rect, h: np.ndarray, canvas=(700, 620)) -> tuple[np.ndarray, np.ndarray]:
    """Only the pixels of ``rect`` of ``img`` warped by ``h`` onto a flat grey canvas, and the warped box."""
    x0, y0, x1, y1 = rect
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[y0:y1, x0:x1] = 255
    warped = cv2.warpPerspective(img, h, canvas)
    inside = cv2.warpPerspective(mask, h, canvas) > 127
    out = np.full_like(warped, 128)
    out[inside] = warped[inside]
    corners = cv2.perspectiveTransform(np.float64([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]).reshape(-1, 1, 2), h)
    corners = corners.reshape(-1, 2)
    return out, np.concatenate([corners.min(axis=0), corners.max(axis=0)])


def _iou(a, b) -> float:
    return float(box_iou(torch.tensor(np.asarray([a], np.float64)), torch.tensor(np.asarray([b], np.float64))))


def test_inlier_boxes_of_a_warped_rectangle_of_a_real_photo():
    img = _rgb("astronaut.png")  # 512 x 512
    rect = (120, 60, 420, 380)
    warped, warped_box = _warp_rectangle(img, rect, H_WARP)
    # features on shrunk images: the boxes must come back in the pixels of the images as given
    a, b = V.sift_features(img, max_side=400), V.sift_features(warped, max_side=450)
    assert a.scale != (1.0, 1.0) and b.scale != (1.0, 1.0)
    box_a, box_b, n = V.inlier_boxes(a, b)
    assert n > 50
    tol = 6.0  # keypoint centres lie inside the region, up to a few pixels of resampling
    assert box_a[0] >= rect[0] - tol and box_a[1] >= rect[1] - tol and box_a[2] <= rect[2] + tol \
        and box_a[3] <= rect[3] + tol
    assert box_b[0] >= warped_box[0] - tol and box_b[1] >= warped_box[1] - tol \
        and box_b[2] <= warped_box[2] + tol and box_b[3] <= warped_box[3] + tol
    assert _iou(box_a, rect) > 0.8, (box_a, rect)
    assert _iou(box_b, warped_box) > 0.7, (box_b, warped_box)
    # no model between unrelated photos: no box
    assert V.inlier_boxes(a, V.sift_features(_rgb("coffee.png")))[:2] == (None, None)


def test_merge_boxes_union_and_median():
    boxes = [[10, 20, 50, 60], [30, 10, 70, 40], [0, 25, 45, 65]]
    assert LB.merge_boxes(boxes, "union").tolist() == [0, 10, 70, 65]
    assert LB.merge_boxes(boxes, "median").tolist() == [10, 20, 50, 60]
    assert LB.merge_boxes(boxes[:1], "median").tolist() == boxes[0]
    with pytest.raises(ValueError, match="merge must be one of"):
        LB.merge_boxes(boxes, "mean")


def _write_pairs(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(P.CSV_COLUMNS)
        w.writerows(rows)


@pytest.fixture(scope="module")
def warped_pairs(tmp_path_factory):
    """A photo, two warps of two rectangles of it, an unrelated photo, and a pairs CSV joining them."""
    folder = tmp_path_factory.mktemp("boxes")
    img = _rgb("astronaut.png")
    rect_b, rect_c = (120, 60, 420, 380), (20, 250, 330, 500)
    h_c = np.array([[1.1, 0.05, 30.0], [-0.08, 1.05, -180.0], [0.0, 1e-4, 1.0]])
    warped_b, box_b = _warp_rectangle(img, rect_b, H_WARP)
    warped_c, box_c = _warp_rectangle(img, rect_c, h_c)
    paths = {name: str(folder / f"{name}.png") for name in ("a", "b", "c", "coffee")}
    for name, arr in (("a", img), ("b", warped_b), ("c", warped_c), ("coffee", _rgb("coffee.png"))):
        Image.fromarray(arr).save(paths[name])
    csv_path = folder / "pairs.csv"
    _write_pairs(csv_path, [[paths["a"], paths["b"], "astro", 30, "kept"],
                            [paths["c"], paths["a"], "astro", 30, "kept"],
                            [paths["a"], paths["coffee"], "astro", 0, "kept"],  # verification would not keep it
                            [paths["b"], paths["c"], "astro", 0, "too_hard"]])
    return {"paths": paths, "csv": csv_path, "rects": {"b": rect_b, "c": rect_c}, "boxes": {"b": box_b, "c": box_c}}


def test_training_boxes_merge_per_image_and_resume_from_the_cache(tmp_path, warped_pairs, monkeypatch):
    paths, rects = warped_pairs["paths"], warped_pairs["rects"]
    cache = tmp_path / "boxes.cache.jsonl"
    calls = []
    real = LB.inlier_boxes

    def counting(fa, fb, *args):
        calls.append(1)
        return real(fa, fb, *args)

    monkeypatch.setattr(LB, "inlier_boxes", counting)
    result = LB.training_boxes(warped_pairs["csv"], cache=cache, workers=0, progress=False)
    assert len(calls) == 3  # the kept pairs; the too-hard one is not read
    assert set(result.boxes) == {paths["a"], paths["b"], paths["c"]}  # the unrelated photo gets no box
    own_a = result.boxes_of(paths["a"])
    assert len(own_a) == 2
    assert result.boxes[paths["a"]] == pytest.approx(LB.merge_boxes(own_a, "union").tolist(), abs=0.006)
    union = [min(rects["b"][0], rects["c"][0]), min(rects["b"][1], rects["c"][1]),
             max(rects["b"][2], rects["c"][2]), max(rects["b"][3], rects["c"][3])]
    assert _iou(result.boxes[paths["a"]], union) > 0.8
    assert _iou(result.boxes[paths["b"]], warped_pairs["boxes"]["b"]) > 0.7
    assert _iou(result.boxes[paths["c"]], warped_pairs["boxes"]["c"]) > 0.7

    # a rerun computes nothing; a run killed after the first pair (and mid-line) computes the rest
    calls.clear()
    again = LB.training_boxes(warped_pairs["csv"], cache=cache, workers=0, progress=False)
    assert calls == [] and again.boxes == result.boxes
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:25])
    resumed = LB.training_boxes(warped_pairs["csv"], cache=cache, workers=0, progress=False)
    assert len(calls) == 2 and resumed.boxes == result.boxes

    median = LB.training_boxes(warped_pairs["csv"], merge="median", cache=cache, workers=0, progress=False)
    assert median.boxes[paths["a"]] == pytest.approx(np.median(own_a, axis=0).tolist(), abs=0.006)  # 2 decimals
    assert median.boxes[paths["b"]] == result.boxes[paths["b"]]  # one box: nothing to merge
    result.save(tmp_path / "boxes.json")
    assert LB.TrainingBoxes.load(tmp_path / "boxes.json").boxes == result.boxes


# --------------------------------------------------------------------------- training the RPN


def _train_cfg(tmp_path, name, **kw):
    from remap_lib.training.rpn import RPNTrainConfig

    # 256 px (enlarged): 8 x 6 maps, 432 anchors, more than the 256 sampled for the loss, so the resume
    # test sees whether the sampling is reproduced
    base = dict(model=_rpn_config(image_sizes=[256], upscale=True), batch_size=2, steps=4, checkpoint_every=2, val_every=2,
                out_dir=str(tmp_path / name), device="cpu", engine="torch", lr=0.01)
    base.update(kw)
    return RPNTrainConfig(**base)


def test_train_rpn_resumes_to_the_same_weights_and_writes_a_loadable_model(tmp_path, random_lite0, photo_dir):
    from remap_lib.training.rpn import RPNTrainer

    files = sorted(str(p) for p in photo_dir.glob("*.png"))
    sizes = {p: Image.open(p).size for p in files}
    boxes = {p: [0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h] for p, (w, h) in sizes.items()}
    val = {files[0]: boxes[files[0]]}

    straight = RPNTrainer(_train_cfg(tmp_path, "a"), boxes=boxes, val_boxes=val, backbone=random_lite0)
    history = straight.run()
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4] and "val_recall_10" in history[-1]
    half = RPNTrainer(_train_cfg(tmp_path, "b", steps=2), boxes=boxes, val_boxes=val, backbone=random_lite0)
    half.run()
    resumed = RPNTrainer(_train_cfg(tmp_path, "b"), boxes=boxes, val_boxes=val, backbone=random_lite0)
    assert [r.get("loss") for r in resumed.run()] == [r.get("loss") for r in history]
    for k, v in straight.rpn.state_dict().items():
        assert torch.equal(v, resumed.rpn.state_dict()[k]), k
    assert not torch.equal(straight.rpn.reduce.weight, RPNTrainer(  # training moved the weights
        _train_cfg(tmp_path, "c", steps=1, val_every=0), boxes=boxes, backbone=random_lite0).rpn.reduce.weight)
    with open(tmp_path / "b" / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2, 3, 4]

    model = RetrievalModel.load(tmp_path / "a" / "model.pt")
    assert bool(model.streams["head"].rpn.trained)
    x = torch.rand(1, 3, 192, 256)
    with torch.no_grad():
        assert torch.equal(model(x), straight.model(x))
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        RPNTrainer(_train_cfg(tmp_path, "b", lr=0.5), boxes=boxes, backbone=random_lite0).run()


def test_remap_train_rpn_command_trains_on_verified_pairs_and_resumes(tmp_path, warped_pairs, capsys):
    import yaml

    from remap_lib.app.cli import main

    cfg = {"pairs": str(warped_pairs["csv"]), "model": _rpn_config(image_sizes=[128]).to_dict(),
           "batch_size": 2, "steps": 2, "checkpoint_every": 1, "val_every": 0, "engine": "torch",
           "out_dir": str(tmp_path / "run"), "box_workers": 0, "device": "cpu"}
    (tmp_path / "rpn.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train-rpn", "--config", str(tmp_path / "rpn.yaml")]) == 0
    assert "model with the trained proposals" in capsys.readouterr().out
    boxes = json.loads((tmp_path / "run" / "boxes.json").read_text())["boxes"]
    assert set(boxes) == {warped_pairs["paths"][k] for k in ("a", "b", "c")}
    assert main(["train-rpn", "--config", str(tmp_path / "rpn.yaml"), "--steps", "3"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and [r["step"] for r in summary["history"]] == [0, 1, 2, 3]
    model = RetrievalModel.load(tmp_path / "run" / "model.pt")
    assert model.config.regions == "rpn" and summary["model_digest"] == model.config.digest()
    cfg["model"]["regions"] = "grid"
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train-rpn", "--config", str(tmp_path / "grid.yaml")]) == 2
    assert "regions: rpn" in capsys.readouterr().err


def test_proposal_regions_and_their_picture(random_lite0):
    from remap_lib.app.plots import plot_proposals_vs_grid, proposal_regions

    torch.manual_seed(6)
    model = RetrievalModel(_rpn_config(proposals=8, image_sizes=[128]), backbone=random_lite0).eval()
    image = Image.fromarray((np.random.default_rng(0).random((150, 200, 3)) * 255).astype(np.uint8))
    r = proposal_regions(model, image, size=256, k=20, levels=2)
    assert r["map_size"] == (6, 8) and r["trained"] is False  # 256x192 px at stride 32
    # the grid in the image's pixels: 200/8 = 25 px a cell across, 150/6 = 25 px down
    np.testing.assert_allclose(r["grid"].numpy(), RF.rmac_regions(6, 8, 2).double().numpy() * 25)
    assert 1 <= len(r["proposals"]) <= 20 and r["scores"].shape == (len(r["proposals"]),)
    assert bool((r["proposals"][:, 2] <= 200 + 1e-6).all()) and bool((r["proposals"][:, 3] <= 150 + 1e-6).all())
    # the proposals in cells are what the model's own proposals() gives (same map, scaled to the picture)
    from remap_lib.data.images import resize_longer_side, to_tensor

    x = to_tensor(resize_longer_side(image, 256))[None]
    own, _ = model.proposals(x, 20)[0]
    np.testing.assert_allclose(r["proposals"].numpy(), own.double().numpy() * 200 / 256, atol=1e-4)
    fig = plot_proposals_vs_grid(r, 5, target=[10, 10, 100, 90])
    assert "UNTRAINED" in fig.axes[1].get_title() and "top 5" in fig.axes[1].get_title()
    # the grid: a fill and an outline per region, and the target; S = 2 on 6x8 cells gives 2 sizes
    grid_patches = fig.axes[0].patches
    assert len(grid_patches) == 2 * len(r["grid"]) + 1 and "in 2 sizes" in fig.axes[0].get_title()
    bold = [pt for pt in grid_patches if not pt.get_fill() and pt.get_linewidth() == 2.5]
    assert len(bold) == 2  # one region of each scale outlined boldly
    assert {pt.get_edgecolor() for pt in bold} != {bold[0].get_edgecolor()}  # in the colours of their scales
    assert len(fig.axes[1].patches) == min(5, len(r["proposals"])) + 1
    with pytest.raises(ValueError, match="not learned proposals"):
        proposal_regions(RetrievalModel(ModelConfig(head="rmac", weights="random", image_sizes=[128]),
                                        backbone=random_lite0), image)


def test_the_proposals_benchmark_names_the_command_that_makes_a_missing_rpn(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "proposals.py"
    spec = importlib.util.spec_from_file_location("proposals_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match=r"no RPN checkpoint at .*none\.pt; train one with "
                                         r"`remap train-rpn --config configs/train_rpn_landmarks_cpu\.yaml`"):
        bench.main(["--rpn", str(tmp_path / "none.pt"), "--out", str(tmp_path)])
