"""Images → ``(N, D)`` float32 L2-normalised descriptors, incrementally and resumably.

:func:`extract_descriptors` decodes images in loader workers, resizes them
keeping the aspect ratio (longer side ``config.image_sizes``, 1024 by default;
smaller images are not enlarged unless ``config.upscale``),
batches consecutive images of equal size, runs the model on CPU or GPU (through
the inference engine of :mod:`remap_lib.describe.engine`: OpenVINO on a CPU by default)
and, when given an output folder, writes the result as it goes:

``out/``
    ``extraction.json``   model config, digest and weights fingerprint, extraction settings
    ``parts/part-FIRST-LAST.npz``  finished descriptors, flushed every ``save_every`` images;
                          named by the positions (in the input list) of the first and
                          last image they hold
    ``failed.jsonl``      images that could not be used, with the reason (JSON lines)
    ``descriptors.npy``, ``paths.jsonl``  the assembled result (one JSON string a line,
                          so any file name survives, newlines and tabs included; bytes
                          that are not UTF-8 as ``\\udcXX`` escapes, see :func:`_jsonl`)
    ``manifest.json``     counts and SHA-256 of the two files above, written last:
                          :func:`load_descriptors` refuses a pair that disagrees with it
    ``.lock``             held while a run writes (a second run is refused)

Running the same command again resumes: images already in ``parts/`` are not
recomputed (deleting a damaged part recomputes exactly its images), and a
folder made by another model (config, weights, region weights or whitening:
anything that changes the fingerprint) is refused.  With ``on_error="skip"``
(default) bad images are logged, listed in ``failed.jsonl`` and left out
(``paths.jsonl`` says which rows are which image); with ``on_error="raise"`` the
first bad image stops the run — after the finished parts are on disk, so
nothing is lost either way.  A run killed at any moment leaves either the
previous complete result or none, never a mixed pair.  A write that fails
(disk full, ``ulimit -f``) names its file and leaves no temporary behind.

Loader workers never leave the run waiting forever: a worker that cannot put
an image in shared memory (a full ``/dev/shm``, ``ulimit -f``) sends its
pixels through its pipe instead, with a warning and the same descriptors
(:func:`_hand_over`); a worker that dies, raises, or sends nothing for
:data:`LOADER_TIMEOUT_S` ends the run with one message, the finished parts kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm.auto import tqdm

from ..data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    OTHER_IMAGE_EXTENSIONS,
    ImageLoadError,
    ImageSpec,
    list_images,
    load_spec,
    pixels_to_tensor,
    resize_longer_side,
    to_pixels,
)
from ..layers.whitening import PCAWhitening, learn_pca_whitening
from .extraction_files import FORMAT, check_output_folder, load_npy, read_manifest, temp_path as _temp_path
from .model import RetrievalModel

__all__ = ["Descriptors", "ExtractionLockedError", "extract_descriptors", "extract_distributed", "learn_whitening",
           "load_descriptors", "merge_extractions", "parse_shard", "resolve_images", "shard_bounds"]

log = logging.getLogger(__name__)
ON_ERROR = ("skip", "raise")
# Longest wait for the next image from the loader workers.  A worker that dies
# ends the run at once (torch notices its exit); this bounds the one failure
# nobody notices: an image lost between a live worker and this process.  No
# single image takes this long to decode and resize.
LOADER_TIMEOUT_S = 600


class ExtractionLockedError(RuntimeError):
    """Another run is writing into the same output folder."""


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
    """A folder, a path, a list of paths / :class:`ImageSpec`, or a dataset (its ``images``) → specs.

    A folder or file that does not exist, and a folder with no images, are
    errors (``FileNotFoundError``), not an empty result.
    """
    if isinstance(images, (str, os.PathLike)):
        if os.path.isdir(images):
            paths = list_images(images)
            if not paths:
                raise FileNotFoundError(f"no images in folder {os.fspath(images)} (looked for "
                                        f"{', '.join(IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS)})")
        elif os.path.lexists(images):
            paths = [os.fspath(images)]
        else:
            raise FileNotFoundError(f"{os.fspath(images)} does not exist")
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


@dataclass
class _Piped:
    """Pixels a loader worker sends through its pipe because shared memory refused the tensors (and why)."""

    pixels: list[np.ndarray]
    reason: str


class _ImageDataset(Dataset):
    """Item ``i``: ``(i, [tensor per image size])``, ``(i, _Piped)`` or ``(i, error message)``."""

    def __init__(self, specs: Sequence[ImageSpec], sizes: Sequence[int], upscale: bool, max_pixels: int):
        self.specs, self.sizes, self.upscale, self.max_pixels = list(specs), list(sizes), upscale, max_pixels

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, i):
        spec = self.specs[i]
        try:
            img = load_spec(spec, self.max_pixels)
            pixels = [to_pixels(resize_longer_side(img, s, spec.path))
                      for s in scaled_sizes(max(img.size), self.sizes, self.upscale)]
        except ImageLoadError as exc:
            return i, exc.reason
        return i, _hand_over(pixels)


def _hand_over(pixels: list[np.ndarray]):
    """The tensors of ``pixels``, placed in shared memory already when this runs in a loader worker.

    torch moves a worker's tensors to shared memory while pickling them in a
    background thread of the worker's queue; a failure there (a full
    ``/dev/shm``, ``ulimit -f``, no file descriptors left) is printed and the
    image silently lost, and the main process would wait for it forever.
    Sharing here instead fails where it can be caught: the pixels then go
    through the worker's pipe (slower, not shared) and become the same
    tensors in the main process (:func:`_unpiped`, which :func:`_batches` applies).
    """
    tensors = [pixels_to_tensor(p) for p in pixels]
    if get_worker_info() is None:  # loading in the main process: nothing to hand over
        return tensors
    try:
        for t in tensors:
            t.share_memory_()
    except (RuntimeError, OSError) as exc:
        return _Piped(pixels, " ".join(str(exc).split()))
    return tensors


def _received(loader: DataLoader, out_dir: Path | None):
    """``(i, item)`` of ``loader``; a loader that fails (a worker died, raised or timed out) ends the run
    with one message saying that the finished images are kept."""
    items = iter(loader)
    while True:
        try:
            i, item = next(items)
        except StopIteration:
            return
        except Exception as exc:
            raise RuntimeError(_loader_failure(exc, out_dir, loader.num_workers)) from exc
        yield i, item


def _unpiped(items: Iterable):
    """``(i, item)`` with the pixels a worker sent through its pipe made tensors (:func:`_hand_over`).

    The first such image is logged: the run goes on, slower, with the same
    descriptors.
    """
    piped = False
    for i, item in items:
        if isinstance(item, _Piped):
            if not piped:
                log.warning("a loader worker could not put an image in shared memory (%s); images that do "
                            "not fit come through a pipe instead (slower). Free /dev/shm or raise its size "
                            "(docker --shm-size), or use --workers 0", item.reason)
                piped = True
            item = [pixels_to_tensor(p) for p in item.pixels]
        yield i, item


def _loader_failure(exc: BaseException, out_dir: Path | None, workers: int) -> str:
    """One line for a failure of the image loader: what happened, and that the finished images are kept.

    A worker's own error arrives as a traceback text: its headline and last
    line say what it was.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    what = (lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}").rstrip(".")
    if isinstance(exc, RuntimeError) and what.startswith("DataLoader timed out"):
        what = (f"no image arrived from the loader workers for {LOADER_TIMEOUT_S} s (a worker may have failed to "
                "send one; see the messages above)")
    kept = (f"; the finished images are kept in {out_dir / 'parts'}: rerun the same command to resume"
            if out_dir is not None else "")
    hint = " (add --workers 0 to load the images in the main process)" if workers else ""
    return f"loading images failed: {what}{kept}{hint}"


