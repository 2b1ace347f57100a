"""One backbone pass for many heads (remap_lib.describe.shared_pass): fewer CNN calls, the same descriptors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remap_lib.nets.backbones import build_backbone
from remap_lib.config import ModelConfig
from remap_lib.describe.extract import extract_descriptors
from remap_lib.data.images import ImageLoadError, ImageSpec
from remap_lib.describe.model import RetrievalModel
from remap_lib.describe.shared_pass import SharedBackbone, group_by_pass
from remap_lib.layers.whitening import learn_pca_whitening


@pytest.fixture(scope="module")
def random_lite0():
    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", weights="random")


@pytest.fixture
def specs(photo_dir):
    """Six photos of three shapes (128×128, 128×85, 128×86): batches of one shape, as in extraction."""
    return [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))]


def counting(backbone) -> list[int]:
    """A list whose one element counts the backbone's forward calls from now on."""
    calls = [0]
    backbone.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def heads(backbone, sizes=(96,), weights=(1.0,)) -> dict[str, RetrievalModel]:
    """Five heads, one whitened, on one backbone."""
    common = {"weights": "random", "image_sizes": list(sizes), "scale_weights": list(weights)}
    models = {h: RetrievalModel(ModelConfig(head=h, levels=2, **common), backbone)
              for h in ("mac", "spoc", "gem", "rmac")}
    models["remap"] = RetrievalModel(ModelConfig(head="remap", layers=[1, 2], levels=3, **common), backbone)
    rng = np.random.default_rng(0)
    models["gem"].set_whitening(learn_pca_whitening(rng.normal(size=(60, 1280)).astype(np.float32), 16))
    return models


def test_group_by_pass_splits_by_weights_and_input_sizes(random_lite0):
    other = build_backbone("efficientnet_lite0", weights="random")  # other random weights
    a = RetrievalModel(ModelConfig(head="mac", weights="random", image_sizes=[96]), random_lite0)
    b = RetrievalModel(ModelConfig(head="remap", levels=3, weights="random", image_sizes=[96]), random_lite0)
    c = RetrievalModel(ModelConfig(head="gem", weights="random", image_sizes=[96, 120], scale_weights=[1, 1]),
                       random_lite0)
    d = RetrievalModel(ModelConfig(head="mac", weights="random", image_sizes=[96]), other)
    e = RetrievalModel(ModelConfig(head="spoc", weights="random", image_sizes=[96], upscale=True), random_lite0)
    groups = group_by_pass({"a": a, "b": b, "c": c, "d": d, "e": e})
    assert [list(g) for g in groups] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_five_heads_one_pass_equal_extraction_multiscale(random_lite0, specs):
    models = heads(random_lite0, sizes=(96, 120), weights=(2.0, 1.4))
    calls = counting(random_lite0)
    shared = SharedBackbone(random_lite0, "cpu", engine="torch")
    got = shared.describe(specs, models)
    one_pass = calls[0]
    # in file order: astronaut (96×96 / 120×120), chelsea and coffee (96×64 / 120×80), the motorcycles
    # (96×64 / 120×81), rocket (96×64 / 120×80): 4 batches of one shape, each through the backbone at 2 sizes
    assert one_pass == 8
    for name, model in models.items():
        calls[0] = 0
        direct = extract_descriptors(model, specs, device="cpu", engine="torch", progress=False).descriptors
        assert calls[0] == one_pass  # the per-method path pays the whole pass for every head
        assert got[name].shape == direct.shape == (6, model.output_dim)
        np.testing.assert_allclose(got[name], direct, atol=1e-6)


def test_pool_gives_each_size_before_whitening(random_lite0, specs):
    models = heads(random_lite0)
    shared = SharedBackbone(random_lite0, "cpu", engine="torch")
    pooled = shared.pool(specs[:2], {"gem": models["gem"]}, [96, 120])["gem"]
    assert pooled.shape == (2, 2, 1280)
    with torch.no_grad():
        from remap_lib.describe.extract import _ImageDataset

        for i in range(2):
            _, per_size = _ImageDataset(specs, [96, 120], False, 10**8)[i]
            for s, x in enumerate(per_size):
                np.testing.assert_allclose(pooled[s, i], models["gem"].pool(x[None])[0].numpy(), atol=1e-6)


