"""One backbone pass, many heads: describe images once per (backbone weights, input sizes).

MAC, SPoC, GeM, R-MAC and REMAP, with any region count, layers, region weights α
or whitening, differ only *after* the backbone: the CNN's feature maps feed the
pooling streams (paper Fig. 1a).  Comparing a dozen heads on one dataset
therefore needs one CNN pass per image and input size, not a dozen.  Here the
backbone runs once, over the union of the layers the heads read, and every head
pools the same maps (:meth:`RetrievalModel.pool_maps`, then
:meth:`~RetrievalModel.from_pooled` and Eq. 3 over the sizes, exactly as
:meth:`RetrievalModel.multiscale` does).

* :func:`group_by_pass` — which models can share a pass: the same backbone
  weights (fingerprint), the same input sizes, the same ``upscale``.
* :class:`SharedBackbone` — runs the pass (through an inference engine of
  :mod:`remap_lib.describe.engine`, OpenVINO on a CPU by default).
  :meth:`~SharedBackbone.describe` gives each model's descriptors, equal to
  :func:`~remap_lib.describe.extract.extract_descriptors`'s (tests/test_shared_pass.py);
  :meth:`~SharedBackbone.pool` and :meth:`~SharedBackbone.pool_dataset` give
  per-size pooled vectors before whitening, for experiments that whiten and
  combine sizes themselves (``benchmarks/paper_*.py``), cached on disk per head;
  :meth:`~SharedBackbone.keep_maps` keeps the maps themselves.
* :class:`FeatureMaps` — the maps of a list of images, kept in memory or, past
  a size limit, in memory-mapped ``.npy`` files, so that any head can be pooled
  again without the backbone (the query browser re-pools on every widget change).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..data.images import DEFAULT_MAX_PIXELS, ImageLoadError, ImageSpec
from ..layers import functional as RF
from .extract import _batches, _ImageDataset, select_device
from .model import RetrievalModel, weights_fingerprint

__all__ = ["DEFAULT_MAP_MEMORY", "FeatureMaps", "SharedBackbone", "describe_maps", "group_by_pass"]

log = logging.getLogger(__name__)

# Maps kept in memory by FeatureMaps before further ones go to disk.  The demo set (174 images) at 320 px
# holds ~90 MB of layer 1+2 maps of EfficientNet-Lite0; at 1024 px ~10x that.
DEFAULT_MAP_MEMORY = 1 << 30


def describe_maps(model: RetrievalModel, maps_per_size: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Paper Eq. 3 on maps already computed: ``L2(Σ_s w_s · from_pooled(pool_maps(maps_s)))``.

    The operations of :meth:`RetrievalModel.multiscale` in the same order, so
    that pooling shared maps changes no descriptor.
    """
    weights = model.config.scale_weights
    if len(maps_per_size) != len(weights):
        raise ValueError(f"maps of {len(maps_per_size)} sizes given, the config has {len(weights)}")
    total = sum(w * model.from_pooled(model.pool_maps(maps)) for w, maps in zip(weights, maps_per_size))
    return RF.l2n(total)


def group_by_pass(models: Mapping[str, RetrievalModel]) -> list[dict[str, RetrievalModel]]:
    """Split ``{label: model}`` into groups that can share one backbone pass, in first-seen order.

    Two models share a pass when their backbones have the same weights
    (:func:`~remap_lib.describe.model.weights_fingerprint`, so a fine-tuned backbone
    never shares with its ImageNet twin) and their configs resize images the
    same way (``image_sizes`` and ``upscale``).  Heads, layers, α, whitening
    and scale weights act after the backbone and may differ.
    """
    prints: dict[int, str] = {}
    groups: dict[tuple, dict[str, RetrievalModel]] = {}
    for label, model in models.items():
        backbone = model.backbone
        if id(backbone) not in prints:  # hashing ~19 MB once per backbone object, not per head
            prints[id(backbone)] = weights_fingerprint(backbone)
        key = (backbone.name, prints[id(backbone)], tuple(model.config.image_sizes), model.config.upscale)
        groups.setdefault(key, {})[label] = model
    return list(groups.values())


