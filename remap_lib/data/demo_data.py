"""The embedded demo benchmark: real photographs that ship inside packages, built offline.

``make demo`` must run on a fresh machine with no internet but the package
registries, so the demo set is built, deterministically, from photographs that
really are inside Python packages:

* installed with remap: scikit-image (``skimage/data``), scikit-learn
  (``sklearn/datasets/images``), matplotlib (``mpl-data/sample_data``);
* fetched from PyPI as package archives, pinned by SHA-256 (``pip download``):
  the ``opencv-python`` source archive, whose ``opencv/samples/data`` holds
  OpenCV's real multi-view pairs (graf, leuven, aero, box/box_in_scene, stereo
  pairs), and the ``vismatch`` wheel, whose ``assets/example_pairs`` holds real
  landmark pairs (Montmartre close/far, Grand Central close/far) and a
  landmark false-positive pair (Chartres vs Notre-Dame) used as distractors.

The set has three kinds of database images:

1. **real multi-view groups** (a query photo and a second real photo of the
   same object or scene), plus a perspective and a clutter view of the second;
2. **generated views** of single real photos under the challenges the REMAP
   paper targets — scale change and cropping, viewpoint (perspective),
   illumination, partial occlusion, cluttered background — ground truth by
   construction; the query is a crop of the photo (as a user's box would be);
3. **distractors**: unrelated real photos and three generated views of each
   (so a generated look does not give a positive away).

Protocols (``dataset.gnd``): ``all`` (every positive counts), and one per
challenge (``scale``, ``perspective``, ``illumination``, ``occlusion``,
``clutter``, ``multiview``): that challenge's views are the positives, the
query's other positives are ignored (junk), so each column says how a method
copes with one kind of change.

Everything lands in ``data/cache/demo/`` (``jpg/``, ``gnd.json``,
``provenance.json``); the package archives in ``data/cache/packages/``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .download import sha256_file

__all__ = ["ARCHIVES", "BUILD_VERSION", "CHALLENGES", "SOURCES", "build_demo_set", "default_demo_dir"]

log = logging.getLogger(__name__)

BUILD_VERSION = 1
STORE_SIZE = 640  # longer side of the stored JPEGs
CHALLENGES = ("scale", "perspective", "illumination", "occlusion", "clutter")


@dataclass(frozen=True)
class Archive:
    """A package archive fetched from PyPI with ``pip download``, checked by SHA-256."""

    requirement: str
    filename: str
    sha256: str
    no_binary: bool


ARCHIVES = {
    "opencv": Archive("opencv-python==5.0.0.93", "opencv_python-5.0.0.93.tar.gz",
                      "66aac3e5b5faa48d4025816592f3af19e4bfc2c68dec067bae2dbb4ca10aa9e2", True),
    "vismatch": Archive("vismatch==1.4.0", "vismatch-1.4.0-py3-none-any.whl",
                        "f78784e0a5540e68459ebcea577340b97788b5f2816d080458f8ef21f05117cc", False),
}


@dataclass(frozen=True)
class Source:
    """One source photograph: where it is inside which package, and its licence."""

    package: str  # "scikit-image", "scikit-learn", "matplotlib", "opencv", "vismatch"
    member: str  # path inside the package / archive
    licence: str
    credit: str


_SK = "scikit-image"
_CV = "opencv"
_VM = "vismatch"
_CV_LIC = "in opencv-python's sdist (Apache-2.0 package); no per-image licence stated"
_VM_LIC = "in the vismatch wheel (BSD-3-Clause code); no image licence stated"

SOURCES: dict[str, Source] = {
    # scikit-image: licences from the docstrings of skimage/data/_fetchers.py
    "motorcycle_left": Source(_SK, "motorcycle_left.png", "Middlebury 2014 stereo; citation requested",
                              "Scharstein et al., Middlebury stereo datasets"),
    "motorcycle_right": Source(_SK, "motorcycle_right.png", "Middlebury 2014 stereo; citation requested",
                               "Scharstein et al., Middlebury stereo datasets"),
    "chelsea": Source(_SK, "chelsea.png", "CC0", "Stefan van der Walt"),
    "coffee": Source(_SK, "coffee.png", "CC0", "Rachel Michetti"),
    "rocket": Source(_SK, "rocket.jpg", "public domain", "SpaceX"),
    "astronaut": Source(_SK, "astronaut.png", "public domain", "NASA (Eileen Collins)"),
    "camera": Source(_SK, "camera.png", "CC0", "scikit-image"),
    "coins": Source(_SK, "coins.png", "public domain (Walters Art Museum)", "scikit-image"),
    "hubble": Source(_SK, "hubble_deep_field.jpg", "public domain", "NASA"),
    "brick": Source(_SK, "brick.png", "CC0", "scikit-image"),
    "grass": Source(_SK, "grass.png", "CC0", "scikit-image"),
    "gravel": Source(_SK, "gravel.png", "CC0", "scikit-image"),
    "clock": Source(_SK, "clock_motion.png", "public domain", "scikit-image"),
    # scikit-learn: sklearn/datasets/images/README.txt
    "china": Source("scikit-learn", "china.jpg", "CC-BY-2.0", "Flickr user danielbuechele"),
    "flower": Source("scikit-learn", "flower.jpg", "CC-BY-2.0", "Flickr user vultilion"),
    # matplotlib: mpl-data/sample_data
    "grace_hopper": Source("matplotlib", "grace_hopper.jpg", "no licence stated in matplotlib",
                           "U.S. Navy photograph of Grace Hopper"),
    # OpenCV samples (opencv/samples/data in the opencv-python sdist)
    "graf1": Source(_CV, "graf1.png", _CV_LIC + "; from the Oxford VGG affine dataset (research use)",
                    "Mikolajczyk et al., Oxford affine covariant regions"),
    "graf3": Source(_CV, "graf3.png", _CV_LIC + "; from the Oxford VGG affine dataset (research use)",
                    "Mikolajczyk et al., Oxford affine covariant regions"),
    "leuvenA": Source(_CV, "leuvenA.jpg", _CV_LIC, "OpenCV samples"),
    "leuvenB": Source(_CV, "leuvenB.jpg", _CV_LIC, "OpenCV samples"),
    "aero1": Source(_CV, "aero1.jpg", _CV_LIC, "OpenCV samples"),
    "aero3": Source(_CV, "aero3.jpg", _CV_LIC, "OpenCV samples"),
    "box": Source(_CV, "box.png", _CV_LIC, "OpenCV samples"),
    "box_in_scene": Source(_CV, "box_in_scene.png", _CV_LIC, "OpenCV samples"),
    "books_left": Source(_CV, "left.jpg", _CV_LIC, "OpenCV samples"),
    "books_right": Source(_CV, "right.jpg", _CV_LIC, "OpenCV samples"),
    "aloeL": Source(_CV, "aloeL.jpg", _CV_LIC + "; Middlebury stereo, citation requested", "Middlebury"),
    "aloeR": Source(_CV, "aloeR.jpg", _CV_LIC + "; Middlebury stereo, citation requested", "Middlebury"),
    "rubberwhale1": Source(_CV, "rubberwhale1.png", _CV_LIC + "; Middlebury optical flow", "Middlebury"),
    "rubberwhale2": Source(_CV, "rubberwhale2.png", _CV_LIC + "; Middlebury optical flow", "Middlebury"),
    "home": Source(_CV, "home.jpg", _CV_LIC, "OpenCV samples"),
    "building": Source(_CV, "building.jpg", _CV_LIC, "OpenCV samples"),
    "fruits": Source(_CV, "fruits.jpg", _CV_LIC, "OpenCV samples"),
    "messi": Source(_CV, "messi5.jpg", _CV_LIC, "OpenCV samples"),
    "baboon": Source(_CV, "baboon.jpg", _CV_LIC, "OpenCV samples (USC-SIPI)"),
    "butterfly": Source(_CV, "butterfly.jpg", _CV_LIC, "OpenCV samples"),
    "orange": Source(_CV, "orange.jpg", _CV_LIC, "OpenCV samples"),
    "apple": Source(_CV, "apple.jpg", _CV_LIC, "OpenCV samples"),
    "smarties": Source(_CV, "smarties.png", _CV_LIC, "OpenCV samples"),
    "board": Source(_CV, "board.jpg", _CV_LIC, "OpenCV samples"),
    "squirrel": Source(_CV, "squirrel_cls.jpg", _CV_LIC, "OpenCV samples"),
    "basketball": Source(_CV, "basketball1.png", _CV_LIC + "; Middlebury optical flow", "Middlebury"),
    # vismatch example pairs (vismatch/assets/example_pairs)
    "montmartre_close": Source(_VM, "outdoor/montmartre_close.jpg", _VM_LIC, "vismatch example pairs"),
    "montmartre_far": Source(_VM, "outdoor/montmartre_far.jpg", _VM_LIC, "vismatch example pairs"),
    "gcs_close": Source(_VM, "indoor/gcs_close.jpg", _VM_LIC, "vismatch example pairs"),
    "gcs_far": Source(_VM, "indoor/gcs_far.jpg", _VM_LIC, "vismatch example pairs"),
    "chartres": Source(_VM, "false_positive/chartres.jpg", _VM_LIC, "vismatch example pairs"),
    "notre_dame": Source(_VM, "false_positive/notre_dame.jpg", _VM_LIC, "vismatch example pairs"),
}

# (query photo, second real photo of the same thing)
MULTIVIEW = [("motorcycle_left", "motorcycle_right"), ("graf1", "graf3"), ("leuvenA", "leuvenB"),
             ("aero1", "aero3"), ("box", "box_in_scene"), ("books_left", "books_right"), ("aloeL", "aloeR"),
             ("rubberwhale1", "rubberwhale2"), ("montmartre_close", "montmartre_far"),
             ("gcs_close", "gcs_far")]
# single photos: the photo is the query, its generated views the positives
GENERATED = ["chelsea", "coffee", "rocket", "astronaut", "china", "flower", "grace_hopper", "home",
             "building", "fruits", "messi"]
DISTRACTORS = ["camera", "coins", "hubble", "brick", "grass", "gravel", "clock", "chartres", "notre_dame",
               "baboon", "butterfly", "orange", "apple", "smarties", "board", "squirrel", "basketball"]
# photos used as backgrounds / occluders (never as database images themselves)
BACKGROUNDS = ["gravel", "grass", "brick", "board", "smarties", "coins"]  # distractors only: no ambiguous positives


def default_demo_dir() -> Path:
    """``data/cache/demo`` in a source checkout, else ``~/.cache/remap/demo``."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "data").is_dir() and (repo / "pyproject.toml").exists():
        return repo / "data" / "cache" / "demo"
    return Path.home() / ".cache" / "remap" / "demo"


