"""Region grid, ROI max-pooling and R-MAC (remap_lib.functional)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from remap_lib import functional as RF


@pytest.mark.parametrize("height,width", [(24, 32), (32, 24)])
def test_region_counts_match_paper_table_1(height, width):
    counts = [len(RF.rmac_regions(height, width, s)) for s in (2, 3, 4, 5)]
    assert counts == [8, 20, 40, 70]
    assert len(RF.rmac_regions(height, width, 4, full_map=True)) == 41


def test_regions_are_square_inside_the_map_and_overlap_about_40_percent():
    boxes, levels = RF.rmac_regions(24, 32, 4, return_levels=True)
    x0, y0, x1, y1 = boxes.T
    assert torch.equal(x1 - x0, y1 - y0)  # square
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 32).all() and (y1 <= 24).all()
    assert levels.tolist() == [1] * 2 + [2] * 6 + [3] * 12 + [4] * 20
    # level 1 on 24x32: two 24x24 squares at x=0 and x=8 -> overlap 16/24
    assert boxes[:2].tolist() == [[0, 0, 24, 24], [8, 0, 32, 24]]
    # level 2: 16x16 squares, 3 across (step 8) and 2 down (step 8): overlap 8/16 = 50%
    assert boxes[2:8, 0].tolist() == [0, 8, 16, 0, 8, 16]
    assert boxes[2:8, 1].tolist() == [0, 0, 0, 8, 8, 8]
    assert (boxes[2:8, 2] - boxes[2:8, 0]).unique().tolist() == [16]


def test_square_and_tiny_maps():
    assert RF.rmac_regions(10, 10, 1).tolist() == [[0, 0, 10, 10]]
    assert len(RF.rmac_regions(10, 10, 3)) == 1 + 4 + 9
    assert RF.rmac_regions(1, 1, 3).tolist() == [[0, 0, 1, 1]]  # levels 2, 3 vanish
    with pytest.raises(ValueError):
        RF.rmac_regions(0, 5, 3)


def _naive_roi_max_pool(x, boxes):
    return torch.stack([x[:, :, y0:y1, x0:x1].amax(dim=(-2, -1)) for x0, y0, x1, y1 in boxes.tolist()], 1)


@pytest.mark.parametrize("shape", [(2, 7, 24, 32), (1, 3, 32, 24), (3, 5, 9, 13), (1, 2, 1, 6)])
def test_roi_max_pool_equals_a_naive_loop(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    boxes = RF.rmac_regions(shape[2], shape[3], 5, full_map=True)
    assert torch.equal(RF.roi_max_pool(x, boxes), _naive_roi_max_pool(x, boxes))


def test_roi_max_pool_arbitrary_rectangles():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 11, 17)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 16, (50, 2), generator=g)
    b = a + 1 + torch.randint(0, 10, (50, 2), generator=g)
    boxes = torch.stack([a[:, 0].clamp(max=16), a[:, 1].clamp(max=10), b[:, 0].clamp(max=17),
                         b[:, 1].clamp(max=11)], 1)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    assert torch.equal(RF.roi_max_pool(x, boxes), _naive_roi_max_pool(x, boxes))


def test_roi_max_pool_gradient_matches_naive():
    torch.manual_seed(3)
    x1 = torch.randn(1, 3, 8, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    boxes = RF.rmac_regions(8, 12, 3)
    w = torch.randn(1, len(boxes), 3)
    (RF.roi_max_pool(x1, boxes) * w).sum().backward()
    (_naive_roi_max_pool(x2, boxes) * w).sum().backward()
    assert torch.allclose(x1.grad, x2.grad)


def test_roi_max_pool_rejects_boxes_outside_the_map():
    with pytest.raises(ValueError, match="inside"):
        RF.roi_max_pool(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 0, 5, 2]]))


def test_rmac_hand_computed():
    # 2x3 map, 1 level: two 2x2 regions, columns 0-1 and 1-2.
    x = torch.tensor([[[[1.0, 0.0, 2.0], [0.0, 3.0, 5.0]],
                       [[0.0, 4.0, 0.0], [1.0, 0.0, 0.0]]]])
    assert RF.rmac_regions(2, 3, 1).tolist() == [[0, 0, 2, 2], [1, 0, 3, 2]]
    a = torch.tensor([3.0, 4.0]) / 5.0  # region 1: max ch0 = 3, ch1 = 4
    b = torch.tensor([5.0, 4.0]) / math.sqrt(41.0)  # region 2: max ch0 = 5, ch1 = 4
    expected = (a + b) / (a + b).norm()
    assert torch.allclose(RF.rmac(x, levels=1)[0], expected, atol=1e-6)
    assert torch.allclose(RF.rmac(x, levels=1)[0], torch.tensor([0.695975, 0.718063]), atol=1e-5)


def _cirtorch_rmac(x, L=3, eps=1e-6):
    """cirtorch.layers.functional.rmac, transcribed (reference computation, loops and all)."""
    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    W, H = x.size(3), x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    (_, idx) = torch.min(torch.abs(((w**2 - w * b) / w**2) - ovr), 0)
    Wd = Hd = 0
    if H < W:
        Wd = idx.item() + 1
    elif H > W:
        Hd = idx.item() + 1
    v = F.max_pool2d(x, (x.size(-2), x.size(-1)))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps).expand_as(v)
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        cenW = torch.floor(wl2 + torch.Tensor(range(l - 1 + Wd + 1)) * b) - wl2
        b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cenH = torch.floor(wl2 + torch.Tensor(range(l - 1 + Hd + 1)) * b) - wl2
        for i_ in cenH.tolist():
            for j_ in cenW.tolist():
                if wl == 0:
                    continue
                R = x[:, :, (int(i_) + torch.Tensor(range(wl)).long()).tolist(), :]
                R = R[:, :, :, (int(j_) + torch.Tensor(range(wl)).long()).tolist()]
                vt = F.max_pool2d(R, (R.size(-2), R.size(-1)))
                vt = vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps).expand_as(vt)
                v += vt
    return v.squeeze(-1).squeeze(-1)


@pytest.mark.parametrize("shape,levels", [((2, 16, 24, 32), 3), ((1, 8, 32, 24), 4), ((1, 8, 20, 20), 3),
                                          ((1, 4, 12, 40), 2), ((1, 4, 30, 40), 5)])
def test_rmac_equals_cirtorch(shape, levels):
    torch.manual_seed(4)
    x = torch.rand(*shape)
    ref = _cirtorch_rmac(x, levels)
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert torch.allclose(RF.rmac(x, levels, full_map=True), ref, atol=1e-5)


def test_weighted_region_sum():
    r = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    out = RF.weighted_region_sum(r, torch.tensor([2.0, 0.5, 0.0]))
    assert out.tolist() == [[2.0, 0.5]]
    with pytest.raises(ValueError, match="region weights"):
        RF.weighted_region_sum(r, torch.ones(2))
