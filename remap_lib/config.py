"""One plain-data description of a descriptor model, saved next to every output.

A :class:`ModelConfig` names the backbone, its weights, the layers, the head
(MAC / SPoC / GeM / R-MAC / REMAP) and its options, the whitening and the input
sizes.  It round-trips through YAML or JSON, and :meth:`ModelConfig.digest`
gives a short hash so that a number can be traced to the model that made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HEADS", "LAYER_WEIGHTS", "REGIONS", "ModelConfig", "PAPER_MULTISCALE", "load_yaml"]

HEADS = ("mac", "spoc", "gem", "rmac", "remap")
LAYER_WEIGHTS = ("none", "ones", "kl")
REGIONS = ("grid", "rpn")

# Options added after the first release: left out of the digest while they hold their default, so
# that the digests of existing configs (recorded with descriptors and indexes) do not change.
_LATER_OPTIONS = ("layer_weights", "regions", "proposals", "rpn_anchor_sizes", "rpn_aspect_ratios",
                  "rpn_width", "rpn_nms", "rpn_min_size")

# Paper Eq. 3: X = 2·X(1024×768) + 1.4·X(1280×960).
PAPER_MULTISCALE = {"image_sizes": (1024, 1280), "scale_weights": (2.0, 1.4)}


def load_yaml(path: str | os.PathLike) -> Any:
    """The data of a user's YAML file (model, train and train-rpn configs, notebook parameters).

    The one place such files are parsed, always with ``yaml.safe_load``: a
    ``!!python/...`` tag is refused, never executed.  A syntax error, a refused
    tag or a file that is not UTF-8 text becomes one ``ValueError`` naming the
    file and the line, instead of the parser's multi-line report.
    """
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a YAML text file (byte {exc.start} is not UTF-8)") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or type(exc).__name__
        if "constructor for the tag" in problem:  # safe_load met !!python/... (or another object tag)
            tag = problem.split("tag", 1)[1].strip().replace("tag:yaml.org,2002:", "!!")
            problem = f"the tag {tag} is refused (plain YAML only: tags that build objects are never run)"
        raise ValueError(f"{where}: not valid YAML: {problem}") from exc


@dataclass
class ModelConfig:
    """Everything that determines a descriptor.

    Attributes:
        backbone: registry name, see :func:`remap_lib.nets.backbones.list_backbones`.
        weights: ``"imagenet"``, a checkpoint path, or ``"random"`` (tests only).
        head: one of :data:`HEADS`.
        layers: paper layer numbers (``1`` = last conv block) or stage names;
            ``None`` means ``[1, 2]`` for REMAP (the paper's final choice, §III-C)
            and ``[1]`` for the baselines.  A built model stores stage names.
        levels: scales S of the region grid for R-MAC / REMAP (4 → 40 regions,
            the paper's best, Table I).
        full_map: add the whole-map region to the grid (cirtorch does; the paper does not).
        gem_p: initial GeM exponent.
        spoc_centre_prior: Babenko's Gaussian centre prior for SPoC.
        whitening: a fully connected PCA-whitening layer after pooling.
        dim: output dimension of the whitening layer (``None``: as many as learned).
        image_sizes: longer side(s) of the resized input, in pixels.  The first
            is the base size; further sizes are ratios to it (Eq. 3's 1280/1024).
        scale_weights: weight of each size in the multi-scale sum (paper Eq. 3).
        layer_weights: how the layer streams of a multi-layer head are balanced
            before concatenation.  ``"none"``: REMAP streams are concatenated as
            they are (the paper; the 1280-channel layer then outweighs the
            320-channel one), baseline streams L2-normalised.  ``"ones"``: every
            stream L2-normalised, then scaled by a non-negative learnable weight
            initialised to 1.  ``"kl"``: the same, the weights initialised from
            each layer's mean KL-divergence when KL region weights are applied
            (:meth:`remap_lib.training.klw.KLWeights.apply`).
        upscale: also enlarge images smaller than the base size.  Off by default,
            as in the standard protocol (cirtorch's ``imresize`` only shrinks): a
            query cropped to its box keeps the scale of the objects in the
            database images.  Measured on the rParis subset, enlarging the crops
            costs SPoC 9 points of Medium mAP (75.8 → 66.8).
        regions: where R-MAC pools.  ``"grid"`` (default): the rigid multi-scale
            grid of ``levels`` scales.  ``"rpn"``: the top ``proposals`` boxes of a
            learned region proposal network on the (single) layer's map (Gordo et
            al. 2016; :mod:`remap_lib.layers.proposals`), for ``head="rmac"`` only; it is
            trained by ``remap train-rpn`` and saved in the model's checkpoint.
        proposals: k, the top-k proposals pooled per image with ``regions="rpn"``
            (Gordo et al. go up to 256).
        rpn_anchor_sizes: anchor sides in feature-map cells (the anchor area is
            the side squared); ``rpn_aspect_ratios``: anchor height / width.
            Every map cell gets ``len(sizes) × len(ratios)`` anchors.
        rpn_width: channels of the RPN's hidden 3×3 conv (256, as Ren et al.'s
            RPN on ZF), after a 1×1 reduction of the map.
        rpn_nms: IoU threshold of the non-maximum suppression among proposals.
        rpn_min_size: proposals narrower or lower than this many cells after
            clipping to the map are dropped (at least 1, so that every kept
            proposal covers a cell once its edges are rounded to the grid).
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    head: str = "remap"
    layers: list[int | str] | None = None
    levels: int = 4
    full_map: bool = False
    gem_p: float = 3.0
    spoc_centre_prior: bool = False
    whitening: bool = False
    dim: int | None = None
    image_sizes: list[int] = field(default_factory=lambda: [1024])
    scale_weights: list[float] = field(default_factory=lambda: [1.0])
    upscale: bool = False
    layer_weights: str = "none"
    regions: str = "grid"
    proposals: int = 256
    rpn_anchor_sizes: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0, 32.0])
    rpn_aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_width: int = 256
    rpn_nms: float = 0.7
    rpn_min_size: float = 1.0

    def __post_init__(self):
        self.head = self.head.lower()
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.layers is None:
            self.layers = [1, 2] if self.head == "remap" else [1]
        self.layers = [int(x) if isinstance(x, str) and x.isdigit() else x for x in self.layers]
        if not self.layers:
            raise ValueError("at least one layer is needed")
        self.image_sizes = [int(s) for s in self.image_sizes]
        self.scale_weights = [float(w) for w in self.scale_weights]
        if len(self.image_sizes) != len(self.scale_weights):
            raise ValueError(
                f"{len(self.image_sizes)} image sizes but {len(self.scale_weights)} scale weights"
            )
        if any(s < 32 for s in self.image_sizes):
            raise ValueError(f"image sizes must be at least 32 pixels, got {self.image_sizes}")
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if self.layer_weights not in LAYER_WEIGHTS:
            raise ValueError(f"layer_weights must be one of {', '.join(LAYER_WEIGHTS)}, got {self.layer_weights!r}")
        self._check_regions()

    def _check_regions(self) -> None:
        if self.regions not in REGIONS:
            raise ValueError(f"regions must be one of {', '.join(REGIONS)}, got {self.regions!r}")
        self.rpn_anchor_sizes = [float(s) for s in self.rpn_anchor_sizes]
        self.rpn_aspect_ratios = [float(r) for r in self.rpn_aspect_ratios]
        if not self.rpn_anchor_sizes or any(not s > 0 for s in self.rpn_anchor_sizes):
            raise ValueError(f"rpn_anchor_sizes must be positive numbers of cells, got {self.rpn_anchor_sizes}")
        if not self.rpn_aspect_ratios or any(not r > 0 for r in self.rpn_aspect_ratios):
            raise ValueError(f"rpn_aspect_ratios must be positive (height / width), got {self.rpn_aspect_ratios}")
        for name in ("proposals", "rpn_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not 0.0 < self.rpn_nms <= 1.0:
            raise ValueError(f"rpn_nms must be an IoU threshold in (0, 1], got {self.rpn_nms}")
        if not self.rpn_min_size >= 1.0:
            raise ValueError(f"rpn_min_size must be at least 1 cell, got {self.rpn_min_size}")
        if self.regions == "rpn":
            if self.head != "rmac":
                raise ValueError(f"regions 'rpn' pools learned proposals as R-MAC: use head 'rmac', not {self.head!r}")
            if len(self.layers) != 1:
                raise ValueError(f"regions 'rpn' proposes boxes on one map: give one layer, got {self.layers}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def digest(self) -> str:
        """12 hex digits identifying this exact configuration.

        Options added after the first release are left out while they hold
        their default, so the digests of existing configs do not change.
        """
        data = self.to_dict()
        for f in dataclasses.fields(self):
            if f.name in _LATER_OPTIONS:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                if data[f.name] == default:
                    del data[f.name]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
        path = os.fspath(path)
        if path.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if path.endswith((".yaml", ".yml")):
            data = load_yaml(path)
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: not a JSON model config ({exc}); give YAML as .yaml/.yml") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a model config must be a mapping, got {type(data).__name__}")
        data = data.get("model", data)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:  # e.g. `levels: abc` (TypeError in the checks): name the file
            raise ValueError(f"{path}: {exc}") from exc
