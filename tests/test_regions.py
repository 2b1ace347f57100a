"""Region grid, ROI max-pooling and R-MAC (remap_lib.layers.functional)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from remap_lib.layers import functional as RF


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


def test_odd_map_5x9_tie_in_the_number_of_regions():
    # short = 5, long = 9: n = 2..7 regions of side 5 along 9 are b = 4/(n-1) = 4, 2, 4/3, 1, 4/5, 2/3 apart;
    # overlap 1 - b/5 = 1/5, 3/5, 11/15, 4/5, 21/25, 13/15; |overlap - 2/5| = 1/5, 1/5, 1/3, 2/5, 11/25, 7/15.
    # n = 2 and n = 3 tie: the larger count wins -> 3 regions at level 1, 2 extra along the width.
    # (cirtorch's float32 error puts n = 2 first: 2 regions at level 1, 3 across at level 2.)
    # Level 1: side floor(2·5/2) = 5; x starts floor(i·(9-5)/2) = 0, 2, 4; one row at y = 0.
    # Level 2: side floor(2·5/3) = 3; 2 + 2 = 4 across: floor(i·(9-3)/3) = 0, 2, 4, 6;
    #          2 down: floor(i·(5-3)/1) = 0, 2.
    boxes, levels = RF.rmac_regions(5, 9, 2, return_levels=True)
    assert boxes.tolist() == [[0, 0, 5, 5], [2, 0, 7, 5], [4, 0, 9, 5],
                              [0, 0, 3, 3], [2, 0, 5, 3], [4, 0, 7, 3], [6, 0, 9, 3],
                              [0, 2, 3, 5], [2, 2, 5, 5], [4, 2, 7, 5], [6, 2, 9, 5]]
    assert levels.tolist() == [1] * 3 + [2] * 8
    # The transposed map gets the transposed grid.
    assert RF.rmac_regions(9, 5, 2).tolist() == [[0, 0, 5, 5], [0, 2, 5, 7], [0, 4, 5, 9],
                                                 [0, 0, 3, 3], [2, 0, 5, 3], [0, 2, 3, 5], [2, 2, 5, 5],
                                                 [0, 4, 3, 7], [2, 4, 5, 7], [0, 6, 3, 9], [2, 6, 5, 9]]


def test_odd_map_9x33_tie_goes_to_more_regions():
    # short = 9, long = 33: b = 24/(n-1); n = 5: b = 6, overlap 1 - 6/9 = 1/3 (error 1/15);
    # n = 6: b = 24/5, overlap 1 - 24/45 = 7/15 (error 1/15).  Tie -> 6 regions of side 9 at level 1,
    # x starts floor(i·24/5) = 0, 4, 9, 14, 19, 24.
    assert RF.rmac_regions(9, 33, 1).tolist() == [[x, 0, x + 9, 9] for x in (0, 4, 9, 14, 19, 24)]


def test_odd_map_2x32_start_positions_are_exact():
    # short = 2, long = 32: b = 30/(n-1) = 30, 15, 10, 7.5, 6, 5; overlap 1 - b/2 is -14 ... -1.5,
    # closest to 2/5 at n = 7 -> 6 extra regions along the width.
    # Level 1: side 2, 7 across at floor(i·30/6) = 0, 5, 10, 15, 20, 25, 30.
    # Level 2: side floor(4/3) = 1, 8 across at floor(i·31/7) = 0, 4, 8, 13, 17, 22, 26, 31, 2 down at 0, 1.
    # (cirtorch computes 7 · float32(31/7) = 30.999998 and starts the last column at 30, so its
    #  level 2 never covers column 31.)
    boxes, levels = RF.rmac_regions(2, 32, 2, return_levels=True)
    assert boxes[levels == 1].tolist() == [[x, 0, x + 2, 2] for x in (0, 5, 10, 15, 20, 25, 30)]
    xs = (0, 4, 8, 13, 17, 22, 26, 31)
    assert boxes[levels == 2].tolist() == [[x, y, x + 1, y + 1] for y in (0, 1) for x in xs]


def test_odd_map_2x62_last_region_reaches_the_edge():
    # As 2x32: n = 7 at level 1 (b = 60/(n-1) = 10 at best).  Level 2: side 1, 8 across at floor(i·61/7):
    # 0, 8, 17, 26, 34, 43, 52, 61.  In float64, 7 · (61/7) = 60.99999999999999 would floor to 60
    # and leave column 61 out of every level-2 region.
    boxes, levels = RF.rmac_regions(2, 62, 2, return_levels=True)
    xs = (0, 8, 17, 26, 34, 43, 52, 61)
    assert boxes[levels == 2].tolist() == [[x, y, x + 1, y + 1] for y in (0, 1) for x in xs]


def _formula_extra(short, long, overlap=Fraction(2, 5)):
    """Extra regions along the long side, from the docstring's rule in exact arithmetic (ties: more)."""
    if short == long:
        return 0
    errors = {n: abs(1 - Fraction(long - short, n - 1) / short - overlap) for n in range(2, 8)}
    best = min(errors.values())
    return max(n for n, e in errors.items() if e == best) - 1


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 6), st.booleans())
def test_grid_invariants(height, width, levels, full_map):
    boxes, box_levels = RF.rmac_regions(height, width, levels, full_map=full_map, return_levels=True)
    short, long = min(height, width), max(height, width)
    extra = _formula_extra(short, long)
    x0, y0, x1, y1 = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert ((box_levels == 0).sum() == int(full_map))
    if full_map:
        assert boxes[0].tolist() == [0, 0, width, height]
    for level in range(1, levels + 1):
        side = 2 * short // (level + 1)
        b = boxes[box_levels == level]
        if side == 0:  # the map is too small for this level
            assert len(b) == 0
            continue
        assert ((b[:, 2] - b[:, 0]) == side).all() and ((b[:, 3] - b[:, 1]) == side).all()
        across = level + (extra if width > height else 0)
        down = level + (extra if height > width else 0)
        assert len(b) == across * down
        xs, ys = b[:across, 0], b[::across, 1]
        # a full grid, row-major: every row has the same x starts, every column the same y starts
        assert b[:, 0].tolist() == xs.tolist() * down and b[:, 1].tolist() == ys.repeat_interleave(across).tolist()
        for starts, n, extent in ((xs, across, width), (ys, down, height)):
            # uniform placement: the i-th of n regions starts at floor(i · (extent - side) / (n - 1)),
            # so the first starts at 0, the last ends on the border and no gap exceeds a step
            assert starts[0] == 0 and starts[-1] + side == (extent if n > 1 else side)
            assert starts.tolist() == [i * (extent - side) // max(n - 1, 1) for i in range(n)]
    if height != width:
        # level 1 has the number of regions whose overlap is nearest 40%, an integer in 2..7
        n1 = 1 + extra
        assert 2 <= n1 <= 7 and len(boxes[box_levels == 1]) == n1
        overlap = 1 - Fraction(long - short, n1 - 1) / short
        assert all(abs(overlap - Fraction(2, 5)) <= abs(1 - Fraction(long - short, n - 1) / short - Fraction(2, 5))
                   for n in range(2, 8))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 20), st.integers(1, 20), st.integers(1, 5),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_roi_max_pool_equals_a_loop_on_any_grid(n, c, height, width, levels, full_map, seed):
    x = torch.randn(n, c, height, width, generator=torch.Generator().manual_seed(seed))
    boxes = RF.rmac_regions(height, width, levels, full_map=full_map)
    expected = torch.stack([x[..., y0:y1, x0:x1].amax(dim=(-2, -1)) for x0, y0, x1, y1 in boxes.tolist()], 1)
    assert torch.equal(RF.roi_max_pool(x, boxes), expected)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_roi_max_pool_equals_a_loop_on_any_boxes(data):
    height, width = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    box = st.tuples(st.integers(0, width - 1), st.integers(0, height - 1)).flatmap(
        lambda xy: st.tuples(st.just(xy[0]), st.just(xy[1]), st.integers(xy[0] + 1, width),
                             st.integers(xy[1] + 1, height)))
    boxes = torch.tensor(data.draw(st.lists(box, min_size=1, max_size=12)))
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    expected = torch.stack([x[..., y0:y1, x0:x1].amax(dim=(-2, -1)) for x0, y0, x1, y1 in boxes.tolist()], 1)
    assert torch.equal(RF.roi_max_pool(x, boxes), expected)


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
