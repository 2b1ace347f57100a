"""The query browser with fine-tuned rows (``QueryBrowser(..., checkpoints={...})``).

A checkpoint here is a :class:`RetrievalModel` saved by the test: EfficientNet-Lite0
with its ImageNet weights moved by ~20 % (so its maps differ from the ImageNet
pass), S = 3 region weights α that are not uniform, and a whitening FC; the REMAP one
also has layer weights.  The browser must describe it exactly as
:func:`remap_lib.evaluation.evaluate.describe` describes the loaded file, and the widgets must
leave it alone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from remap_lib.app.browser import QueryBrowser
from remap_lib.config import ModelConfig
from remap_lib.data.datasets import RetrievalDataset
from remap_lib.evaluation.evaluate import describe
from remap_lib.data.images import ImageSpec
from remap_lib.evaluation.metrics import rank_database
from remap_lib.describe.model import RetrievalModel
from remap_lib.layers.pooling import region_count
from remap_lib.layers.whitening import PCAWhitening

SIZE = 96
TOP_K = 6  # the whole database: the full ranking is compared


@pytest.fixture(scope="module")
def dataset(photo_dir):
    photos = [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))]
    queries = [ImageSpec(photos[1].path, box=(10, 5, 110, 80)), photos[4], ImageSpec(photos[0].path, box=(0, 0, 90, 90))]
    gnd = {"map": [{"ok": [1], "junk": []}, {"ok": [3], "junk": [4]}, {"ok": [0], "junk": []}]}
    return RetrievalDataset("photos", photos, queries, gnd)


def trained_model(imagenet, head: str, perturb: bool = True, seed: int = 1) -> RetrievalModel:
    """A stand-in for a fine-tuned model: perturbed backbone, non-uniform α, a whitening FC (and layer weights)."""
    gen = torch.Generator().manual_seed(seed)
    backbone = copy.deepcopy(imagenet)
    if perturb:
        with torch.no_grad():
            for p in backbone.parameters():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    remap = head == "remap"
    model = RetrievalModel(ModelConfig(head=head, layers=[1, 2] if remap else [1], levels=3, image_sizes=[SIZE],
                                       layer_weights="ones" if remap else "none"), backbone)
    if remap:
        n = region_count(3)
        model.set_region_weights({layer: torch.rand(n, generator=gen) * 2 for layer in model.layers})
        model.set_layer_weights([0.6, 1.4])
    rng = np.random.default_rng(seed)
    d = model.pooled_dim
    model.set_whitening(PCAWhitening(mean=rng.normal(0, 0.01, d), projection=rng.normal(0, d ** -0.5, (32, d)),
                                     eigenvalues=np.ones(32)))
    return model


@pytest.fixture(scope="module")
def batches(dataset, lite0):
    """Forward calls of one backbone pass over the dataset (one batch per run of images of one shape)."""
    from remap_lib.describe.shared_pass import SharedBackbone

    net = copy.deepcopy(lite0)
    calls, handle = count_passes(net)
    SharedBackbone(net, "cpu", "torch").keep_maps(dataset.images + dataset.queries, [SIZE], [1, 2])
    handle.remove()
    assert calls[0] >= 3
    return calls[0]


def count_passes(module):
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def reference(model: RetrievalModel, ds) -> tuple[np.ndarray, np.ndarray]:
    return describe(model, ds, None, "cpu", progress=False, engine="torch")


@pytest.mark.parametrize("head", ["rmac", "remap"])
def test_a_fine_tuned_row_ranks_as_its_checkpoint_describes(head, dataset, lite0, batches, tmp_path):
    path = tmp_path / "model.pt"
    trained_model(lite0, head).save(path)
    imagenet = copy.deepcopy(lite0)
    calls, handle = count_passes(imagenet)
    try:
        browser = QueryBrowser(dataset, image_size=SIZE, top_k=TOP_K, backbone=imagenet, engine="torch",
                               device="cpu", checkpoints={head: str(path), "rmac" if head == "remap" else "remap": None})
    finally:
        handle.remove()
    assert calls[0] == batches  # one ImageNet pass, for the other row
    other = "rmac" if head == "remap" else "remap"
    assert browser.head_maps[head] is not browser.head_maps[other]  # its own backbone, its own maps

    loaded = RetrievalModel.load(path)
    db, q = reference(loaded, dataset)
    shown_db, shown_q, shown_map = browser.descriptors(head)
    np.testing.assert_allclose(shown_db, db, atol=1e-5)
    np.testing.assert_allclose(shown_q, q, atol=1e-5)
    assert shown_db.shape == (6, 32)  # its whitening FC
    for i in range(len(dataset.queries)):
        browser.select(i)
        expected = rank_database(q[i:i + 1], db, TOP_K)[0].tolist()
        assert browser.ranking(head) == expected
        assert f"{head}:{','.join(map(str, expected))}" in browser.output.value

    # the checkpoint's backbone matters: with the ImageNet backbone under the same head, other descriptors
    loaded.backbone.load_state_dict(lite0.state_dict())
    assert np.abs(reference(loaded, dataset)[0] - db).max() > 0.05
    label = browser.label(head)
    assert label.startswith(("R-MAC fine-tuned" if head == "rmac" else "REMAP fine-tuned")) and "S = 3" in label
    assert label in browser.output.value
    assert browser.model(other).config.levels == 4  # the other row is still the widgets'


def test_widgets_move_the_imagenet_row_but_not_the_fine_tuned_one(dataset, lite0):
    model = trained_model(lite0, "remap")
    imagenet = copy.deepcopy(lite0)
    browser = QueryBrowser(dataset, image_size=SIZE, top_k=TOP_K, backbone=imagenet, engine="torch", device="cpu",
                           checkpoints={"remap": model})
    assert (browser.scales_slider.disabled, browser.layers_toggle.disabled) == (False, True)

    def shown():
        out = {}
        for i in range(len(dataset.queries)):
            browser.select(i)
            out[i] = {h: browser.ranking(h) for h in ("rmac", "remap")}
        return out, {h: browser.descriptors(h)[0].copy() for h in ("rmac", "remap")}

    rankings4, desc4 = shown()
    calls = [count_passes(imagenet), count_passes(model.backbone)]
    try:
        browser.scales_slider.value = 5  # as a person moving the slider would
        rankings5, desc5 = shown()
        browser._set(layers="1")
        rankings_l1, desc_l1 = shown()
    finally:
        for _, handle in calls:
            handle.remove()
    assert [c[0] for c, _ in calls] == [0, 0]  # re-pooled, no backbone
    assert browser.scales == 5 and 'data-scales="5"' in browser.output.value
    # the ImageNet R-MAC row follows the slider: S = 5 is another descriptor (and equals describe's)
    assert not np.allclose(desc5["rmac"], desc4["rmac"], atol=1e-3)
    np.testing.assert_allclose(desc5["rmac"], reference(browser.model("rmac"), dataset)[0], atol=1e-5)
    assert browser.model("rmac").config.levels == 5
    # the fine-tuned REMAP row does not move: same descriptors, same rankings, for every query
    np.testing.assert_array_equal(desc5["remap"], desc4["remap"])
    np.testing.assert_array_equal(desc_l1["remap"], desc4["remap"])
    assert [r["remap"] for r in rankings5.values()] == [r["remap"] for r in rankings4.values()]
    assert [r["remap"] for r in rankings_l1.values()] == [r["remap"] for r in rankings4.values()]
    assert browser.model("remap").config.levels == 3 and browser.model("remap").layers == model.layers
    assert set(browser.cache) == {("remap", "fine-tuned"), ("rmac", 4, (1,), "uniform"), ("rmac", 5, (1,), "uniform")}


def test_one_pass_per_distinct_backbone(dataset, lite0, batches, tmp_path):
    """A model trained with a frozen backbone (only α and the FC learned) shares the ImageNet pass."""
    frozen = trained_model(lite0, "remap", perturb=False)  # the ImageNet weights, in another object
    imagenet = copy.deepcopy(lite0)
    calls = [count_passes(imagenet), count_passes(frozen.backbone)]
    try:
        browser = QueryBrowser(dataset, image_size=SIZE, backbone=imagenet, engine="torch", device="cpu",
                               checkpoints={"remap": frozen})
    finally:
        for _, handle in calls:
            handle.remove()
    assert [c[0] for c, _ in calls] == [batches, 0]
    assert browser.head_maps["remap"] is browser.head_maps["rmac"] is browser.maps
    np.testing.assert_allclose(browser.descriptors("remap")[0], reference(frozen, dataset)[0], atol=1e-5)

    # both rows fine-tuned: no ImageNet backbone at all, and no widget acts on anything
    path = tmp_path / "rmac.pt"
    trained_model(lite0, "rmac", seed=2).save(path)
    both = QueryBrowser(dataset, image_size=SIZE, engine="torch", device="cpu",
                        checkpoints={"rmac": path, "remap": frozen})
    assert both.backbone is None and both.maps is None
    assert both.scales_slider.disabled and both.layers_toggle.disabled and both.weighting_toggle.disabled
    np.testing.assert_allclose(both.descriptors("rmac")[0], reference(RetrievalModel.load(path), dataset)[0],
                               atol=1e-5)


def test_a_checkpoint_trained_at_another_size_is_shown_at_the_browser_size(dataset, lite0, tmp_path):
    path = tmp_path / "model.pt"
    model = trained_model(lite0, "rmac")
    model.config.image_sizes = [128]
    model.save(path)
    browser = QueryBrowser(dataset, image_size=SIZE, backbone=copy.deepcopy(lite0), engine="torch", device="cpu",
                           checkpoints={"rmac": path})
    assert browser.model("rmac").config.image_sizes == [SIZE]
    assert "trained at 128 px" in browser.label("rmac")
    at_size = RetrievalModel.load(path)
    at_size.config.image_sizes = [SIZE]
    np.testing.assert_allclose(browser.descriptors("rmac")[0], reference(at_size, dataset)[0], atol=1e-5)


def test_bad_checkpoints_are_refused_before_any_backbone_pass(dataset, lite0, tmp_path, monkeypatch):
    from remap_lib.app import browser as browser_module

    def no_pass(*_a, **_k):
        raise AssertionError("a backbone pass ran before the checkpoints were checked")

    monkeypatch.setattr(browser_module.SharedBackbone, "keep_maps", no_pass)
    build = lambda checkpoints: QueryBrowser(dataset, image_size=SIZE, backbone=lite0, engine="torch",
                                             device="cpu", checkpoints=checkpoints)
    with pytest.raises(FileNotFoundError, match=r"R-MAC checkpoint .*nowhere\.pt: no such file.*remap train"):
        build({"rmac": tmp_path / "nowhere.pt"})
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(ValueError, match=r"REMAP checkpoint: cannot read checkpoint .*garbage\.pt"):
        build({"remap": tmp_path / "garbage.pt"})
    torch.save({"format": "remap-train-state", "step": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"REMAP checkpoint: .*is not a remap checkpoint.*model\.pt"):
        build({"remap": tmp_path / "checkpoint.pt"})
    trained_model(lite0, "remap", perturb=False).save(tmp_path / "remap.pt")
    with pytest.raises(ValueError, match=r"the R-MAC row shows a rmac model; this checkpoint has a remap head"):
        build({"rmac": tmp_path / "remap.pt"})
    with pytest.raises(ValueError, match=r"no 'gem' row"):
        build({"gem": tmp_path / "remap.pt"})
    unlearned = RetrievalModel(ModelConfig(head="rmac", whitening=True, image_sizes=[SIZE]), lite0)
    with pytest.raises(ValueError, match=r"R-MAC checkpoint: its whitening layer was never learned"):
        build({"rmac": unlearned})


def proposal_model(imagenet, seed: int = 3) -> RetrievalModel:
    """A ``regions: rpn`` model over the ImageNet backbone with a (random) RPN marked trained, as train-rpn saves."""
    torch.manual_seed(seed)
    model = RetrievalModel(ModelConfig(head="rmac", regions="rpn", proposals=8, image_sizes=[SIZE], rpn_width=16,
                                       rpn_anchor_sizes=[1, 2, 4]), copy.deepcopy(imagenet))
    model.streams[model.layers[0]].rpn.trained.fill_(True)
    return model


def test_a_proposals_model_is_a_third_row_with_its_own_k(dataset, lite0, batches, tmp_path):
    path = tmp_path / "rpn.pt"
    proposal_model(lite0).save(path)
    imagenet = copy.deepcopy(lite0)
    calls, handle = count_passes(imagenet)
    try:
        browser = QueryBrowser(dataset, image_size=SIZE, top_k=TOP_K, backbone=imagenet, engine="torch",
                               device="cpu", checkpoints={"rpn": str(path)})
    finally:
        handle.remove()
    assert calls[0] == batches  # its backbone is the ImageNet one (train-rpn keeps it frozen): one shared pass
    assert browser.rows == ["rmac", "remap", "rpn"] and browser.head_maps["rpn"] is browser.maps
    assert browser.proposals == 8 and not browser.proposals_dropdown.disabled
    assert browser.proposals_dropdown in browser.widget.children[1].children

    loaded = RetrievalModel.load(path)
    db8, q8 = reference(loaded, dataset)
    np.testing.assert_allclose(browser.descriptors("rpn")[0], db8, atol=1e-5)
    for i in range(len(dataset.queries)):
        browser.select(i)
        expected = rank_database(q8[i:i + 1], db8, TOP_K)[0].tolist()
        assert f"rpn:{','.join(map(str, expected))}" in browser.output.value
    assert "R-MAC over learned proposals (RPN, top 8 proposals, layer 1)" in browser.output.value

    browser.proposals_dropdown.value = 16  # as a person would pick it: pooled again from the kept maps
    browser.set_proposals(1)
    loaded.set_proposal_count(1)
    db1, _ = reference(loaded, dataset)
    np.testing.assert_allclose(browser.descriptors("rpn")[0], db1, atol=1e-5)
    assert np.abs(db1 - db8).max() > 1e-3  # k matters
    assert "top 1 proposals" in browser.output.value
    # the scales slider moves the grid R-MAC row only
    before = browser.descriptors("rpn")[0].copy()
    browser.scales_slider.value = 3
    np.testing.assert_array_equal(browser.descriptors("rpn")[0], before)
    assert {k for k in browser.cache if k[0] == "rpn"} == {("rpn", "fine-tuned", 8), ("rpn", "fine-tuned", 16),
                                                           ("rpn", "fine-tuned", 1)}


def test_proposals_models_go_to_the_third_row_only(dataset, lite0, tmp_path, monkeypatch):
    from remap_lib.app import browser as browser_module

    monkeypatch.setattr(browser_module.SharedBackbone, "keep_maps",
                        lambda *_a, **_k: pytest.fail("a backbone pass ran before the checkpoints were checked"))
    build = lambda checkpoints: QueryBrowser(dataset, image_size=SIZE, backbone=lite0, engine="torch",
                                             device="cpu", checkpoints=checkpoints)
    proposal_model(lite0).save(tmp_path / "rpn.pt")
    with pytest.raises(ValueError, match=r"R-MAC row shows the grid; .*learned proposals.*checkpoints=\{'rpn'"):
        build({"rmac": tmp_path / "rpn.pt"})
    trained_model(lite0, "rmac", perturb=False).save(tmp_path / "grid.pt")
    with pytest.raises(ValueError, match=r"learned proposals row shows a regions: rpn model.*give it to the R-MAC row"):
        build({"rpn": tmp_path / "grid.pt"})
    untrained = proposal_model(lite0)
    untrained.streams[untrained.layers[0]].rpn.trained.fill_(False)
    with pytest.raises(ValueError, match=r"region proposal network was never trained.*remap train-rpn"):
        build({"rpn": untrained})
    with pytest.raises(FileNotFoundError, match=r"learned proposals checkpoint .*: no such file.*remap train-rpn"):
        build({"rpn": tmp_path / "nowhere.pt"})
