"""Local features and geometry: RootSIFT, mutual ratio-test matches, RANSAC inliers (REMAP §IV-A).

The math is small pure functions on :class:`Features`: :func:`sift_features`
(RootSIFT, Arandjelović & Zisserman 2012, on the image resized to a maximum
side) → :func:`match_features` (mutual nearest neighbours passing Lowe's ratio
test) → a homography (or fundamental matrix) fitted with RANSAC
(OpenCV's USAC) → :func:`count_inliers`; :func:`inlier_boxes` gives the box of
the inliers in each image (the RPN's targets), :func:`draw_matches` a picture.
What is done with the counts (sampling, classifying, caching the training
pairs of a dataset) is in :mod:`remap_lib.training.pairs`.

Chance matches.  Two unrelated photos always give a few dozen tentative
matches, and RANSAC finds *some* model among them.  Measured on
``landmarks_fr`` (photos ≤ 640 px, pairs of different landmarks): with the
plain ratio test and a homography, unrelated pairs had a median of 7 inliers
(up to 32: many keypoints of one image matched to the same point of the other),
so the paper's bound of 5 separated nothing.  Mutual nearest neighbours, one
match per pair of locations and a plausibility check on the homography (the
first image's frame must map to a convex quadrilateral in front of the camera,
not more than 50× larger or smaller) bring unrelated pairs to 0 inliers in
~90 % of cases and at most ~5–6.  A fundamental matrix is fitted from 7–8
correspondences and constrains points only to a line, so unrelated pairs keep
~10 inliers: with ``method="fundamental"`` raise ``min_inliers`` accordingly.
With a homography a count is 0 or at least 4 (the sample it is fitted from),
so 4 is no evidence either; the paper's 5 is the first count that is.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from ..data.images import ImageSpec, load_spec

__all__ = [
    "Features",
    "MatchSettings",
    "count_inliers",
    "draw_matches",
    "geometric_matches",
    "inlier_boxes",
    "match_features",
    "sift_features",
]

log = logging.getLogger(__name__)

METHODS = ("homography", "fundamental")
DEFAULT_THRESHOLDS = {"homography": 4.0, "fundamental": 2.0}  # pixels of the resized image
MIN_CORRESPONDENCES = {"homography": 4, "fundamental": 8}
MAX_AREA_RATIO = 50.0  # a homography may shrink / enlarge the first image's frame at most this much
ALGORITHM_VERSION = 1  # bump when counts change for the same settings (invalidates caches)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MatchSettings:
    """How two images are matched; part of every cache key.

    ``max_side``: images are shrunk (never enlarged) so that their longer side
    is at most this many pixels before SIFT; ``max_keypoints``: the strongest
    SIFT keypoints kept; ``ratio``: Lowe's ratio test; ``method``:
    ``"homography"`` (default) or ``"fundamental"``; ``ransac_threshold``: in
    pixels of the resized image (default 4 for a homography's reprojection
    error, 2 for a fundamental matrix's epipolar distance).
    """

    max_side: int = 1024
    max_keypoints: int = 4000
    ratio: float = 0.8
    method: str = "homography"
    ransac_threshold: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, got {self.max_side}")
        if self.max_keypoints < 1:
            raise ValueError(f"max_keypoints must be at least 1, got {self.max_keypoints}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.ransac_threshold is None:
            object.__setattr__(self, "ransac_threshold", DEFAULT_THRESHOLDS[self.method])
        if not self.ransac_threshold > 0:
            raise ValueError(f"ransac_threshold must be positive, got {self.ransac_threshold}")

    def key(self) -> str:
        """A string naming these settings (cache lines with another key are ignored)."""
        return (f"v{ALGORITHM_VERSION}-rootsift{self.max_side}px{self.max_keypoints}kp-ratio{self.ratio:g}"
                f"-{self.method}{self.ransac_threshold:g}px")


# --------------------------------------------------------------------------- features and matching


@dataclass
class Features:
    """RootSIFT keypoints of one image.

    Attributes:
        xy: ``(N, 2)`` float32 keypoint positions in the *resized* image.
        desc: ``(N, 128)`` float32 RootSIFT descriptors, rows L2-normalised.
        size: ``(width, height)`` of the resized image.
        scale: ``(sx, sy)``: resized / input pixels (1 when not resized).
    """

    xy: np.ndarray
    desc: np.ndarray
    size: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)

    def __len__(self) -> int:
        return len(self.xy)


def _working_gray(image, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """8-bit gray image shrunk so that its longer side is ≤ ``max_side``, and the scale ``(sx, sy)``."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got {arr.dtype}")
    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
    h, w = arr.shape
    if max(h, w) <= max_side:
        return arr, (1.0, 1.0)
    s = max_side / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    return cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA), (nw / w, nh / h)