def _batches(loader: Iterable, batch_size: int):
    """Group consecutive decoded images of identical shapes into batches; errors pass alone."""
    batch: list = []
    for i, item in _unpiped(loader):
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


# ---------------------------------------------------------------------- files
@contextlib.contextmanager
def _writing(target: Path, tmp: Path):
    """Remove ``tmp`` if writing it fails, and name ``target`` in the error.

    An ``OSError`` of a write (disk full, ``ulimit -f``) names no file, and
    numpy's says only "N requested and M written".
    """
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
            error = OSError(f"cannot write {target}: {reason}; free space (or raise the file-size limit) and rerun "
                            "the same command: the finished images are kept")
            error.errno = exc.errno  # kept for callers; left out of the message, which says it in words
            raise error from exc
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and ``os.replace`` (never half a file)."""
    tmp = _temp_path(path)
    with _writing(path, tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _save_npy(path: Path, matrix: np.ndarray) -> None:
    """``np.save`` of a C-contiguous array through a temporary name, with the write's own error on failure."""
    tmp = _temp_path(path, ".tmp.npy")
    with _writing(path, tmp):
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(matrix))
            f.write(np.ascontiguousarray(matrix).reshape(-1).view(np.uint8))  # a real errno, unlike ndarray.tofile
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _jsonl(items) -> bytes:
    """One JSON value a line, UTF-8; lone surrogates (``os.fsdecode`` of a non-UTF-8 file name) as ``\\udcXX``.

    ``ensure_ascii=False`` keeps names readable, but a name's undecodable
    bytes are lone surrogates that UTF-8 cannot encode; ``backslashreplace``
    writes them as the JSON escape ``\\udcXX`` (they only occur inside JSON
    strings), which ``json.loads`` reads back as the same surrogate, so the
    name opens the same file again.
    """
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items).encode("utf-8", "backslashreplace")


