"""The descriptor network: backbone → per-layer pooling streams → [whitening FC] → L2.

``RetrievalModel`` builds any of MAC, SPoC, GeM, R-MAC and REMAP from a
:class:`~remap_lib.config.ModelConfig`; all five share the same optional
whitening layer, so that they are compared on equal terms.

Data flow for an image batch ``x`` (paper Fig. 1a for REMAP):

1. ``maps = backbone(x, layers)`` (layer access function, Eq. 1);
2. per layer, a stream: REMAP ``Σ α_i L2(ζ(map))_i``; baselines their pooling, L2;
3. concatenate the streams (multi-layer aggregation), L2;
4. optional FC initialised from PCA-whitening, then L2.

Multi-scale descriptors (Eq. 3) are a weighted sum of the single-scale
descriptors at several input sizes, L2-normalised (:meth:`RetrievalModel.multiscale`).
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import functional as RF
from ..layers.pooling import MAC, RMAC, GeM, RegionWeights, RemapStream, SPoC
from ..layers.whitening import PCAWhitening
from ..nets.backbones import FeatureBackbone, build_backbone

__all__ = ["RetrievalModel", "WhiteningNotLearnedError", "load_torch_file", "weights_fingerprint"]

CHECKPOINT_FORMAT = "remap-checkpoint-v1"


def load_torch_file(path: str | os.PathLike, what: str = "remap checkpoint", advice: str = "",
                    map_location="cpu"):
    """The contents of a torch file a user gave us, read as data (``weights_only=True``).

    The one place every user file goes through ``torch.load`` (model checkpoints,
    training and RPN-training checkpoints).  A file that cannot be read as data
    is damaged or not ours: the error names it and says so in one line.
    torch's own message is never passed on: it ends by advising to re-run with
    ``weights_only`` set to ``False``, which would execute whatever code the file
    holds.  A file that is missing or unreadable keeps its ``OSError``, which
    names it.  ``what`` names the expected kind of file, ``advice`` what to do.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...: torch's text stays out
        raise ValueError(f"cannot read checkpoint {path}: not a {what}, or a damaged one ({type(exc).__name__})"
                         + (f"; {advice}" if advice else "")) from exc


class WhiteningNotLearnedError(RuntimeError):
    """The config asks for a whitening layer that has not been learned yet."""


def _stream(config: ModelConfig, channels: int) -> nn.Module:
    if config.regions == "rpn":  # R-MAC over learned proposals (ModelConfig checks the head)
        from ..layers.proposals import ProposalRMAC

        return ProposalRMAC.from_config(channels, config)
    if config.head == "mac":
        return MAC()
    if config.head == "spoc":
        return SPoC(config.spoc_centre_prior)
    if config.head == "gem":
        return GeM(config.gem_p)
    if config.head == "rmac":
        return RMAC(config.levels, config.full_map)
    return RemapStream(config.levels, None, config.full_map)


