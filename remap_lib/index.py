"""The search index: faiss behind one factory string, with metadata and safe files.

``RetrievalIndex(dim, "PQ16")`` builds any faiss pipeline by its factory
string (``"Flat"``: exact inner product; ``"PQ16"``: product quantisation, 16
sub-quantisers × 8 bits = 16 bytes an image, searched with asymmetric distance
computation; ``"IVF1024,PQ16"``: inverted file over PQ codes; ``"OPQ16,IVF1024,PQ16"``:
with a learned rotation).  The inner product of L2-normalised descriptors is
their cosine similarity, so every index uses ``METRIC_INNER_PRODUCT``.

Compact codes (paper §III-E): :func:`truncate_descriptors` keeps the first
``d`` dimensions of a whitened descriptor (the paper keeps 128 of 4096; after
PCA-whitening the leading dimensions carry the most variance) and
re-normalises; PQ compresses further.

An index file holds, besides the faiss index, the image paths (id ↔ path),
the model config with its digest, the model's weights fingerprint (which
checkpoint, region weights and whitening), the files the model was built from
(``--checkpoint/--klw/--whitening``, so that ``remap index search photo.jpg``
can rebuild exactly that model and verify it), the dimension and the count; it is written
atomically with a SHA-256 of its contents, so a truncated or corrupt file is
refused before faiss reads it, and a query model that does not match the
index's is refused with a clear message.  ``faiss-gpu`` is used for search when
installed and asked for (same API); otherwise the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path

import numpy as np

__all__ = ["IndexFileError", "ModelMismatchError", "RetrievalIndex", "synthetic_distractors", "truncate_descriptors"]

log = logging.getLogger(__name__)

MAGIC = b"REMAPIDX"
VERSION = 2  # 2: weights fingerprint, model sources and precision in the header


class IndexFileError(ValueError):
    """An index file that is truncated, corrupt or not an index."""


class ModelMismatchError(ValueError):
    """Query descriptors from a model other than the index's."""


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("the search index needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def truncate_descriptors(x: np.ndarray, dim: int) -> np.ndarray:
    """Top-``dim`` truncation: the first ``dim`` components, L2-normalised again (paper §III-E)."""
    x = np.asarray(x, dtype=np.float32)
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"cannot truncate {x.shape[1]}-d descriptors to {dim}")
    t = x[:, :dim]
    return t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-12)