def sift_features(image, max_side: int = 1024, max_keypoints: int = 4000) -> Features:
    """RootSIFT features of ``image`` (PIL image or ``(H, W[, 3])`` uint8 array, RGB).

    The image is shrunk to ``max_side`` first (never enlarged); blank or tiny
    images simply have no keypoints.  RootSIFT (Arandjelović & Zisserman
    2012): L1-normalise each SIFT descriptor, take the square root; Euclidean
    distances between the results are Hellinger distances between the originals.
    """
    gray, scale = _working_gray(image, max_side)
    keypoints, desc = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(gray, None)
    size = (gray.shape[1], gray.shape[0])
    if desc is None or not keypoints:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), size, scale)
    desc = desc.astype(np.float32)
    desc = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7))
    xy = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    return Features(xy, desc.astype(np.float32), size, scale)


def match_features(feat_a: Features, feat_b: Features, ratio: float = 0.8) -> np.ndarray:
    """Tentative correspondences ``(M, 2)`` (index in ``feat_a``, index in ``feat_b``).

    A match is kept when (1) it passes Lowe's ratio test, nearest distance
    < ``ratio`` × second nearest, (2) the two keypoints are each other's
    nearest neighbour, and (3) no earlier match joins the same two pixel
    locations (SIFT repeats a keypoint for each dominant orientation).  (2) and
    (3) keep one point of one image from collecting many matches, which
    otherwise lets RANSAC find "models" between unrelated photos.
    """
    if len(feat_a) == 0 or len(feat_b) < 2:
        return np.zeros((0, 2), np.int64)
    sim = feat_a.desc @ feat_b.desc.T  # unit rows: squared distance = 2 - 2 sim
    nearest = sim.argmax(axis=1)
    top2 = np.partition(sim, -2, axis=1)[:, -2:]
    d1 = np.sqrt(np.maximum(2.0 - 2.0 * top2[:, 1], 0.0))
    d2 = np.sqrt(np.maximum(2.0 - 2.0 * top2[:, 0], 0.0))
    rows = np.arange(len(feat_a))
    keep = (d1 < ratio * d2) & (sim.argmax(axis=0)[nearest] == rows)
    matches = np.stack([rows[keep], nearest[keep]], axis=1)
    locations = np.round(np.hstack([feat_a.xy[matches[:, 0]], feat_b.xy[matches[:, 1]]])).astype(np.int64)
    _, first = np.unique(locations, axis=0, return_index=True)
    return matches[np.sort(first)]


def _plausible_homography(h: np.ndarray, size: tuple[int, int]) -> bool:
    """The first image's frame maps, in front of the camera, to a convex quadrilateral of sane area."""
    w, hh = size
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, hh, 1], [0, hh, 1]], dtype=np.float64)
    mapped = corners @ h.T
    if not (np.all(mapped[:, 2] > 1e-9) or np.all(mapped[:, 2] < -1e-9)):
        return False  # the frame crosses the line at infinity
    q = mapped[:, :2] / mapped[:, 2:]
    edges = np.roll(q, -1, axis=0) - q
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not (np.all(turns > 0) or np.all(turns < 0)):
        return False  # folded or non-convex
    area = 0.5 * abs(np.sum(q[:, 0] * np.roll(q[:, 1], -1) - q[:, 1] * np.roll(q[:, 0], -1)))
    ratio = area / float(w * hh)
    return 1.0 / MAX_AREA_RATIO <= ratio <= MAX_AREA_RATIO


