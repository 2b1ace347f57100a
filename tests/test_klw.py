"""KL-divergence region weighting (remap_lib.training.klw) and its pictures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from remap_lib.app.cli import main
from remap_lib.config import ModelConfig
from remap_lib.data.datasets import load_folder_groups
from remap_lib.training.klw import (KLWeights, estimate_kl_weights, histogram_densities, pair_distances,
                           region_descriptors, region_kl, sample_pairs)
from remap_lib.describe.model import RetrievalModel
from remap_lib.app.plots import kl_weight_map

N = 20000


@pytest.fixture(scope="module")
def gaussians():
    rng = np.random.default_rng(0)
    return {"n01": rng.normal(0, 1, N), "n11": rng.normal(1, 1, N), "n02": rng.normal(0, 2, N),
            "n01b": rng.normal(0, 1, N)}


def test_two_gaussians_match_the_closed_form(gaussians):
    g = gaussians
    # KL(N(m1,s1) || N(m2,s2)) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2
    shift = 0.5  # N(0,1) vs N(1,1)
    wider = math.log(2) + 1 / 8 - 0.5  # N(0,1) vs N(0,2^2) = 0.3181
    assert region_kl(g["n01"], g["n11"], bins=50)[0] == pytest.approx(shift, abs=0.03)
    assert region_kl(g["n11"], g["n01"], bins=50, direction="nonmatch_match")[0] == pytest.approx(shift, abs=0.03)
    assert region_kl(g["n01"], g["n11"], bins=50, direction="symmetric")[0] == pytest.approx(2 * shift, abs=0.06)
    assert region_kl(g["n01"], g["n02"], bins=50)[0] == pytest.approx(wider, abs=0.03)


def test_coinciding_distributions_get_weight_near_zero(gaussians):
    w = region_kl(gaussians["n01"], gaussians["n01b"], bins=30)[0]
    assert 0 <= w < 0.01


def test_several_regions_and_non_negativity():
    rng = np.random.default_rng(1)
    d_match = np.stack([rng.normal(0.5, 0.1, 3000), rng.normal(1.0, 0.1, 3000), rng.uniform(0, 2, 3000)], 1)
    d_non = np.stack([rng.normal(1.0, 0.1, 3000), rng.normal(1.0, 0.1, 3000), rng.uniform(0, 2, 3000)], 1)
    w = region_kl(d_match, d_non)
    assert w.shape == (3,) and (w >= 0).all()
    assert w[0] > 3 and w[1] < 0.02 and w[2] < 0.02  # only the first region separates the pairs
    with pytest.raises(ValueError, match="direction"):
        region_kl(d_match, d_non, direction="up")


@pytest.mark.parametrize("smoothing", [0, 0.0, -0.5, float("nan")])
def test_smoothing_must_be_positive(smoothing):
    # Without smoothing a bin reached by one sample only gives 0·log(0/q) = NaN or p·log(p/0) = inf:
    # with smoothing=0 these two samples, disjoint on 3 bins, would give a NaN weight.
    d_match, d_non = np.array([[0.1], [0.2]]), np.array([[1.5], [1.9]])
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        region_kl(d_match, d_non, bins=3, smoothing=smoothing)
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        histogram_densities(d_match[:, 0], d_non[:, 0], bins=3, smoothing=smoothing)
    # Half a count: bins [0.1, 0.7), [0.7, 1.3), [1.3, 1.9]; p = (2.5, .5, .5) / 3.5, q = (.5, .5, 2.5) / 3.5
    #   Σ p log(p/q) = (2.5 log 5 + 0.5 log 1 + 0.5 log(1/5)) / 3.5 = 2 log 5 / 3.5
    assert region_kl(d_match, d_non, bins=3, smoothing=0.5)[0] == pytest.approx(2 * math.log(5) / 3.5)


def test_non_finite_divergences_are_refused(monkeypatch):
    import remap_lib.training.klw as klw

    monkeypatch.setattr(klw, "kl_divergence", lambda p, q: float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        region_kl(np.array([[0.1, 0.2]]), np.array([[1.0, 1.5]]))


def test_sample_pairs():
    groups = [0, 0, 0, 1, 1, 2, 2, 2, -1]
    m, n = sample_pairs(groups, nonmatching_per_matching=2, seed=3)
    g = np.array(groups)
    assert sorted(map(tuple, m.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4), (5, 6), (5, 7), (6, 7)]
    assert len(n) == 14 and (g[n[:, 0]] != g[n[:, 1]]).all() and (n[:, 0] < n[:, 1]).all()
    assert len(set(map(tuple, n.tolist()))) == 14 and 8 not in n  # no repeats, ungrouped image unused
    m2, n2 = sample_pairs(groups, nonmatching_per_matching=2, seed=3)
    assert np.array_equal(m, m2) and np.array_equal(n, n2)
    assert not np.array_equal(n, sample_pairs(groups, nonmatching_per_matching=2, seed=4)[1])
    with pytest.raises(ValueError, match="matching pairs"):
        sample_pairs([0, 1, 2])


def test_pair_distances():
    regions = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    d = pair_distances(regions, np.array([[0, 1], [0, 2]]))
    assert np.allclose(d, [[math.sqrt(2), 0.0], [0.0, math.sqrt(2)]])


@pytest.fixture(scope="module")
def group_dataset(tmp_path_factory, photo_dir):
    """3 groups of 2 real photos: a photo and a shifted crop of it."""
    from PIL import Image

    root = tmp_path_factory.mktemp("groups")
    for name in ("chelsea", "coffee", "rocket"):
        (root / name).mkdir()
        img = Image.open(photo_dir / f"{name}.png")
        img.save(root / name / "a.png")
        img.crop((8, 4, img.width, img.height)).save(root / name / "b.png")
    return load_folder_groups(root)


def test_region_descriptors_are_the_heads_regions(group_dataset, lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2), backbone=lite0)
    regs = region_descriptors(model, group_dataset.images[:2], input_size=(128, 96), progress=False)
    assert set(regs) == {"head", "block15"} and regs["head"].shape == (2, 8, 1280)
    alpha = torch.linspace(0.5, 2, 8)
    model.set_region_weights({"head": alpha})
    from remap_lib.data.images import load_spec, to_tensor

    x = to_tensor(load_spec(group_dataset.images[0]).resize((128, 96), resample=2))[None]
    with torch.no_grad():
        stream_out = model.streams["head"](model.feature_maps(x)["head"])[0].numpy()
    assert np.allclose(stream_out, (alpha.numpy()[:, None] * regs["head"][0]).sum(0), atol=1e-5)


def test_region_descriptors_on_openvino_equal_torch(group_dataset, lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2), backbone=lite0)
    kw = dict(input_size=(128, 96), progress=False, batch_size=2)
    ov = region_descriptors(model, group_dataset.images[:3], engine="openvino", **kw)
    pt = region_descriptors(model, group_dataset.images[:3], engine="torch", **kw)
    for layer in ("head", "block15"):
        assert ov[layer].shape == pt[layer].shape == (3, 8, {"head": 1280, "block15": 320}[layer])
        assert np.abs(ov[layer] - pt[layer]).max() <= 1e-5
        assert not np.array_equal(ov[layer], pt[layer])  # two engines ran, not one twice


def test_estimate_is_deterministic_and_loads_into_a_model(tmp_path, group_dataset, lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2), backbone=lite0)
    kw = dict(input_size=(128, 96), nonmatching_per_matching=3, bins=10, progress=False)
    a = estimate_kl_weights(model, group_dataset, seed=0, **kw)
    b = estimate_kl_weights(model, group_dataset, seed=0, **kw)
    for layer in ("head", "block15"):
        assert a.weights[layer].shape == (8,) and (a.weights[layer] >= 0).all()
        assert np.array_equal(a.weights[layer], b.weights[layer])
    assert a.settings["matching_pairs"] == 3 and a.settings["nonmatching_pairs"] == 9
    a.save(tmp_path / "klw.json")
    loaded = KLWeights.load(tmp_path / "klw.json")
    loaded.apply(model)
    assert np.allclose(model.region_weights()["head"].numpy(), a.weights["head"])
    other = RetrievalModel(ModelConfig(head="remap", levels=3), backbone=lite0)
    with pytest.raises(ValueError, match="levels"):
        loaded.apply(other)
    (tmp_path / "bad.json").write_text('{"format": "remap-klw-v1", "model": {}, "settings": {}, '
                                       '"weights": {"head": [-1.0]}}')
    with pytest.raises(ValueError, match="non-negative"):
        KLWeights.load(tmp_path / "bad.json")


def test_estimate_refuses_smoothing_zero_before_describing_images(group_dataset, lite0, monkeypatch):
    import remap_lib.training.klw as klw

    def fail(*args, **kwargs):
        raise AssertionError("the backbone ran before the settings were checked")

    monkeypatch.setattr(klw, "region_descriptors", fail)
    model = RetrievalModel(ModelConfig(head="remap", levels=2), backbone=lite0)
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        estimate_kl_weights(model, group_dataset, smoothing=0, input_size=(128, 96), progress=False)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-1.0"])
def test_klw_file_with_non_finite_or_negative_weights_is_refused(tmp_path, bad):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "remap-klw-v1", "model": {}, "settings": {}, '
                    f'"weights": {{"head": [0.5, 1.0], "block15": [0.5, {bad}]}}}}')
    with pytest.raises(ValueError, match=r"bad\.json.*layer 'block15'.*finite and non-negative"):
        KLWeights.load(path)


def test_a_file_that_is_not_klw_json_is_named_as_such(tmp_path):
    """A checkpoint given as --klw gave "'utf-8' codec can't decode ..." without the file's name (issue 25)."""
    torch.save({"format": "remap-checkpoint-v1"}, tmp_path / "model.pt")
    (tmp_path / "cut.json").write_text('{"format": "remap-klw-v1", "weights": {')
    (tmp_path / "other.json").write_text('{"format": "remap-extraction-v2"}')
    for name, detail in (("model.pt", "binary, not JSON text"), ("cut.json", "invalid JSON at line 1"),
                         ("other.json", "")):
        with pytest.raises(ValueError) as err:
            KLWeights.load(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name} is not a KL-weights JSON file written by `remap klw`")
        assert detail in str(err.value) and "codec" not in str(err.value)


