"""Images → ``(N, D)`` float32 L2-normalised descriptors, incrementally and resumably.

:func:`extract_descriptors` decodes images in loader workers, resizes them
keeping the aspect ratio (longer side ``config.image_sizes``, 1024 by default;
smaller images are not enlarged unless ``config.upscale``),
batches consecutive images of equal size, runs the model on CPU or GPU and,
when given an output folder, writes the result as it goes:

``out/``
    ``extraction.json``   model config (+ digest) and extraction settings
    ``parts/part-NNNNNN.npz``  finished descriptors, flushed every ``save_every`` images
    ``failed.tsv``        images that could not be used, with the reason
    ``descriptors.npy``, ``paths.txt``, ``manifest.json``  the assembled result

Running the same command again resumes: images already in ``parts/`` are not
recomputed, and a folder made by a different model config is refused.  With
``on_error="skip"`` (default) bad images are logged, listed in ``failed.tsv``
and left out (``paths.txt`` says which rows are which image); with
``on_error="raise"`` the first bad image stops the run — after the finished
parts are on disk, so nothing is lost either way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .images import (DEFAULT_MAX_PIXELS, ImageLoadError, ImageSpec, list_images, load_spec, resize_longer_side,
                     to_tensor)
from .model import RetrievalModel
from .whitening import PCAWhitening, learn_pca_whitening

__all__ = ["Descriptors", "extract_descriptors", "learn_whitening", "load_descriptors", "resolve_images"]

log = logging.getLogger(__name__)
ON_ERROR = ("skip", "raise")


@dataclass
class Descriptors:
    """Extraction result: row ``i`` of ``descriptors`` describes ``paths[i]``.

    ``paths`` holds each input's :attr:`ImageSpec.key`: the file path itself,
    with ``|rot=`` / ``|crop=`` appended for rotated or cropped inputs.
    """

    paths: list[str]
    descriptors: np.ndarray
    failed: list[tuple[str, str]] = field(default_factory=list)
    config: dict | None = None


def resolve_images(images) -> list[ImageSpec]:
    """A folder, a path, a list of paths / :class:`ImageSpec`, or a dataset (its ``images``) → specs."""
    if isinstance(images, (str, os.PathLike)):
        paths = list_images(images) if os.path.isdir(images) else [os.fspath(images)]
        return [ImageSpec(p) for p in paths]
    if hasattr(images, "images") and not callable(images.images):
        images = images.images
    return [im if isinstance(im, ImageSpec) else ImageSpec(os.fspath(im)) for im in images]


def select_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def scaled_sizes(longer_side: int, sizes: Sequence[int], upscale: bool) -> list[int]:
    """Longer side of each scale for an image whose longer side is ``longer_side``.

    The base (first) size shrinks larger images and, unless ``upscale``, leaves
    smaller ones as they are; further scales keep their ratio to the base, so
    ``[1024, 1280]`` gives 1024/1280 for a large photo and 800/1000 for an
    800 px crop (paper Eq. 3, applied like cirtorch's multi-scale).
    """
    base = sizes[0] if upscale else min(sizes[0], longer_side)
    return [round(base * s / sizes[0]) for s in sizes]


class _ImageDataset(Dataset):
    """Item ``i``: ``(i, [tensor per image size])`` or ``(i, error message)``."""

    def __init__(self, specs: Sequence[ImageSpec], sizes: Sequence[int], upscale: bool, max_pixels: int):
        self.specs, self.sizes, self.upscale, self.max_pixels = list(specs), list(sizes), upscale, max_pixels

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, i):
        spec = self.specs[i]
        try:
            img = load_spec(spec, self.max_pixels)
            return i, [to_tensor(resize_longer_side(img, s, spec.path))
                       for s in scaled_sizes(max(img.size), self.sizes, self.upscale)]
        except ImageLoadError as exc:
            return i, exc.reason


def _batches(loader: Iterable, batch_size: int):
    """Group consecutive decoded images of identical shapes into batches; errors pass alone."""
    batch: list = []
    for i, item in loader:
        if isinstance(item, str):
            if batch:  # finish the images before the bad one first
                yield batch
                batch = []
            yield [(i, item)]
            continue
        if batch and [t.shape for t in item] != [t.shape for t in batch[0][1]]:
            yield batch
            batch = []
        batch.append((i, item))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class _PartWriter:
    """Appends finished descriptors to ``out/parts`` in atomically written npz files."""

    def __init__(self, out_dir: Path, save_every: int):
        self.dir = out_dir / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_every = save_every
        self.paths: list[str] = []
        self.rows: list[np.ndarray] = []
        self.next_index = len(list(self.dir.glob("part-*.npz")))

    def add(self, path: str, row: np.ndarray):
        self.paths.append(path)
        self.rows.append(row)
        if len(self.paths) >= self.save_every:
            self.flush()

    def flush(self):
        if not self.paths:
            return
        target = self.dir / f"part-{self.next_index:06d}.npz"
        tmp = self.dir / f".part-{self.next_index:06d}.tmp.npz"
        np.savez(tmp, paths=np.array(self.paths, dtype=str), descriptors=np.stack(self.rows))
        os.replace(tmp, target)
        self.next_index += 1
        self.paths, self.rows = [], []


def _read_parts(out_dir: Path) -> dict[str, np.ndarray]:
    done: dict[str, np.ndarray] = {}
    for part in sorted((out_dir / "parts").glob("part-*.npz")):
        try:
            with np.load(part, allow_pickle=False) as z:
                for p, d in zip(z["paths"].tolist(), z["descriptors"]):
                    done[p] = d
        except Exception as exc:  # a part written by os.replace is complete; anything else is foreign
            raise RuntimeError(f"{part} is unreadable ({exc}); delete it to recompute its images") from exc
    return done


def _settings(model: RetrievalModel, max_pixels: int) -> dict:
    return {"model": model.config.to_dict(), "model_digest": model.config.digest(),
            "max_pixels": max_pixels}


def _check_or_write_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / "extraction.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("model_digest") != settings["model_digest"]:
            raise RuntimeError(
                f"{out_dir} holds descriptors of a different model (config digest "
                f"{old.get('model_digest')} vs {settings['model_digest']}); use another output folder"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, path)


@torch.no_grad()
def extract_descriptors(
    model: RetrievalModel,
    images,
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    num_workers: int | None = None,
    on_error: str = "skip",
    save_every: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> Descriptors:
    """Describe every image with ``model``.

    Args:
        model: a :class:`RetrievalModel` (its config fixes sizes and scales).
        images: folder, list of paths, or a dataset with an ``images`` list.
        out_dir: folder for incremental, resumable output (``None``: in memory only).
        batch_size: images per forward pass (consecutive images of equal size).
        device: ``"auto"`` (GPU when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        num_workers: image-decoding processes (default: half the CPU cores, at most 4).
        on_error: ``"skip"`` bad images (logged, listed) or ``"raise"`` at the first.
        save_every: flush finished descriptors to disk every this many images.
        max_pixels: refuse images with more pixels (decompression-bomb guard).
        progress: show a progress bar.

    Returns:
        :class:`Descriptors` in input order, bad images left out.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    specs = resolve_images(images)
    paths = [spec.key for spec in specs]
    if len(set(paths)) != len(paths):
        raise ValueError("the image list contains duplicates")
    device = select_device(device)
    model = model.to(device).eval()
    settings = _settings(model, max_pixels)

    done: dict[str, np.ndarray] = {}
    writer = None
    if out_dir is not None:
        out_path = Path(out_dir)
        _check_or_write_settings(out_path, settings)
        done = _read_parts(out_path)
        writer = _PartWriter(out_path, save_every)
        if done:
            log.info("resuming: %d of %d images already extracted in %s", len(done), len(paths), out_dir)
    todo_specs = [spec for spec in specs if spec.key not in done]
    todo = [spec.key for spec in todo_specs]

    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) // 2))
    dataset = _ImageDataset(todo_specs, model.config.image_sizes, model.config.upscale, max_pixels)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers if todo else 0,
                        pin_memory=device.type == "cuda")
    failed: list[tuple[str, str]] = []
    try:
        with tqdm(total=len(paths), initial=len(done), desc="extract", unit="img",
                  disable=not progress) as bar:
            for batch in _batches(loader, batch_size):
                if isinstance(batch[0][1], str):
                    i, reason = batch[0]
                    failed.append((todo[i], reason))
                    log.warning("skipping %s: %s", todo[i], reason)
                    if on_error == "raise":
                        raise ImageLoadError(todo[i], reason)
                    bar.update(1)
                    continue
                scales = [torch.stack([item[s] for _, item in batch]).to(device, non_blocking=True)
                          for s in range(len(model.config.image_sizes))]
                desc = model.multiscale(scales).float().cpu().numpy()
                for (i, _), row in zip(batch, desc):
                    if not np.isfinite(row).all():
                        reason = "descriptor is not finite (NaN/Inf): check the model weights"
                        failed.append((todo[i], reason))
                        log.warning("skipping %s: %s", todo[i], reason)
                        if on_error == "raise":
                            raise ImageLoadError(todo[i], reason)
                        continue
                    done[todo[i]] = row
                    if writer is not None:
                        writer.add(todo[i], row)
                bar.update(len(batch))
    finally:
        if writer is not None:
            writer.flush()
            if failed:
                with open(Path(out_dir) / "failed.tsv", "w") as f:
                    f.writelines(f"{p}\t{r}\n" for p, r in failed)

    kept = [p for p in paths if p in done]
    dim = model.output_dim
    matrix = np.stack([done[p] for p in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32)
    result = Descriptors(kept, matrix, failed, settings)
    if out_dir is not None:
        _write_result(Path(out_dir), result)
    if failed:
        log.warning("%d of %d images could not be described (see failed.tsv)", len(failed), len(paths))
    return result


def _write_result(out_dir: Path, result: Descriptors) -> None:
    tmp = out_dir / ".descriptors.tmp.npy"
    np.save(tmp, result.descriptors)
    os.replace(tmp, out_dir / "descriptors.npy")
    (out_dir / "paths.txt").write_text("".join(p + "\n" for p in result.paths))
    manifest = {"count": len(result.paths), "dim": int(result.descriptors.shape[1]),
                "failed": len(result.failed), "model_digest": result.config["model_digest"]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def load_descriptors(out_dir: str | os.PathLike) -> Descriptors:
    """Read what :func:`extract_descriptors` wrote to ``out_dir``."""
    out_dir = Path(out_dir)
    if not (out_dir / "descriptors.npy").exists():
        raise FileNotFoundError(f"{out_dir} has no descriptors.npy; run (or finish) `remap extract` first")
    descriptors = np.load(out_dir / "descriptors.npy", allow_pickle=False)
    paths = (out_dir / "paths.txt").read_text().splitlines()
    if len(paths) != len(descriptors):
        raise ValueError(f"{out_dir}: {len(paths)} paths but {len(descriptors)} descriptors")
    failed = []
    if (out_dir / "failed.tsv").exists():
        failed = [tuple(line.split("\t", 1)) for line in (out_dir / "failed.tsv").read_text().splitlines()]
    config = json.loads((out_dir / "extraction.json").read_text())
    return Descriptors(paths, descriptors, failed, config)


def learn_whitening(model: RetrievalModel, images, dim: int | None = None, **extract_kwargs) -> PCAWhitening:
    """Learn PCA-whitening from ``images`` described by ``model`` *without* its whitening,
    and install it as the model's FC layer.  Returns the whitening."""
    whiten = model.whiten
    model.whiten = None  # pool() output: the input the FC layer sees
    try:
        pooled = extract_descriptors(model, images, **extract_kwargs)
    finally:
        model.whiten = whiten
    whitening = learn_pca_whitening(pooled.descriptors, dim)
    model.set_whitening(whitening)
    return whitening
