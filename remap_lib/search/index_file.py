"""The index file format: one checked file per index, refused before faiss reads a byte of a bad one.

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

:class:`~remap_lib.search.index.RetrievalIndex` supplies the header's fields
(its factory, model identity, search defaults) and the serialised faiss index;
this module owns the bytes around them: the layout, the version, the sizes
and the checksum (:func:`write_index_file`, :func:`read_checked_header`), the
atomic write and its error messages (:func:`_writing`), and the guards of the
command line (:func:`is_index_file`, :func:`check_index_output`).  It needs
numpy but not faiss, so that a file can be checked, and an output path
refused, without the index machinery.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..describe.extraction_files import temp_path

__all__ = ["IndexFileError", "PathTable", "check_index_output", "is_index_file", "payload_reader",
           "read_checked_header", "sampled_sha256", "write_index_file"]

MAGIC = b"REMAPIDX"
VERSION = 4  # 2: weights fingerprint, model sources, precision; 3: refine, on-disk inverted lists;
#               4: the checksum covers the header too
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 1 << 16  # sampled checksum of an .ivfdata file


class IndexFileError(ValueError):
    """An index file that is truncated, corrupt or not an index."""


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


def write_index_file(path: Path, fields: dict, payload, table: PathTable, left: str = "nothing was replaced") -> None:
    """Write an index file: ``fields``, ``payload`` (the serialised faiss index: a file, or bytes), ``table``.

    The header is ``fields`` between the format's ``version`` and the sizes of
    the payload and the paths; ``left``: what a failed write leaves, for its
    error message.

    The checksum covers the header (:func:`_canonical_header`), then the
    payload and the paths.  The file is written under a short temporary
    name (:func:`~remap_lib.describe.extraction_files.temp_path`), then renamed over ``path``.
    """
    paths = table.packed()
    if not isinstance(payload, Path):
        payload = memoryview(np.ascontiguousarray(payload)).cast("B")
    index_bytes = os.path.getsize(payload) if isinstance(payload, Path) else len(payload)
    header = {"version": VERSION, **fields, "index_bytes": index_bytes, "paths_format": "packed",
              "paths_bytes": table.packed_bytes()}
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


def read_checked_header(f, path: Path, verify: str) -> tuple[dict, int, Path | None]:
    """The header of the open index file ``f``, the offset of its faiss payload and its ``.ivfdata`` file (or None).

    Refuses the file (:class:`IndexFileError`) unless its version, size and
    checksum are right, and those of its ``.ivfdata`` file (``verify``:
    ``"sampled"`` or ``"full"``, see :func:`_check_ivfdata`); from then on,
    every header field is the one written.
    """
    header, body = _read_header(f, path)
    _check_checksum(path, header, body)
    ivfdata = header.get("ivfdata")
    data_file = None
    if ivfdata is not None:
        data_file = path.with_name(ivfdata["file"])
        _check_ivfdata(data_file, ivfdata, verify)
    return header, body, data_file


def payload_reader(f, start: int, nbytes: int):
    """A ``read(n)`` for faiss's ``PyCallbackIOReader``: the ``nbytes`` at ``start`` of ``f`` only, never past them."""
    f.seek(start)
    left = nbytes

    def read(n):
        nonlocal left
        data = f.read(min(n, left))
        left -= len(data)
        return data

    return read


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
