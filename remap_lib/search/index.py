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

At scale (:meth:`RetrievalIndex.build`, :meth:`RetrievalIndex.build_on_disk`)
the descriptors of an extraction folder are streamed through
:class:`DescriptorSource`: read in chunks from ``descriptors.npy`` (never the
whole matrix in memory), checked chunk by chunk against the SHA-256 of the
folder's ``manifest.json``, quantisers trained on a random sample.  Two ways to
grow past memory and past PQ's accuracy:

* **refine** (``refine="SQ8"``): faiss ``IndexRefine`` keeps finer codes (SQ8: one
  byte a dimension) beside the IVF-PQ codes and re-ranks the PQ shortlist of
  ``k × refine_k`` candidates with them;
* **on-disk inverted lists**: IVF sub-indexes are built in parallel processes
  over slices of the rows, merged with faiss's ``merge_ondisk`` into one
  ``FILE.ivfdata`` beside the index file, and searched memory-mapped (only the
  visited lists are read).

``faiss-gpu``, when installed and asked for (``use_gpu=True``), trains the
coarse quantiser (k-means), assigns added vectors to their lists and searches
on the GPU (same API); otherwise the CPU.

File format (version 4): ``REMAPIDX``, the header length (``<Q``), a JSON
header, the faiss index, the image paths (a packed :class:`PathTable`,
memory-mapped when loaded).  The header's ``sha256`` covers the header itself
(its other fields as canonical JSON: sorted keys, no spaces) and everything
after it, so an edit to any field (a model option, the count, a size) is
refused like damage to the data.  Files of versions 1-3, whose checksum left
the header out, are refused with a message to rebuild them: accepting them
would keep that hole open.  An on-disk index's header
(its faiss part holds only the lists' offsets) also names its
``.ivfdata`` file with the file's size, its full SHA-256 and a *sampled*
SHA-256 (:func:`sampled_sha256`: the size and 64 blocks of 64 KiB spread evenly
over the file, the whole file when smaller): loading checks the size and the
sampled hash (milliseconds, whatever the size), ``verify="full"`` the whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Iterator

import numpy as np

from ..describe.extraction_files import FORMAT as EXTRACTION_FORMAT, load_npy, read_manifest, temp_path  # the folder of `remap extract`

__all__ = ["DescriptorSource", "IndexFileError", "ModelMismatchError", "PathTable", "RetrievalIndex",
           "check_index_output", "gpu_available", "is_index_file", "sampled_sha256", "synthetic_distractors",
           "truncate_descriptors"]

log = logging.getLogger(__name__)

MAGIC = b"REMAPIDX"
VERSION = 4  # 2: weights fingerprint, model sources, precision; 3: refine, on-disk inverted lists;
#               4: the checksum covers the header too
DEFAULT_REFINE_K = 8  # PQ shortlist of k * DEFAULT_REFINE_K re-ranked by the refine codes
CHUNK_BYTES = 64 << 20  # default streaming chunk: 64 MiB of float32 rows
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 1 << 16  # sampled checksum of an .ivfdata file


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


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _require_gpu() -> None:
    if not gpu_available():
        raise ValueError("a GPU was asked for, but this faiss has no GPU support or sees no GPU "
                         "(install faiss-gpu on a machine with a CUDA GPU, or leave out --gpu)")


def _sha256_file(path, start: int = 0, stop: int | None = None, block: int = 16 << 20, digest=None) -> str:
    """SHA-256 of bytes ``[start, stop)`` of a file, read in blocks (fed to ``digest`` if given)."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as f:
        f.seek(start)
        left = (os.path.getsize(path) if stop is None else stop) - start
        while left > 0:
            data = f.read(min(block, left))
            if not data:
                break
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def sampled_sha256(path, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK_BYTES) -> str:
    """A cheap checksum of a large file: SHA-256 of its size and ``blocks`` blocks of ``block`` bytes.

    The blocks start at evenly spaced offsets from the first byte to the last
    block; a file of at most ``blocks * block`` bytes is hashed whole.  It
    catches truncation, a swapped or stale file and damage to any sampled
    block; a change elsewhere needs the full SHA-256 (``verify="full"``).
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256(struct.pack("<Q", size))
    if size <= blocks * block:
        digest.update(bytes.fromhex(_sha256_file(path)))
        return digest.hexdigest()
    with open(path, "rb") as f:
        for offset in np.linspace(0, size - block, blocks).astype(np.int64):
            f.seek(int(offset))
            digest.update(f.read(block))
    return digest.hexdigest()


def _canonical_header(header: dict) -> bytes:
    """The bytes of an index header that its checksum covers: every field but ``sha256``, canonical JSON.

    Canonical (sorted keys, no spaces), not the bytes as written, so that the
    checksum can be computed before the header holds it; any change of a
    field's value changes these bytes.
    """
    fields = {key: value for key, value in header.items() if key != "sha256"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` allows (255 when it cannot be asked)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


@contextlib.contextmanager
def _writing(path: Path, left: str = "nothing was replaced"):
    """Name the index file in a failed write (a full disk, a read-only folder), and say what is ``left``.

    Without it the error is faiss's ``32000 requested and 25568 written`` or a
    bare ``No space left on device``, about no file or a temporary one.  The
    previous index at ``path`` is untouched: it is replaced only by the last,
    atomic step (an on-disk build has replaced its ``.ivfdata`` file by then).
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            (str(exc).strip().splitlines() or [type(exc).__name__])[-1])
        error = OSError(f"cannot write the index {path}: {reason}; {left}")
        error.errno = getattr(exc, "errno", None)
        raise error from None


def is_index_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file that starts like a remap index (of any version, even a damaged one)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def check_index_output(path: str | os.PathLike, inputs: Sequence[str | os.PathLike], force: bool = False) -> None:
    """Refuse to write an index over one of its ``inputs``, or over a file that is not an index unless ``force``.

    ``remap index build SRC -o SRC/descriptors.npy`` would replace its own
    input, and ``-o notes.txt`` an unrelated file; both ended with exit code 0.
    An existing index is replaced (atomically), as a rebuild should.
    """
    path = Path(path)
    if not path.exists():
        return
    for source in inputs:
        if os.path.exists(source) and os.path.samefile(path, source):
            same = "" if os.path.abspath(path) == os.path.abspath(source) else f" ({source})"
            raise FileExistsError(f"-o {path} is an input of the index{same}; write the index to another file")
    if not force and not is_index_file(path):
        raise FileExistsError(f"-o {path} exists and is not a remap index; choose another file name, "
                              "or add --force to replace it")


class PathTable(Sequence):
    """Image paths as JSON strings one after another (``paths.jsonl``'s lines), found by byte offsets.

    Ten million paths cost their bytes plus 8 bytes each, not ten million
    Python strings; a table read from an index file is memory-mapped, so a
    search touches only the pages of the paths it returns.  Item ``i`` is
    decoded when asked for.

    Packed form (in an index file): ``<Q`` count, ``count + 1`` little-endian
    uint64 offsets into the blob, the blob (UTF-8 JSON strings, each ending in
    a newline).
    """

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        self.offsets, self.blob = offsets, blob

    @classmethod
    def from_jsonl(cls, data: bytes) -> "PathTable":
        """The lines of a ``paths.jsonl`` file (one JSON string a line)."""
        if data and not data.endswith(b"\n"):
            data += b"\n"
        blob = np.frombuffer(data, np.uint8)
        offsets = np.concatenate([[0], np.flatnonzero(blob == 10) + 1]).astype(np.uint64)
        if np.any(np.diff(offsets) < 2):
            raise ValueError("paths.jsonl has an empty line")
        return cls(offsets, blob)

    @classmethod
    def from_list(cls, paths) -> "PathTable":
        return cls.from_jsonl("".join(json.dumps(str(p), ensure_ascii=False) + "\n" for p in paths).encode("utf-8", "backslashreplace"))

    @classmethod
    def map(cls, path: Path, offset: int, nbytes: int) -> "PathTable":
        """The packed table at byte ``offset`` of ``path``, memory-mapped (read-only)."""
        with open(path, "rb") as f:
            f.seek(offset)
            (count,) = struct.unpack("<Q", f.read(8))
        start = offset + 8 + 8 * (count + 1)
        if start > offset + nbytes:
            raise IndexFileError(f"{path}: damaged path table")
        offsets = np.memmap(path, dtype="<u8", mode="r", offset=offset + 8, shape=(count + 1,))
        blob = (np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(offset + nbytes - start,))
                if offset + nbytes > start else np.zeros(0, np.uint8))
        return cls(offsets, blob)

    def packed(self) -> list:
        """The packed form, as buffers to write one after another."""
        return [struct.pack("<Q", len(self)), np.ascontiguousarray(self.offsets, dtype="<u8"), self.blob]

    def packed_bytes(self) -> int:
        return 8 + 8 * len(self.offsets) + len(self.blob)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"path {i} of {len(self)}")
        return json.loads(bytes(self.blob[int(self.offsets[i]):int(self.offsets[i + 1])]))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths)"


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


@contextlib.contextmanager
def _quiet_stdout():
    """Silence what C++ code prints on file descriptor 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


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

    @classmethod
    def build_on_disk(cls, source: DescriptorSource, path: str | os.PathLike, factory: str, *,
                      shards: int = 1, truncate: int | None = None, nprobe: int = 16, train_size: int = 200_000,
                      chunk: int | None = None, seed: int = 0, use_gpu: bool = False,
                      progress: bool = False) -> "RetrievalIndex":
        """An IVF index whose inverted lists live on disk: ``path`` + ``path.ivfdata``; returns it loaded.

        The quantisers are trained once on a sample; ``shards`` sub-indexes, each
        over a contiguous slice of rows (ids = row numbers), are filled in parallel
        processes (each with its share of faiss's threads) when the source is a
        folder, one after the other otherwise; faiss's ``merge_ondisk`` then
        concatenates their inverted lists into the ``.ivfdata`` file, so that
        each list holds its vectors in row order, exactly like an in-memory index
        built from the same trained quantisers.  The descriptors' checksum is
        verified meanwhile; a failure (a damaged descriptor file included) leaves
        no file behind.  The ``.ivfdata`` file is put in place just before the
        index file, which names its size and checksum, so an interrupted rebuild
        over an older index leaves a pair that :meth:`load` refuses, never a mix.
        """
        from faiss.contrib.ondisk import merge_ondisk

        faiss = _faiss()
        path = Path(path)
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        data_name = f"{path.name}.ivfdata"
        if len(os.fsencode(data_name)) > _name_max(path.parent):  # refused now, not after the whole build
            limit = _name_max(path.parent) - len(".ivfdata")
            raise ValueError(f"{path}: too long a name for an on-disk index, whose lists go to NAME.ivfdata beside "
                             f"it; choose a name of at most {limit} bytes")
        if not len(source):
            raise ValueError(f"{source.folder or 'the source'} holds no descriptors")
        index = cls._for_source(source, factory, truncate)
        if faiss.try_extract_index_ivf(index.index) is None:
            raise ValueError(f"an on-disk index needs an inverted file: {factory!r} has none (try 'IVF4096,PQ16')")
        if isinstance(faiss.downcast_index(index.index), faiss.IndexRefine):
            raise ValueError("an on-disk index cannot have a refine stage (its codes would be in memory)")
        if _is_fast_scan(faiss.try_extract_index_ivf(index.index)):
            raise ValueError(f"faiss keeps fast-scan codes ({factory!r}) in blocked in-memory lists that "
                             "merge_ondisk cannot write; use 8-bit PQ on disk (e.g. 'IVF4096,PQ16x8')")
        index.nprobe = nprobe
        chunk = chunk or source.default_chunk()
        t = time.perf_counter()
        if not index.index.is_trained:
            index.train(source.sample(train_size, seed), use_gpu=use_gpu)
        work, data_tmp = temp_path(path, ".build"), temp_path(path, ".ivfdata.tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            trained = work / "trained.faissindex"
            faiss.write_index(index.index, str(trained))
            bounds = np.linspace(0, len(source), shards + 1).round().astype(np.int64)
            jobs = [(int(a), int(b), str(work / f"shard{k}.faissindex")) for k, (a, b) in
                    enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
            threads = max(1, faiss.omp_get_max_threads() // len(jobs))
            settings = dict(dim=index.dim, truncate=truncate, chunk=chunk, use_gpu=use_gpu)
            if len(jobs) > 1 and source.npy is not None:
                workers = [_start_shard(dict(npy=str(source.npy), trained=str(trained), start=a, stop=b, out=out,
                                             threads=threads, **settings)) for a, b, out in jobs]
                try:
                    source.verify(chunk)  # the checksum pass, while the shards are built
                    with _progress(len(source), "shards", progress) as bar:
                        for worker, (a, b, _) in zip(workers, jobs):
                            _finish_shard(worker)
                            bar.update(b - a)
                finally:
                    for process, log_file in workers:
                        if process.poll() is None:
                            process.kill()
                            process.wait()
                        log_file.close()
            else:
                checksum = source.checksum()
                with _progress(len(source), "index add", progress) as bar:
                    for a, b, out in jobs:
                        shard = cls(index.dim, factory, truncate=truncate, _index=faiss.read_index(str(trained)))
                        assigner = shard._gpu_assigner() if use_gpu else None
                        for start, rows in source.chunks(chunk, a, b, checksum=checksum):
                            shard._add_vectors(shard._prepare(rows), np.arange(start, start + len(rows)), assigner)
                            bar.update(len(rows))
                        faiss.write_index(shard.index, out)
                        del shard
                checksum.check()
            merged = faiss.read_index(str(trained))
            with _writing(path), _quiet_stdout():  # faiss prints "resizing FILE to N bytes"
                merge_ondisk(merged, [out for _, _, out in jobs], str(data_tmp))
            index.paths, count = source.paths, merged.ntotal
            payload = faiss.serialize_index(merged)  # small: the lists' offsets, not their data
            del merged  # unmaps the .ivfdata file
            with _writing(path):
                with open(data_tmp, "rb+") as f:
                    os.fsync(f.fileno())
                ivfdata = {"file": data_name, "bytes": os.path.getsize(data_tmp),
                           "sha256": _sha256_file(data_tmp), "sampled_sha256": sampled_sha256(data_tmp)}
                os.replace(data_tmp, path.with_name(data_name))
            index.ivfdata = ivfdata
            index._write(path, payload, count, left=f"{data_name} was replaced already, so a previous {path.name} "
                                                   "is refused until the build is run again")
        finally:
            shutil.rmtree(work, ignore_errors=True)
            data_tmp.unlink(missing_ok=True)
        log.info("built %s over %d vectors in %d shards in %.1f s", factory, len(source), len(jobs),
                 time.perf_counter() - t)
        return cls.load(path)

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

    def _header(self, index_bytes: int, table: PathTable, count: int | None) -> dict:
        """The header of the index file, without its checksum."""
        return {"version": VERSION, "factory": self.factory, "dim": self.dim, "truncate": self.truncate,
                "count": len(self) if count is None else count, "model_config": self.model_config,
                "model_digest": self.model_digest,
                "weights_fingerprint": self.weights_fingerprint, "model_sources": self.model_sources,
                "precision": self.precision, "refine": self.refine, "refine_k": self.refine_k,
                "nprobe": self.nprobe, "ivfdata": self.ivfdata, "index_bytes": index_bytes,
                "paths_format": "packed", "paths_bytes": table.packed_bytes()}

    def _write(self, path: Path, payload, count: int | None = None, left: str = "nothing was replaced") -> None:
        """Write the index file from ``payload``: the serialised faiss index (a file, or bytes) of ``count``.

        ``left``: what a failed write leaves, for its error message.

        The checksum covers the header (:func:`_canonical_header`), then the
        payload and the paths.  The file is written under a short temporary
        name (:func:`~remap_lib.describe.extraction_files.temp_path`), then renamed over ``path``.
        """
        table = self.paths if isinstance(self.paths, PathTable) else PathTable.from_list(self.paths)
        paths = table.packed()
        if not isinstance(payload, Path):
            payload = memoryview(np.ascontiguousarray(payload)).cast("B")
        header = self._header(os.path.getsize(payload) if isinstance(payload, Path) else len(payload), table, count)
        digest = hashlib.sha256(_canonical_header(header))
        if isinstance(payload, Path):
            _sha256_file(payload, digest=digest)
        else:
            digest.update(payload)
        for part in paths:
            digest.update(part)
        header["sha256"] = digest.hexdigest()
        head = json.dumps(header).encode()
        tmp = temp_path(path, ".tmp")
        try:
            with _writing(path, left):
                with open(tmp, "wb") as f:
                    f.write(MAGIC + struct.pack("<Q", len(head)) + head)
                    if isinstance(payload, Path):
                        with open(payload, "rb") as g:
                            shutil.copyfileobj(g, f, 16 << 20)
                    else:
                        f.write(payload)
                    for part in paths:
                        f.write(part)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: str = "sampled") -> "RetrievalIndex":
        """Read an index file, refusing a truncated or corrupt one before faiss reads it.

        ``verify`` (on-disk indexes): ``"sampled"`` checks the ``.ivfdata`` file's
        size and sampled SHA-256 (:func:`sampled_sha256`), ``"full"`` its whole SHA-256.
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
            header, body = _read_header(f, path)
            _check_checksum(path, header, body)  # from here on, every header field is the one written
            ivfdata = header.get("ivfdata")
            data_file = None
            if ivfdata is not None:
                data_file = path.with_name(ivfdata["file"])
                _check_ivfdata(data_file, ivfdata, verify)
            f.seek(body)
            left = header["index_bytes"]

            def read(nbytes):  # the faiss payload only, never past it
                nonlocal left
                data = f.read(min(nbytes, left))
                left -= len(data)
                return data

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


def _read_header(f, path: Path) -> tuple[dict, int]:
    """The JSON header of an open index file and the offset of what follows it; refuses other versions.

    Files of versions 1-3 are refused, not read: their checksum does not
    cover the header, so an edited model option or count would go unnoticed.
    """
    size = os.path.getsize(path)
    start = f.read(len(MAGIC) + 8)
    if not start.startswith(MAGIC) or len(start) < len(MAGIC) + 8:
        raise IndexFileError(f"{path} is not a remap index file")
    (n,) = struct.unpack("<Q", start[8:16])
    if n > size - len(start):
        raise IndexFileError(f"{path} is truncated: its header says {n} bytes, the file holds {size - len(start)}")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{path}: damaged header ({exc})") from None
    version = header.get("version") if isinstance(header, dict) else None
    if type(version) is not int:
        raise IndexFileError(f"{path}: damaged header (no format version)")
    if version < VERSION:
        raise IndexFileError(f"{path} was written by an older remap (index format {version}, whose checksum does "
                             "not cover the header); rebuild it with `remap index build`")
    if version > VERSION:
        raise IndexFileError(f"{path} was written by a newer remap (index format {version}; this one reads "
                             f"{VERSION}); update remap to read it")
    return header, len(start) + n


def _check_checksum(path: Path, header: dict, body: int) -> None:
    """Refuse an index file whose size or SHA-256 (over its header and everything after it) is not the recorded one."""
    sizes, digest = (header.get("index_bytes"), header.get("paths_bytes")), header.get("sha256")
    if any(type(v) is not int or v < 0 for v in sizes) or not isinstance(digest, str):
        raise IndexFileError(f"{path}: damaged header (its sizes or checksum are missing)")
    data = os.path.getsize(path) - body
    if data != sum(sizes):
        raise IndexFileError(f"{path} is truncated or padded: {data} bytes of data, expected {sum(sizes)}")
    if _sha256_file(path, body, digest=hashlib.sha256(_canonical_header(header))) != digest:
        raise IndexFileError(f"{path} is corrupt: its checksum does not match (its header or its data changed "
                             "since it was written); rebuild it")


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


def _check_ivfdata(data_file: Path, ivfdata: dict, verify: str) -> None:
    """Refuse an ``.ivfdata`` file that is missing, of another size or of another checksum."""
    if not data_file.is_file():
        raise IndexFileError(f"{data_file} is missing: an on-disk index needs its .ivfdata file beside it")
    size = os.path.getsize(data_file)
    if size != ivfdata["bytes"]:
        raise IndexFileError(f"{data_file} is truncated or padded: {size} bytes, expected {ivfdata['bytes']}")
    if verify == "full":
        ok = _sha256_file(data_file) == ivfdata["sha256"]
    else:
        ok = sampled_sha256(data_file) == ivfdata["sampled_sha256"]
    if not ok:
        raise IndexFileError(f"{data_file} is corrupt: its checksum does not match (rebuild the index)")


def _start_shard(job: dict):
    """Start :func:`_build_shard` in a fresh Python process (not a fork: faiss's OpenMP threads exist here;
    not multiprocessing's spawn: it would import the caller's ``__main__`` again)."""
    import subprocess

    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]),
           "PYTHONPATH": os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    log_file = open(f"{job['out']}.log", "w+b")
    code = "import json, sys; from remap_lib.search.index import _build_shard; _build_shard(**json.loads(sys.argv[1]))"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(job)], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT), log_file


def _finish_shard(worker) -> None:
    process, log_file = worker
    with log_file:
        if process.wait() != 0:
            log_file.seek(0)
            lines = log_file.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"building an index shard failed (exit code {process.returncode}): {lines[-1]}")


def _build_shard(npy: str, trained: str, start: int, stop: int, out: str, threads: int, *, dim: int,
                 truncate: int | None, chunk: int, use_gpu: bool) -> int:
    """Worker of :meth:`RetrievalIndex.build_on_disk`: rows ``[start, stop)`` into a copy of the trained index."""
    faiss = _faiss()
    faiss.omp_set_num_threads(threads)
    shard = RetrievalIndex(dim, "shard", truncate=truncate, _index=faiss.read_index(trained))
    assigner = shard._gpu_assigner() if use_gpu else None
    rows = _NpyRows(Path(npy))
    for s in range(start, stop, chunk):
        x = rows.read(s, min(s + chunk, stop))
        shard._add_vectors(shard._prepare(x), np.arange(s, s + len(x)), assigner)
    faiss.write_index(shard.index, out)
    return stop - start


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
