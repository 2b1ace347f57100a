"""What a search index is built from: rows of descriptors with their image paths, streamed in chunks.

At scale (:meth:`~remap_lib.search.index.RetrievalIndex.build`,
:meth:`~remap_lib.search.index.RetrievalIndex.build_on_disk`) the descriptors
of an extraction folder are streamed through :class:`DescriptorSource`: read
in chunks from ``descriptors.npy`` (never the whole matrix in memory), checked
chunk by chunk against the SHA-256 of the folder's ``manifest.json``,
quantisers trained on a random sample (:meth:`DescriptorSource.sample`).

:func:`synthetic_distractors` makes descriptor-like rows for benchmarks of
collections larger than the real ones (``benchmarks/search.py``,
``benchmarks/distractors.py``, ``notebooks/04_benchmarks.ipynb``).

Apart from the index because reading and checking the folder ``remap
extract`` wrote is the contract with :mod:`remap_lib.describe.extraction_files`,
not faiss: this module needs numpy only, and the on-disk build's worker
processes read their rows with :class:`_NpyRows` from here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Iterator

import numpy as np

from ..describe.extraction_files import load_npy, read_manifest  # the folder of `remap extract`
from .index_file import PathTable

__all__ = ["DescriptorSource", "synthetic_distractors"]

CHUNK_BYTES = 64 << 20  # default streaming chunk: 64 MiB of float32 rows


class _NpyRows:
    """Rows of a C-ordered float32 ``(N, D)`` ``.npy`` file, read with ordinary reads at its data offset."""

    def __init__(self, npy: Path):
        self.npy = npy
        m = load_npy(npy, mmap_mode="r")  # parses the header; reads no data page
        if m.dtype != np.float32 or m.ndim != 2 or not m.flags.c_contiguous:
            raise ValueError(f"{npy}: expected a C-ordered float32 (N, D) matrix, got {m.dtype} {m.shape}")
        self.shape, self.offset, self.row_bytes = tuple(m.shape), int(m.offset), 4 * int(m.shape[1])
        del m
        if os.path.getsize(npy) < self.offset + self.row_bytes * self.shape[0]:
            raise ValueError(f"{npy} is shorter than its header says (a damaged file); rerun `remap extract`")

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), self.shape[1]), np.float32)
        with open(self.npy, "rb") as f:
            f.seek(self.offset + self.row_bytes * start)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ValueError(f"{self.npy} is shorter than its header says; rerun `remap extract`")
        return out

    def take(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.shape[1]), np.float32)
        fd = os.open(self.npy, os.O_RDONLY)
        try:
            for k, i in enumerate(ids):
                data = os.pread(fd, self.row_bytes, self.offset + self.row_bytes * int(i))
                if len(data) != self.row_bytes:
                    raise ValueError(f"{self.npy} is shorter than its header says; rerun `remap extract`")
                out[k] = np.frombuffer(data, np.float32)
        finally:
            os.close(fd)
        return out


class _RowChecksum:
    """SHA-256 over rows fed in order, compared with the manifest's ``descriptors_sha256`` at the end."""

    def __init__(self, source: "DescriptorSource"):
        self.source, self.position, self.digest = source, 0, hashlib.sha256()

    def update(self, start: int, rows: np.ndarray) -> None:
        if start != self.position:
            raise RuntimeError(f"checksum fed row {start}, expected row {self.position}")
        if self.source.sha256 is not None:  # an in-memory array has nothing to compare with
            self.digest.update(np.ascontiguousarray(rows).data)
        self.position += len(rows)

    def check(self) -> None:
        if self.source.sha256 is None:
            return
        if self.position != len(self.source):
            raise RuntimeError(f"checksum over {self.position} of {len(self.source)} rows")
        if self.digest.hexdigest() != self.source.sha256:
            raise ValueError(f"{self.source.folder}: descriptors.npy does not match manifest.json (an interrupted or "
                             "concurrent write, or a damaged file); rerun the same `remap extract` command to "
                             "rebuild it")