def _read_jsonl(path: Path) -> list:
    """The values of a :func:`_jsonl` file.  Split at ``\\n`` only: ``str.splitlines`` would also split
    inside names holding U+2028, U+0085 or other line breaks that JSON leaves unescaped."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _PartWriter:
    """Appends finished descriptors to ``out/parts`` in atomically written npz files.

    A part is named by the input positions of the first and last image it
    holds (``part-000000064-000000127.npz``), so parts of reruns never collide
    with the ones that survive, whatever was deleted.
    """

    def __init__(self, out_dir: Path, save_every: int):
        self.dir = out_dir / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".part-*"):  # temporaries of a killed run (we hold the lock)
            stale.unlink()
        self.save_every = save_every
        self.positions: list[int] = []
        self.paths: list[str] = []
        self.rows: list[np.ndarray] = []

    def add(self, position: int, path: str, row: np.ndarray):
        self.positions.append(position)
        self.paths.append(path)
        self.rows.append(row)
        if len(self.paths) >= self.save_every:
            self.flush()

    def flush(self):
        if not self.paths:
            return
        stem = f"part-{self.positions[0]:09d}-{self.positions[-1]:09d}"
        target, k = self.dir / f"{stem}.npz", 1
        while target.exists():  # only if the input list changed order between runs
            target, k = self.dir / f"{stem}-{k}.npz", k + 1
        tmp = self.dir / f".{target.stem}.tmp.npz"
        with _writing(target, tmp):
            np.savez(tmp, paths=np.array(self.paths, dtype=str), descriptors=np.stack(self.rows))
            os.replace(tmp, target)
        self.positions, self.paths, self.rows = [], [], []


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


@contextlib.contextmanager
def _output_lock(out_dir: Path):
    """Hold ``out/.lock`` while writing; a second writer is refused, naming the holder.

    ``filelock`` uses ``flock``, which the kernel releases when the holder dies,
    so a killed run never leaves the folder locked.
    """
    from filelock import FileLock, Timeout

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_dir / ".lock"), timeout=0)
    holder_file = out_dir / ".lock-holder.json"
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(holder_file.read_text())
            who = f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise ExtractionLockedError(
            f"{out_dir} is being written by {who}; wait for it to finish or use another output folder"
        ) from None
    try:
        _atomic_write(holder_file, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()


def _settings(model: RetrievalModel, max_pixels: int, precision: str) -> dict:
    return {"format": FORMAT, **model.identity(), "precision": precision, "max_pixels": max_pixels}


# What must agree for two runs' descriptors to be rows of one matrix.
_IDENTITY_KEYS = ("model_digest", "weights_fingerprint", "precision")


def _check_or_write_shard(old: dict, settings: dict, out_dir: Path) -> None:
    if old.get("shard") != settings.get("shard"):
        raise RuntimeError(f"{out_dir} holds another part of the image list (shard {old.get('shard')} there, "
                           f"{settings.get('shard')} now); use another output folder")


def _check_or_write_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / "extraction.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("format") != FORMAT:
            raise RuntimeError(f"{out_dir} was written by an older remap (no weights fingerprint); "
                               "use another output folder")
        diff = {k: (old.get(k), settings[k]) for k in _IDENTITY_KEYS if old.get(k) != settings[k]}
        if diff:
            raise RuntimeError(
                f"{out_dir} holds descriptors of a different model ("
                + ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in diff.items())
                + "); use another output folder"
            )
        _check_or_write_shard(old, settings, out_dir)
        return
    _atomic_write(path, json.dumps(settings, indent=2).encode())


# ---------------------------------------------------------------------- extraction
def _describer(model: RetrievalModel, engine, precision: str, device: torch.device):
    """``images_per_scale -> (N, D)`` for ``model`` on ``engine``, and the precision that actually runs.

    ``engine`` is a name, or an :class:`~remap_lib.describe.engine.InferenceEngine` of ``model`` that is reused
    (the trainer keeps one across validations, its compiled model in memory only).
    """
    from .engine import InferenceEngine, create_engine

    if isinstance(engine, InferenceEngine):
        if engine.model is not model:
            raise ValueError("the inference engine given describes another model")
        return engine.describe, engine.precision
    if engine == "torch" and precision == "f32":
        return model.multiscale, "f32"

    eng = create_engine(model, engine=engine, precision=precision, device=device)
    return eng.describe, eng.precision


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
    engine: str = "auto",
    precision: str = "f32",
    sources: dict | None = None,
    shard: tuple[int, int] | None = None,
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
        engine: ``"auto"`` (OpenVINO on a CPU, torch on a GPU), ``"torch"`` or
            ``"openvino"`` (:mod:`remap_lib.describe.engine`), or an engine of ``model`` to reuse
            (then ``precision`` is the engine's).
        precision: ``"f32"`` (equal to the torch path) or ``"bf16"`` (faster, approximate).
        sources: the files the model was built from (``{"checkpoint"|"klw"|"whitening": path}``),
            recorded in ``extraction.json`` so that an index built from it can rebuild the query model.
        shard: ``(k, n)``: describe only the ``k``-th of ``n`` contiguous blocks of the image
            list (0-based; :func:`shard_bounds`), for independent jobs (SLURM arrays) whose
            folders :func:`merge_extractions` joins; recorded in ``extraction.json``.

    Returns:
        :class:`Descriptors` in input order, bad images left out.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if save_every < 1:
        raise ValueError(f"save_every must be at least 1, got {save_every}")
    specs = resolve_images(images)
    paths = [spec.key for spec in specs]
    if len(set(paths)) != len(paths):
        raise ValueError("the image list contains duplicates")
    shard_info = None
    if shard is not None:
        k, n = shard
        start, stop = shard_bounds(len(specs), k, n)
        shard_info = {"index": k, "count": n, "start": start, "stop": stop, "total": len(specs),
                      "input_sha256": _sha256(_jsonl(paths))}
        specs = specs[start:stop]
    if out_dir is not None:
        check_output_folder(out_dir)
    device = select_device(device)
    model = model.to(device).eval()
    describe, precision = _describer(model, engine, precision, device)
    settings = _settings(model, max_pixels, precision)
    settings["sources"] = dict(sources or {})
    if shard_info is not None:
        settings["shard"] = shard_info
    if out_dir is None:
        return _extract(model, describe, specs, None, settings, batch_size, device, num_workers, on_error,
                        save_every, max_pixels, progress)
    out_path = Path(out_dir)
    with _output_lock(out_path):
        return _extract(model, describe, specs, out_path, settings, batch_size, device, num_workers, on_error,
                        save_every, max_pixels, progress)


def _extract(model, describe, specs, out_dir: Path | None, settings, batch_size, device, num_workers, on_error,
             save_every, max_pixels, progress) -> Descriptors:
    paths = [spec.key for spec in specs]
    offset = settings.get("shard", {}).get("start", 0)  # parts are named by positions in the whole list
    done: dict[str, np.ndarray] = {}
    writer = None
    if out_dir is not None:
        _check_or_write_settings(out_dir, settings)
        done = _read_parts(out_dir)
        writer = _PartWriter(out_dir, save_every)
        if done:
            log.info("resuming: %d of %d images already extracted in %s",
                     sum(p in done for p in paths), len(paths), out_dir)
    todo_positions = [k for k, spec in enumerate(specs) if spec.key not in done]
    todo_specs = [specs[k] for k in todo_positions]
    todo = [spec.key for spec in todo_specs]

    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) // 2))
    dataset = _ImageDataset(todo_specs, model.config.image_sizes, model.config.upscale, max_pixels)
    num_workers = num_workers if todo else 0
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
                        timeout=LOADER_TIMEOUT_S if num_workers else 0)
    failed: list[tuple[str, str]] = []
    complete = False
    try:
        with tqdm(total=len(paths), initial=len(paths) - len(todo), desc="extract", unit="img",
                  disable=not progress) as bar:
            for batch in _batches(_received(loader, out_dir), batch_size):
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
                desc = describe(scales).float().cpu().numpy()
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
                        writer.add(offset + todo_positions[i], todo[i], row)
                bar.update(len(batch))
        complete = True
    except RuntimeError as exc:
        if not str(exc).startswith("DataLoader worker"):
            raise
        # torch's SIGCHLD handler raises this wherever the main process is when a worker dies
        raise RuntimeError(_loader_failure(exc, out_dir, num_workers)) from exc
    finally:
        if writer is not None:
            writer.flush()
            if complete or failed:  # this run's failures replace the previous run's list
                failed_file = out_dir / "failed.jsonl"
                if failed:
                    _atomic_write(failed_file, _jsonl({"path": p, "reason": r} for p, r in failed))
                elif complete:
                    failed_file.unlink(missing_ok=True)

    kept = [p for p in paths if p in done]
    dim = model.output_dim
    matrix = np.stack([done[p] for p in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32)
    result = Descriptors(kept, matrix, failed, settings)
    if out_dir is not None:
        _write_result(out_dir, result)
    if failed:
        log.warning("%d of %d images could not be described (see failed.jsonl)", len(failed), len(paths))
    return result


def _write_result(out_dir: Path, result: Descriptors) -> None:
    """``descriptors.npy`` + ``paths.jsonl``, then ``manifest.json`` with their hashes.

    The manifest goes first (removed) and last (written): a kill in between
    leaves no manifest, and :func:`load_descriptors` then asks for a rerun
    instead of reading a pair that may disagree.
    """
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for old in ("paths.txt", "failed.tsv"):  # the previous format's files
        (out_dir / old).unlink(missing_ok=True)
    matrix = np.ascontiguousarray(result.descriptors, dtype=np.float32)
    _save_npy(out_dir / "descriptors.npy", matrix)
    paths_blob = _jsonl(result.paths)
    _atomic_write(out_dir / "paths.jsonl", paths_blob)
    manifest = {"format": FORMAT, "count": len(result.paths), "dim": int(matrix.shape[1]),
                "failed": len(result.failed), "model_digest": result.config["model_digest"],
                "weights_fingerprint": result.config["weights_fingerprint"],
                "descriptors_sha256": _sha256(matrix.tobytes()), "paths_sha256": _sha256(paths_blob)}
    _atomic_write(out_dir / "manifest.json", json.dumps(manifest, indent=2).encode())


def load_descriptors(out_dir: str | os.PathLike) -> Descriptors:
    """Read what :func:`extract_descriptors` wrote to ``out_dir``, checked against its manifest."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    descriptors = load_npy(out_dir / "descriptors.npy")  # a plain array, or a message naming the file
    paths_blob = (out_dir / "paths.jsonl").read_bytes()
    if (_sha256(np.ascontiguousarray(descriptors).tobytes()) != manifest["descriptors_sha256"]
            or _sha256(paths_blob) != manifest["paths_sha256"]):
        raise ValueError(f"{out_dir}: descriptors.npy / paths.jsonl do not match manifest.json (an interrupted "
                         "or concurrent write); rerun the same `remap extract` command to rebuild them")
    paths = _read_jsonl(out_dir / "paths.jsonl")
    if len(paths) != len(descriptors) or len(paths) != manifest["count"]:
        raise ValueError(f"{out_dir}: {len(paths)} paths but {len(descriptors)} descriptors")
    failed = []
    if (out_dir / "failed.jsonl").exists():
        failed = [(f["path"], f["reason"]) for f in _read_jsonl(out_dir / "failed.jsonl")]
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


