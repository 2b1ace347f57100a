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
atomically with a SHA-256 of its header and contents, so a truncated, corrupt or
edited file is refused before faiss reads it, and a query model that does not
match the index's is refused with a clear message.

At scale (:meth:`RetrievalIndex.build`, :func:`~remap_lib.search.on_disk.build_on_disk`)
the descriptors of an extraction folder are streamed in chunks, checked
against their manifest, through a :class:`~remap_lib.search.sources.DescriptorSource`.
Two ways to grow past memory and past PQ's accuracy:

* **refine** (``refine="SQ8"``): faiss ``IndexRefine`` keeps finer codes (SQ8: one
  byte a dimension) beside the IVF-PQ codes and re-ranks the PQ shortlist of
  ``k × refine_k`` candidates with them;
* **on-disk inverted lists**: IVF sub-indexes built in parallel processes and
  merged into one ``FILE.ivfdata`` beside the index file, searched
  memory-mapped (:mod:`remap_lib.search.on_disk`).

``faiss-gpu``, when installed and asked for (``use_gpu=True``), trains the
coarse quantiser (k-means), assigns added vectors to their lists and searches
on the GPU (same API); otherwise the CPU.

This module holds :class:`RetrievalIndex` (train, add, search, the model
checks, save and load) and the faiss helpers of its search; its parts live beside it:

``sources``     what an index is built from: :class:`~remap_lib.search.sources.DescriptorSource`,
                synthetic distractors for benchmarks
``index_file``  the checked file format: layout, version, checksums, the packed path table
``on_disk``     the sharded, parallel build of an index whose inverted lists live on disk
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..describe.extraction_files import temp_path
from .index_file import IndexFileError, PathTable, _writing, payload_reader, read_checked_header, write_index_file
from .sources import DescriptorSource

__all__ = ["ModelMismatchError", "RetrievalIndex", "gpu_available", "truncate_descriptors"]

log = logging.getLogger(__name__)

DEFAULT_REFINE_K = 8  # PQ shortlist of k * DEFAULT_REFINE_K re-ranked by the refine codes


_ROLES = {  # how check_model words a refusal for its caller: the queries of a search, or descriptors to add
    "query": {"what": "the queries",
              "config": "the query model (digest {theirs}) is not the index's model (digest {mine}); they differ "
                        "in {diff}. Describe the queries with the index's model config.",
              "weights": "the query model has the index's config but other weights"},
    "add": {"what": "these descriptors",
            "config": "these descriptors were made by another model than the index's (digest {theirs}, the "
                      "index's {mine}); they differ in {diff}. Add only descriptors extracted with the index's "
                      "model, or build a new index from these.",
            "weights": "these descriptors were made with the index's model config but other weights"},
}


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


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _require_gpu() -> None:
    if not gpu_available():
        raise ValueError("a GPU was asked for, but this faiss has no GPU support or sees no GPU "
                         "(install faiss-gpu on a machine with a CUDA GPU, or leave out --gpu)")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vec", unit_scale=True, disable=not enabled)


