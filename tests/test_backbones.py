"""Backbones and their layer access function (remap_lib.nets.backbones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from remap_lib.nets.backbones import (BACKBONES, TFSameConv2d, TraceableFeatures, WeightsUnavailableError, build_backbone,
                                 tf_same_conv2d)
from remap_lib.data.images import load_image, resize_longer_side, to_tensor

EGYPTIAN_CAT, TABBY, TIGER_CAT = 285, 281, 282


def test_lite0_imagenet_weights_load_offline_and_classify_a_real_cat(lite0):
    from skimage import data as skdata

    img = load_image(Path(skdata.data_dir) / "chelsea.png")  # Chelsea the cat
    x = to_tensor(resize_longer_side(img, 300))[None]
    probs = lite0.classify(x).softmax(-1)[0]
    top = probs.topk(3).indices.tolist()
    assert top[0] in (EGYPTIAN_CAT, TABBY, TIGER_CAT)
    assert probs[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum() > 0.5


def test_layer_access_returns_named_maps_and_stops_at_the_deepest(lite0):
    calls = []
    handle = lite0.stages["head"].register_forward_hook(lambda *a: calls.append(1))
    try:
        maps = lite0(torch.rand(1, 3, 768, 1024), ["block15", "block14"])
    finally:
        handle.remove()
    assert list(maps) == ["block15", "block14"]
    assert maps["block15"].shape == (1, 320, 24, 32) and maps["block14"].shape == (1, 192, 24, 32)
    assert calls == []  # the head stage never ran
    assert lite0.resolve_layers([1, 2, 3]) == ("head", "block15", "block14")
    assert lite0(torch.rand(1, 3, 768, 1024), ["head"])["head"].shape == (1, 1280, 24, 32)


def test_same_padding_keeps_every_row_at_any_size(lite0):
    # the package's default (image_size=224) would drop a row at other sizes
    assert lite0(torch.rand(1, 3, 100, 300), ["head"])["head"].shape[-2:] == (4, 10)


@pytest.mark.parametrize("kernel,stride,groups", [(1, 1, 1), (1, 2, 1), (3, 1, 8), (3, 2, 1), (3, 2, 8),
                                                  (5, 1, 8), (5, 2, 8)])
def test_tf_same_padding_keeps_the_packages_numbers_and_traces_for_any_size(kernel, stride, groups):
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    torch.manual_seed(0)
    package = Conv2dDynamicSamePadding(8, 8, kernel, stride=stride, groups=groups)
    ours = TFSameConv2d(package)
    for h, w in [(1, 1), (2, 3), (7, 9), (8, 10), (97, 131), (120, 160)]:
        x = torch.randn(2, 8, h, w)
        with torch.no_grad():
            expected = package(x)
            assert torch.equal(ours(x), expected)  # eager: bit for bit
            traceable = tf_same_conv2d(x, package.weight, package.bias, stride, 1, groups, "traceable")
        assert traceable.shape == expected.shape
        assert (traceable - expected).abs().max() <= 2e-6 * expected.abs().max()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_one_traced_lite0_serves_odd_and_even_sizes(lite0):
    layers = lite0.resolve_layers([1, 2])
    with torch.no_grad():
        traced = torch.jit.trace(TraceableFeatures(lite0, layers), torch.rand(1, 3, 64, 64), check_trace=False)
        for h, w in [(97, 131), (120, 160), (33, 48)]:
            x = torch.rand(1, 3, h, w)
            for got, expected in zip(traced(x), lite0(x, layers).values()):
                assert got.shape == expected.shape
                assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


def test_unknown_layers_and_backbones_are_clear_errors(lite0):
    with pytest.raises(ValueError, match="paper layer number"):
        lite0.resolve_layers(["conv9"])
    with pytest.raises(ValueError, match="layers 1..3"):
        lite0.resolve_layers([4])
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="ambiguous"):
        build_backbone("efficientnet_lite0", weights=None)


def test_taps_read_a_convolution_inside_a_stage_before_its_cap():
    backbone = build_backbone("efficientnet_lite0")  # own instance: resolving a tap registers its channels
    x = torch.rand(2, 3, 96, 128)
    names = backbone.resolve_layers(["head:1", "block15:_bn0", 1, 2])
    assert names == ("head:1", "block15:_bn0", "head", "block15")
    assert backbone.channels["head:1"] == 1280 and backbone.channels["block15:_bn0"] == 1152
    assert backbone.layer_names[-5:] == ("block14", "block15:_bn0", "block15", "head:1", "head")
    with torch.no_grad():
        maps = backbone(x, names)
        assert maps["block15:_bn0"].shape == (2, 1152, 3, 4)
        # the head's post-ReLU6 map is the tapped pre-cap map clipped: the tap is the same convolution
        assert torch.equal(maps["head"], maps["head:1"].clamp(0, 6))
        assert maps["head:1"].max() > 6 and maps["head:1"].min() < 0
        # hooks are removed after each pass: a later pass without the taps returns only what it asks for
        assert list(backbone(x, ["head"])) == ["head"]
        # the export path (flipped, mirrored convolutions) reads the taps too
        traced = TraceableFeatures(backbone, ["head:1", "block15:_bn0"])(x)
        assert torch.allclose(traced[0], maps["head:1"], atol=1e-4)
        assert torch.allclose(traced[1], maps["block15:_bn0"], atol=1e-4)
    for bad in ("head:2", "head:0.weight", "nosuch:1", "block15:_swish"):  # ReLU6 runs twice in a block
        with pytest.raises(ValueError, match="tap"):
            backbone.resolve_layers([bad])


def test_missing_weight_file_is_an_error_not_a_random_model(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone("efficientnet_lite0", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        build_backbone("resnet50", weights=str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("name,layers,shapes", [
    ("resnet50", ("layer4_2", "layer4_1", "layer4_0"), [(2048, 4, 5), (2048, 4, 5)]),
    ("vgg16", ("conv5_3", "conv5_2", "conv5_1"), [(512, 8, 10), (512, 8, 10)]),
])
def test_torchvision_backbones_random_and_local_file(tmp_path, name, layers, shapes):
    torch.manual_seed(0)
    net = build_backbone(name, weights="random")
    assert net.paper_layers == layers
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        maps = net(x, list(layers[:2]))
    assert [tuple(m.shape[1:]) for m in maps.values()] == shapes
    # a local checkpoint (here: the random net's own weights) loads exactly
    import torchvision

    tv = torchvision.models.get_model(name, weights=None)
    torch.save({"state_dict": tv.state_dict()}, tmp_path / "w.pth")
    loaded = build_backbone(name, weights=str(tmp_path / "w.pth"))
    ref = torchvision.models.get_model(name, weights=None)
    ref.load_state_dict(tv.state_dict())
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.classify(x), ref(loaded.normalise(x)), atol=1e-5)


def test_registry_lists_the_papers_backbones():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101",
            "resnext101_32x8d", "vgg16"} <= set(BACKBONES)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_weights_are_real(name):
    from skimage import data as skdata

    net = build_backbone(name)
    x = to_tensor(resize_longer_side(load_image(Path(skdata.data_dir) / "chelsea.png"), 300))[None]
    assert net.classify(x).argmax(-1).item() in (EGYPTIAN_CAT, TABBY, TIGER_CAT)


def test_offline_torchvision_weights_give_a_clear_error(monkeypatch):
    import urllib.error

    import torchvision

    enum = type(torchvision.models.get_model_weights("resnet50").DEFAULT)

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(enum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match="Offline.*--weights FILE"):
        build_backbone("resnet50")