def test_pool_dataset_without_a_cache_folder(random_lite0, specs):
    """No cache folder (a fine-tuned backbone, as benchmarks/finetune_landmarks.py scores it): pooled, not cached."""
    from remap_lib.data.datasets import RetrievalDataset

    ds = RetrievalDataset("six", specs, specs[:2], {"map": [{"ok": [0], "junk": []}, {"ok": [1], "junk": []}]})
    model = heads(random_lite0)["gem"]
    shared = SharedBackbone(random_lite0, "cpu", engine="torch")  # cache_dir None
    db, q = shared.pool_dataset(ds, {"gem": model}, [96], cache=True, progress=False)["gem"]
    assert db.shape == (1, 6, 1280) and q.shape == (1, 2, 1280)
    np.testing.assert_allclose(q[0], db[0, :2], atol=1e-6)  # the queries are the first two images
    np.testing.assert_allclose(db[0], shared.pool(specs, {"gem": model}, [96])["gem"][0], atol=1e-6)


def test_one_pass_serves_one_set_of_input_sizes(random_lite0, specs):
    a = RetrievalModel(ModelConfig(head="mac", weights="random", image_sizes=[96]), random_lite0)
    b = RetrievalModel(ModelConfig(head="mac", weights="random", image_sizes=[128]), random_lite0)
    with pytest.raises(ValueError, match="group_by_pass"):
        SharedBackbone(random_lite0, "cpu", engine="torch").describe(specs, {"a": a, "b": b})


def test_an_unreadable_image_stops_the_pass_naming_it(random_lite0, specs, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    model = RetrievalModel(ModelConfig(head="mac", weights="random", image_sizes=[96]), random_lite0)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        SharedBackbone(random_lite0, "cpu", engine="torch").describe(specs[:2] + [ImageSpec(str(bad))], {"m": model})


@pytest.mark.parametrize("max_bytes", [1 << 30, 0], ids=["in memory", "on disk"])
def test_kept_maps_pool_like_extraction_without_the_backbone(random_lite0, specs, max_bytes):
    shared = SharedBackbone(random_lite0, "cpu", engine="torch")
    maps = shared.keep_maps(specs, [96], [1, 2], max_bytes=max_bytes)
    assert (maps.nbytes_on_disk == maps.nbytes) == (max_bytes == 0)
    folder = maps.folder
    if max_bytes == 0:
        # at 96 px: astronaut (96×96), then five 96×64 photos -> 2 batches × 2 layers, memory-mapped
        assert len(list(folder.glob("*.npy"))) == 2 * 2
    calls = counting(random_lite0)
    models = heads(random_lite0)
    for name, model in models.items():
        direct = extract_descriptors(model, specs, device="cpu", engine="torch", progress=False).descriptors
        calls[0] = 0
        np.testing.assert_allclose(maps.describe(model), direct, atol=1e-6)
        assert calls[0] == 0
    with pytest.raises(ValueError, match="image_sizes|at \\[96\\] px"):
        maps.describe(RetrievalModel(ModelConfig(head="mac", weights="random", image_sizes=[128]), random_lite0))
    with pytest.raises(ValueError, match="were not kept"):
        maps.describe(RetrievalModel(ModelConfig(head="mac", layers=[3], weights="random", image_sizes=[96]),
                                     random_lite0))
    del maps
    if folder is not None:
        assert not folder.exists()  # the temporary folder goes with the maps


def test_openvino_pass_over_the_union_of_layers_matches_torch(random_lite0, specs):
    pytest.importorskip("openvino")
    models = {"rmac": RetrievalModel(ModelConfig(head="rmac", levels=2, weights="random", image_sizes=[96]),
                                     random_lite0),
              "remap": RetrievalModel(ModelConfig(head="remap", layers=[1, 2], levels=2, weights="random",
                                                  image_sizes=[96]), random_lite0)}
    ov = SharedBackbone(random_lite0, "cpu", engine="openvino").describe(specs[:3], models)
    ref = SharedBackbone(random_lite0, "cpu", engine="torch").describe(specs[:3], models)
    for name in models:
        np.testing.assert_allclose(ov[name], ref[name], atol=1e-5)
