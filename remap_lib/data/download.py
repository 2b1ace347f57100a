"""Download the standard benchmarks (for users who are online).

``remap download NAME --root DIR`` fetches a benchmark from its official
address into the layout the readers in :mod:`remap_lib.data.datasets` expect:

============  =================================================================
name          files
============  =================================================================
roxford5k     Oxford buildings images (VGG) + ``gnd_roxford5k.pkl`` (revisitop)
rparis6k      Paris buildings images (VGG, 2 archives) + ``gnd_rparis6k.pkl``
oxford5k      Oxford buildings images + the original ``gt/`` files
paris6k       Paris buildings images + the original ``gt/`` files
holidays      INRIA Holidays, ``jpg1``/``jpg2`` archives (INRIA FTP)
ukbench       UKBench (archive.org mirror of the original zip)
============  =================================================================

Downloads are resumable (HTTP ``Range`` on a ``.part`` file), written
atomically, checked against the server's ``Content-Length`` and, for
archives, by reading them through before unpacking.  None of these files has a
published checksum; the SHA-256 of each finished file is recorded in
``DIR/.remap-downloads.json`` and verified when the file is used again.
Without a network the command fails within seconds and says where to put the
files by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["BENCHMARKS", "DownloadError", "download_benchmark", "download_file", "sha256_file"]

log = logging.getLogger(__name__)

VGG = "https://www.robots.ox.ac.uk/~vgg/data"
REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"


@dataclass(frozen=True)
class Remote:
    url: str
    unpack_to: str | None = None  # folder (relative to the dataset root) to unpack an archive into
    flatten: bool = False  # move every unpacked file directly into unpack_to


BENCHMARKS: dict[str, list[Remote]] = {
    "roxford5k": [Remote(f"{VGG}/oxbuildings/oxbuild_images-v1.tgz", "jpg", True),
                  Remote(f"{REVISITOP}/roxford5k/gnd_roxford5k.pkl")],
    "rparis6k": [Remote(f"{VGG}/parisbuildings/paris_1-v1.tgz", "jpg", True),
                 Remote(f"{VGG}/parisbuildings/paris_2-v1.tgz", "jpg", True),
                 Remote(f"{REVISITOP}/rparis6k/gnd_rparis6k.pkl")],
    "oxford5k": [Remote(f"{VGG}/oxbuildings/oxbuild_images-v1.tgz", "jpg", True),
                 Remote(f"{VGG}/oxbuildings/gt_files_170407.tgz", "gt", True)],
    "paris6k": [Remote(f"{VGG}/parisbuildings/paris_1-v1.tgz", "jpg", True),
                Remote(f"{VGG}/parisbuildings/paris_2-v1.tgz", "jpg", True),
                Remote(f"{VGG}/parisbuildings/paris_120310.tgz", "gt", True)],
    "holidays": [Remote("ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg1.tar.gz", "jpg", True),
                 Remote("ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg2.tar.gz", "jpg", True)],
    "ukbench": [Remote("https://archive.org/download/ukbench/ukbench.zip", ".", False)],
}


class DownloadError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reachable(url: str, timeout: float = 5.0) -> None:
    """Fail fast (DNS and TCP connect) instead of hanging when offline."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"https": 443, "http": 80, "ftp": 21}[parts.scheme]
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise DownloadError(f"cannot reach {parts.hostname} ({exc})") from None


def download_file(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest``, resuming a previous ``dest.part``; atomic rename at the end."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    _reachable(url)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part file is already complete
            os.replace(part, dest)
            return dest
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: {exc}") from None
    with response:
        resumed = have and getattr(response, "status", 200) == 206
        mode = "ab" if resumed else "wb"
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        with open(part, mode) as f, tqdm(total=total, initial=have if resumed else 0, unit="B",
                                         unit_scale=True, desc=dest.name) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise DownloadError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def _unpack(archive: Path, target: Path, flatten: bool) -> int:
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f".unpack-{archive.name}"
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()
                if bad:
                    raise DownloadError(f"{archive}: member {bad} is corrupt; delete the file and download again")
                z.extractall(staging)
        else:
            with tarfile.open(archive) as t:
                t.extractall(staging, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DownloadError(f"{archive} is damaged ({exc}); delete it and download again") from None
    count = 0
    for f in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = Path(f.name) if flatten else f.relative_to(staging)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target / rel)
        count += 1
    shutil.rmtree(staging)
    return count


def download_benchmark(name: str, root: str | os.PathLike) -> Path:
    """Download and unpack benchmark ``name`` into ``root/name``; returns that folder."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / ".remap-downloads.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for remote in BENCHMARKS[name]:
        filename = Path(urllib.parse.urlsplit(remote.url).path).name
        dest = folder / ("archives" if remote.unpack_to else ".") / filename
        try:
            download_file(remote.url, dest)
        except DownloadError as exc:
            raise DownloadError(
                f"{exc}.\nDownload {remote.url} by hand and put it at {dest}"
                + (f" (it is unpacked into {folder / remote.unpack_to})" if remote.unpack_to else "")
                + f", then run this command again; or lay the benchmark out in {folder} yourself "
                "(see remap_lib/data/datasets.py)."
            ) from None
        digest = sha256_file(dest)
        if manifest.get(filename, digest) != digest:
            raise DownloadError(f"{dest} changed since it was downloaded (SHA-256 {digest} vs "
                                f"{manifest[filename]}); delete it to fetch it again")
        manifest[filename] = digest
        if remote.unpack_to:
            n = _unpack(dest, folder / remote.unpack_to, remote.flatten)
            log.info("%s: %d files unpacked into %s", filename, n, remote.unpack_to)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return folder