# ---------------------------------------------------------------------- several processes, several jobs
def shard_bounds(total: int, index: int, count: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``index`` (0-based) when ``total`` images are cut into ``count`` contiguous blocks.

    Contiguous blocks (not every ``count``-th image) keep each shard's images
    in input order, so the merged result is the shards concatenated, and
    consecutive images of one size still batch together.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= K < N (shards are numbered 0 to N-1)")
    base, extra = divmod(total, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)``, 0-based: ``--shard 0/4`` … ``--shard 3/4``."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shards are numbered 0 to N-1)") from None
    shard_bounds(0, k, n)  # validates
    return k, n


def merge_extractions(out_dir: str | os.PathLike, shard_dirs: Sequence[str | os.PathLike]) -> Descriptors:
    """Join the folders of ``--shard 0/N`` … ``--shard N-1/N`` into one extraction folder, in input order.

    Refused, with a message, unless every shard is complete (manifest),
    all come from one model (config digest, weights fingerprint, precision)
    and one image list (same hash), and each of the ``N`` shards is there
    exactly once.
    """
    shards = [load_descriptors(d) for d in shard_dirs]
    if not shards:
        raise ValueError("no shard folders to merge")
    infos = []
    for d, sh in zip(shard_dirs, shards):
        info = sh.config.get("shard")
        if info is None:
            raise ValueError(f"{d} is not a shard (made without --shard or torchrun)")
        infos.append(info)
    first = shards[0].config
    for d, sh, info in zip(shard_dirs, shards, infos):
        diff = [k for k in _IDENTITY_KEYS if sh.config.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"{d} was made with other model settings than {shard_dirs[0]} (differs in "
                             f"{', '.join(diff)}: {', '.join(f'{sh.config.get(k)} vs {first.get(k)}' for k in diff)})")
        if (info["count"], info["input_sha256"]) != (infos[0]["count"], infos[0]["input_sha256"]):
            raise ValueError(f"{d} is a shard of another image list or shard count than {shard_dirs[0]}")
    count = infos[0]["count"]
    found = sorted(info["index"] for info in infos)
    if found != list(range(count)):
        missing = sorted(set(range(count)) - set(found))
        repeated = sorted({k for k in found if found.count(k) > 1})
        raise ValueError(f"need each of the {count} shards once: "
                         + (f"missing {missing}" if missing else "") + (f" repeated {repeated}" if repeated else ""))
    order = sorted(range(len(shards)), key=lambda i: infos[i]["index"])
    paths = [p for i in order for p in shards[i].paths]
    failed = [f for i in order for f in shards[i].failed]
    matrix = (np.concatenate([shards[i].descriptors for i in order]) if paths
              else np.zeros((0, shards[0].descriptors.shape[1]), np.float32))
    settings = {k: v for k, v in first.items() if k != "shard"}
    settings["merged_from"] = [os.path.abspath(d) for d in (shard_dirs[i] for i in order)]
    out = Path(out_dir)
    check_output_folder(out)
    with _output_lock(out):
        old = out / "extraction.json"
        if old.exists() and json.loads(old.read_text()).get("merged_from") is None:
            raise ValueError(f"{out} already holds an extraction; merge into a new folder")
        _atomic_write(old, json.dumps(settings, indent=2).encode())
        result = Descriptors(paths, matrix, failed, settings)
        if failed:
            _atomic_write(out / "failed.jsonl", _jsonl({"path": p, "reason": r} for p, r in failed))
        else:
            (out / "failed.jsonl").unlink(missing_ok=True)
        _write_result(out, result)
    return result


