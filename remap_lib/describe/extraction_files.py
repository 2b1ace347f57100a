"""The manifest of an extraction folder (``remap extract``), readable without torch.

:mod:`remap_lib.describe.extract` writes the folder; :func:`remap_lib.describe.extract.load_descriptors`
and :class:`remap_lib.search.sources.DescriptorSource` read it.  The index side must not
import torch (its search processes are measured for memory), so what both
readers check first lives here, with the output-folder check the CLI runs
before it builds a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["FORMAT", "check_output_folder", "load_npy", "read_manifest", "temp_path"]

FORMAT = "remap-extraction-v2"


def read_manifest(folder: str | os.PathLike) -> dict:
    """``manifest.json`` of a complete extraction folder, or a clear error saying what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder written by `remap extract`")
    manifest_file = folder / "manifest.json"
    if not manifest_file.exists():
        raise FileNotFoundError(f"{folder} has no complete result (manifest.json missing); run (or rerun, "
                                "to finish) `remap extract` into it")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder} was written by an older remap; extract again into a new folder")
    return manifest


def check_output_folder(path) -> None:
    """An output folder may exist (to resume) but must not be a file."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"output folder {path} is an existing file; choose a folder")


def load_npy(path, mmap_mode=None):
    """``descriptors.npy`` as an array (memory-mapped with ``mmap_mode``), or an error that says what to do.

    numpy's error for a file that is not a plain array (another file written
    over it, e.g. by ``remap index build -o``) advises loading it "unsafely
    using allow_pickle": never right for descriptors, which are never pickled.
    """
    import numpy as np

    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError:
        raise ValueError(f"{path} is not a plain numpy array (another file was written over it, or it is "
                         "damaged); rerun the same `remap extract` command to rebuild it") from None


def temp_path(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden temporary name next to ``path``, never longer than ``path``'s own name allows.

    ``.NAME<suffix>`` while that fits in 255 bytes; a longer name (a valid -o of
    251 to 255 bytes) gets ``.<16 hex of its hash><suffix>``, so that a finished
    file or index is never lost to a temporary name the file system refuses.
    The name is the same at every run, so a run replaces what a killed one left.
    Used by every writer of extraction folders and index files.
    """
    path = Path(path)
    name = f".{path.name}{suffix}"
    if len(os.fsencode(name)) > 255:
        name = f".{hashlib.sha1(os.fsencode(path.name)).hexdigest()[:16]}{suffix}"
    return path.with_name(name)
