"""Training the region proposal network of ``regions: rpn`` models (Gordo et al. 2016): ``remap train-rpn``.

Data.  The landmark boxes of the verified training pairs
(:func:`~remap_lib.training.landmark_boxes.training_boxes`: the box of the RANSAC
inliers of every kept pair of ``remap verify-pairs``, merged per image), one
box per image, converted to cells of the image's map (a cell covers
``image size / map size`` pixels) and clipped to it; a box under
``model.rpn_min_size`` cells after clipping is left out, since the network
could never propose it.  Only images with a box are used: an image without
one is not known to be background.

What trains.  Only the RPN (1×1 reduction, ``RPNHead``); the backbone is
frozen, so the RPN learns where to pool on exactly the maps the descriptor
pools, and every map is computed once, at ``model.image_sizes[0]``, and kept
in memory as float16.  To put proposals on a fine-tuned backbone, fine-tune
first (``remap train``) and start from its ``model.pt`` (``checkpoint:``); the
whitening FC is not carried over (it was learned on grid R-MAC vectors):
learn one for the proposal descriptors with ``remap extract`` + ``remap whiten``.
Loss: torchvision's RPN loss (:meth:`~remap_lib.layers.proposals.ProposalNetwork.loss`),
averaged over the ``batch_size`` images of an update; Adam (default) or SGD.

Outputs in ``out_dir``: ``model.pt`` (a :class:`~remap_lib.describe.model.RetrievalModel`
checkpoint with the trained RPN: ``remap extract --checkpoint``, evaluation and
the index take it like any other model), ``checkpoint.pt`` (resume),
``log.csv`` (loss; box recall of held-out landmarks at IoU 0.5 for the top 1
and top 10 proposals when ``val_groups`` or ``val_pairs`` is given),
``boxes.json`` / ``val_boxes.json`` (the boxes) with their resumable cache
``boxes.cache.jsonl``, ``train_config.json`` and ``summary.json``.  One pairs
CSV of a whole dataset serves both: ``dataset``, ``train_groups`` and
``val_groups`` split its pairs by landmark, as ``remap train`` splits images.

Resume.  Checkpoints are written atomically every ``checkpoint_every`` updates
and after the last; running the same command again continues from the last
one and ends with the same weights as an uninterrupted run: the images of
update ``t`` are a fixed permutation of ``(seed, epoch)``, and the anchors
sampled for the loss come from a generator seeded by ``(seed, t)``.  A
checkpoint of another config (other than ``steps``, ``checkpoint_every``,
``val_every``, ``out_dir``, ``device``, ``engine``, ``box_workers``) or of another
backbone is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, load_yaml
from ..data.images import ImageLoadError, load_spec, resize_longer_side, to_tensor
from ..describe.extract import scaled_sizes
from ..describe.model import RetrievalModel, load_torch_file, weights_fingerprint
from ..layers.proposals import box_recall

__all__ = ["RPNTrainConfig", "RPNTrainer", "train_rpn"]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "remap-train-rpn-v1"
_CHECKPOINT_KEYS = ("config", "rpn", "optimizer", "step", "history", "backbone")
# options that change nothing trained: a resumed run may differ in them
_RESUME_IGNORES = ("steps", "checkpoint_every", "val_every", "out_dir", "device", "engine", "box_workers")
_LOG_FIELDS = ["step", "loss", "objectness", "box", "val_recall_1", "val_recall_10", "seconds"]


def _default_model() -> ModelConfig:
    return ModelConfig(head="rmac", regions="rpn", image_sizes=[512])


@dataclass
class RPNTrainConfig:
    """Everything about an RPN training run; YAML-loadable (``remap train-rpn --config FILE``)."""

    pairs: str | None = None  # CSV of verified pairs (`remap verify-pairs`): the training boxes come from its kept pairs
    dataset: str | None = None  # the dataset of the pairs, to split them by landmark with the two options below
    train_groups: str | None = None  # "LO-HI": train on the pairs within these groups of `dataset` only
    val_groups: str | None = None  # "LO-HI": held-out landmarks of `dataset`: box recall logged during training
    val_pairs: str | None = None  # or: a pairs CSV of held-out landmarks
    model: ModelConfig = field(default_factory=_default_model)  # regions: rpn; image_sizes[0] is the training size
    checkpoint: str | None = None  # start from this model file's backbone (e.g. `remap train`'s model.pt)
    merge: str = "union"  # boxes of one image from several pairs: "union" or "median" (remap_lib.training.landmark_boxes)
    min_inliers: int = 5  # a pair with fewer recomputed inliers gives no box
    max_side: int = 1024  # SIFT image size of the box estimation (as `remap verify-pairs --max-side`)
    box_workers: int | None = None  # processes for the box estimation (default: the CPU cores)
    optimizer: str = "adam"  # or "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    batch_size: int = 8  # images per update
    steps: int = 300  # updates
    seed: int = 0
    out_dir: str = "runs/train-rpn"
    checkpoint_every: int = 50
    val_every: int = 50  # updates (0: never)
    device: str = "auto"
    engine: str = "auto"  # where the frozen backbone computes the maps: auto (OpenVINO on a CPU), torch, openvino

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if self.model.regions != "rpn":
            raise ValueError("train-rpn trains the proposals of a model with regions: rpn (and head: rmac); "
                             f"the model config has regions: {self.model.regions}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.merge not in ("union", "median"):
            raise ValueError(f"merge must be union or median, got {self.merge!r}")
        if self.engine not in ("auto", "torch", "openvino"):
            raise ValueError(f"engine must be auto, torch or openvino, got {self.engine!r}")
        for name in ("batch_size", "steps", "checkpoint_every", "max_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.val_every, int) or isinstance(self.val_every, bool) or self.val_every < 0:
            raise ValueError(f"val_every must be 0 (never) or a positive whole number, got {self.val_every!r}")
        if (self.train_groups or self.val_groups) and not self.dataset:
            raise ValueError("train_groups / val_groups split the pairs by the groups of `dataset:`; give it")
        if self.val_groups and self.val_pairs:
            raise ValueError("give held-out landmarks either as val_groups or as val_pairs, not both")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RPNTrainConfig":
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an RPN training config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown train-rpn config keys {sorted(unknown)}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a value of the wrong kind (e.g. `steps: [1]`) meets a comparison: name the file
            raise ValueError(f"{path}: {exc}") from exc


class RPNTrainer:
    """Runs an :class:`RPNTrainConfig`; ``RPNTrainer(cfg).run()`` trains (resuming if a checkpoint exists).

    Args:
        cfg: the run.
        boxes, val_boxes: image path → box ``[x0, y0, x1, y1]`` in its pixels, in
            place of the boxes of ``cfg.pairs`` / ``cfg.val_pairs`` (or a
            :class:`~remap_lib.training.landmark_boxes.TrainingBoxes`).
        backbone: an already built backbone (else from ``cfg.checkpoint`` or ``cfg.model``).
    """

    def __init__(self, cfg: RPNTrainConfig, boxes=None, val_boxes=None, backbone=None):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # the RPN's initialisation
        if cfg.checkpoint:  # read first: a file that cannot be used fails before the long box estimation
            base = RetrievalModel.load(cfg.checkpoint)
            if base.config.backbone != cfg.model.backbone:
                raise ValueError(f"{cfg.checkpoint} holds a {base.config.backbone} backbone, the model config asks "
                                 f"for {cfg.model.backbone}; set model.backbone: {base.config.backbone}")
            backbone = base.backbone
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if boxes is None or (val_boxes is None and (cfg.val_pairs or cfg.val_groups)):
            train_pairs, val_pairs = self._pairs()
            boxes = self._boxes(train_pairs, "boxes") if boxes is None else boxes
            if val_boxes is None and val_pairs:
                val_boxes = self._boxes(val_pairs, "val_boxes")
        boxes, val_boxes = (getattr(b, "boxes", b) for b in (boxes, val_boxes))

        self.model = RetrievalModel(cfg.model, backbone).to(self.device).eval()
        self.layer = self.model.layers[0]
        self.stream = self.model.streams[self.layer]
        self.rpn = self.stream.rpn
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.rpn.parameters():
            p.requires_grad_(True)
        self.backbone_fingerprint = weights_fingerprint(self.model.backbone)

        start = time.perf_counter()
        self.maps, self.targets, self.paths = self._maps(boxes, "training")
        self.val = self._maps(val_boxes, "validation") if val_boxes else None
        log.info("maps of %d training images in %.1f s", len(self.maps), time.perf_counter() - start)
        if not self.maps:
            raise ValueError("no training image with a usable box (readable, at least "
                             f"{cfg.model.rpn_min_size:g} cells wide and high on its map)")
        self.step = 0
        self.history: list[dict] = []

    # ---------------------------------------------------------------- data
    def _pairs(self) -> tuple[list, list]:
        """The kept pairs to train on and those of the held-out landmarks (split by ``dataset`` groups)."""
        from ..data.datasets import load_dataset, parse_group_range, split_groups
        from .pairs import load_pairs

        cfg = self.cfg
        if not cfg.pairs:
            raise ValueError("no training boxes: give `pairs:` (a CSV of `remap verify-pairs`)")
        pairs = load_pairs(cfg.pairs)
        val = load_pairs(cfg.val_pairs) if cfg.val_pairs else []
        if cfg.dataset:
            ds = load_dataset(cfg.dataset)

            def within(groups):
                part = split_groups(ds, parse_group_range(groups))
                paths = {os.path.realpath(spec.path) for spec in part.images}
                return [p for p in pairs if os.path.realpath(p.query) in paths and os.path.realpath(p.positive) in paths]

            if cfg.val_groups:
                val = within(cfg.val_groups)
            if cfg.train_groups:
                pairs = within(cfg.train_groups)
        held_out = {os.path.realpath(x) for p in val for x in (p.query, p.positive)}
        overlap = [p for p in pairs if {os.path.realpath(p.query), os.path.realpath(p.positive)} & held_out]
        if overlap:
            raise ValueError(f"{len(overlap)} training pairs hold images of the held-out landmarks "
                             f"(e.g. {overlap[0].query}); split the groups apart")
        if not pairs:
            raise ValueError(f"{cfg.pairs}: no kept pair to take training boxes from"
                             + (f" within groups {cfg.train_groups}" if cfg.train_groups else ""))
        return pairs, val

    def _boxes(self, pairs: list, name: str):
        from .landmark_boxes import training_boxes
        from .verification import MatchSettings

        cfg = self.cfg
        result = training_boxes(pairs, merge=cfg.merge, min_inliers=cfg.min_inliers,
                                settings=MatchSettings(max_side=cfg.max_side),
                                cache=self.out / "boxes.cache.jsonl", workers=cfg.box_workers)
        result.settings["pairs_file"] = cfg.val_pairs if name == "val_boxes" and cfg.val_pairs else cfg.pairs
        result.save(self.out / f"{name}.json")
        log.info("%s: boxes of %d images from %d pairs in %.1f s", name, len(result.boxes),
                 result.settings["pairs"], result.seconds)
        return result

    @torch.no_grad()
    def _maps(self, boxes: dict, what: str):
        """Maps (float16, CPU) and target boxes (cells) of the images with a usable box."""
        from ..describe.engine import create_engine

        engine = create_engine(self.model, self.cfg.engine, "f32", self.device, cache_dir=False)
        config = self.model.config
        maps, targets, paths, skipped = [], [], [], 0
        for path, box in sorted(boxes.items()):
            try:
                img = load_spec(path)
                width, height = img.size
                size = scaled_sizes(max(width, height), [config.image_sizes[0]], config.upscale)[0]
                x = to_tensor(resize_longer_side(img, size, path))[None]
            except ImageLoadError as exc:
                log.warning("%s: %s", exc.path, exc.reason)
                continue
            fmap = engine.feature_maps(x.to(self.device))[self.layer][0]
            h, w = fmap.shape[-2:]
            b = torch.as_tensor(box, dtype=torch.float32).reshape(4) * torch.tensor([w / width, h / height] * 2)
            b = torch.stack([b[0].clamp(0, w), b[1].clamp(0, h), b[2].clamp(0, w), b[3].clamp(0, h)])
            if not (b[2] - b[0] >= config.rpn_min_size and b[3] - b[1] >= config.rpn_min_size):
                skipped += 1
                continue
            maps.append(fmap.half().cpu())
            targets.append(b[None])
            paths.append(path)
        if skipped:
            log.info("%s: %d boxes under %g cells left out", what, skipped, config.rpn_min_size)
        return maps, targets, paths

    def batch(self, step: int) -> np.ndarray:
        """Image indices of update ``step`` (0-based): a fixed permutation of the images per epoch."""
        n, b = len(self.maps), self.cfg.batch_size
        idx = np.arange(step * b, (step + 1) * b)
        epochs, pos = np.divmod(idx, n)
        out = np.empty(b, dtype=np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.cfg.seed, int(e)]).permutation(n)
            out[epochs == e] = perm[pos[epochs == e]]
        return out

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.cfg, list(self.rpn.parameters())
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def save_checkpoint(self, optimizer) -> None:
        blob = {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(),
                "rpn": {k: v.detach().cpu() for k, v in self.rpn.state_dict().items()},
                "optimizer": optimizer.state_dict(), "step": self.step, "history": json.dumps(self.history),
                "backbone": self.backbone_fingerprint}
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self._checkpoint_path())

    def _resume(self, optimizer) -> None:
        path = self._checkpoint_path()
        advice = "delete it to start this training over, or use another out_dir"
        blob = load_torch_file(path, "remap RPN training checkpoint", advice)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or \
                any(k not in blob for k in _CHECKPOINT_KEYS):
            raise ValueError(f"{path} is not a remap RPN training checkpoint ({CHECKPOINT_FORMAT}); {advice}")
        old = {k: v for k, v in blob["config"].items() if k not in _RESUME_IGNORES}
        new = {k: v for k, v in self.cfg.to_dict().items() if k in old}
        if old != new:
            diff = sorted(k for k in old if old[k] != new.get(k))
            raise ValueError(f"{path} was written by a different train-rpn config (differs in {diff}); {advice}")
        if blob["backbone"] != self.backbone_fingerprint:
            raise ValueError(f"{path} was trained on the maps of another backbone (weights fingerprint "
                             f"{blob['backbone']}, this one {self.backbone_fingerprint}); {advice}")
        self.rpn.load_state_dict(blob["rpn"])
        optimizer.load_state_dict(blob["optimizer"])
        self.step, self.history = int(blob["step"]), json.loads(blob["history"])
        self._cut_log(self.step)
        log.info("resumed from %s at update %d", path, self.step)

    def _cut_log(self, last_step: int) -> None:
        """Keep log.csv's rows up to ``last_step`` (those after the checkpoint are logged again)."""
        path = self.out / "log.csv"
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_LOG_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) <= last_step)
        os.replace(tmp, path)

    def _log(self, row: dict) -> None:
        self.history.append(row)
        path = self.out / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_LOG_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    # ---------------------------------------------------------------- the loop
    @torch.no_grad()
    def validate(self) -> dict:
        """Box recall of the validation images at IoU 0.5 for the top 1 and top 10 proposals."""
        if not self.val or not self.val[0]:
            return {}
        maps, targets, _ = self.val
        proposals = [self.rpn.propose(m.float().to(self.device)[None], 10)[0][0].cpu() for m in maps]
        return {f"val_recall_{k}": round(box_recall(proposals, targets, 0.5, k), 4) for k in (1, 10)}

    def run(self) -> list[dict]:
        cfg = self.cfg
        optimizer = self._optimizer()
        if self._checkpoint_path().exists():
            self._resume(optimizer)
        else:
            self._cut_log(-1)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            self._log({"step": 0, **self.validate()})
        self.rpn.train()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            # the anchors sampled for the loss (torch's global generator) are a function of (seed, update)
            torch.manual_seed(int(np.random.default_rng([cfg.seed, self.step]).integers(2**62)))
            optimizer.zero_grad(set_to_none=True)
            parts = {"objectness": 0.0, "box": 0.0}
            batch = self.batch(self.step)
            for i in batch:
                losses = self.rpn.loss(self.maps[i].float().to(self.device)[None], [self.targets[i].to(self.device)])
                (sum(losses.values()) / len(batch)).backward()
                for k, v in losses.items():
                    parts[k] += v.item() / len(batch)
            optimizer.step()
            self.step += 1
            row = {"step": self.step, "loss": round(sum(parts.values()), 6),
                   **{k: round(v, 6) for k, v in parts.items()}, "seconds": round(time.perf_counter() - t0, 4)}
            if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                self.rpn.eval()
                row.update(self.validate())
                self.rpn.train()
            self._log(row)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint(optimizer)
        self.rpn.eval()
        self.rpn.trained.fill_(True)
        self.model.save(self.out / "model.pt")
        summary = {"steps": self.step, "images": len(self.maps), "validation_images": len(self.val[0]) if self.val else 0,
                   "model_digest": self.model.config.digest(), "weights_fingerprint": self.model.fingerprint(),
                   "history": self.history}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return self.history


def train_rpn(cfg: RPNTrainConfig, **kwargs) -> list[dict]:
    """Train (or resume) the region proposal network as ``cfg`` says; returns the logged history."""
    return RPNTrainer(cfg, **kwargs).run()