def weights_fingerprint(module: nn.Module) -> str:
    """16 hex digits of a SHA-256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes, bytes).

    Two models with the same config but other weights (ImageNet vs fine-tuned,
    another whitening or other region weights α) get different fingerprints, so
    caches, ``extraction.json`` and index files can tell them apart; the
    config digest alone cannot.  Hashing EfficientNet-Lite0 (~19 MB) takes a
    few tens of milliseconds; :meth:`RetrievalModel.fingerprint` caches it
    until a tensor changes.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _state_version(module: nn.Module) -> tuple:
    """Identity + in-place version counter of every tensor: changes whenever any weight is modified."""
    return tuple((k, v.data_ptr(), v._version, tuple(v.shape)) for k, v in module.state_dict().items())


class RetrievalModel(nn.Module):
    """A global image descriptor network.

    Args:
        config: what to build; its ``layers`` are resolved to stage names.
        backbone: an already built backbone (else built from the config).
    """

    def __init__(self, config: ModelConfig, backbone: FeatureBackbone | None = None):
        super().__init__()
        config = copy.deepcopy(config)
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone, config.weights)
        config.layers = list(self.backbone.resolve_layers(config.layers))
        self.config = config
        self.streams = nn.ModuleDict({layer: _stream(config, self.backbone.channels[layer]) for layer in config.layers})
        # per-layer balance (ModelConfig.layer_weights); absent by default, so old checkpoints load unchanged
        self.layer_weights = RegionWeights(torch.ones(len(config.layers))) if config.layer_weights != "none" else None
        self.pooled_dim = sum(self.backbone.channels[layer] for layer in config.layers)
        self.whiten: nn.Linear | None = None
        self.register_buffer("whitening_learned", torch.tensor(False))
        if config.whitening:
            out = config.dim or self.pooled_dim
            if out > self.pooled_dim:
                raise ValueError(f"dim {out} exceeds the pooled dimension {self.pooled_dim}")
            self.whiten = nn.Linear(self.pooled_dim, out)
        self.eval()

    # ------------------------------------------------------------------ properties
    @property
    def layers(self) -> list[str]:
        return list(self.config.layers)

    @property
    def output_dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else self.pooled_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of this model, cached until any of its tensors changes."""
        version = _state_version(self)
        cached = getattr(self, "_fingerprint_cache", None)
        if cached is None or cached[0] != version:
            cached = (version, weights_fingerprint(self))
            object.__setattr__(self, "_fingerprint_cache", cached)
        return cached[1]

    def identity(self) -> dict:
        """What identifies the model behind a descriptor: config, its digest and the weights fingerprint."""
        return {"model": self.config.to_dict(), "model_digest": self.config.digest(),
                "weights_fingerprint": self.fingerprint()}

    # ------------------------------------------------------------------ forward
    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone(images, self.layers)

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised concatenation of the layer streams, before whitening: ``(N, D_in)``.

        REMAP streams are concatenated as they are, so their region weights
        also weigh the layers against each other (the paper's "region and layer
        weighting"); baseline streams are L2-normalised first.  With
        ``config.layer_weights`` other than ``"none"``, every stream is
        L2-normalised and scaled by its learnable non-negative layer weight.
        """
        return self.pool_maps(self.feature_maps(images))

    def pool_maps(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`pool` on feature maps already computed (``{layer: (N, C, H, W)}``).

        Lets experiments that only change the head (region count, layers, α)
        run the backbone once and pool many ways (``benchmarks/paper_*.py``).
        """
        parts = []
        weights = self.layer_weights() if self.layer_weights is not None else None
        for i, layer in enumerate(self.layers):
            v = self.streams[layer](maps[layer])
            if weights is not None:
                v = RF.l2n(v) * weights[i]
            elif self.config.head != "remap":
                v = RF.l2n(v)
            parts.append(v)
        return RF.l2n(torch.cat(parts, dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors ``(N, D)``, rows L2-normalised, for RGB ``images`` in ``[0, 1]``."""
        return self.from_pooled(self.pool(images))

    def from_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The descriptor from a pooled vector (:meth:`pool`): whitening FC, if any, then L2."""
        if self.whiten is not None:
            if not bool(self.whitening_learned):
                raise WhiteningNotLearnedError(
                    "this model has a whitening layer that was never learned; learn it with "
                    "remap_lib.describe.extract.learn_whitening / `remap whiten`, or load a checkpoint"
                )
            x = RF.l2n(self.whiten(x))
        return x

    def multiscale(self, images_per_scale: Sequence[torch.Tensor]) -> torch.Tensor:
        """Paper Eq. 3: ``L2(Σ_s w_s · X(image at size s))`` with the config's sizes and weights."""
        if len(images_per_scale) != len(self.config.scale_weights):
            raise ValueError(
                f"{len(images_per_scale)} scales given, config has {len(self.config.scale_weights)}"
            )
        total = sum(w * self(x) for w, x in zip(self.config.scale_weights, images_per_scale))
        return RF.l2n(total)

    # ------------------------------------------------------------------ learned proposals
    def _proposal_stream(self):
        if self.config.regions != "rpn":
            raise ValueError(f"this model pools the {self.config.regions} regions, not learned proposals "
                             "(ModelConfig(head='rmac', regions='rpn'))")
        return self.streams[self.layers[0]]

    @torch.no_grad()
    def proposals(self, images: torch.Tensor, k: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The learned regions of each image: ``(boxes (R, 4), scores (R,))``, best first, at most ``k``.

        Boxes are floats ``[x0, y0, x1, y1]`` in the pixels of ``images``
        (a cell of the map covers ``image size / map size`` pixels), before
        the rounding to cells that pooling applies; ``k`` defaults to
        ``config.proposals``.  For pictures and box recall (Gordo et al. Fig. 3).
        """
        stream = self._proposal_stream()
        fmap = self.feature_maps(images)[self.layers[0]]
        sx, sy = images.shape[-1] / fmap.shape[-1], images.shape[-2] / fmap.shape[-2]
        scale = torch.tensor([sx, sy, sx, sy], device=fmap.device)
        return [(b * scale, s) for b, s in stream.rpn.propose(fmap, k or stream.k)]

    def set_proposal_count(self, k: int) -> None:
        """Pool the top ``k`` proposals from now on (``config.proposals`` follows, and so does the digest)."""
        stream = self._proposal_stream()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a whole number >= 1, got {k!r}")
        stream.k = self.config.proposals = k

    # ------------------------------------------------------------------ parameters
    def region_weights(self) -> dict[str, torch.Tensor]:
        """Current α (clamped, detached) of each REMAP stream, by layer."""
        if self.config.head != "remap":
            return {}
        return {layer: self.streams[layer].alpha().detach().cpu() for layer in self.layers}

    @torch.no_grad()
    def set_region_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load α per layer (e.g. KL-divergences); layers not named keep theirs.

        Every weight must be finite and ≥ 0: one NaN α would make every
        descriptor NaN.  All layers are checked before any is changed.
        """
        if self.config.head != "remap":
            raise ValueError(f"a {self.config.head} head has no region weights")
        checked = {}
        for layer, alpha in weights.items():
            if layer not in self.layers:
                raise ValueError(f"no stream for layer {layer!r}; streams: {self.layers}")
            stream = self.streams[layer]
            alpha = torch.as_tensor(alpha, dtype=torch.float32)
            if alpha.shape != stream.alpha.raw.shape or not bool(torch.isfinite(alpha).all()) \
                    or bool((alpha < 0).any()):
                raise ValueError(
                    f"layer {layer}: need {stream.alpha.raw.numel()} finite, non-negative weights, "
                    f"got shape {tuple(alpha.shape)}"
                    + (f" with values {alpha.tolist()!r:.120}" if alpha.shape == stream.alpha.raw.shape else "")
                )
            checked[layer] = alpha
        for layer, alpha in checked.items():
            self.streams[layer].alpha.raw.copy_(alpha)

    @torch.no_grad()
    def set_layer_weights(self, weights) -> None:
        """Load the per-layer weights (one non-negative, finite number per layer, in ``self.layers`` order)."""
        if self.layer_weights is None:
            raise ValueError("this model has no layer weights (ModelConfig.layer_weights is 'none')")
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (len(self.layers),) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"need {len(self.layers)} finite, non-negative layer weights, got {w.tolist()}")
        self.layer_weights.raw.copy_(w)

    @torch.no_grad()
    def set_whitening(self, whitening: PCAWhitening) -> None:
        """Install PCA-whitening as the FC layer: weight ``P``, bias ``-P μ``."""
        if whitening.input_dim != self.pooled_dim:
            raise ValueError(
                f"whitening was learned on {whitening.input_dim}-d descriptors; "
                f"this model pools {self.pooled_dim}-d ones"
            )
        p = torch.as_tensor(whitening.projection, dtype=torch.float32)
        mu = torch.as_tensor(whitening.mean, dtype=torch.float32)
        self.whiten = nn.Linear(self.pooled_dim, p.shape[0]).to(self.whitening_learned.device)
        self.whiten.weight.copy_(p)
        self.whiten.bias.copy_(-(p @ mu))
        self.whitening_learned.fill_(True)
        self.config.whitening, self.config.dim = True, p.shape[0]

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Config and weights in one file, written atomically."""
        path = os.fspath(path)
        blob = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        tmp = path + ".tmp"
        torch.save(blob, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "RetrievalModel":
        """A model saved by :meth:`save`; read as data (``weights_only=True``).

        Every floating-point tensor (region weights α, backbone, whitening) must
        be finite: a file from a run that diverged is refused here, by tensor
        name, rather than producing NaN descriptors later.
        """
        blob = load_torch_file(path, map_location=map_location)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a remap checkpoint ({CHECKPOINT_FORMAT})")
        state = blob.get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"{path} has no state_dict; it is not a complete remap checkpoint")
        for name, tensor in state.items():  # a NaN α or weight would make every descriptor NaN
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise ValueError(
                        f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                        "the file is corrupt or was saved from a diverged training run: "
                        "use an earlier checkpoint or train again"
                    )
        config = ModelConfig.from_dict(blob["config"])
        backbone = build_backbone(config.backbone, "random")  # every weight comes from the file
        model = cls(config, backbone)
        model.load_state_dict(state, strict=True)
        return model.eval()
