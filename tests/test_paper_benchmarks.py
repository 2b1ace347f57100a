"""The helpers behind benchmarks/paper_*.py: one backbone pass for many heads must change no number."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _paper import (Bench, SharedBackbone, combine_scales, disjoint_whitening, held_out_ukbench,  # noqa: E402
                    scores_row)
from remap_lib.nets.backbones import build_backbone  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.data.datasets import RetrievalDataset  # noqa: E402
from remap_lib.evaluation.evaluate import describe  # noqa: E402
from remap_lib.data.images import ImageSpec  # noqa: E402
from remap_lib.describe.model import RetrievalModel  # noqa: E402
from remap_lib.layers.whitening import learn_pca_whitening  # noqa: E402


@pytest.fixture(scope="module")
def random_lite0():
    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", weights="random")


def test_pool_maps_on_computed_maps_equals_pool(random_lite0):
    model = RetrievalModel(ModelConfig(head="remap", layers=[1, 2], levels=3), random_lite0)
    x = torch.rand(2, 3, 96, 128)
    with torch.inference_mode():
        assert torch.equal(model.pool_maps(model.feature_maps(x)), model.pool(x))


def test_combine_scales_with_whitening_equals_the_models_eq_3(random_lite0):
    torch.manual_seed(1)
    model = RetrievalModel(ModelConfig(head="rmac", levels=2, whitening=True, dim=8,
                                       image_sizes=[128, 160], scale_weights=[2.0, 1.4]), random_lite0)
    pooled_train = np.random.default_rng(0).normal(size=(40, model.pooled_dim)).astype(np.float32)
    w = learn_pca_whitening(pooled_train, 8)
    model.set_whitening(w)
    xs = [torch.rand(3, 3, 96, 128), torch.rand(3, 3, 120, 160)]
    with torch.inference_mode():
        expected = model.multiscale(xs).numpy()
        per_scale = np.stack([model.pool(x).numpy() for x in xs])
    np.testing.assert_allclose(combine_scales(per_scale, (2.0, 1.4), w), expected, atol=1e-5)


def test_disjoint_whitening_is_learned_on_the_other_datasets_only():
    rng = np.random.default_rng(0)
    raw = {"a": rng.normal(5.0, 1, (30, 6)), "b": rng.normal(-1.0, 1, (20, 6)), "c": rng.normal(2.0, 1, (25, 6))}
    w = disjoint_whitening(raw, "a", dim=4)
    np.testing.assert_allclose(w.mean, np.concatenate([raw["b"], raw["c"]]).mean(0), atol=1e-6)
    assert w.projection.shape == (4, 6)
    assert disjoint_whitening({"a": raw["a"]}, "a", 4) is None


def test_scores_row_hand_computed():
    specs = [ImageSpec(f"/x/{i}.jpg") for i in range(4)]
    ds = RetrievalDataset("toy", specs, specs[:1], {"map": [{"ok": [1, 3], "junk": []}]})
    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.5, 0.3]], dtype=np.float32)  # ranking 1, 2, 3, 0: positives at ranks 1 and 3
    row, aps = scores_row(Bench("toy", ds, 64, "folder"), db, q)
    # revisitop's trapezoidal AP: rank 1 → (1 + 1)/2 · ½, rank 3 → (1/2 + 2/3)/2 · ½
    expected = 100 * ((1 + 1) / 2 * 0.5 + (1 / 2 + 2 / 3) / 2 * 0.5)
    assert row == {"toy mAP": round(expected, 2)}
    assert aps == {"toy mAP": [round(expected, 1)]}


def test_shared_pass_equals_describe_for_several_heads(photo_dir, random_lite0, tmp_path):
    specs = [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))[:3]]
    ds = RetrievalDataset("photos", specs, specs, {"map": [{"ok": [i], "junk": []} for i in range(3)]})
    shared = SharedBackbone("efficientnet_lite0", "random", tmp_path, torch.device("cpu"), built=random_lite0,
                            engine="torch")
    configs = {"gem": ModelConfig(head="gem", weights="random"),
               "remap": ModelConfig(head="remap", layers=[1, 2], levels=3, weights="random")}
    got = shared.describe_many(Bench("photos", ds, 160, "folder"), {k: shared.model(c) for k, c in configs.items()},
                               [160])
    for name, cfg in configs.items():
        direct, _ = describe(RetrievalModel(ModelConfig.from_dict({**cfg.to_dict(), "image_sizes": [160]}),
                                            random_lite0), ds, None, "cpu", progress=False, engine="torch")
        np.testing.assert_allclose(combine_scales(got[name][0]), direct, atol=1e-5)
    # second call: read back from the cache, identical
    again = shared.describe_many(Bench("photos", ds, 160, "folder"), {"gem": shared.model(configs["gem"])}, [160])
    np.testing.assert_array_equal(again["gem"][0], got["gem"][0])


def test_cache_keeps_heads_with_one_config_and_different_alpha_apart(photo_dir, random_lite0, tmp_path):
    specs = [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))[:2]]
    ds = RetrievalDataset("photos", specs, specs, {"map": [{"ok": [i], "junk": []} for i in range(2)]})
    shared = SharedBackbone("efficientnet_lite0", "random", tmp_path, torch.device("cpu"), built=random_lite0,
                            engine="torch")
    cfg = ModelConfig(head="remap", layers=[1], levels=2, weights="random")
    ones, weighted = shared.model(cfg), shared.model(cfg)
    alpha = torch.linspace(0.1, 2.0, len(weighted.region_weights()[weighted.layers[0]]))
    weighted.set_region_weights({weighted.layers[0]: alpha})
    bench = Bench("photos", ds, 128, "folder")
    first = shared.describe_many(bench, {"ones": ones}, [128])["ones"][0]
    got = shared.describe_many(bench, {"ones": ones, "weighted": weighted}, [128])  # "ones" from the cache
    np.testing.assert_array_equal(got["ones"][0], first)
    direct, _ = describe(RetrievalModel(ModelConfig.from_dict({**cfg.to_dict(), "image_sizes": [128]}),
                                        random_lite0), ds, None, "cpu", progress=False, engine="torch")
    assert not np.allclose(got["weighted"][0][0], got["ones"][0][0])
    np.testing.assert_allclose(got["ones"][0][0], direct, atol=1e-5)


def _fake_ukbench(objects: int) -> Bench:
    specs = [ImageSpec(f"/ukbench/ukbench{i:05d}.jpg") for i in range(4 * objects)]
    groups = [i // 4 for i in range(len(specs))]
    gnd = [{"ok": [j for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i], "junk": [i]} for i in range(len(specs))]
    ds = RetrievalDataset("ukbench", specs, list(specs), {"map": gnd}, groups)
    return Bench("ukbench", ds, 320, "ukbench")


def test_held_out_ukbench_refuses_a_dataset_too_small_for_its_split():
    with pytest.raises(ValueError, match=r"ukbench has 100 objects.*objects 0-99.*needs at least 101"):
        held_out_ukbench(_fake_ukbench(100))
    with pytest.raises(ValueError, match=r"scoring on objects 50-119 needs at least 120"):
        held_out_ukbench(_fake_ukbench(100), "0-49", "50-119")
    with pytest.raises(ValueError, match="overlap"):
        held_out_ukbench(_fake_ukbench(100), "0-49", "40-59")


def test_held_out_ukbench_takes_the_split_as_an_option():
    train, test = held_out_ukbench(_fake_ukbench(100), "0-49")
    assert len(train.images) == 200 and len(test.dataset.images) == 200 and test.name == "ukbench-test"
    assert train.images[0].path.endswith("ukbench00000.jpg")
    assert test.dataset.images[0].path.endswith("ukbench00200.jpg")  # object 50
    train, test = held_out_ukbench(_fake_ukbench(150))  # the default: 0-99 train, 100-149 scored
    assert (len(train.images), len(test.dataset.images)) == (400, 200)
    train, test = held_out_ukbench(_fake_ukbench(100), range(10), range(90, 100))
    assert (len(train.images), len(test.dataset.images)) == (40, 40)