class RetrievalIndex:
    """Descriptors of a collection, searchable by inner product, with their image paths.

    Args:
        dim: descriptor dimension the index stores (after truncation, if any).
        factory: faiss factory string.
        model_config: config (dict) of the model that made the descriptors.
        truncate: keep only the first ``truncate`` dimensions of added/searched descriptors.
    """

    def __init__(self, dim: int, factory: str = "Flat", model_config: dict | None = None,
                 truncate: int | None = None, _index=None, *, weights_fingerprint: str | None = None,
                 model_sources: dict | None = None, precision: str = "f32"):
        faiss = _faiss()
        if int(dim) < 1:
            raise ValueError(f"index dimension must be at least 1, got {dim}")
        if truncate is not None and int(truncate) < 1:
            raise ValueError(f"truncate must be at least 1, got {truncate}")
        self.dim, self.factory, self.truncate = int(dim), factory, truncate
        self.model_config = model_config
        self.weights_fingerprint = weights_fingerprint
        self.model_sources = dict(model_sources or {})
        self.precision = precision
        try:
            self.index = _index if _index is not None else faiss.index_factory(self.dim, factory,
                                                                               faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"faiss cannot build {factory!r} for {self.dim}-d vectors: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
        self.paths: list[str] = []
        self.nprobe = 1

    @classmethod
    def for_descriptors(cls, extraction: dict, dim: int, factory: str = "Flat", truncate: int | None = None):
        """An empty index for descriptors whose ``extraction.json`` settings are ``extraction``
        (see :func:`remap_lib.extract.load_descriptors`): it records the whole model identity."""
        return cls(dim, factory, extraction["model"], truncate,
                   weights_fingerprint=extraction.get("weights_fingerprint"),
                   model_sources=extraction.get("sources"), precision=extraction.get("precision", "f32"))

    # ------------------------------------------------------------------ metadata
    @property
    def model_digest(self) -> str | None:
        if self.model_config is None:
            return None
        from .config import ModelConfig

        return ModelConfig.from_dict(self.model_config).digest()

    def __len__(self) -> int:
        return self.index.ntotal

    def bytes_per_vector(self) -> float:
        """Bytes of code stored per database vector (IVF lists also keep an 8-byte id each)."""
        faiss = _faiss()
        index = self.index
        while isinstance(index, faiss.IndexPreTransform):  # OPQ rotation in front
            index = faiss.downcast_index(index.index)
        return float(index.code_size)

    def check_model(self, model_config: dict | None, weights_fingerprint: str | None = None,
                    precision: str | None = None) -> None:
        """Refuse queries from a model other than the index's.

        The config digest says which architecture; the weights fingerprint
        (:meth:`RetrievalModel.fingerprint`) says which weights, region weights α
        and whitening: an ImageNet model and its fine-tuned twin share a config
        but not a fingerprint.  A query given without a fingerprint is checked
        by config only (logged).
        """
        if self.model_config is None or model_config is None:
            return
        from .config import ModelConfig

        theirs = ModelConfig.from_dict(model_config).digest()
        if theirs != self.model_digest:
            mine = ModelConfig.from_dict(self.model_config).to_dict()
            other = ModelConfig.from_dict(model_config).to_dict()
            diff = {k: (mine[k], other[k]) for k in mine if mine[k] != other.get(k)}
            raise ModelMismatchError(
                f"the query model (digest {theirs}) is not the index's model (digest {self.model_digest}); "
                f"they differ in {diff}. Describe the queries with the index's model config."
            )
        if self.weights_fingerprint is not None:
            if weights_fingerprint is None:
                log.warning("query weights not verified against the index's (no fingerprint given)")
            elif weights_fingerprint != self.weights_fingerprint:
                raise ModelMismatchError(
                    f"the query model has the index's config but other weights (fingerprint "
                    f"{weights_fingerprint}, index {self.weights_fingerprint}: another checkpoint, region "
                    f"weights or whitening){self._sources_hint()}"
                )
        if precision is not None and precision != self.precision:
            raise ModelMismatchError(f"the index holds {self.precision} descriptors; the queries are {precision}")

    def _sources_hint(self) -> str:
        if not self.model_sources:
            return ""
        return "; the index was built with " + ", ".join(f"--{k} {v}" for k, v in self.model_sources.items())

    # ------------------------------------------------------------------ data
    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"descriptors must be (N, D), got shape {x.shape}")
        if self.truncate is not None and x.shape[1] != self.dim:
            x = truncate_descriptors(x, self.truncate)
        if x.shape[1] != self.dim:
            raise ValueError(f"the index stores {self.dim}-d descriptors, got {x.shape[1]}-d")
        if not np.isfinite(x).all():
            raise ValueError("descriptors contain NaN or infinite values")
        return np.ascontiguousarray(x)

    def train(self, x: np.ndarray) -> None:
        """Train the quantisers (PQ codebooks, IVF centroids, OPQ rotation) on ``x``."""
        x = self._prepare(x)
        if not self.index.is_trained:
            t = time.perf_counter()
            self.index.train(x)
            log.info("trained %s on %d vectors in %.1f s", self.factory, len(x), time.perf_counter() - t)

    def add(self, x: np.ndarray, paths: list[str]) -> None:
        """Add descriptors (their ids continue from the current count) and their image paths."""
        x = self._prepare(x)
        if len(paths) != len(x):
            raise ValueError(f"{len(x)} descriptors but {len(paths)} paths")
        if not self.index.is_trained:
            self.train(x)
        self.index.add(x)
        self.paths.extend(str(p) for p in paths)

    def search(self, q: np.ndarray, k: int = 10, nprobe: int | None = None, use_gpu: bool = False):
        """``(scores (n, k), ids (n, k))``; ids are -1 where fewer than k results exist."""
        faiss = _faiss()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        q = self._prepare(np.atleast_2d(q))
        index = self.index
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = nprobe or self.nprobe
        if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        scores, ids = index.search(q, min(k, max(len(self), 1)))
        return scores, ids

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (decoded codes for PQ) of ``ids``, shape ``ids.shape + (dim,)``."""
        faiss = _faiss()
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        flat = np.asarray(ids).ravel()
        out = np.stack([self.index.reconstruct(int(i)) for i in flat]) if len(flat) else np.zeros((0, self.dim))
        return out.reshape(*np.shape(ids), self.dim).astype(np.float32)

    def search_paths(self, q: np.ndarray, k: int = 10, **kw) -> list[list[tuple[str, float]]]:
        """For each query, ``[(image path, score), ...]`` best first."""
        scores, ids = self.search(q, k, **kw)
        return [[(self.paths[i], float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """One file: magic, header (JSON, with the payload's SHA-256), faiss index, paths; atomic."""
        faiss = _faiss()
        payload = faiss.serialize_index(self.index).tobytes()
        paths = json.dumps(self.paths).encode()
        header = {"version": VERSION, "factory": self.factory, "dim": self.dim, "truncate": self.truncate,
                  "count": len(self), "model_config": self.model_config, "model_digest": self.model_digest,
                  "weights_fingerprint": self.weights_fingerprint, "model_sources": self.model_sources,
                  "precision": self.precision,
                  "nprobe": self.nprobe, "index_bytes": len(payload), "paths_bytes": len(paths),
                  "sha256": hashlib.sha256(payload + paths).hexdigest()}
        head = json.dumps(header).encode()
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(head)) + head + payload + paths)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RetrievalIndex":
        faiss = _faiss()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"index file {path} does not exist")
        if path.is_dir():
            raise IndexFileError(f"{path} is a folder, not an index file")
        data = path.read_bytes()
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
            raise IndexFileError(f"{path} is not a remap index file")
        (n,) = struct.unpack("<Q", data[8:16])
        try:
            header = json.loads(data[16:16 + n])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexFileError(f"{path}: damaged header ({exc})") from None
        body = data[16 + n:]
        expected = header["index_bytes"] + header["paths_bytes"]
        if len(body) != expected:
            raise IndexFileError(f"{path} is truncated or padded: {len(body)} bytes of data, expected {expected}")
        if hashlib.sha256(body).hexdigest() != header["sha256"]:
            raise IndexFileError(f"{path} is corrupt: its checksum does not match")
        index = faiss.deserialize_index(np.frombuffer(body[:header["index_bytes"]], dtype=np.uint8).copy())
        obj = cls(header["dim"], header["factory"], header["model_config"], header["truncate"], _index=index,
                  weights_fingerprint=header.get("weights_fingerprint"), model_sources=header.get("model_sources"),
                  precision=header.get("precision", "f32"))
        if header.get("version", 1) < 2:
            log.warning("%s was written by an older remap: its model weights cannot be verified; rebuild it", path)
        obj.paths = json.loads(body[header["index_bytes"]:])
        obj.nprobe = header.get("nprobe", 1)
        if len(obj.paths) != index.ntotal:
            raise IndexFileError(f"{path}: {index.ntotal} vectors but {len(obj.paths)} paths")
        return obj


def synthetic_distractors(real: np.ndarray, n: int, seed: int = 0, batch: int = 100_000) -> np.ndarray:
    """``n`` L2-normalised distractors drawn from a Gaussian fitted to ``real`` descriptors.

    The mean and full covariance of the real ``(N, D)`` descriptors (before
    normalisation) define the Gaussian; samples are then L2-normalised like
    real descriptors.  They follow the real descriptors' first two moments
    (directions of high and low variance, overall offset), not their cluster
    structure, so they are distractors of realistic spread but no
    near-duplicates.  Needs ``N > D`` for a full-rank covariance (else a small
    ridge is added).
    """
    real = np.asarray(real, np.float64)
    mean = real.mean(0)
    cov = np.cov(real, rowvar=False) + 1e-6 * np.eye(real.shape[1])
    chol = np.linalg.cholesky(cov)
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), np.float32)
    for s in range(0, n, batch):
        z = rng.standard_normal((min(batch, n - s), real.shape[1]))
        x = mean + z @ chol.T
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