class SharedBackbone:
    """A backbone that runs once per image and input size for any number of heads.

    Args:
        backbone: the built backbone (every model pooled here must have the same weights).
        device: where the backbone runs (``"auto"``: CUDA when available).
        engine, precision: the inference engine of the pass (:func:`remap_lib.describe.engine.create_engine`).
        cache_dir: where :meth:`pool_dataset` keeps pooled vectors (``None``: nowhere).
        weights: what ``backbone``'s weights are called in the configs of :meth:`model`.
        batch_size: images per forward pass (consecutive images of one size, as in extraction).
        num_workers: image-decoding processes (default: none under 64 images, else half the cores, ≤ 4).
        max_pixels: refuse larger images (decompression-bomb guard).

    ``precision`` says what actually runs once a pass has run (f32 where the
    hardware has no bf16).
    """

    def __init__(self, backbone, device: str | torch.device = "auto", engine: str = "auto", precision: str = "f32",
                 *, cache_dir: str | os.PathLike | None = None, weights: str = "imagenet", batch_size: int = 8,
                 num_workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.device = select_device(device)
        self.backbone = backbone.to(self.device).eval()
        self.engine, self.precision, self.weights = engine, precision, weights
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.batch_size, self.num_workers, self.max_pixels = batch_size, num_workers, max_pixels
        self._engines: dict[tuple, object] = {}

    @property
    def name(self) -> str:
        return self.backbone.name

    def model(self, config: ModelConfig) -> RetrievalModel:
        """A model with ``config``'s head over this backbone (built once, shared)."""
        cfg = ModelConfig.from_dict({**config.to_dict(), "backbone": self.name, "weights": self.weights})
        return RetrievalModel(cfg, self.backbone).to(self.device)

    # ------------------------------------------------------------------ the pass
    def _engine_for(self, layers: tuple[str, ...]):
        """An inference engine returning the maps of ``layers`` (one per layer set, compiled once)."""
        if layers not in self._engines:
            from .engine import create_engine

            # the engine asks a model for its layers; a MAC head is the cheapest carrier of them
            carrier = RetrievalModel(ModelConfig(backbone=self.name, head="mac", layers=list(layers)), self.backbone)
            self._engines[layers] = create_engine(carrier, self.engine, self.precision, self.device)
            self.precision = self._engines[layers].precision
        return self._engines[layers]

    def layers_of(self, models: Mapping[str, RetrievalModel]) -> tuple[str, ...]:
        """The union of the models' layers, in the backbone's order."""
        wanted = {layer for m in models.values() for layer in m.layers}
        return tuple(layer for layer in self.backbone.layer_names if layer in wanted)

    def passes(self, specs: Sequence[ImageSpec], sizes: Sequence[int], layers: Sequence[int | str],
               upscale: bool = False, progress: bool = False, desc: str = "backbone"
               ) -> Iterator[tuple[list[int], list[dict[str, torch.Tensor]]]]:
        """The one backbone pass: ``(positions, [{layer: (n, C, h, w)} per size])`` per batch, in input order.

        Images are resized as :func:`~remap_lib.describe.extract.extract_descriptors`
        does (longer side ``sizes``, Eq. 3's further sizes as ratios, no
        enlarging unless ``upscale``) and batched when consecutive images have
        one shape.  An image that cannot be read stops the pass, naming it.
        """
        layers = tuple(self.backbone.resolve_layers(layers))
        engine = self._engine_for(layers)
        workers = self.num_workers
        if workers is None:
            workers = 0 if len(specs) < 64 else min(4, max(0, (os.cpu_count() or 1) // 2))
        loader = DataLoader(_ImageDataset(specs, sizes, upscale, self.max_pixels), batch_size=None,
                            num_workers=workers)
        with torch.no_grad(), tqdm(total=len(specs), desc=desc, unit="img", disable=not progress) as bar:
            for batch in _batches(loader, self.batch_size):
                first, item = batch[0]
                if isinstance(item, str):
                    raise ImageLoadError(specs[first].key, item)
                maps = [engine.feature_maps(torch.stack([it[s] for _, it in batch]).to(self.device))
                        for s in range(len(sizes))]
                yield [i for i, _ in batch], maps
                bar.update(len(batch))

    def describe(self, specs: Sequence[ImageSpec], models: Mapping[str, RetrievalModel], progress: bool = False,
                 desc: str = "backbone") -> dict[str, np.ndarray]:
        """``{label: (N, D)}`` descriptors of ``specs``, every model from the same pass.

        The models must resize alike (one group of :func:`group_by_pass`).
        Equal to :func:`~remap_lib.describe.extract.extract_descriptors` per model (to
        float rounding: the batches are the same).
        """
        inputs = {(tuple(m.config.image_sizes), m.config.upscale) for m in models.values()}
        if len(inputs) != 1:
            raise ValueError(f"one pass serves models with one set of input sizes, got {sorted(inputs)}; "
                             "split them with group_by_pass")
        (sizes, upscale), = inputs
        models = {k: m.to(self.device).eval() for k, m in models.items()}
        out = {k: np.zeros((len(specs), m.output_dim), np.float32) for k, m in models.items()}
        with torch.no_grad():
            for positions, maps in self.passes(specs, sizes, self.layers_of(models), upscale, progress, desc):
                for k, m in models.items():
                    rows = describe_maps(m, maps).float().cpu().numpy()
                    bad = ~np.isfinite(rows).all(1)
                    if bad.any():
                        raise ImageLoadError(specs[positions[int(np.argmax(bad))]].key,
                                             f"{k}: descriptor is not finite (NaN/Inf): check the model weights")
                    out[k][positions] = rows
        return out

    def pool(self, specs: Sequence[ImageSpec], models: Mapping[str, RetrievalModel], sizes: Sequence[int],
             upscale: bool = False, progress: bool = False, desc: str = "backbone") -> dict[str, np.ndarray]:
        """``{label: (len(sizes), N, D)}``: each model's :meth:`~RetrievalModel.pool_maps` at each size.

        Before whitening and before Eq. 3, at ``sizes`` whatever the configs
        say: experiments whiten per dataset and weigh the sizes themselves.
        """
        models = {k: m.to(self.device).eval() for k, m in models.items()}
        out = {k: np.zeros((len(sizes), len(specs), m.pooled_dim), np.float32) for k, m in models.items()}
        with torch.no_grad():
            for positions, maps in self.passes(specs, sizes, self.layers_of(models), upscale, progress, desc):
                for k, m in models.items():
                    for s, maps_s in enumerate(maps):
                        out[k][s, positions] = m.pool_maps(maps_s).float().cpu().numpy()
        return out

    def pool_dataset(self, dataset, models: Mapping[str, RetrievalModel], sizes: Sequence[int], cache: bool = True,
                     name: str | None = None, progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{label: (database (S, N, D), queries (S, Nq, D))}`` of a :class:`RetrievalDataset`, pooled by :meth:`pool`.

        With a ``cache_dir``, each head's result is kept as ``.npy`` files under
        ``cache_dir/<name>-<N images>/``, keyed by its config digest, its
        weights fingerprint (backbone, α, whitening), the sizes and the
        precision: a rerun (or another script with the same heads) skips the
        CNN, and two heads that differ only in α never share an entry.
        """
        name = name or dataset.name
        cache = cache and self.dir is not None
        out, todo = {}, {}
        for label, m in models.items():
            paths = [self._path(name, len(dataset.images), m, sizes, part) for part in ("database", "queries")] \
                if cache else []
            if cache and all(p.exists() for p in paths):
                out[label] = tuple(np.load(p) for p in paths)
            else:
                todo[label] = m
        if todo:
            t = time.perf_counter()
            db = self.pool(dataset.images, todo, sizes, progress=progress, desc=f"{name} database @{list(sizes)}")
            q = db if dataset.query_is_database else \
                self.pool(dataset.queries, todo, sizes, progress=progress, desc=f"{name} queries @{list(sizes)}")
            log.info("%s: one backbone pass for %d heads, %.0f s", name, len(todo), time.perf_counter() - t)
            for label, m in todo.items():
                out[label] = (db[label], q[label])
                if cache:
                    for part, x in zip(("database", "queries"), out[label]):
                        _save_npy(self._path(name, len(dataset.images), m, sizes, part), x)
        return out

    def _path(self, name: str, count: int, model: RetrievalModel, sizes, part: str) -> Path:
        precision = "" if self.precision == "f32" else f"-{self.precision}"
        key = f"{model.config.digest()}-{model.fingerprint()}-{'x'.join(map(str, sizes))}{precision}-{part}.npy"
        return self.dir / f"{name}-{count}" / key

    def keep_maps(self, specs: Sequence[ImageSpec], sizes: Sequence[int], layers: Sequence[int | str],
                  upscale: bool = False, max_bytes: int = DEFAULT_MAP_MEMORY, folder: str | os.PathLike | None = None,
                  progress: bool = False) -> "FeatureMaps":
        """Run the pass once and keep the maps (:class:`FeatureMaps`) for pooling later by any head."""
        store = FeatureMaps(len(specs), tuple(self.backbone.resolve_layers(layers)), list(sizes), upscale,
                            max_bytes, folder)
        for positions, maps in self.passes(specs, sizes, store.layers, upscale, progress, "feature maps"):
            store.add(positions, maps)
        return store.finish()


def _save_npy(path: Path, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, x)
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written file


class FeatureMaps:
    """The feature maps of ``count`` images at each input size, kept to be pooled again without the backbone.

    :meth:`describe` pools them with any model whose layers are among
    ``layers`` and whose ``image_sizes`` / ``upscale`` are the ones the maps
    were computed at; the result equals describing the images with that model.

    Memory: maps stay in memory (on the device of the pass) while their total
    stays under ``max_bytes`` (:data:`DEFAULT_MAP_MEMORY`, 1 GiB); every
    further batch goes to ``.npy`` files in ``folder`` (by default a temporary
    folder, removed with this object) and is read back memory-mapped, one chunk
    at a time, when pooled.  EfficientNet-Lite0's layers 1+2 take about
    0.5 MB per image at 320 px and 5 MB at 1024 px.
    """

    def __init__(self, count: int, layers: Sequence[str], sizes: Sequence[int], upscale: bool = False,
                 max_bytes: int = DEFAULT_MAP_MEMORY, folder: str | os.PathLike | None = None):
        self.count, self.layers, self.sizes, self.upscale = count, tuple(layers), list(sizes), upscale
        self.max_bytes, self._folder, self._tmp = max_bytes, folder, None
        self.nbytes, self.nbytes_on_disk = 0, 0
        # chunks: (positions, [{layer: tensor or np.memmap} per size]); one shape within a chunk
        self._chunks: list[tuple[np.ndarray, list[dict]]] = []

    @property
    def folder(self) -> Path | None:
        """Where maps past ``max_bytes`` are (``None`` while everything is in memory)."""
        if self._folder is not None:
            return Path(self._folder)
        return None if self._tmp is None else Path(self._tmp)

    def add(self, positions: Sequence[int], maps_per_size: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Keep one batch of maps (images of one shape): ``[{layer: (n, C, h, w)} per size]``."""
        maps = [{layer: m[layer] for layer in self.layers} for m in maps_per_size]
        size = sum(t.numel() * t.element_size() for m in maps for t in m.values())
        if self.nbytes - self.nbytes_on_disk + size > self.max_bytes:
            maps = self._spill(len(self._chunks), maps)
            self.nbytes_on_disk += size
        self.nbytes += size
        self._chunks.append((np.asarray(positions, dtype=np.int64), maps))

    def _spill(self, k: int, maps: list[dict]) -> list[dict]:
        if self.folder is None:
            self._tmp = tempfile.mkdtemp(prefix="remap-maps-")
        self.folder.mkdir(parents=True, exist_ok=True)
        out = []
        for s, m in enumerate(maps):
            kept = {}
            for i, (layer, t) in enumerate(m.items()):
                path = self.folder / f"chunk{k:06d}-size{s}-layer{i}.npy"
                np.save(path, t.float().cpu().numpy())
                kept[layer] = np.load(path, mmap_mode="r")
            out.append(kept)
        return out

    def finish(self, chunk: int = 4) -> "FeatureMaps":
        """Stack the in-memory batches of one shape and cut them into chunks of ``chunk`` images.

        Pooling runs per chunk.  Chunks of 4-8 images of EfficientNet-Lite0's
        1280-channel maps at 320 px pool fastest on a CPU (measured: 1.0 CPU s
        for R-MAC + REMAP over the demo set's 174 images in chunks of 4, 1.8 s
        in chunks of 16, 2.3-3.2 s in one stack of 44: the region tables
        leave the cache).  Returns ``self``.
        """
        by_shape: dict[tuple, list] = {}
        on_disk = []
        for positions, maps in self._chunks:
            if isinstance(next(iter(maps[0].values())), np.ndarray):
                on_disk.append((positions, maps))
                continue
            shape = tuple(tuple(m[layer].shape[1:]) for m in maps for layer in self.layers)
            by_shape.setdefault(shape, []).append((positions, maps))
        self._chunks = on_disk
        for group in by_shape.values():
            positions = np.concatenate([p for p, _ in group])
            maps = [{layer: torch.cat([m[s][layer] for _, m in group]) for layer in self.layers}
                    for s in range(len(self.sizes))]
            del group[:]
            for a in range(0, len(positions), chunk):
                self._chunks.append((positions[a:a + chunk], [{k: v[a:a + chunk] for k, v in m.items()} for m in maps]))
        return self

    def describe(self, model: RetrievalModel) -> np.ndarray:
        """``(count, D)`` descriptors of the images under ``model``, pooled from the kept maps (no backbone)."""
        missing = set(model.layers) - set(self.layers)
        if missing:
            raise ValueError(f"maps of {sorted(missing)} were not kept (have {list(self.layers)})")
        if list(model.config.image_sizes) != self.sizes or model.config.upscale != self.upscale:
            raise ValueError(f"the maps are of images at {self.sizes} px (upscale={self.upscale}); the model wants "
                             f"{model.config.image_sizes} (upscale={model.config.upscale})")
        out = np.zeros((self.count, model.output_dim), np.float32)
        device = model.device
        with torch.no_grad():
            for positions, maps in self._chunks:
                maps = [{layer: _tensor(m[layer], device) for layer in model.layers} for m in maps]
                out[positions] = describe_maps(model, maps).float().cpu().numpy()
        return out

    def __del__(self):
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __repr__(self) -> str:
        where = f", {self.nbytes_on_disk / 2**20:.0f} MB of them in {self.folder}" if self.nbytes_on_disk else ""
        return (f"FeatureMaps({self.count} images, layers {list(self.layers)}, sizes {self.sizes}: "
                f"{self.nbytes / 2**20:.0f} MB{where})")


def _tensor(x, device: torch.device) -> torch.Tensor:
    """A kept map as a tensor on ``device`` (a memory-mapped one is read now)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x))
    return x.to(device)