# --------------------------------------------------------------------------- sources


def fetch_archive(name: str, cache: Path) -> Path:
    """The package archive ``name`` from :data:`ARCHIVES`, downloaded once with pip and checked."""
    spec = ARCHIVES[name]
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / spec.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache),
               spec.requirement]
        if spec.no_binary:
            cmd[5:5] = ["--no-binary", spec.requirement.split("==")[0]]
        log.info("fetching %s from PyPI", spec.requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(
                f"could not download {spec.requirement} from the package registry (needed for the demo "
                f"set's OpenCV / vismatch photos): {proc.stderr.strip()[-500:]}. On a machine without "
                f"registry access, copy {spec.filename} into {cache}."
            )
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise RuntimeError(f"{path} has SHA-256 {digest}, expected {spec.sha256}; delete it to download again")
    return path


class _SourceReader:
    """Opens source photos from installed packages and the fetched archives."""

    def __init__(self, package_cache: Path):
        self.package_cache = package_cache
        self._members: dict[str, dict[str, bytes]] = {}

    def _archive_members(self, name: str, prefix: str, wanted: set[str]) -> dict[str, bytes]:
        if name not in self._members:
            path = fetch_archive(name, self.package_cache)
            found: dict[str, bytes] = {}
            if path.suffix == ".whl":
                with zipfile.ZipFile(path) as z:
                    for member in wanted:
                        found[member] = z.read(prefix + member)
            else:
                with tarfile.open(path) as t:
                    for info in t:
                        rel = info.name.split(prefix, 1)[-1] if prefix in info.name else None
                        if rel in wanted:
                            found[rel] = t.extractfile(info).read()
            missing = wanted - set(found)
            if missing:
                raise RuntimeError(f"{path.name} lacks {sorted(missing)}")
            self._members[name] = found
        return self._members[name]

    def open(self, key: str) -> Image.Image:
        src = SOURCES[key]
        if src.package == _SK:
            from skimage import data as skdata

            img = Image.open(Path(skdata.data_dir) / src.member)
        elif src.package == "scikit-learn":
            import sklearn.datasets

            img = Image.open(Path(sklearn.datasets.__file__).parent / "images" / src.member)
        elif src.package == "matplotlib":
            import matplotlib

            img = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / src.member)
        else:
            prefix = "opencv/samples/data/" if src.package == _CV else "vismatch/assets/example_pairs/"
            wanted = {s.member for s in SOURCES.values() if s.package == src.package}
            img = Image.open(io.BytesIO(self._archive_members(src.package, prefix, wanted)[src.member]))
        img.load()
        return _fit(img.convert("RGB"), STORE_SIZE)