class DescriptorSource:
    """Rows of an ``(N, D)`` float32 descriptor matrix with their image paths, read in chunks.

    :meth:`open` reads a folder written by ``remap extract`` (``descriptors.npy``,
    ``paths.jsonl``, ``manifest.json``, ``extraction.json``) without loading the
    matrix: rows are read from the file with ordinary reads at the ``.npy``
    data offset, one chunk at a time (a memory map would leave every page it
    touched counted in the process's resident memory).  The counts, the shape
    and the paths' SHA-256 are checked when opening; the matrix's SHA-256 while
    streaming (:meth:`chunks` with a checksum, or :meth:`verify`), since hashing
    10 million rows up front would read them all once more.
    :meth:`from_array` wraps an in-memory matrix (no checksum).

    Attributes:
        paths: image path of each row (a :class:`PathTable`).
        config: the folder's ``extraction.json`` (model identity), or ``None``.
        sha256: the manifest's ``descriptors_sha256`` (``None`` for an array).
    """

    def __init__(self, paths: Sequence[str], config: dict | None = None, *, array: np.ndarray | None = None,
                 npy: Path | None = None, folder: Path | None = None, sha256: str | None = None):
        self.paths, self.config, self.sha256, self.folder = paths, config, sha256, folder
        self._array, self.npy = array, npy
        self._file = None if array is not None else _NpyRows(npy)
        self.shape = tuple(array.shape) if array is not None else self._file.shape
        if len(paths) != self.shape[0]:
            raise ValueError(f"{folder or 'descriptors'}: {len(paths)} paths but {self.shape[0]} descriptors")

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "DescriptorSource":
        """The result of ``remap extract`` in ``folder``, checked against its ``manifest.json``."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        blob = (folder / "paths.jsonl").read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest["paths_sha256"]:
            raise ValueError(f"{folder}: paths.jsonl does not match manifest.json (an interrupted or concurrent "
                             "write); rerun the same `remap extract` command to rebuild it")
        paths = PathTable.from_jsonl(blob)  # decoded one by one when asked for
        config = json.loads((folder / "extraction.json").read_text())
        source = cls(paths, config, npy=folder / "descriptors.npy", folder=folder,
                     sha256=manifest["descriptors_sha256"])
        if source.shape != (manifest["count"], manifest["dim"]):
            raise ValueError(f"{folder}: descriptors.npy holds {source.shape}, manifest.json says "
                             f"({manifest['count']}, {manifest['dim']}); rerun `remap extract`")
        return source

    def inputs(self) -> list[Path]:
        """The files of the extraction folder an index of this source is made from (none for an array)."""
        if self.folder is None:
            return []
        return [self.folder / name for name in ("descriptors.npy", "paths.jsonl", "manifest.json", "extraction.json")]

    @classmethod
    def from_array(cls, x: np.ndarray, paths, config: dict | None = None) -> "DescriptorSource":
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"descriptors must be (N, D), got shape {x.shape}")
        return cls(PathTable.from_list(paths), config, array=x)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def default_chunk(self) -> int:
        """Rows in :data:`CHUNK_BYTES` (64 MiB)."""
        return max(1, CHUNK_BYTES // (4 * self.dim))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows ``[start, stop)``."""
        stop = min(stop, len(self))
        if self._array is not None:
            return np.array(self._array[start:stop], dtype=np.float32)
        return self._file.read(start, stop)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (sorted ascending: one read each), e.g. a training sample."""
        ids = np.asarray(ids, np.int64)
        if self._array is not None:
            return np.array(self._array[ids], dtype=np.float32)
        return self._file.take(ids)

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """``size`` rows drawn without replacement (all rows when fewer), in row order."""
        if size >= len(self):
            return self.rows(0, len(self))
        ids = np.sort(np.random.default_rng(seed).choice(len(self), size, replace=False))
        return self.take(ids)

    def checksum(self) -> _RowChecksum:
        """A running SHA-256 to feed every row in order (:meth:`chunks`); ``.check()`` at the end."""
        return _RowChecksum(self)

    def chunks(self, size: int | None = None, start: int = 0, stop: int | None = None,
               checksum: _RowChecksum | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` of at most ``size`` rows from ``start`` to ``stop``, fed to ``checksum``."""
        size = size or self.default_chunk()
        stop = len(self) if stop is None else min(stop, len(self))
        for s in range(start, stop, size):
            rows = self.rows(s, min(s + size, stop))
            if checksum is not None:
                checksum.update(s, rows)
            yield s, rows

    def verify(self, size: int | None = None) -> None:
        """Read every row once and compare their SHA-256 with the manifest (``ValueError`` if it differs)."""
        if self.sha256 is None:
            return
        checksum = self.checksum()
        for _ in self.chunks(size, checksum=checksum):
            pass
        checksum.check()


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