class RetrievalIndex:
    """Descriptors of a collection, searchable by inner product, with their image paths.

    Args:
        dim: descriptor dimension the index stores (after truncation, if any).
        factory: faiss factory string.
        model_config: config (dict) of the model that made the descriptors.
        truncate: keep only the first ``truncate`` dimensions of added/searched descriptors.
        refine: faiss factory string of finer codes that re-rank the ``factory``
            index's shortlist (``"SQ8"``: one byte a dimension; ``"Flat"``: float32),
            i.e. ``faiss.index_factory(dim, f"{factory},Refine({refine})")``.
        refine_k: the shortlist holds ``k * refine_k`` candidates (faiss ``k_factor``).
    """

    def __init__(self, dim: int, factory: str = "Flat", model_config: dict | None = None,
                 truncate: int | None = None, _index=None, *, weights_fingerprint: str | None = None,
                 model_sources: dict | None = None, precision: str = "f32", refine: str | None = None,
                 refine_k: int = DEFAULT_REFINE_K):
        faiss = _faiss()
        if int(dim) < 1:
            raise ValueError(f"index dimension must be at least 1, got {dim}")
        if truncate is not None and int(truncate) < 1:
            raise ValueError(f"truncate must be at least 1, got {truncate}")
        if refine is not None and ("Refine(" in factory or "RFlat" in factory):
            raise ValueError(f"the factory {factory!r} already has a refine stage; leave out refine={refine!r}")
        if int(refine_k) < 1:
            raise ValueError(f"refine_k must be at least 1, got {refine_k}")
        self.dim, self.factory, self.truncate = int(dim), factory, truncate
        self.refine, self.refine_k = refine, int(refine_k)
        self.model_config = model_config
        self.weights_fingerprint = weights_fingerprint
        self.model_sources = dict(model_sources or {})
        self.precision = precision
        full = factory if refine is None else f"{factory},Refine({refine})"
        try:
            self.index = _index if _index is not None else faiss.index_factory(self.dim, full,
                                                                               faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"faiss cannot build {full!r} for {self.dim}-d vectors: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
        if _index is None:
            _no_polysemous_training(self.index)
        self.paths: Sequence[str] = []  # a list, or a PathTable (read from a file or a source)
        self.nprobe = 1
        self.ivfdata: dict | None = None  # on-disk inverted lists: {"file", "bytes", "sha256", "sampled_sha256"}
        self._file: Path | None = None  # where the index was loaded from
        self._recorded_digest: str | None = None  # the model digest its file recorded
        self._gpu_index = None  # cached GPU copy for search

    @classmethod
    def for_descriptors(cls, extraction: dict, dim: int, factory: str = "Flat", truncate: int | None = None,
                        **kw):
        """An empty index for descriptors whose ``extraction.json`` settings are ``extraction``
        (see :func:`remap_lib.describe.extract.load_descriptors`): it records the whole model identity.
        ``kw``: ``refine``, ``refine_k``."""
        return cls(dim, factory, extraction["model"], truncate,
                   weights_fingerprint=extraction.get("weights_fingerprint"),
                   model_sources=extraction.get("sources"), precision=extraction.get("precision", "f32"), **kw)

    @classmethod
    def _for_source(cls, source: DescriptorSource, factory: str, truncate: int | None, **kw) -> "RetrievalIndex":
        dim = truncate or source.dim
        if dim > source.dim:
            raise ValueError(f"truncate {dim} exceeds the descriptors' dimension {source.dim}")
        if source.config is not None:
            return cls.for_descriptors(source.config, dim, factory, truncate, **kw)
        return cls(dim, factory, None, truncate, **kw)

    # ------------------------------------------------------------------ metadata
    @property
    def model_digest(self) -> str | None:
        """The digest of the index's model: the one its file recorded, else computed from ``model_config``.

        The recorded one is what the descriptors were checked against when the
        index was built; a model rebuilt from ``model_config`` must give it.
        """
        if self._recorded_digest is not None:
            return self._recorded_digest
        return self._config_digest()

    def _config_digest(self) -> str | None:
        if self.model_config is None:
            return None
        from ..config import ModelConfig

        return ModelConfig.from_dict(self.model_config).digest()

    def __len__(self) -> int:
        return self.index.ntotal

    def bytes_per_vector(self) -> float:
        """Bytes of code stored per database vector (IVF lists also keep an 8-byte id each);
        with refine, the coarse and the refine codes together."""
        faiss = _faiss()

        def code_bytes(index) -> int:
            index = faiss.downcast_index(index)
            if isinstance(index, faiss.IndexPreTransform):  # OPQ rotation in front
                return code_bytes(index.index)
            if isinstance(index, faiss.IndexRefine):
                return code_bytes(index.base_index) + code_bytes(index.refine_index)
            return index.code_size

        return float(code_bytes(self.index))

    @property
    def on_disk(self) -> bool:
        """True when the inverted lists live in a memory-mapped ``.ivfdata`` file."""
        return self.ivfdata is not None

    def describe(self) -> str:
        """``"IVF4096,PQ16 + Refine(SQ8) x8, on disk"``: the pipeline in a few words."""
        text = self.factory
        if self.refine:
            text += f" + Refine({self.refine}) x{self.refine_k}"
        return text + (", on disk" if self.on_disk else "")

    def check_model(self, model_config: dict | None, weights_fingerprint: str | None = None,
                    precision: str | None = None, *, role: str = "query") -> None:
        """Refuse descriptors from a model other than the index's.

        The config digest says which architecture; the weights fingerprint
        (:meth:`RetrievalModel.fingerprint`) says which weights, region weights α
        and whitening: an ImageNet model and its fine-tuned twin share a config
        but not a fingerprint.  Descriptors given without a fingerprint are
        checked by config only (logged).  ``role`` words the refusal for the
        caller: ``"query"`` (a search) or ``"add"`` (descriptors to add).
        """
        if role not in _ROLES:
            raise ValueError(f"role must be one of {sorted(_ROLES)}, got {role!r}")
        if self.model_config is None or model_config is None:
            return
        from ..config import ModelConfig

        words = _ROLES[role]
        theirs = ModelConfig.from_dict(model_config).digest()
        if theirs != self.model_digest:
            mine = ModelConfig.from_dict(self.model_config).to_dict()
            other = ModelConfig.from_dict(model_config).to_dict()
            diff = {k: (mine[k], other[k]) for k in mine if mine[k] != other.get(k)}
            if not diff:  # the index's own config does not give the digest it recorded
                raise ModelMismatchError(
                    f"{self._file or 'the index'} records model digest {self.model_digest}, but its model config "
                    f"gives {self._config_digest()} (written by another remap, or edited); rebuild the index")
            raise ModelMismatchError(words["config"].format(theirs=theirs, mine=self.model_digest, diff=diff))
        if self.weights_fingerprint is not None:
            if weights_fingerprint is None:
                log.warning("%s not verified against the index's weights (no fingerprint given)", words["what"])
            elif weights_fingerprint != self.weights_fingerprint:
                raise ModelMismatchError(
                    f"{words['weights']} (fingerprint "
                    f"{weights_fingerprint}, index {self.weights_fingerprint}: another checkpoint, region "
                    f"weights or whitening){self._sources_hint()}")
        if precision is not None and precision != self.precision:
            raise ModelMismatchError(f"the index holds {self.precision} descriptors; {words['what']} are {precision}")

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

    def train(self, x: np.ndarray, use_gpu: bool = False) -> None:
        """Train the quantisers (PQ codebooks, IVF centroids, OPQ rotation, refine codes) on ``x``.

        ``use_gpu``: the coarse quantiser's k-means runs on the GPU (faiss's
        ``clustering_index``); the rest stays on the CPU.
        """
        faiss = _faiss()
        x = self._prepare(x)
        if self.index.is_trained:
            return
        ivf = faiss.try_extract_index_ivf(self.index)
        gpu_flat = None
        if use_gpu:
            _require_gpu()
            if ivf is not None:
                gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type))
                ivf.clustering_index = gpu_flat
        t = time.perf_counter()
        try:
            self.index.train(x)
        except RuntimeError as exc:
            raise ValueError(f"faiss cannot train {self.describe()} on {len(x)} vectors: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
        finally:
            if gpu_flat is not None:
                ivf.clustering_index = None
        log.info("trained %s on %d vectors in %.1f s", self.describe(), len(x), time.perf_counter() - t)

    def _writable(self) -> None:
        if self.on_disk:
            raise ValueError("an on-disk index is read-only (memory-mapped inverted lists); build it again with "
                             "all the descriptors (`remap index build --on-disk`)")

    def add(self, x: np.ndarray, paths: list[str], use_gpu: bool = False) -> None:
        """Add descriptors (their ids continue from the current count) and their image paths."""
        self._writable()
        x = self._prepare(x)
        if len(paths) != len(x):
            raise ValueError(f"{len(x)} descriptors but {len(paths)} paths")
        if not self.index.is_trained:
            self.train(x, use_gpu=use_gpu)
        self._add_vectors(x, assigner=self._gpu_assigner() if use_gpu else None)
        self._extend_paths([str(p) for p in paths])

    def _gpu_assigner(self):
        """A GPU copy of the coarse quantiser (IVF indexes), which assigns added vectors to lists."""
        faiss = _faiss()
        _require_gpu()
        ivf = faiss.try_extract_index_ivf(self.index)
        return None if ivf is None else faiss.index_cpu_to_all_gpus(ivf.quantizer)

    def _add_vectors(self, x: np.ndarray, ids: np.ndarray | None = None, assigner=None) -> None:
        """Add prepared vectors, with explicit ``ids`` (IVF shards) or the next ones.

        With ``assigner`` (an index over the coarse centroids, e.g. on the GPU) the
        list of each vector is computed by it and the codes are added with
        ``IndexIVF.add_core``, as in faiss's ``bench_all_ivf.py --quantizer_on_gpu_add``;
        an OPQ rotation in front and a refine stage around the IVF are applied here.
        """
        faiss = _faiss()
        self._gpu_index = None
        if assigner is None:
            if ids is None:
                self.index.add(x)
            else:
                self.index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
            return

        def add_to(index, x):
            index = faiss.downcast_index(index)
            if isinstance(index, faiss.IndexIVF):
                _, assign = assigner.search(x, 1)
                assign = np.ascontiguousarray(assign.ravel(), dtype=np.int64)
                id_array = None if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
                index.add_core(len(x), faiss.swig_ptr(x), None if id_array is None else faiss.swig_ptr(id_array),
                               faiss.swig_ptr(assign))  # counts the vectors itself
                return
            if isinstance(index, faiss.IndexRefine):
                add_to(index.base_index, x)
                index.refine_index.add(x)
            elif isinstance(index, faiss.IndexPreTransform):
                xt = x
                for i in range(index.chain.size()):
                    xt = np.ascontiguousarray(faiss.downcast_VectorTransform(index.chain.at(i)).apply(xt))
                add_to(index.index, xt)
            else:
                raise ValueError(f"{self.describe()} has no inverted file to assign on the GPU")
            index.ntotal += len(x)

        add_to(self.index, x)

    def refuse_known_paths(self, paths: Sequence[str], source: str = "these descriptors") -> None:
        """Refuse to add images the index already holds (the same path, ``./`` and ``//`` aside).

        Adding one extraction folder twice used to duplicate every entry: a
        search then returned each photo two or three times at score 1.0.
        Refused rather than skipped, so that the index and the command's
        output never disagree about what was added.
        """
        known = {os.path.normpath(p) for p in self.paths}
        again = [p for p in paths if os.path.normpath(p) in known]
        if again:
            where = self._file or "the index"
            raise ValueError(f"{len(again)} of the {len(paths)} images of {source} are already in {where} "
                             f"(e.g. {again[0]}); nothing was added. Extract only the new images into another "
                             "folder and add that, or rebuild the index with `remap index build`")

    def _extend_paths(self, paths: Sequence[str]) -> None:
        if not len(self.paths):
            self.paths = paths if isinstance(paths, PathTable) else list(paths)  # a table stays packed
            return
        if not isinstance(self.paths, list):
            self.paths = list(self.paths)
        self.paths.extend(paths)

    def add_from(self, source: DescriptorSource, chunk: int | None = None, use_gpu: bool = False,
                 progress: bool = False) -> None:
        """Add every row of ``source`` in chunks of ``chunk`` rows, checking the folder's checksum.

        Nothing but the current chunk is held in memory.  The rows' SHA-256 is
        compared with the manifest's after the last chunk; on a mismatch the
        index holds descriptors of a damaged folder, so this raises and the
        caller must discard the index (:meth:`build` does).
        """
        self._writable()
        if not self.index.is_trained:
            raise ValueError(f"train {self.describe()} before adding (RetrievalIndex.build trains on a sample)")
        assigner = self._gpu_assigner() if use_gpu else None
        checksum = source.checksum()
        t = time.perf_counter()
        with _progress(len(source), "index add", progress) as bar:
            for _, rows in source.chunks(chunk, checksum=checksum):
                self._add_vectors(self._prepare(rows), assigner=assigner)
                bar.update(len(rows))
        checksum.check()
        self._extend_paths(source.paths)
        log.info("added %d vectors to %s in %.1f s", len(source), self.describe(), time.perf_counter() - t)

    @classmethod
    def build(cls, source: DescriptorSource, factory: str = "Flat", *, truncate: int | None = None,
              refine: str | None = None, refine_k: int = DEFAULT_REFINE_K, nprobe: int = 16,
              train_size: int = 200_000, chunk: int | None = None, seed: int = 0, use_gpu: bool = False,
              progress: bool = False) -> "RetrievalIndex":
        """An in-memory index of ``source``: trained on ``train_size`` random rows, then filled chunk by chunk.

        Equal to ``index.train(x[sample]); index.add(x, paths)`` over the whole
        matrix, with ``sample`` = :meth:`DescriptorSource.sample`'s rows; the
        matrix itself is never in memory (only the index's codes are).
        """
        if train_size < 1:
            raise ValueError(f"train_size must be at least 1, got {train_size}")
        if not len(source):
            raise ValueError(f"{source.folder or 'the source'} holds no descriptors")
        index = cls._for_source(source, factory, truncate, refine=refine, refine_k=refine_k)
        index.nprobe = nprobe
        if not index.index.is_trained:
            index.train(source.sample(train_size, seed), use_gpu=use_gpu)
        index.add_from(source, chunk, use_gpu=use_gpu, progress=progress)
        return index

    def search(self, q: np.ndarray, k: int = 10, nprobe: int | None = None, use_gpu: bool = False,
               refine_k: int | None = None):
        """``(scores (n, k), ids (n, k))``; ids are -1 where fewer than k results exist.

        ``refine_k``: shortlist factor of a refine stage (default: the index's).
        ``use_gpu``: search a GPU copy of the index (made once, kept until the next add).
        """
        faiss = _faiss()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        if refine_k is not None and refine_k < 1:
            raise ValueError(f"refine_k must be at least 1, got {refine_k}")
        q = self._prepare(np.atleast_2d(q))
        index = self.index
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = nprobe or self.nprobe
            _spread_lists_over_threads(ivf, len(q))
        top = faiss.downcast_index(index)
        if isinstance(top, faiss.IndexRefine):
            top.k_factor = float(refine_k or self.refine_k)
        if use_gpu:
            index = self._gpu_search_index(nprobe or self.nprobe, refine_k or self.refine_k)
        scores, ids = index.search(q, min(k, max(len(self), 1)))
        return scores, ids

    def _gpu_search_index(self, nprobe: int, refine_k: int):
        """The index on the GPU (IVF, PQ, SQ, flat parts; a refine stage re-ranks on the CPU)."""
        faiss = _faiss()
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and _is_fast_scan(ivf):
            raise ValueError(f"faiss has no GPU version of fast-scan codes ({self.factory!r}): search this index "
                             "on the CPU, or build it with 8-bit PQ (e.g. 'IVF4096,PQ16x8') to search on the GPU")
        _require_gpu()
        if self._gpu_index is None:
            top = faiss.downcast_index(self.index)
            if isinstance(top, faiss.IndexRefine):  # the shortlist on the GPU, the re-ranking here
                base = faiss.index_cpu_to_all_gpus(top.base_index)
                gpu = faiss.IndexRefine(base, top.refine_index)
                self._gpu_index = (gpu, base)  # keep the GPU base alive with its wrapper
            else:
                gpu = faiss.index_cpu_to_all_gpus(self.index)
                self._gpu_index = (gpu, None)
        gpu = self._gpu_index[0]
        params = faiss.GpuParameterSpace()
        target = self._gpu_index[1] if self._gpu_index[1] is not None else gpu
        if faiss.try_extract_index_ivf(self.index) is not None:
            params.set_index_parameter(target, "nprobe", nprobe)
        if isinstance(gpu, faiss.IndexRefine):
            gpu.k_factor = float(refine_k)
        return gpu

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (decoded codes for PQ; refine codes with refine) of ``ids``, shape ``ids.shape + (dim,)``."""
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
        """One file: magic, header (JSON, with the SHA-256 of the header and the payload), faiss index, paths;
        written atomically (a failed or interrupted write leaves the previous file as it was).

        An on-disk index's ``.ivfdata`` stays where it was built: it can be saved
        again (e.g. with another default ``nprobe``) only under its own name.
        """
        faiss = _faiss()
        path = Path(path)
        if self.on_disk and (self._file is None or path.resolve() != self._file.resolve()):
            raise ValueError(f"an on-disk index is saved only where it was built ({self._file}); to move it, "
                             f"move {self._file} and {self.ivfdata['file']} together")
        tmp = temp_path(path, ".faiss.tmp")
        try:
            with _writing(path):
                faiss.write_index(self.index, str(tmp))  # streamed to disk, no copy in memory
            self._write(path, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def _header(self, count: int | None) -> dict:
        """The index's fields of its file's header (the file format adds its version, sizes and checksum)."""
        return {"factory": self.factory, "dim": self.dim, "truncate": self.truncate,
                "count": len(self) if count is None else count, "model_config": self.model_config,
                "model_digest": self.model_digest,
                "weights_fingerprint": self.weights_fingerprint, "model_sources": self.model_sources,
                "precision": self.precision, "refine": self.refine, "refine_k": self.refine_k,
                "nprobe": self.nprobe, "ivfdata": self.ivfdata}

    def _write(self, path: Path, payload, count: int | None = None, left: str = "nothing was replaced") -> None:
        """Write the index file from ``payload``: the serialised faiss index (a file, or bytes) of ``count``.

        ``left``: what a failed write leaves, for its error message.  The bytes,
        checksum and atomic rename: :func:`~remap_lib.search.index_file.write_index_file`.
        """
        table = self.paths if isinstance(self.paths, PathTable) else PathTable.from_list(self.paths)
        write_index_file(path, self._header(count), payload, table, left)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: str = "sampled") -> "RetrievalIndex":
        """Read an index file, refusing a truncated or corrupt one before faiss reads it.

        ``verify`` (on-disk indexes): ``"sampled"`` checks the ``.ivfdata`` file's
        size and sampled SHA-256 (:func:`~remap_lib.search.index_file.sampled_sha256`),
        ``"full"`` its whole SHA-256.
        """
        faiss = _faiss()
        path = Path(path)
        if verify not in ("sampled", "full"):
            raise ValueError(f"verify must be 'sampled' or 'full', got {verify!r}")
        if not path.exists():
            raise FileNotFoundError(f"index file {path} does not exist")
        if path.is_dir():
            raise IndexFileError(f"{path} is a folder, not an index file")
        with open(path, "rb") as f:
            # from here on, every header field is the one written, and the .ivfdata file is checked
            header, body, data_file = read_checked_header(f, path, verify)
            ivfdata = header.get("ivfdata")
            read = payload_reader(f, body, header["index_bytes"])  # the faiss payload only, never past it
            flags = faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY if ivfdata else 0
            index = faiss.read_index(faiss.PyCallbackIOReader(read), flags)
            # memory-mapped: pages are read when a path is asked for
            paths = PathTable.map(path, body + header["index_bytes"], header["paths_bytes"])
        if data_file is not None:  # map the checked file, wherever the index was built
            lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
            lists.filename = str(data_file)
            lists.do_mmap()
            lists.prefetch_nthread = 0  # faiss's default starts 32 threads a query to touch pages in advance
        obj = cls(header["dim"], header["factory"], header["model_config"], header["truncate"], _index=index,
                  weights_fingerprint=header.get("weights_fingerprint"), model_sources=header.get("model_sources"),
                  precision=header.get("precision", "f32"), refine=header.get("refine"),
                  refine_k=header.get("refine_k", DEFAULT_REFINE_K))
        obj._recorded_digest = header.get("model_digest")
        obj.paths = paths
        obj.nprobe = header.get("nprobe", 1)
        obj.ivfdata, obj._file = ivfdata, path
        if len(obj.paths) != index.ntotal:
            raise IndexFileError(f"{path}: {index.ntotal} vectors but {len(obj.paths)} paths")
        return obj


def _is_fast_scan(ivf) -> bool:
    """True for faiss's fast-scan IVF codes (factory ``PQ32x4fs``: 4-bit PQ scanned with SIMD lookups)."""
    return isinstance(_faiss().downcast_index(ivf), _faiss().IndexIVFFastScan)


def _spread_lists_over_threads(ivf, n_queries: int) -> None:
    """Search one query's inverted lists on every thread when there are fewer queries than threads.

    faiss parallelises a search over its queries, so a single query (the
    usual case when serving) runs on one core however many there are.
    ``parallel_mode = 1`` (IVF) and ``implem = 15`` (IVF fast-scan: the
    (query, list) pairs shared out over the threads, candidates kept in a
    reservoir, which stays cheap for a refine stage's long shortlist) split
    the visited lists over the threads instead.  The results are the same
    (tests/test_index.py); a single query runs 1.4-1.9x faster on 2 cores
    (``benchmarks/search.py``, its one-thread column).
    Batches keep faiss's per-query split.
    """
    faiss = _faiss()
    few = n_queries < faiss.omp_get_max_threads()
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFFastScan):
        ivf.implem = 15 if few else 0
    else:
        ivf.parallel_mode = 1 if few else 0


def _no_polysemous_training(index) -> None:
    """Switch off the polysemous training faiss's factory turns on for 8-bit PQ.

    It reorders the PQ centroids so that Hamming distances between codes mimic
    true distances, which only searches with ``polysemous_ht`` use (we never
    do), and it costs ~2 s per sub-quantiser on one core: 30 s for PQ16.
    """
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        _no_polysemous_training(index.base_index)
    elif isinstance(index, faiss.IndexPreTransform):
        _no_polysemous_training(index.index)
    elif isinstance(index, (faiss.IndexPQ, faiss.IndexIVFPQ)):
        index.do_polysemous_training = False
