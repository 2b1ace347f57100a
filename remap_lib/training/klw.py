"""KL-divergence region weighting (KLW), the REMAP paper's key idea (§III-B, Fig. 2).

For every region of every chosen layer we ask: how well does the distance
between two images' descriptors *of this region alone* separate matching from
non-matching pairs?  The answer, a KL-divergence between the two distance
distributions, initialises that region's weight α in the REMAP head.

Pipeline (:func:`estimate_kl_weights`):

1. :func:`sample_pairs`: matching pairs (same group) and non-matching pairs
   (different groups) from any dataset with groups, deterministically for a seed;
2. :func:`region_descriptors`: every image resized to a fixed 4:3 input (the
   paper uses 1024×768; 512×384 by default here, for speed), passed through
   the backbone, and each layer's regions ROI-max-pooled and L2-normalised
   with the REMAP head's own code (:meth:`RemapStream.regions`), so the regions
   are exactly the head's reference regions;
3. :func:`pair_distances`: the Euclidean distance of each pair, per region;
4. :func:`region_kl`: per region, the two densities and their KL-divergence.

Density estimate
    Histograms on shared bins (per region, spanning both samples) with
    Jeffreys smoothing: half a count is added to every bin before normalising.
    Distances between unit vectors are bounded (``[0, 2]``), so a histogram
    covers the support exactly; it is fast for thousands of pairs × 40 regions ×
    several layers, and easy to check.  Without smoothing a bin that only
    matching pairs reach would make the divergence infinite; half a count keeps
    it finite and shrinks estimates from tiny samples toward zero, the right
    bias for an initial weight.  A kernel estimate would be smoother but needs
    a bandwidth choice and numerical integration for no practical gain here.
    Accuracy, measured with 20,000 samples a side and 50 bins: KL(N(0,1)‖N(1,1))
    = 0.500 is estimated as 0.493 and KL(N(0,1)‖N(0,2²)) = 0.318 as 0.315; where
    the first density's tails reach places the second has barely sampled, the
    estimate is low (KL(N(0,2²)‖N(0,1)) = 0.807 comes out 0.66).

Direction
    The paper does not say.  The default is ``KL(P(y|match) ‖ P(y|non-match))``:
    the expected log-likelihood ratio of a *matching* pair, which by Stein's
    lemma is the exponent at which a test that keeps the matches (fixed recall)
    can reject non-matches — the retrieval question.  ``"nonmatch_match"`` is
    the reverse; ``"symmetric"`` is Jeffreys' divergence, the sum of both.

The weights are the divergences themselves (non-negative by construction); as
the REMAP streams are concatenated without per-stream normalisation, their
scale across layers also weighs the layers against each other.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.images import ImageSpec, load_spec, to_tensor
from ..describe.model import RetrievalModel
from ..layers.pooling import _regions_and_weight_index

__all__ = [
    "DIRECTIONS",
    "KLWeights",
    "estimate_kl_weights",
    "histogram_densities",
    "kl_divergence",
    "pair_distances",
    "region_descriptors",
    "region_kl",
    "sample_pairs",
]

log = logging.getLogger(__name__)

DIRECTIONS = ("match_nonmatch", "nonmatch_match", "symmetric")
KLW_FORMAT = "remap-klw-v1"


# --------------------------------------------------------------------------- pairs


def sample_pairs(groups: Sequence[int], max_matching: int = 2000, nonmatching_per_matching: int = 5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Matching and non-matching index pairs from group labels (``-1``: no group, never used).

    Every unordered pair inside a group is a matching pair (a random subset of
    ``max_matching`` when there are more); non-matching pairs are drawn
    uniformly from pairs of images of different groups, ``nonmatching_per_matching``
    times as many, without repetition.  Returns two ``(P, 2)`` int arrays.
    """
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(groups >= 0)
    matching = []
    for g in np.unique(groups[labelled]):
        members = labelled[groups[labelled] == g]
        matching += [(a, b) for k, a in enumerate(members) for b in members[k + 1:]]
    if not matching:
        raise ValueError("no group has two images: matching pairs are needed to estimate KL weights")
    matching = np.array(matching, dtype=np.int64)
    if len(matching) > max_matching:
        matching = matching[np.sort(rng.choice(len(matching), max_matching, replace=False))]
    n_non = nonmatching_per_matching * len(matching)
    seen: set[tuple[int, int]] = set()
    nonmatching = []
    attempts = 0
    while len(nonmatching) < n_non and attempts < 50 * n_non:
        a, b = rng.choice(labelled, 2, replace=False)
        attempts += 1
        a, b = (int(a), int(b)) if a < b else (int(b), int(a))
        if groups[a] != groups[b] and (a, b) not in seen:
            seen.add((a, b))
            nonmatching.append((a, b))
    if len(nonmatching) < n_non:
        raise ValueError(f"only {len(nonmatching)} distinct non-matching pairs exist; need {n_non}")
    return matching, np.array(nonmatching, dtype=np.int64)


