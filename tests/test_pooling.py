"""MAC / SPoC / GeM and the REMAP stream's region weights (remap_lib.layers.pooling)."""

from __future__ import annotations

import math

import pytest
import torch

from remap_lib.layers import functional as RF
from remap_lib.layers.pooling import (GeM, RemapStream, _regions_and_weight_index, project_nonnegative_,
                               register_nonnegative_projection)

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


def test_clamp_min_passthrough_value_and_gradient():
    x = torch.tensor([-1.0, 0.0, 0.0, 2.0, 3.0], requires_grad=True)
    y = RF.clamp_min_passthrough(x, 0.0)
    assert y.tolist() == [0.0, 0.0, 0.0, 2.0, 3.0]
    # below / at the bound: a gradient pushing up (negative) passes, one pushing down does not;
    # inside: the identity's gradient whatever its sign
    y.backward(torch.tensor([-1.0, -2.0, 3.0, 4.0, -5.0]))
    assert x.grad.tolist() == [-1.0, -2.0, 0.0, 4.0, -5.0]
    with torch.no_grad():
        assert RF.clamp_min_passthrough(x, 0.5).tolist() == [0.5, 0.5, 0.5, 2.0, 3.0]


def test_zero_region_weight_grows_under_a_gradient_that_pushes_it_up():
    # -Σ_i α_i r_i summed over channels: d loss / d α_i = -Σ_c r_i[c] < 0 for every region,
    # so every weight, those at the bound α = 0 included, should grow.
    torch.manual_seed(5)
    x = torch.rand(1, 3, 24, 32)
    stream = RemapStream(levels=2)
    with torch.no_grad():
        stream.alpha.raw[:4] = 0.0
    (-stream(x).sum()).backward()
    expected = -stream.regions(x)[0].sum(-1)  # the gradient of an unconstrained α
    assert (expected < 0).all()
    assert torch.allclose(stream.alpha.raw.grad, expected)  # reaches the four zero weights too

    opt = torch.optim.SGD(stream.parameters(), lr=0.1)
    register_nonnegative_projection(opt, stream)
    for _ in range(20):
        opt.zero_grad()
        (-stream(x).sum()).backward()
        opt.step()
    # 20 steps of lr 0.1 along -grad: α_i = α_i(0) + 2 Σ_c r_i[c] exactly (the gradient does not depend on α)
    assert torch.allclose(stream.alpha.raw, torch.tensor([0.0] * 4 + [1.0] * 4) - 2.0 * expected, atol=1e-5)
    assert (stream.alpha.raw[:4] > 1.0).all()


def test_region_weight_at_zero_gets_no_gradient_that_pushes_it_below():
    # +Σ α_i r_i pushes every α down; at α = 0 the gradient is blocked (it would only be
    # undone by the projection, and would build up momentum toward the infeasible side).
    torch.manual_seed(6)
    x = torch.rand(1, 3, 24, 32)
    stream = RemapStream(levels=2)
    with torch.no_grad():
        stream.alpha.raw[:4] = 0.0
    stream(x).sum().backward()
    sums = stream.regions(x)[0].sum(-1)
    assert torch.equal(stream.alpha.raw.grad[:4], torch.zeros(4))
    assert torch.allclose(stream.alpha.raw.grad[4:], sums[4:])


def test_region_weights_forward_values_and_checkpoint_names_unchanged():
    stream = RemapStream(levels=2)
    raw = torch.tensor([-1.5, -0.0, 0.0, 1e-30, 0.25, 3.0, -1e-7, 7.0])
    with torch.no_grad():
        stream.alpha.raw.copy_(raw)
    assert torch.equal(stream.alpha(), raw.clamp(min=0))
    assert list(stream.state_dict()) == ["alpha.raw"]
    assert list(GeM().state_dict()) == ["p"]


def test_gem_exponent_at_one_grows_under_a_gradient_that_pushes_it_up():
    # GeM is a power mean: it grows with p on a non-constant map, so -GeM pushes p up.
    torch.manual_seed(7)
    x = torch.rand(2, 4, 5, 6)
    gem = GeM(p=1.0)
    (-gem(x).sum()).backward()
    p = torch.tensor(1.0, requires_grad=True)
    (-RF.gem(x, p).sum()).backward()  # the unconstrained derivative at p = 1
    assert p.grad < 0 and torch.allclose(gem.p.grad, p.grad)
    opt = torch.optim.SGD(gem.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        (-gem(x).sum()).backward()
        opt.step()
    assert gem.p.item() > 1.0
    # value unchanged: below the bound the forward pass uses p = 1
    low = GeM(p=0.5)
    assert torch.equal(low(x), RF.gem(x, torch.tensor(1.0)))
    (low(x).sum()).backward()  # pushes p down: blocked below the bound
    assert low.p.grad == 0


def test_projection_keeps_gem_exponent_at_least_one():
    model = torch.nn.ModuleDict({"gem": GeM(p=3.0), "remap": RemapStream(levels=1)})
    with torch.no_grad():
        model["gem"].p.fill_(0.25)
        model["remap"].alpha.raw.copy_(torch.tensor([-2.0, 0.5]))
    project_nonnegative_(model)
    assert model["gem"].p.item() == 1.0
    assert model["remap"].alpha.raw.tolist() == [0.0, 0.5]


@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (9, 12), (24, 32), (32, 24)])
@pytest.mark.parametrize("levels", [2, 3, 4, 5])
def test_every_4_3_map_uses_each_region_weight_once(shape, levels):
    """Small 4:3 maps (a 256x192 input gives 6x8) have the reference's layout: region k uses alpha k.

    Before, the nearest-centre rule on a 6x8 map at S = 4 gave 35 distinct alphas for 40 regions.
    """
    from remap_lib.layers.pooling import _regions_and_weight_index

    boxes, index = _regions_and_weight_index(*shape, levels, False, (24, 32))
    assert len(boxes) == {2: 8, 3: 20, 4: 40, 5: 70}[levels]
    assert sorted(index.tolist()) == list(range(len(boxes)))
    if shape[0] < shape[1]:
        assert index.tolist() == list(range(len(boxes)))