def _process_group() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment; joins the group (gloo / nccl)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


def extract_distributed(model: RetrievalModel, images, out_dir: str | os.PathLike, *,
                        device: str | torch.device = "auto", **kwargs) -> Descriptors | None:
    """:func:`extract_descriptors` under ``torchrun``: each rank describes its block of the image list.

    Rank ``r`` of ``N`` writes ``out/shards/shard-r-of-N/`` (a resumable
    extraction folder of its own, on the GPU of its ``LOCAL_RANK`` when
    ``device`` is ``"auto"`` and CUDA is there, else the CPU); after a barrier,
    rank 0 merges the shards into ``out/`` in input order
    (:func:`merge_extractions`).  Rerunning the same command after a crash or
    a kill resumes every rank where its parts stop.  With several machines
    (``--nnodes``), ``out`` must be on a file system they share.  Returns the
    merged result on rank 0 and ``None`` on the other ranks.  Without torchrun
    (``WORLD_SIZE`` unset or 1) this is :func:`extract_descriptors`.
    """
    import torch.distributed as dist

    rank, world, local = _process_group()
    if world == 1:
        return extract_descriptors(model, images, out_dir, device=device, **kwargs)
    if str(device) == "auto":
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    out = Path(out_dir)
    shard_dirs = [out / "shards" / f"shard-{k:05d}-of-{world:05d}" for k in range(world)]
    kwargs.setdefault("progress", rank == 0)
    try:
        extract_descriptors(model, images, shard_dirs[rank], device=device, shard=(rank, world), **kwargs)
    finally:
        dist.barrier()  # every rank reaches it, also after an error, so that none waits forever
    merged = merge_extractions(out, shard_dirs) if rank == 0 else None
    dist.barrier()
    return merged