def test_klw_weights_that_are_not_finite_do_not_reach_the_model(lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2), backbone=lite0)
    klw = KLWeights({"head": np.full(8, np.nan, np.float32), "block15": np.ones(8, np.float32)},
                    model.config.to_dict(), {})
    with pytest.raises(ValueError, match="finite"):
        klw.apply(model)
    assert torch.equal(model.region_weights()["head"], torch.ones(8))  # untouched


def test_kl_weight_map_hand_computed():
    # levels=1 on the 24x32 reference: region 0 = x 0..24, region 1 = x 8..32 (full height)
    heat = kl_weight_map(np.array([1.0, 0.0]), levels=1, height=24, width=32)
    assert heat[0, 0] == 1.0  # only region 0
    assert heat[0, 16] == 0.5  # both: mean of 1 and 0
    assert heat[0, 30] == 0.0  # only region 1


def test_cli_klw(tmp_path, group_dataset, capsys):
    root = str(group_dataset.images[0].path).rsplit("/", 2)[0]
    out = tmp_path / "klw.json"
    code = main(["klw", "-d", root, "-o", str(out), "--levels", "2", "--input-size", "128x96", "--bins", "10",
                 "--nonmatching-ratio", "3", "-q", "--plots", str(tmp_path / "figs")])
    assert code == 0
    klw = KLWeights.load(out)
    assert set(klw.weights) == {"head", "block15"} and klw.settings["direction"] == "match_nonmatch"
    assert (tmp_path / "figs" / "kl_weights.png").exists() and (tmp_path / "figs" / "histograms_head.png").exists()
    assert "3 matching / 9 non-matching pairs" in capsys.readouterr().out
