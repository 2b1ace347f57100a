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

__all__ = ["HEADS", "LAYER_WEIGHTS", "ModelConfig", "PAPER_MULTISCALE"]

HEADS = ("mac", "spoc", "gem", "rmac", "remap")
LAYER_WEIGHTS = ("none", "ones", "kl")

# Paper Eq. 3: X = 2·X(1024×768) + 1.4·X(1280×960).
PAPER_MULTISCALE = {"image_sizes": (1024, 1280), "scale_weights": (2.0, 1.4)}


@dataclass
class ModelConfig:
    """Everything that determines a descriptor.

    Attributes:
        backbone: registry name, see :func:`remap_lib.backbones.list_backbones`.
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
            (:meth:`remap_lib.klw.KLWeights.apply`).
        upscale: also enlarge images smaller than the base size.  Off by default,
            as in the standard protocol (cirtorch's ``imresize`` only shrinks): a
            query cropped to its box keeps the scale of the objects in the
            database images.  Measured on the rParis subset, enlarging the crops
            costs SPoC 9 points of Medium mAP (75.8 → 66.8).
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
        if data.get("layer_weights") == "none":
            del data["layer_weights"]
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
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(f)
            else:
                data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a model config must be a mapping, got {type(data).__name__}")
        data = data.get("model", data)
        return cls.from_dict(data)
