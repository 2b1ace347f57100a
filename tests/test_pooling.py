"""MAC / SPoC / GeM and the REMAP stream's region weights (remap_lib.pooling)."""

from __future__ import annotations

import math

import torch

from remap_lib import functional as RF
from remap_lib.pooling import RemapStream, _regions_and_weight_index, register_nonnegative_projection

X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])


def test_mac_spoc_gem_hand_computed():
    assert RF.mac(X).item() == 4.0
    assert RF.spoc(X).item() == 10.0
    assert math.isclose(RF.gem(X, 2.0).item(), math.sqrt(7.5), rel_tol=1e-6)
    assert math.isclose(RF.gem(X, 1.0).item(), 2.5, rel_tol=1e-6)
    assert RF.gem(X, 200.0).item() > 3.9  # p -> inf approaches MAC


def test_spoc_centre_prior_hand_computed():
    w = RF.spoc_centre_prior(3, 3)  # sigma = (3/2)/3 = 0.5
    assert math.isclose(w[1, 1].item(), 1.0)
    assert math.isclose(w[0, 1].item(), math.exp(-2.0), rel_tol=1e-6)
    assert math.isclose(w[0, 0].item(), math.exp(-4.0), rel_tol=1e-6)
    x = torch.ones(1, 1, 3, 3)
    assert math.isclose(RF.spoc(x, centre_prior=True).item(), 1 + 4 * math.exp(-2) + 4 * math.exp(-4),
                        rel_tol=1e-6)


def test_remap_stream_with_unit_weights_is_unnormalised_rmac():
    torch.manual_seed(0)
    x = torch.rand(2, 6, 24, 32)
    stream = RemapStream(levels=4)
    assert stream.alpha.raw.numel() == 40
    assert torch.allclose(RF.l2n(stream(x)), RF.rmac(x, 4), atol=1e-6)


def test_remap_stream_weights_select_regions():
    torch.manual_seed(1)
    x = torch.rand(1, 5, 24, 32)
    alpha = torch.zeros(40)
    alpha[7] = 2.0
    stream = RemapStream(levels=4, alpha=alpha)
    boxes = RF.rmac_regions(24, 32, 4)
    x0, y0, x1, y1 = boxes[7].tolist()
    expected = 2.0 * RF.l2n(x[:, :, y0:y1, x0:x1].amax(dim=(-2, -1)))
    assert torch.allclose(stream(x), expected, atol=1e-6)


def test_weight_index_identity_on_reference_and_permutation_on_portrait():
    _, idx = _regions_and_weight_index(24, 32, 4, False, (24, 32))
    assert idx.tolist() == list(range(40))
    boxes, idx = _regions_and_weight_index(32, 24, 4, False, (24, 32))
    assert sorted(idx.tolist()) == list(range(40))  # each weight used exactly once
    ref = RF.rmac_regions(24, 32, 4)
    for (x0, y0, x1, y1), j in zip(boxes.tolist(), idx.tolist()):
        assert ref[j].tolist() == [y0, x0, y1, x1]  # the transposed region
    boxes, idx = _regions_and_weight_index(32, 32, 4, False, (24, 32))
    assert len(boxes) == 1 + 4 + 9 + 16 and idx.max() < 40


def test_alpha_stays_non_negative_after_a_step_that_pushes_it_negative():
    stream = RemapStream(levels=2)
    opt = torch.optim.SGD(stream.parameters(), lr=1.0)
    register_nonnegative_projection(opt, stream)
    x = torch.rand(1, 3, 24, 32)
    loss = 10.0 * stream(x).sum()  # d loss / d alpha_i = 10 * sum(region_i) > 1 -> alpha_i < 0
    loss.backward()
    grad = stream.alpha.raw.grad.clone()
    assert (1.0 - grad < 0).any()  # the unprojected step would make some alpha negative
    opt.step()
    assert (stream.alpha.raw >= 0).all() and (stream.alpha() >= 0).all()
    assert torch.equal(stream.alpha.raw, (1.0 - grad).clamp(min=0))