# --------------------------------------------------------------------------- regions


class _FixedSizeImages(Dataset):
    def __init__(self, specs, size):
        self.specs, self.size = list(specs), size

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, i):
        spec = self.specs[i]
        img = load_spec(spec)  # ImageLoadError propagates: KL weights need every sampled image
        return to_tensor(img.resize(self.size, resample=2))  # 2 = bilinear


@torch.no_grad()
def region_descriptors(model: RetrievalModel, specs: Sequence[ImageSpec], input_size: tuple[int, int] = (512, 384),
                       batch_size: int = 8, device: str | torch.device = "cpu", num_workers: int = 0,
                       progress: bool = True, engine: str = "auto",
                       precision: str = "f32") -> dict[str, np.ndarray]:
    """Per layer, ``(N, R, C)`` float32 L2-normalised region vectors on the reference grid.

    Images are resized to exactly ``input_size`` (width, height), as the paper
    resizes to 1024×768, so that every image has the same regions: those of
    the REMAP head's reference grid (checked).  The backbone runs on
    ``engine`` (:func:`~remap_lib.describe.engine.create_engine`: OpenVINO on a CPU by
    default, equal to torch to ~1e-6 in f32); the regions are pooled in torch.
    """
    from ..describe.engine import create_engine

    if model.config.head != "remap":
        raise ValueError("KL weights belong to a REMAP head; build the model with head='remap'")
    device = torch.device(device)
    model = model.to(device).eval()
    runner = create_engine(model, engine, precision, device)
    loader = DataLoader(_FixedSizeImages(specs, input_size), batch_size=batch_size, num_workers=num_workers)
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in model.layers}
    for batch in tqdm(loader, desc=f"region descriptors ({runner.name})", unit="batch", disable=not progress):
        maps = runner.feature_maps(batch.to(device))
        for layer in model.layers:
            stream = model.streams[layer]
            _, index = _regions_and_weight_index(*maps[layer].shape[-2:], stream.levels, stream.full_map,
                                                 stream.reference)
            if sorted(index.tolist()) != list(range(stream.alpha.raw.numel())):
                raise ValueError(
                    f"a {input_size[0]}x{input_size[1]} input gives a {tuple(maps[layer].shape[-2:])} map whose "
                    f"{stream.levels}-level grid does not match the {stream.reference} reference grid one to one "
                    f"(a 4:3 input large enough for {stream.levels} levels, e.g. 512x384, does)"
                )
            regions = stream.regions(maps[layer])  # (B, R, C), the head's own code
            reordered = torch.empty_like(regions)
            reordered[:, index] = regions
            out[layer].append(reordered.float().cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def pair_distances(regions: np.ndarray, pairs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Euclidean distance of each pair, per region: ``(N, R, C)`` × ``(P, 2)`` → ``(P, R)``."""
    out = np.empty((len(pairs), regions.shape[1]), dtype=np.float64)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        out[s:s + chunk] = np.linalg.norm(regions[p[:, 0]].astype(np.float64) - regions[p[:, 1]], axis=-1)
    return out


# --------------------------------------------------------------------------- divergence


def _check_smoothing(smoothing: float) -> None:
    """Refuse a smoothing that would let an empty bin through.

    With ``smoothing <= 0`` a bin reached by one sample only gives ``0·log 0``
    (NaN) or ``p·log(p/0)`` (inf), and a NaN weight turns every descriptor of
    the model into NaN.
    """
    if not smoothing > 0:  # also catches NaN
        raise ValueError(f"smoothing must be > 0 (counts added to every histogram bin), got {smoothing!r}; "
                         "without it an empty bin makes the divergence NaN or infinite (0.5 is Jeffreys')")


def histogram_densities(a: np.ndarray, b: np.ndarray, bins: int = 30, smoothing: float = 0.5):
    """Probabilities of ``a`` and ``b`` on shared bins spanning both, each bin + ``smoothing`` counts.

    ``smoothing`` must be > 0, so that both distributions are strictly
    positive and the divergence finite.  Returns ``(edges (bins+1,), p (bins,), q (bins,))``.
    """
    _check_smoothing(smoothing)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both samples must be non-empty")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("distances contain NaN or infinite values")
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi <= lo:
        hi = lo + 1e-9
    edges = np.linspace(lo, hi, bins + 1)
    p = np.histogram(a, edges)[0] + smoothing
    q = np.histogram(b, edges)[0] + smoothing
    return edges, p / p.sum(), q / q.sum()


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """``Σ p log(p / q)`` in nats for strictly positive distributions on the same bins."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return float(np.sum(p * np.log(p / q)))


def region_kl(d_match: np.ndarray, d_nonmatch: np.ndarray, bins: int = 30, smoothing: float = 0.5,
              direction: str = "match_nonmatch") -> np.ndarray:
    """KL-divergence per region between matching ``(P, R)`` and non-matching ``(Q, R)`` distances.

    Returns ``(R,)`` finite, non-negative weights; a non-finite divergence is
    an error, never a weight.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    _check_smoothing(smoothing)
    d_match, d_nonmatch = np.atleast_2d(d_match.T).T, np.atleast_2d(d_nonmatch.T).T
    if d_match.shape[1] != d_nonmatch.shape[1]:
        raise ValueError(f"{d_match.shape[1]} vs {d_nonmatch.shape[1]} regions")
    out = np.empty(d_match.shape[1])
    for r in range(d_match.shape[1]):
        _, p, q = histogram_densities(d_match[:, r], d_nonmatch[:, r], bins, smoothing)
        if direction == "match_nonmatch":
            out[r] = kl_divergence(p, q)
        elif direction == "nonmatch_match":
            out[r] = kl_divergence(q, p)
        else:
            out[r] = kl_divergence(p, q) + kl_divergence(q, p)
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise ValueError(f"the KL-divergence of region(s) {bad.tolist()} is not finite; "
                         f"check the distances and use smoothing > 0 (got {smoothing!r})")
    return np.maximum(out, 0.0)  # exact KL is >= 0; guard against rounding


# --------------------------------------------------------------------------- result


@dataclass
class KLWeights:
    """Region weights per layer, with everything needed to reproduce them."""

    weights: dict[str, np.ndarray]
    model: dict
    settings: dict
    distances: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def apply(self, model: RetrievalModel) -> None:
        """Load the weights into ``model``'s REMAP streams (config must agree)."""
        for key in ("backbone", "levels", "full_map"):
            if model.config.to_dict()[key] != self.model[key]:
                raise ValueError(f"KL weights were estimated with {key}={self.model[key]!r}, "
                                 f"the model has {model.config.to_dict()[key]!r}")
        missing = set(model.layers) - set(self.weights)
        if missing:
            raise ValueError(f"no KL weights for layer(s) {sorted(missing)}; have {sorted(self.weights)}")
        model.set_region_weights({layer: torch.as_tensor(self.weights[layer]) for layer in model.layers})
        if model.config.layer_weights == "kl":  # each layer by its regions' mean divergence
            model.set_layer_weights([float(np.mean(self.weights[layer])) for layer in model.layers])

    def save(self, path: str | os.PathLike) -> None:
        """JSON with the weights, the model config and the estimation settings; atomic."""
        blob = {"format": KLW_FORMAT, "model": self.model, "settings": self.settings,
                "weights": {k: [float(x) for x in v] for k, v in self.weights.items()}}
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump(blob, f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KLWeights":
        not_ours = f"{path} is not a KL-weights JSON file written by `remap klw` ({KLW_FORMAT})"
        try:
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read KL weights {path}: {exc}") from exc
        except UnicodeDecodeError as exc:  # a checkpoint, an image...: binary, not text
            raise ValueError(f"{not_ours}: it is binary, not JSON text") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{not_ours}: invalid JSON at line {exc.lineno}, column {exc.colno}") from exc
        if not isinstance(blob, dict) or blob.get("format") != KLW_FORMAT:
            raise ValueError(not_ours)
        if not all(isinstance(blob.get(k), dict) for k in ("weights", "model", "settings")):
            raise ValueError(f"{path}: a KL-weights file needs 'weights', 'model' and 'settings' objects")
        weights = {}
        for layer, values in blob["weights"].items():
            try:
                w = np.asarray(values, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: layer {layer!r}: KL weights must be a list of numbers ({exc})") from exc
            # json reads NaN and Infinity; a NaN weight would make every descriptor NaN
            if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError(f"{path}: layer {layer!r}: KL weights must be a list of finite and non-negative "
                                 f"numbers, got {values!r:.120}; estimate them again (`remap klw`)")
            weights[layer] = w
        return cls(weights, blob["model"], blob["settings"])


def estimate_kl_weights(model: RetrievalModel, dataset, *, input_size: tuple[int, int] = (512, 384),
                        max_matching: int = 2000, nonmatching_per_matching: int = 5, bins: int = 30,
                        smoothing: float = 0.5, direction: str = "match_nonmatch", seed: int = 0,
                        device: str = "cpu", batch_size: int = 8, progress: bool = True,
                        engine: str = "auto", precision: str = "f32") -> KLWeights:
    """KL weights of ``model``'s REMAP layers from a dataset with groups (see the module docstring).

    ``dataset`` is a :class:`~remap_lib.data.datasets.RetrievalDataset` with ``groups``
    (UKBench, a folder/CSV of groups, Holidays, the demo set).  Only images in
    sampled pairs are described.  ``smoothing`` must be > 0 (checked before
    any image is described).  ``engine``/``precision``: where the backbone
    runs (:func:`region_descriptors`).
    """
    _check_smoothing(smoothing)
    if getattr(dataset, "groups", None) is None:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')} has no groups; KL weights need matching pairs")
    matching, nonmatching = sample_pairs(dataset.groups, max_matching, nonmatching_per_matching, seed)
    used = np.unique(np.concatenate([matching.ravel(), nonmatching.ravel()]))
    position = {int(i): k for k, i in enumerate(used)}
    remap_pairs = np.vectorize(position.__getitem__)
    m_local, n_local = remap_pairs(matching), remap_pairs(nonmatching)
    regions = region_descriptors(model, [dataset.images[i] for i in used], input_size, batch_size, device,
                                 progress=progress, engine=engine, precision=precision)
    weights, distances = {}, {}
    for layer, reg in regions.items():
        dm, dn = pair_distances(reg, m_local), pair_distances(reg, n_local)
        weights[layer] = region_kl(dm, dn, bins, smoothing, direction).astype(np.float32)
        distances[layer] = (dm, dn)
        log.info("KL weights %s: min %.3f mean %.3f max %.3f", layer, weights[layer].min(),
                 weights[layer].mean(), weights[layer].max())
    settings = {"dataset": getattr(dataset, "name", "?"), "images": int(len(used)),
                "matching_pairs": int(len(matching)), "nonmatching_pairs": int(len(nonmatching)),
                "input_size": list(input_size), "bins": bins, "smoothing": smoothing, "direction": direction,
                "seed": seed, "estimator": "histogram, shared bins, Jeffreys smoothing"}
    return KLWeights(weights, model.config.to_dict(), settings, distances)
