"""The on-disk IVF build: inverted lists merged into one memory-mapped ``.ivfdata`` file.

**On-disk inverted lists** grow an index past memory: IVF sub-indexes are
built in parallel processes over slices of the rows, merged with faiss's
``merge_ondisk`` into one ``FILE.ivfdata`` beside the index file, and searched
memory-mapped (only the visited lists are read).  :func:`build_on_disk` does
it (:func:`build_on_disk`
calls it); the index file then names the ``.ivfdata`` file with its size and
checksums (:mod:`remap_lib.search.index_file`).

Apart from the index because it is a build pipeline of its own: worker
processes (:func:`_start_shard` runs :func:`_build_shard` in a fresh Python,
by this module's name), temporary shard files, the order in which the two
files are put in place.  It uses :class:`~remap_lib.search.index.RetrievalIndex`
(the class is passed in; the faiss helpers are imported when called, since
``index`` imports this module).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..describe.extraction_files import temp_path
from .index import RetrievalIndex, _faiss, _is_fast_scan, _progress
from .index_file import _name_max, _sha256_file, _writing, sampled_sha256
from .sources import DescriptorSource, _NpyRows

__all__ = ["build_on_disk"]

log = logging.getLogger(__name__)


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


def build_on_disk(source: DescriptorSource, path: str | os.PathLike, factory: str, *,
                  shards: int = 1, truncate: int | None = None, nprobe: int = 16, train_size: int = 200_000,
                  chunk: int | None = None, seed: int = 0, use_gpu: bool = False,
                  progress: bool = False, index_class=None):
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
    over an older index leaves a pair that
    :meth:`~remap_lib.search.index.RetrievalIndex.load` refuses, never a mix.

    ``index_class``: the :class:`~remap_lib.search.index.RetrievalIndex` (sub)class
    to build and return (default: ``RetrievalIndex``).
    """
    from faiss.contrib.ondisk import merge_ondisk


    cls = RetrievalIndex if index_class is None else index_class
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


def _start_shard(job: dict):
    """Start :func:`_build_shard` in a fresh Python process (not a fork: faiss's OpenMP threads exist here;
    not multiprocessing's spawn: it would import the caller's ``__main__`` again)."""
    import subprocess

    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]),
           "PYTHONPATH": os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    log_file = open(f"{job['out']}.log", "w+b")
    code = ("import json, sys; from remap_lib.search.on_disk import _build_shard; "
            "_build_shard(**json.loads(sys.argv[1]))")
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
    """Worker of :func:`build_on_disk`: rows ``[start, stop)`` into a copy of the trained index."""
    from .index import RetrievalIndex, _faiss

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
