"""The descriptor network (remap_lib.describe.model): heads, whitening FC, gradients, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remap_lib.layers import functional as RF
from remap_lib.nets.backbones import build_backbone
from remap_lib.config import HEADS, PAPER_MULTISCALE, ModelConfig
from remap_lib.describe.model import RetrievalModel, WhiteningNotLearnedError
from remap_lib.layers.whitening import learn_pca_whitening


@pytest.fixture()
def random_lite0():
    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", weights="random")


@pytest.mark.parametrize("head", HEADS)
def test_every_head_gives_unit_rows_of_the_right_dimension(head, lite0):
    model = RetrievalModel(ModelConfig(head=head), backbone=lite0)
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        d = model(x)
    assert d.shape == (2, 1600 if head == "remap" else 1280)
    assert torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)


def test_remap_is_the_concatenation_of_weighted_streams(lite0):
    model = RetrievalModel(ModelConfig(head="remap", layers=[1, 2], levels=3), backbone=lite0)
    assert model.layers == ["head", "block15"]
    x = torch.rand(1, 3, 768, 1024)
    with torch.no_grad():
        maps = lite0(x, ["head", "block15"])
        expected = []
        for k in ("head", "block15"):
            regions = RF.l2n(RF.roi_max_pool(maps[k], RF.rmac_regions(24, 32, 3)))
            expected.append(regions.sum(1))
        expected = RF.l2n(torch.cat(expected, 1))  # alpha = 1: plain sums, no per-stream L2
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_whitening_fc_equals_pca_whitening(random_lite0):
    model = RetrievalModel(ModelConfig(head="rmac", levels=2), backbone=random_lite0)
    torch.manual_seed(1)
    x = torch.rand(40, 3, 64, 64)
    with torch.no_grad():
        pooled = model.pool(x).numpy()
    w = learn_pca_whitening(pooled, dim=16)
    model.set_whitening(w)
    assert model.output_dim == 16 and model.config.dim == 16 and model.config.whitening
    with torch.no_grad():
        d = model(x).numpy()
    assert np.allclose(d, w.apply(pooled), atol=1e-4)


def test_unlearned_whitening_is_refused(random_lite0):
    model = RetrievalModel(ModelConfig(head="mac", whitening=True, dim=8), backbone=random_lite0)
    with pytest.raises(WhiteningNotLearnedError):
        model(torch.rand(1, 3, 64, 64))


def test_gradients_reach_backbone_alpha_and_fc(random_lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2), backbone=random_lite0)
    torch.manual_seed(2)
    with torch.no_grad():
        pooled = model.pool(torch.rand(30, 3, 64, 64)).numpy()
    model.set_whitening(learn_pca_whitening(pooled, dim=8))
    model.train()
    d = model(torch.rand(2, 3, 64, 64))
    (d[0] @ d[1]).backward()
    conv = model.backbone.stages["block3"]._depthwise_conv.weight
    for name, p in [("backbone conv", conv), ("alpha head", model.streams["head"].alpha.raw),
                    ("alpha block15", model.streams["block15"].alpha.raw), ("fc", model.whiten.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_multiscale_is_the_weighted_sum_of_eq_3(lite0):
    model = RetrievalModel(ModelConfig(head="rmac", **PAPER_MULTISCALE), backbone=lite0)
    a, b = torch.rand(1, 3, 96, 128), torch.rand(1, 3, 120, 160)
    with torch.no_grad():
        expected = RF.l2n(2.0 * model(a) + 1.4 * model(b))
        assert torch.allclose(model.multiscale([a, b]), expected, atol=1e-6)


def test_checkpoint_round_trip(tmp_path, random_lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2, weights="random"), backbone=random_lite0)
    with torch.no_grad():
        model.set_region_weights({"head": torch.linspace(0, 1, 8)})
        pooled = model.pool(torch.rand(20, 3, 64, 64)).numpy()
    model.set_whitening(learn_pca_whitening(pooled, dim=10))
    model.save(tmp_path / "m.pt")
    loaded = RetrievalModel.load(tmp_path / "m.pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config
    assert torch.equal(loaded.region_weights()["head"], torch.linspace(0, 1, 8))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        RetrievalModel.load(tmp_path / "bad.pt")


def test_set_region_weights_refuses_non_finite_or_negative(random_lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2, weights="random"), backbone=random_lite0)
    for bad in (float("nan"), float("inf"), -1.0):
        alpha = torch.ones(8)
        alpha[3] = bad
        with pytest.raises(ValueError, match="layer head: need 8 finite, non-negative weights"):
            model.set_region_weights({"head": alpha})
    assert torch.equal(model.region_weights()["head"], torch.ones(8))  # untouched
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_checkpoint_with_non_finite_tensor_is_refused(tmp_path, random_lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2, weights="random"), backbone=random_lite0)
    with torch.no_grad():
        pooled = model.pool(torch.rand(20, 3, 64, 64)).numpy()
    model.set_whitening(learn_pca_whitening(pooled, dim=10))
    model.save(tmp_path / "m.pt")
    for name, bad in [("streams.head.alpha.raw", float("nan")),
                      ("backbone.stages.block3._depthwise_conv.weight", float("inf")),
                      ("whiten.bias", float("-inf"))]:
        blob = torch.load(tmp_path / "m.pt", weights_only=True)
        blob["state_dict"][name].view(-1)[1] = bad
        torch.save(blob, tmp_path / "broken.pt")
        with pytest.raises(ValueError, match=rf"broken\.pt.*{name.replace('.', '[.]')}.*1 NaN or infinite"):
            RetrievalModel.load(tmp_path / "broken.pt")
    RetrievalModel.load(tmp_path / "m.pt")  # the intact file still loads


def test_config_round_trip_and_digest(tmp_path):
    c = ModelConfig(head="gem", levels=3, image_sizes=[512])
    for name in ("c.yaml", "c.json"):
        c.save(tmp_path / name)
        assert ModelConfig.load(tmp_path / name) == c
    assert c.digest() != ModelConfig(head="gem", levels=3, image_sizes=[1024]).digest()
    assert ModelConfig().layers == [1, 2] and ModelConfig(head="mac").layers == [1]
    with pytest.raises(ValueError, match="unknown head"):
        ModelConfig(head="vlad")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"hed": "mac"})


def test_a_checkpoint_that_is_not_plain_data_is_refused_in_one_line_without_unsafe_advice(tmp_path):
    """torch's own text advises re-running with weights_only=False (running the file's code): never passed on."""
    import argparse

    torch.save({"format": "remap-checkpoint-v1", "args": argparse.Namespace(a=1)}, tmp_path / "object.pt")
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    for name in ("object.pt", "truncated.pt"):
        with pytest.raises(ValueError) as err:
            RetrievalModel.load(tmp_path / name)
        message = str(err.value)
        assert name in message and "not a remap checkpoint, or a damaged one" in message
        assert "weights_only" not in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):  # the OS's own message names the file
        RetrievalModel.load(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("text, where", [("head: gem\nlevels: [2, 3\ngem_p: 3\n", "line 3"),
                                         ("head: gem\ngem_p: !!python/object/apply:os.getpid []\n", "line 2")])
def test_a_yaml_config_that_is_not_plain_yaml_names_the_file_and_line(tmp_path, text, where):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError) as err:
        ModelConfig.load(tmp_path / "c.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'c.yaml'}, {where}: not valid YAML")
    assert "\n" not in str(err.value)
    (tmp_path / "c.json").write_text('{"head": "gem",')
    with pytest.raises(ValueError, match=r"c\.json: not a JSON model config"):
        ModelConfig.load(tmp_path / "c.json")
    (tmp_path / "kind.yaml").write_text("levels: [4]\n")  # a comparison of a list with 1: TypeError, named here
    with pytest.raises(ValueError, match=r"kind\.yaml: "):
        ModelConfig.load(tmp_path / "kind.yaml")


def test_gradient_checkpointing_gives_the_same_gradients(random_lite0):
    model = RetrievalModel(ModelConfig(head="remap", levels=2), backbone=random_lite0)
    x = torch.rand(1, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.backbone.checkpointing = checkpointing
        model(x).sum().backward()
        grads.append(model.backbone.stages["block3"]._depthwise_conv.weight.grad.clone())
    model.backbone.checkpointing = False
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_layer_weights_balance_the_streams_and_learn():
    """layer_weights="ones": each stream L2-normalised, times a learnable non-negative weight (init 1)."""
    from remap_lib.layers import functional as RF

    cfg = ModelConfig(head="remap", levels=2, weights="random", layer_weights="ones")
    model = RetrievalModel(cfg)
    x = torch.rand(2, 3, 96, 128)
    maps = model.feature_maps(x)
    parts = [RF.l2n(model.streams[layer](maps[layer])) for layer in model.layers]
    assert torch.allclose(model.pool_maps(maps), RF.l2n(torch.cat(parts, 1)), atol=1e-6)
    model.set_layer_weights([2.0, 0.5])
    expected = RF.l2n(torch.cat([2.0 * parts[0], 0.5 * parts[1]], 1))
    assert torch.allclose(model.pool_maps(maps), expected, atol=1e-6)
    model.pool_maps(maps)[:, :5].sum().backward()
    assert model.layer_weights.raw.grad is not None and bool(model.layer_weights.raw.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="finite, non-negative"):
        model.set_layer_weights([1.0, float("nan")])
    plain = RetrievalModel(ModelConfig(head="remap", levels=2, weights="random"))
    assert plain.layer_weights is None and "layer_weights.raw" not in plain.state_dict()
    assert ModelConfig(head="remap").digest() == "9bb2ecd06d68"  # the default keeps old digests


def test_layer_weights_kl_start_from_each_layers_mean_divergence(tmp_path):
    import numpy as np

    from remap_lib.training.klw import KLWeights

    model = RetrievalModel(ModelConfig(head="remap", levels=2, weights="random", layer_weights="kl"))
    weights = {layer: np.full(8, v, np.float32) for layer, v in zip(model.layers, (0.2, 0.8))}
    weights[model.layers[0]][0] = 1.0  # mean 0.3
    KLWeights(weights, model.config.to_dict(), {}).apply(model)
    assert torch.allclose(model.layer_weights(), torch.tensor([0.3, 0.8]), atol=1e-6)
    model.save(tmp_path / "m.pt")
    again = RetrievalModel.load(tmp_path / "m.pt")
    assert torch.equal(again.layer_weights(), model.layer_weights())