def geometric_matches(feat_a: Features, feat_b: Features, ratio: float = 0.8, method: str = "homography",
                      ransac_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Tentative matches, their RANSAC inlier mask and the model, in input-image pixels.

    Returns ``(matches (M, 2), inliers (M,) bool, model)``.  ``model`` is the
    3×3 homography ``H`` with ``x_b ~ H x_a``, or the fundamental matrix ``F``
    with ``x_b^T F x_a = 0``, both in the pixels of the images *as given*
    (before :func:`sift_features` shrank them); ``None`` (and no inliers) when
    there are too few matches or the fitted homography is implausible.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    threshold = DEFAULT_THRESHOLDS[method] if ransac_threshold is None else float(ransac_threshold)
    matches = match_features(feat_a, feat_b, ratio)
    none = np.zeros(len(matches), bool)
    if len(matches) < MIN_CORRESPONDENCES[method]:
        return matches, none, None
    pa, pb = feat_a.xy[matches[:, 0]], feat_b.xy[matches[:, 1]]
    if method == "homography":
        model, mask = cv2.findHomography(pa, pb, cv2.USAC_ACCURATE, threshold, maxIters=10000, confidence=0.999)
        if model is not None and not _plausible_homography(model, feat_a.size):
            model = None
    else:
        model, mask = cv2.findFundamentalMat(pa, pb, cv2.USAC_ACCURATE, threshold, 0.999, 10000)
        if model is not None:
            model = model[:3]  # the 7-point solver may stack several solutions
    if model is None or mask is None:
        return matches, none, None
    # back to input pixels: x_resized = S x_input with S = diag(sx, sy, 1)
    sa, sb = np.diag([*feat_a.scale, 1.0]), np.diag([*feat_b.scale, 1.0])
    if method == "homography":
        model = np.linalg.inv(sb) @ model @ sa
        model = model / model[2, 2]
    else:
        model = sb @ model @ sa
        model = model / np.linalg.norm(model)
    return matches, mask.ravel().astype(bool), model


def count_inliers(feat_a: Features, feat_b: Features, ratio: float = 0.8, method: str = "homography",
                  ransac_threshold: float | None = None) -> tuple[int, np.ndarray | None]:
    """RANSAC inliers among the SIFT matches of two images, and the model (see :func:`geometric_matches`).

    Images with too few keypoints (blank, tiny) give ``(0, None)``.
    """
    _, inliers, model = geometric_matches(feat_a, feat_b, ratio, method, ransac_threshold)
    return int(inliers.sum()), model


# --------------------------------------------------------------------------- counting pairs, in parallel, cached

_FEATURES: OrderedDict = OrderedDict()  # per process: features of the current group's images
_FEATURE_CACHE_SIZE = 256


def _image_features(spec: ImageSpec, settings: MatchSettings) -> Features:
    key = (spec.key, settings.max_side, settings.max_keypoints)
    if key in _FEATURES:
        _FEATURES.move_to_end(key)
        return _FEATURES[key]
    feats = sift_features(load_spec(spec), settings.max_side, settings.max_keypoints)
    _FEATURES[key] = feats
    while len(_FEATURES) > _FEATURE_CACHE_SIZE:
        _FEATURES.popitem(last=False)
    return feats


# --------------------------------------------------------------------------- pictures


def draw_matches(path_a, path_b, *, settings: MatchSettings | None = None, show_outliers: bool = False,
                 title: bool = True) -> np.ndarray:
    """The two images side by side (resized as for matching) with the RANSAC inliers drawn in green.

    ``show_outliers`` adds the other tentative matches in red; ``title`` a
    band saying how many inliers of how many tentative matches.  Returns an
    RGB uint8 array (``PIL.Image.fromarray`` it, or ``plt.imshow``).
    """
    settings = settings or MatchSettings()
    images, feats = [], []
    for p in (path_a, path_b):
        img = np.asarray(load_spec(p))
        feats.append(sift_features(img, settings.max_side, settings.max_keypoints))  # as verify_pairs does
        if feats[-1].size != (img.shape[1], img.shape[0]):
            img = cv2.resize(img, feats[-1].size, interpolation=cv2.INTER_AREA)
        images.append(np.ascontiguousarray(img))
    matches, inliers, _ = geometric_matches(feats[0], feats[1], settings.ratio, settings.method,
                                            settings.ransac_threshold)
    canvas = cv2.drawMatches(images[0], [], images[1], [], [], None)
    layers = ([(~inliers, (255, 0, 0))] if show_outliers else []) + [(inliers, (0, 200, 0))]
    for mask, colour in layers:
        m = matches[mask]
        if not len(m):
            continue
        kp_a = [cv2.KeyPoint(float(x), float(y), 4.0) for x, y in feats[0].xy[m[:, 0]]]
        kp_b = [cv2.KeyPoint(float(x), float(y), 4.0) for x, y in feats[1].xy[m[:, 1]]]
        canvas = cv2.drawMatches(images[0], kp_a, images[1], kp_b, [cv2.DMatch(i, i, 0.0) for i in range(len(m))],
                                 canvas, matchColor=colour, singlePointColor=colour,
                                 flags=cv2.DrawMatchesFlags_DRAW_OVER_OUTIMG
                                 | cv2.DrawMatchesFlags_NOT_DRAW_SINGLE_POINTS)
    if not title:
        return canvas
    band = np.full((28, canvas.shape[1], 3), 255, np.uint8)
    text = (f"{int(inliers.sum())} inliers / {len(matches)} tentative matches "
            f"({settings.method}, {settings.ransac_threshold:g} px)")
    cv2.putText(band, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, canvas])


# --------------------------------------------------------------------------- boxes of the inliers


def inlier_boxes(feat_a: Features, feat_b: Features, ratio: float = 0.8, method: str = "homography",
                 ransac_threshold: float | None = None) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """The bounding box of the RANSAC inliers in each image: a box of what the two photos share.

    Gordo et al. (Deep Image Retrieval, 2016) train their region proposal
    network on landmark boxes found this way, without hand labels: in a
    verified matching pair, the inlier keypoints lie on the landmark, so their
    bounding box in each image is a box of the landmark (of the part both
    photos see).  Returns ``(box_a, box_b, inliers)``: ``[x0, y0, x1, y1]``
    float64 arrays in the pixels of the images *as given* to
    :func:`sift_features` (not the shrunk ones), spanning the inlier keypoint
    centres, and the inlier count; ``(None, None, 0)`` when no geometric model
    was found (see :func:`geometric_matches`).
    """
    matches, inliers, model = geometric_matches(feat_a, feat_b, ratio, method, ransac_threshold)
    if model is None or not inliers.any():
        return None, None, 0
    boxes = []
    for feat, column in ((feat_a, 0), (feat_b, 1)):
        xy = feat.xy[matches[inliers, column]].astype(np.float64) / np.asarray(feat.scale, np.float64)
        boxes.append(np.concatenate([xy.min(axis=0), xy.max(axis=0)]))
    return boxes[0], boxes[1], int(inliers.sum())
