"""End-to-end fine-tuning with a triplet loss and hard-negative mining (paper §III-D, §IV-B).

One network, applied to the three images of a triplet (a three-stream siamese
network with shared weights).  For every matching pair (query, positive) of
the training groups the negative is the closest non-matching image under the
current model; the pool is re-described and the negatives re-mined every
``remine_every`` triplets (the paper: 3000).  Parameters are updated every
``accumulate`` triplets (64), one triplet in memory at a time, with SGD
(lr 1e-3, momentum 0.9, weight decay 5e-5).  Batch-norm statistics are frozen:
the network stays in ``eval()`` mode, which freezes them and changes nothing
else (these backbones have no dropout before the pooled features).

Trained jointly, each part optional: backbone conv weights, region weights α
(kept ≥ 0 by projection), and the whitening FC layer (initialised by
PCA-whitening of the training images' descriptors).  The paper's Table III is
three configs of this one code path: "RMAC" (α = 1, frozen), "RMAC+SGD"
(α = 1, learned) and "KLW" (α = KL, learned).

Determinism and resume
    Triplet ``t`` is a pure function of the seed and ``t`` (a fixed permutation
    of the pairs per epoch); checkpoints are written at update boundaries and
    hold the weights, the optimiser state, the triplet counter and the negatives
    mined for the current window, so a resumed run takes the same next triplet
    with the same negative and ends with the same weights.

Distributed
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the triplets of each update are split
    across ranks and the model is wrapped in PyTorch DDP (NCCL on GPUs, gloo on
    CPUs); the loss is scaled so that the averaged gradient equals the
    single-process one.  Rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import ModelConfig, load_yaml
from ..data.datasets import RetrievalDataset, load_dataset, parse_group_range, split_groups
from ..data.download import sha256_file
from ..data.images import ImageSpec, load_spec, resize_longer_side, to_tensor
from ..describe.extract import scaled_sizes
from ..describe.model import CHECKPOINT_FORMAT as MODEL_FORMAT, RetrievalModel, load_torch_file
from ..layers import functional as RF
from ..layers.pooling import RegionWeights, project_nonnegative_

__all__ = ["TrainConfig", "Trainer", "check_no_overlap", "matching_pairs", "mine_hard_negatives", "train",
           "verified_training_pairs"]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "remap-train-v1"
# "auto" engine: below this many images to describe, the OpenVINO export costs more than it saves
ENGINE_MIN_IMAGES = 64
_CHECKPOINT_KEYS = ("config", "model", "optimizer", "step", "triplet", "negatives", "window_start", "history")


@dataclass
class TrainConfig:
    """Everything about a training run; YAML-loadable (``remap train --config FILE``)."""

    train: str = "demo"  # dataset spec with groups: a path (UKBench, folder/CSV of groups, ...) or "demo"
    train_groups: str | None = None  # "LO-HI": only these groups (e.g. UKBench objects 0-99)
    pairs: str | None = None  # CSV of verified matching pairs (`remap verify-pairs`) in place of all same-group pairs
    val: str | None = None  # dataset spec for validation mAP during training
    val_groups: str | None = None
    exclude: list[str] = field(default_factory=list)  # evaluation sets that must not overlap the training images
    model: ModelConfig = field(default_factory=ModelConfig)
    alpha_init: str = "ones"  # "ones" or a KL-weights file from `remap klw`
    whitening_init: str = "pca"  # "pca" (FC from PCA-whitening of the training images) or "none";
    #                             its dimension is model.dim, or a quarter of the training images
    train_backbone: bool = True
    train_alpha: bool = True
    train_whitening: bool = True
    loss: str = "triplet"  # or "contrastive" (positive and negative pairs of each triplet)
    margin: float = 0.1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    accumulate: int = 64  # triplets per parameter update
    steps: int = 100  # parameter updates
    remine_every: int = 3000  # triplets between re-mining
    seed: int = 0
    out_dir: str = "runs/train"
    checkpoint_every: int = 10  # updates
    val_every: int = 10  # updates (0: never)
    device: str = "auto"
    amp: str | None = None  # "bf16" or "fp16" (GPU); None: float32
    channels_last: bool = False
    grad_checkpointing: bool = False
    num_workers: int = 0
    cache_images: bool = True  # keep decoded training images in memory (single process loaders)
    # where the backbone runs when the pool is described (whitening init, hard-negative mining) and for
    # validation: "auto" = OpenVINO f32 on a CPU for pools of at least 64 images (re-exported after every
    # weight change, ~5 s; below 64 images torch is quicker), torch otherwise; "torch"; "openvino"
    engine: str = "auto"

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if self.loss not in ("triplet", "contrastive"):
            raise ValueError(f"loss must be 'triplet' or 'contrastive', got {self.loss!r}")
        if self.engine not in ("auto", "torch", "openvino"):
            raise ValueError(f"engine must be auto, torch or openvino, got {self.engine!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be bf16, fp16 or null, got {self.amp!r}")
        for name in ("accumulate", "steps", "remine_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.val_every, int) or isinstance(self.val_every, bool) or self.val_every < 0:
            raise ValueError(f"val_every must be 0 (never) or a positive whole number, got {self.val_every!r}")
        if self.model.head != "remap" and self.train_alpha and self.alpha_init != "ones":
            raise ValueError("alpha_init applies to REMAP heads only")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown training config keys {sorted(unknown)}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a value of the wrong kind (e.g. `steps: [1]`) meets a comparison: name the file
            raise ValueError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------- pure pieces


def matching_pairs(groups) -> np.ndarray:
    """Every ordered (query, positive) pair of distinct images in the same group: ``(P, 2)``."""
    groups = np.asarray(groups)
    pairs = [(a, b) for g in np.unique(groups[groups >= 0]) for a in np.flatnonzero(groups == g)
             for b in np.flatnonzero(groups == g) if a != b]
    if not pairs:
        raise ValueError("no group has two images: nothing to train on")
    return np.array(pairs, dtype=np.int64)


def verified_training_pairs(train_set: RetrievalDataset, path: str | os.PathLike):
    """``(training set, (P, 2) ordered pairs)`` from a pairs file of ``remap verify-pairs``.

    The kept pairs become the positive pairs (both orders), in place of every
    same-group pair: too-easy near-duplicates and unverifiable pairs are left
    out, as in Gordo et al. and the REMAP paper (§IV-A).  Images the noise
    cleaning dropped (the ``dropped`` list of the JSON beside the CSV) leave
    the training set, so they are not mined as negatives either.  Pairs with
    an image outside the training set (e.g. a validation landmark) are
    skipped and counted in the log.
    """
    from ..data.datasets import without_images
    from .pairs import load_pairs

    path = Path(path)
    side = path.with_suffix(".json")
    if side.is_file():
        dropped = {os.path.realpath(d["path"]) for d in json.loads(side.read_text()).get("dropped", [])}
        if dropped:
            keys = [spec.key for spec in train_set.images if os.path.realpath(spec.path) in dropped]
            train_set = without_images(train_set, keys)
            log.info("pairs file: %d images dropped by noise cleaning leave the training set", len(keys))
    index = {os.path.realpath(spec.path): i for i, spec in enumerate(train_set.images) if spec.box is None}
    pairs, skipped = set(), 0
    for p in load_pairs(path):
        a, b = index.get(os.path.realpath(p.query)), index.get(os.path.realpath(p.positive))
        if a is None or b is None or train_set.groups[a] != train_set.groups[b] or a == b:
            skipped += 1
            continue
        pairs.update({(a, b), (b, a)})
    if not pairs:
        raise ValueError(f"{path}: none of its kept pairs joins two images of one group of {train_set.name}")
    if skipped:
        log.info("pairs file: %d kept pairs skipped (an image outside the training set)", skipped)
    return train_set, np.array(sorted(pairs), dtype=np.int64)


def mine_hard_negatives(query_desc: np.ndarray, query_groups, pool_desc: np.ndarray, pool_groups) -> np.ndarray:
    """For each query, the index of the most similar pool image of another group."""
    sim = np.asarray(query_desc, np.float32) @ np.asarray(pool_desc, np.float32).T
    same = np.asarray(query_groups)[:, None] == np.asarray(pool_groups)[None, :]
    sim[same] = -np.inf
    if np.isinf(sim).all(axis=1).any():
        raise ValueError("a query has no image of another group to use as negative")
    return sim.argmax(axis=1)


def check_no_overlap(train: RetrievalDataset, evaluation: dict[str, RetrievalDataset]) -> None:
    """Refuse training images that are also evaluation images (same file or same bytes)."""
    def keys(specs):
        out = {}
        for s in specs:
            if os.path.exists(s.path):
                out[os.path.realpath(s.path)] = s.path
                out[sha256_file(s.path)] = s.path
        return out

    train_keys = keys(train.images)
    for name, ds in evaluation.items():
        clash = {train_keys[k] for k in keys(list(ds.images) + list(ds.queries)) if k in train_keys}
        if clash:
            raise ValueError(f"{len(clash)} training images are also in the evaluation set {name} "
                             f"(e.g. {sorted(clash)[:3]}); the paper excludes them. Remove them from training.")


# --------------------------------------------------------------------------- data


class _Images:
    """Training images as tensors at the training size, optionally cached in memory (uint8)."""

    def __init__(self, specs: list[ImageSpec], size: int, upscale: bool, cache: bool):
        self.specs, self.size, self.upscale, self.cache = specs, size, upscale, cache
        self._store: dict[int, torch.Tensor] = {}

    def __call__(self, i: int) -> torch.Tensor:
        if i in self._store:
            return self._store[i].float().div_(255)
        img = load_spec(self.specs[i])
        img = resize_longer_side(img, scaled_sizes(max(img.size), [self.size], self.upscale)[0], self.specs[i].path)
        t = to_tensor(img)
        if self.cache:
            self._store[i] = (t * 255).round().to(torch.uint8)
        return t


class _TripletImages(Dataset):
    def __init__(self, images: _Images, triplets: np.ndarray):
        self.images, self.triplets = images, triplets

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, k):
        return [self.images(int(i)) for i in self.triplets[k]]


class _TripletNet(nn.Module):
    """The three-stream siamese network: one model, three images, one forward call (for DDP)."""

    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.model(x) for x in images])


# --------------------------------------------------------------------------- trainer


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local



class Trainer:
    """Runs a :class:`TrainConfig`; ``Trainer(cfg).run()`` trains (resuming if a checkpoint exists)."""

    def __init__(self, cfg: TrainConfig, train_set: RetrievalDataset | None = None,
                 val_set: RetrievalDataset | None = None, backbone=None):
        self.cfg = cfg
        self.world, self.rank, local = _distributed()
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        self.out = Path(cfg.out_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.accumulate % self.world:
            raise ValueError(f"accumulate ({cfg.accumulate}) must be a multiple of the {self.world} processes")

        self.train_set = train_set or self._load(cfg.train, cfg.train_groups)
        if self.train_set.groups is None:
            raise ValueError(f"{self.train_set.name} has no groups to build triplets from")
        self.val_set = val_set if val_set is not None else (self._load(cfg.val, cfg.val_groups) if cfg.val else None)
        check_no_overlap(self.train_set, {spec: load_dataset(spec) for spec in cfg.exclude})
        if self.val_set is not None:
            check_no_overlap(self.train_set, {"validation": self.val_set})

        if cfg.pairs:
            self.train_set, self.pairs = verified_training_pairs(self.train_set, cfg.pairs)
        self.groups = np.asarray(self.train_set.groups)
        if not cfg.pairs:
            self.pairs = matching_pairs(self.groups)
        self.images = _Images(list(self.train_set.images), cfg.model.image_sizes[0], cfg.model.upscale,
                              cfg.cache_images and cfg.num_workers == 0)
        torch.manual_seed(cfg.seed)  # random initialisation (weights: random) is reproducible too
        self.model = RetrievalModel(cfg.model, backbone)
        self.step, self.triplet = 0, 0
        self.negatives = np.zeros(0, dtype=np.int64)
        self.window_start = -1
        self.history: list[dict] = []
        self._engines: dict[str, object] = {}
        self._pooled: tuple | None = None  # (weights state, pooled pool vectors) of the last description

    @staticmethod
    def _load(spec: str, groups: str | None) -> RetrievalDataset:
        ds = load_dataset(spec)
        return split_groups(ds, parse_group_range(groups)) if groups else ds

    # ---------------------------------------------------------------- setup
    def _init_parameters(self) -> None:
        cfg = self.cfg
        if cfg.model.head == "remap" and cfg.alpha_init != "ones":
            from .klw import KLWeights

            KLWeights.load(cfg.alpha_init).apply(self.model)
        if cfg.whitening_init == "pca":
            from ..layers.whitening import learn_pca_whitening

            pooled = self._describe(whitened=False)
            # Whitening N images in N-1 dimensions would place them on a regular simplex: every pair
            # equidistant, every triplet loss exactly margin/2 (seen on UKBench 0-99 with 399 dims).
            # A quarter of the image count keeps the structure (there: matches 0.43, non-matches 2.02).
            dim = cfg.model.dim or min(self.model.pooled_dim, len(pooled) // 4)
            log.info("whitening FC: PCA-whitening %d -> %d learned from %d training images",
                     self.model.pooled_dim, dim, len(pooled))
            self.model.set_whitening(learn_pca_whitening(pooled, dim))
        self._freeze_as_configured()

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("every part is frozen: nothing to train")
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    # ---------------------------------------------------------------- helpers
    def _autocast(self):
        if self.cfg.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 3:
            x = x[None]
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def inference_engine(self, images: int):
        """The engine that describes ``images`` images without gradients, or ``None``: the model itself.

        ``None`` (torch, under the configured AMP) on a GPU, with ``engine: torch``, or for fewer than
        :data:`ENGINE_MIN_IMAGES` images under ``auto``; otherwise OpenVINO f32 (equal to torch to ~1e-6).
        One engine is kept for the run: it re-exports the backbone whenever an update changed its
        weights (never a stale export), compiled in memory only (training weights are not worth a file).
        """
        choice = self.cfg.engine
        if choice == "auto":
            choice = "openvino" if self.device.type == "cpu" and images >= ENGINE_MIN_IMAGES else "torch"
            if choice == "openvino":
                try:
                    import openvino  # noqa: F401
                except ImportError:
                    choice = "torch"
        if choice == "torch":
            return None
        if "openvino" not in self._engines:
            from ..describe.engine import create_engine

            self._engines["openvino"] = create_engine(self.model, "openvino", "f32", self.device, cache_dir=False)
        return self._engines["openvino"]

    @torch.no_grad()
    def _describe(self, whitened: bool = True) -> np.ndarray:
        """Descriptors of every training image under the current model (eval mode, no grad).

        Single scale, at the training size, as the triplets see them; the backbone runs on
        :meth:`inference_engine`, the heads and whitening in torch.  The pooled vectors (before
        the FC) are kept until a weight that shapes them changes, so the whitening initialisation
        and the first mining describe the pool once.
        """
        count = len(self.train_set.images)
        runner = self.inference_engine(count)
        state = (self._pool_state(), runner.name if runner is not None else "model")
        if self._pooled is None or self._pooled[0] != state:
            rows = []
            for i in tqdm(range(count), desc="describe pool" + (f" ({runner.name})" if runner else ""),
                          leave=False, disable=self.rank != 0 or count < 50):
                x = self._prepare(self.images(i))
                if runner is None:
                    with self._autocast():
                        rows.append(self.model.pool(x).float())
                else:  # = self.model.pool(x): the model's own pooling on the engine's maps
                    rows.append(self.model.pool_maps(runner.feature_maps(x)))
            self._pooled = (state, torch.cat(rows))
        pooled = self._pooled[1]
        return (self.model.from_pooled(pooled) if whitened else pooled).cpu().numpy()

    def _pool_state(self) -> tuple:
        """Identity and in-place version of every tensor the pooled vectors depend on (all but the FC)."""
        return tuple((id(t), t._version) for name, t in self.model.state_dict(keep_vars=True).items()
                     if not name.startswith("whiten.") and name != "whitening_learned")

    def _triplet_pairs(self, start: int, count: int) -> np.ndarray:
        """Pairs for triplets ``start .. start+count-1`` (a fixed permutation per epoch)."""
        idx = np.arange(start, start + count)
        epochs, pos = np.divmod(idx, len(self.pairs))
        out = np.empty((count, 2), dtype=np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.cfg.seed, int(e)]).permutation(len(self.pairs))
            out[epochs == e] = self.pairs[perm[pos[epochs == e]]]
        return out

    def _remine(self) -> None:
        """Describe the pool with the current model; mine negatives for the next window of triplets."""
        start = self.triplet - self.triplet % self.cfg.remine_every
        pairs = self._triplet_pairs(start, self.cfg.remine_every)
        pool = self._describe()
        self.negatives = mine_hard_negatives(pool[pairs[:, 0]], self.groups[pairs[:, 0]], pool, self.groups)
        self.window_start = start

    def triplets(self, start: int, count: int) -> np.ndarray:
        """``(count, 3)`` (query, positive, negative) image indices from triplet ``start``."""
        if self.window_start < 0 or not (self.window_start <= start < self.window_start + self.cfg.remine_every):
            self._remine()
        pairs = self._triplet_pairs(start, count)
        offset = start - self.window_start
        return np.column_stack([pairs, self.negatives[offset:offset + count]])

    def _loss(self, d: torch.Tensor) -> torch.Tensor:
        q, m, n = d[0:1], d[1:2], d[2:3]
        if self.cfg.loss == "triplet":
            return RF.triplet_loss(q, m, n, self.cfg.margin)
        return RF.contrastive_loss(torch.cat([q, q]), torch.cat([m, n]), torch.tensor([1.0, 0.0], device=d.device),
                                   self.cfg.margin)

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self, optimizer) -> None:
        if self.rank != 0:
            return
        blob = {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "model_config": self.model.config.to_dict(),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "step": self.step, "triplet": self.triplet,
                "negatives": torch.as_tensor(self.negatives), "window_start": self.window_start,
                "history": json.dumps(self.history)}
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self._checkpoint_path())

    def _read_checkpoint(self) -> dict:
        path = self._checkpoint_path()
        advice = "delete it to start this training over, or restore a good copy of it to resume"
        blob = load_torch_file(path, "remap training checkpoint", advice)
        if not isinstance(blob, dict):
            problem = f"it holds a {type(blob).__name__}"
        elif blob.get("format") != CHECKPOINT_FORMAT:
            problem = f"its format is {blob.get('format')!r}"
            if blob.get("format") == MODEL_FORMAT:
                problem += " (a trained model, like model.pt, not the state of a training run)"
        else:
            missing = [k for k in _CHECKPOINT_KEYS if k not in blob]
            problem = f"it lacks {missing}" if missing else ""
        if problem:
            raise ValueError(f"{path} is not a remap training checkpoint ({CHECKPOINT_FORMAT}): {problem}; {advice}")
        ignored = ("steps", "checkpoint_every", "out_dir", "device", "num_workers", "engine")  # change nothing trained
        old = {k: v for k, v in blob["config"].items() if k not in ignored}
        new = {k: v for k, v in self.cfg.to_dict().items() if k in old}
        if old != new:
            diff = sorted(k for k in old if old[k] != new.get(k))
            raise ValueError(f"{path} was written by a different training config (differs in {diff}); "
                             "use another out_dir or the same config")
        return blob

    def _resume(self) -> torch.optim.Optimizer:
        """Weights, optimiser state, counters and mined negatives from the checkpoint."""
        blob = self._read_checkpoint()
        if "whiten.weight" in blob["model"]:
            out_dim, in_dim = blob["model"]["whiten.weight"].shape
            self.model.whiten = nn.Linear(in_dim, out_dim)
            self.model.config.whitening, self.model.config.dim = True, out_dim
        self.model.load_state_dict(blob["model"])
        self.model.to(self.device)
        self._freeze_as_configured()
        optimizer = self._optimizer()
        optimizer.load_state_dict(blob["optimizer"])
        self.step, self.triplet = int(blob["step"]), int(blob["triplet"])
        self.negatives, self.window_start = blob["negatives"].numpy(), int(blob["window_start"])
        self.history = json.loads(blob["history"])
        self._cut_log(self.step)  # rows logged after the checkpoint are logged again from here
        log.info("resumed from %s at update %d (triplet %d)", self._checkpoint_path(), self.step, self.triplet)
        return optimizer

    # ---------------------------------------------------------------- validation and logs
    def validate(self) -> dict:
        if self.val_set is None:
            return {}
        from ..evaluation.evaluate import describe, score

        count = len(self.val_set.images) + (0 if self.val_set.query_is_database else len(self.val_set.queries))
        runner = self.inference_engine(count)
        scores = score(self.val_set, *describe(self.model, self.val_set, None, str(self.device), progress=False,
                                                engine=runner if runner is not None else "torch"))
        out = {"val_map": round(100 * scores["map"]["map"], 3) if "map" in scores else None}
        if "ukbench" in scores:
            out["val_ukbench"] = round(scores["ukbench"]["score"], 4)
        return out

    def _cut_log(self, last_step: int) -> None:
        """Keep log.csv's header and its complete rows up to ``last_step``; rewritten atomically."""
        path = self.out / "log.csv"
        if self.rank != 0 or not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            return
        header, col = rows[0], rows[0].index("step")
        keep = [r for r in rows[1:] if len(r) == len(header) and r[col].isdigit() and int(r[col]) <= last_step]
        if len(keep) == len(rows) - 1:
            return
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *keep])
        os.replace(tmp, path)

    def _log(self, row: dict, writer) -> None:
        self.history.append(row)
        if self.rank != 0:
            return
        path = self.out / "log.csv"
        fields = ["step", "triplets", "loss", "val_map", "val_ukbench", "seconds_per_triplet", "peak_memory_mb"]
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(k, v, row["step"])

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    # ---------------------------------------------------------------- the loop
    def prepare(self) -> torch.optim.Optimizer:
        """Initialise (α, PCA-whitening FC, frozen parts) or resume; idempotent.  Returns the optimiser."""
        if getattr(self, "_optimizer_ready", None) is not None:
            return self._optimizer_ready
        cfg = self.cfg
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.backbone.checkpointing = cfg.grad_checkpointing
        self.model.eval()  # frozen batch-norm statistics (see module docstring)
        if self._checkpoint_path().exists():
            optimizer = self._resume()
        else:
            self._cut_log(-1)  # a run killed before its first checkpoint starts over, step 0 included
            self._init_parameters()
            optimizer = self._optimizer()
        self._optimizer_ready = optimizer
        return optimizer

    def run(self) -> list[dict]:
        cfg = self.cfg
        optimizer = self.prepare()
        if self.step == 0 and self.rank == 0:
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            before = self.validate()
            self._log({"step": 0, "triplets": 0, **before}, None)
        net = _TripletNet(self.model)
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(enabled=cfg.amp == "fp16" and self.device.type == "cuda")
        writer = None
        if self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run drops the events logged after its checkpoint, as _cut_log does for log.csv
                writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if self.step else None)
            except ImportError:
                pass

        per_rank = cfg.accumulate // self.world
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="update", disable=self.rank != 0)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            triplets = self.triplets(self.triplet, cfg.accumulate)[self.rank::self.world]
            loader = DataLoader(_TripletImages(self.images, triplets), batch_size=None, num_workers=cfg.num_workers,
                                pin_memory=self.device.type == "cuda")
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for k, images in enumerate(loader):
                sync = k == per_rank - 1 or self.world == 1
                ctx = net.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    with self._autocast():
                        d = net([self._prepare(x) for x in images]).float()
                    loss = self._loss(d)
                    scaler.scale(loss * (self.world / cfg.accumulate)).backward()
                losses.append(loss.item())
            scaler.step(optimizer)
            scaler.update()
            project_nonnegative_(self.model)
            self.step += 1
            self.triplet += cfg.accumulate
            loss = float(np.mean(losses))
            if self.world > 1:
                t = torch.tensor([loss], device=self.device if self.device.type == "cuda" else "cpu")
                dist.all_reduce(t)
                loss = t.item() / self.world
            row = {"step": self.step, "triplets": self.triplet, "loss": round(loss, 6),
                   "seconds_per_triplet": round((time.perf_counter() - t0) / per_rank, 4),
                   "peak_memory_mb": round(self._peak_memory_mb(), 1)}
            if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps) and self.rank == 0:
                row.update(self.validate())
            self._log(row, writer)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint(optimizer)
        bar.close()
        if self.rank == 0:
            self.model.save(self.out / "model.pt")
        self._write_summary()
        if writer is not None:
            writer.close()
        return self.history

    def _freeze_as_configured(self) -> None:
        backbone = self.model.backbone
        for p in backbone.parameters():
            p.requires_grad_(self.cfg.train_backbone)
        # never trained: the ImageNet classifier and stages after the deepest pooled layer (no gradient
        # reaches them, and DDP requires every trainable parameter to take part in the loss)
        names = list(backbone.stages)
        deepest = max(names.index(layer.partition(":")[0]) for layer in self.model.layers)  # a tap: its stage
        for name in names[deepest + 1:]:
            backbone.stages[name].requires_grad_(False)
        if backbone.classifier is not None:
            backbone.classifier.requires_grad_(False)
        for m in self.model.modules():
            if isinstance(m, RegionWeights):
                m.raw.requires_grad_(self.cfg.train_alpha)
        if self.model.whiten is not None:
            for p in self.model.whiten.parameters():
                p.requires_grad_(self.cfg.train_whitening)

    def _write_summary(self) -> None:
        digest = hashlib.sha256()
        for _, v in sorted(self.model.state_dict().items()):
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        mine = digest.hexdigest()
        hashes = [mine]
        if self.world > 1:
            hashes = [None] * self.world
            dist.all_gather_object(hashes, mine)
        if self.rank == 0:
            summary = {"steps": self.step, "triplets": self.triplet, "world_size": self.world,
                       "weight_sha256_per_rank": hashes, "history": self.history}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))


def train(cfg: TrainConfig, **kwargs) -> list[dict]:
    """Train (or resume) according to ``cfg``; returns the logged history."""
    return Trainer(cfg, **kwargs).run()