def _fit(img: Image.Image, size: int) -> Image.Image:
    scale = size / max(img.size)
    if scale >= 1:
        return img
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)


# --------------------------------------------------------------------------- challenges


def _rng(*keys: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(keys).encode()))


def query_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The query of a generated group: a 50–70 % area crop (the region a user would box)."""
    w, h = img.size
    f = np.sqrt(rng.uniform(0.5, 0.7))
    cw, ch = int(w * f), int(h * f)
    x0, y0 = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def view_scale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Scale change and cropping: a 20–35 % area crop, shown at the full size."""
    w, h = img.size
    f = np.sqrt(rng.uniform(0.20, 0.35))
    cw, ch = int(w * f), int(h * f)
    x0, y0 = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)


def view_perspective(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Viewpoint change: a homography moving each corner by up to 25 % of the side."""
    w, h = img.size
    d = 0.25
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    dst = [(x + rng.uniform(-d, d) * w, y + rng.uniform(-d, d) * h) for x, y in src]
    coeffs = _perspective_coeffs(dst, src)
    return img.transform((w, h), Image.PERSPECTIVE, coeffs, Image.BICUBIC, fillcolor=(0, 0, 0))


def _perspective_coeffs(dst, src):
    """PIL's 8 coefficients mapping output points ``dst`` to input points ``src``."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    b = np.array(src, dtype=np.float64).reshape(8)
    return np.linalg.solve(np.array(a, dtype=np.float64), b).tolist()


def view_illumination(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Illumination: gamma 0.35–2.8, brightness 0.4–1.3 and a colour cast of ±40 % per channel."""
    arr = np.asarray(img, dtype=np.float64) / 255.0
    gamma = float(np.exp(rng.uniform(np.log(0.35), np.log(2.8))))
    cast = rng.uniform(0.6, 1.4, size=3)
    arr = np.clip(arr**gamma * rng.uniform(0.4, 1.3) * cast, 0, 1)
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def view_occlusion(img: Image.Image, rng: np.random.Generator, occluder: Image.Image) -> Image.Image:
    """Partial occlusion: 45–60 % of the image covered by a patch of another photo."""
    w, h = img.size
    area = rng.uniform(0.45, 0.60)
    ow = int(w * np.sqrt(area) * rng.uniform(0.8, 1.25))
    oh = min(h, int(area * w * h / max(ow, 1)))
    ow = min(w, ow)
    patch = occluder.resize((ow, oh), Image.BICUBIC)
    out = img.copy()
    out.paste(patch, (int(rng.uniform(0, w - ow + 1)), int(rng.uniform(0, h - oh + 1))))
    return out


def view_clutter(img: Image.Image, rng: np.random.Generator, background: Image.Image) -> Image.Image:
    """Cluttered background: the photo shrunk to 28–40 % of the side, pasted into another scene."""
    bw, bh = background.size
    f = rng.uniform(0.28, 0.40)
    scale = f * min(bw / img.width, bh / img.height)
    small = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.BICUBIC)
    out = background.copy()
    out.paste(small, (int(rng.uniform(0, bw - small.width + 1)), int(rng.uniform(0, bh - small.height + 1))))
    return out.filter(ImageFilter.GaussianBlur(0.5))


def make_view(challenge: str, img: Image.Image, key: str, reader: _SourceReader) -> Image.Image:
    rng = _rng(key, challenge)
    if challenge == "scale":
        return view_scale(img, rng)
    if challenge == "perspective":
        return view_perspective(img, rng)
    if challenge == "illumination":
        return view_illumination(img, rng)
    other = reader.open(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    if challenge == "occlusion":
        return view_occlusion(img, rng, other)
    if challenge == "clutter":
        return view_clutter(img, rng, other)
    raise ValueError(f"unknown challenge {challenge!r}; choose one of {CHALLENGES}")


# --------------------------------------------------------------------------- build


def build_demo_set(out_dir: str | os.PathLike | None = None, package_cache: str | os.PathLike | None = None,
                   force: bool = False) -> Path:
    """Build the demo set into ``out_dir`` (default :func:`default_demo_dir`); a no-op when up to date."""
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    stamp = out / "gnd.json"
    if stamp.exists() and not force:
        try:
            if json.loads(stamp.read_text()).get("build_version") == BUILD_VERSION:
                return out
        except json.JSONDecodeError:
            pass
    cache = Path(package_cache) if package_cache is not None else out.parent / "packages"
    reader = _SourceReader(cache)
    jpg = out / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)

    imlist: list[str] = []
    kinds: list[str] = []  # challenge (or "multiview" / "distractor") of each database image
    groups: list[int] = []
    qimlist: list[str] = []
    provenance: dict[str, dict] = {}

    def save(name: str, img: Image.Image, sources: list[str], how: str) -> None:
        img.save(jpg / f"{name}.jpg", quality=90, subsampling=0)
        provenance[name] = {"sources": sources, "made_by": how}

    def add_db(name, img, group, kind, sources, how):
        save(name, img, sources, how)
        imlist.append(name)
        groups.append(group)
        kinds.append(kind)

    for g, (query, other) in enumerate(MULTIVIEW):
        name = f"g{g:02d}_{query}"
        save(name, reader.open(query), [query], "the photo as shipped (resized)")
        qimlist.append(name)
        second = reader.open(other)
        add_db(f"g{g:02d}_{other}", second, g, "multiview", [other], "a second real photo of the same scene")
        for challenge in ("perspective", "clutter"):
            add_db(f"g{g:02d}_{other}_{challenge}", make_view(challenge, second, other, reader), g, challenge,
                   [other], f"generated: {challenge} view of the second photo")
    offset = len(MULTIVIEW)
    for g, key in enumerate(GENERATED, start=offset):
        img = reader.open(key)
        name = f"g{g:02d}_{key}"
        save(name, query_crop(img, _rng(key, "query")), [key], "query: a 50–70 % area crop of the photo")
        qimlist.append(name)
        for challenge in CHALLENGES:
            add_db(f"g{g:02d}_{key}_{challenge}", make_view(challenge, img, key, reader), g, challenge, [key],
                   f"generated: {challenge} view")
    for key in DISTRACTORS:
        img = reader.open(key)
        add_db(f"x_{key}", img, -1, "distractor", [key], "distractor photo")
        for challenge in _rng(key, "distractor").choice(CHALLENGES, size=3, replace=False):
            add_db(f"x_{key}_{challenge}", make_view(str(challenge), img, key, reader), -1, "distractor", [key],
                   f"distractor: generated {challenge} view")

    n_groups = len(MULTIVIEW) + len(GENERATED)
    gnd = [{"ok": [i for i, g in enumerate(groups) if g == q]} for q in range(n_groups)]
    meta = {
        "build_version": BUILD_VERSION,
        "imlist": imlist,
        "qimlist": qimlist,
        "gnd": gnd,
        "groups": groups,
        "kinds": kinds,
        "sources": {k: asdict(SOURCES[k]) for k in sorted({s for p in provenance.values() for s in p["sources"]})},
        "archives": {k: asdict(v) for k, v in ARCHIVES.items()},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    tmp = out / "gnd.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, stamp)
    log.info("demo set: %d database images, %d queries in %s", len(imlist), len(qimlist), out)
    return out
