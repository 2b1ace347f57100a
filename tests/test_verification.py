"""Geometric verification of training pairs (remap_lib.training.verification): SIFT + RANSAC inlier counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from remap_lib.training import pairs as P
from remap_lib.training import verification as V
from remap_lib.data.images import load_image


def _skimage(name: str) -> Path:
    from skimage import data as skdata

    return Path(skdata.data_dir) / name


def _features(path_or_array, **kw) -> V.Features:
    image = load_image(path_or_array) if isinstance(path_or_array, (str, Path)) else path_or_array
    return V.sift_features(image, **kw)


def _rgb(name: str) -> np.ndarray:
    with Image.open(_skimage(name)) as img:
        return np.asarray(img.convert("RGB"))


# the homography of the synthetic warp: rotation, scale, shear, perspective, translation (in input pixels)
H_TRUE = np.array([[0.85, -0.18, 60.0],
                   [0.12, 0.90, 25.0],
                   [2.0e-4, -1.5e-4, 1.0]])


def _corner_error(h_est: np.ndarray, h_true: np.ndarray, w: int, h: int) -> float:
    corners = np.float64([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
    a = cv2.perspectiveTransform(corners, h_est).reshape(-1, 2)
    b = cv2.perspectiveTransform(corners, h_true).reshape(-1, 2)
    return float(np.linalg.norm(a - b, axis=1).max())


# --------------------------------------------------------------------------- counts on real photos


def test_real_stereo_pair_has_many_inliers_and_unrelated_photos_almost_none():
    left, right = _features(_skimage("motorcycle_left.png")), _features(_skimage("motorcycle_right.png"))
    n, h = V.count_inliers(left, right)
    assert n > 100 and h is not None  # two real photos of one scene: hundreds of verified matches
    cat, coffee, astronaut = (_features(_skimage(f)) for f in ("chelsea.png", "coffee.png", "astronaut.png"))
    for a, b in ((left, cat), (coffee, astronaut), (cat, coffee), (right, astronaut)):
        assert V.count_inliers(a, b)[0] < 5  # below the paper's min_inliers: chance level


def test_demo_box_in_scene_matches_the_box():
    from remap_lib.data.demo_data import default_demo_dir

    jpg = default_demo_dir() / "jpg"
    if not (jpg / "g04_box.jpg").exists():
        pytest.skip(f"demo set not built in {jpg.parent} (run `remap demo-data`); the stereo-pair test covers this")
    box, scene = _features(jpg / "g04_box.jpg"), _features(jpg / "g04_box_in_scene.jpg")
    n, h = V.count_inliers(box, scene)
    assert n >= 30 and h is not None  # OpenCV's own example of a planar object found in clutter
    assert V.count_inliers(box, _features(jpg / "g10_chelsea.jpg"))[0] < 5


def test_synthetic_homography_warp_is_recovered_in_input_pixels():
    img = _rgb("astronaut.png")  # 512 x 512
    warped = cv2.warpPerspective(img, H_TRUE, (600, 560))
    # max_side below the image sizes: features are computed on shrunk images, the model comes back in input pixels
    a, b = V.sift_features(img, max_side=400), V.sift_features(warped, max_side=450)
    assert a.scale != (1.0, 1.0) and b.scale != (1.0, 1.0)
    n, h = V.count_inliers(a, b, method="homography")
    assert n > 50
    assert _corner_error(h, H_TRUE, 512, 512) < 2.0


def test_fundamental_matrix_of_a_stereo_pair_holds_for_its_inliers_in_input_pixels():
    left, right = (_features(_skimage(f), max_side=500) for f in ("motorcycle_left.png", "motorcycle_right.png"))
    assert left.scale[0] < 1  # 741 px wide photos, shrunk
    matches, inliers, f = V.geometric_matches(left, right, method="fundamental")
    assert f is not None and inliers.sum() > 100
    xa = np.hstack([left.xy[matches[inliers, 0]] / left.scale, np.ones((inliers.sum(), 1))])
    xb = np.hstack([right.xy[matches[inliers, 1]] / right.scale, np.ones((inliers.sum(), 1))])
    lines = xa @ f.T  # epipolar lines in the right image
    dist = np.abs(np.sum(lines * xb, axis=1)) / np.linalg.norm(lines[:, :2], axis=1)
    assert np.median(dist) < 1.0  # pixels of the 741-px input image


def test_implausible_homographies_are_refused():
    assert V._plausible_homography(H_TRUE, (512, 512))
    assert V._plausible_homography(np.diag([-1.0, 1.0, 1.0]), (100, 80))  # a mirror image still is one
    assert not V._plausible_homography(np.diag([0.05, 0.05, 1.0]), (100, 80))  # shrinks the frame 400 times
    assert not V._plausible_homography(np.array([[1, 0, 0], [0, 1, 0], [-0.02, 0, 1.0]]), (100, 80))  # horizon x=50
    fold = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    fold[0] = [0, 1, 0]  # x' = y: every corner lands on the diagonal, the frame collapses to a line
    assert not V._plausible_homography(fold, (100, 80))


def test_matches_are_one_to_one():
    left, right = _features(_skimage("motorcycle_left.png")), _features(_skimage("motorcycle_right.png"))
    m = V.match_features(left, right)
    assert len(m) > 100
    assert len(np.unique(m[:, 0])) == len(m) and len(np.unique(m[:, 1])) == len(m)


def test_blank_and_tiny_images_give_zero_inliers():
    blank = V.sift_features(np.full((300, 400, 3), 128, np.uint8))
    tiny = V.sift_features(np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8))
    photo = _features(_skimage("astronaut.png"))
    assert len(blank) == 0 and len(tiny) == 0
    for a, b in ((blank, photo), (photo, blank), (tiny, photo), (blank, tiny)):
        for method in V.METHODS:
            assert V.count_inliers(a, b, method=method) == (0, None)


# --------------------------------------------------------------------------- the pair filter


def test_pair_filter_keeps_exactly_the_pairs_inside_the_bounds():
    counts = [0, 4, 5, 6, 17, 29, 30, 31, 200, None]
    assert P.classify_pairs(counts, 5, 30) == ["too_hard", "too_hard", "kept", "kept", "kept", "kept", "kept",
                                              "too_easy", "too_easy", "failed"]
    assert P.classify_pairs([9, 10, 11], 10, 10) == ["too_hard", "kept", "too_easy"]
    with pytest.raises(ValueError, match="min_inliers <= max_inliers"):
        P.classify_pairs([1], 31, 30)


def test_pairs_are_sampled_distinct_unordered_and_reproducible():
    rng = np.random.default_rng
    pairs = P.sample_pairs(60, 50, rng(0))
    assert len(pairs) == 50 == len(set(pairs)) and all(0 <= i < j < 60 for i, j in pairs)
    assert pairs == P.sample_pairs(60, 50, rng(0)) and pairs != P.sample_pairs(60, 50, rng(1))
    assert P.sample_pairs(5, 50, rng(0)) == [(i, j) for i in range(5) for j in range(i + 1, 5)]  # all 10
    dense = P.sample_pairs(12, 50, rng(0))  # 50 of 66: drawn from the list of all pairs
    assert len(set(dense)) == 50 and all(0 <= i < j < 12 for i, j in dense)
    assert P.sample_pairs(1, 50, rng(0)) == []


# --------------------------------------------------------------------------- datasets of groups


@pytest.fixture(scope="module")
def groups_dir(tmp_path_factory) -> Path:
    """Two groups of real photos: three views of the astronaut, three of the coffee cup (320 px)."""
    root = tmp_path_factory.mktemp("groups")
    for group, name in (("astronaut", "astronaut.png"), ("coffee", "coffee.png")):
        (root / group).mkdir()
        img = _rgb(name)
        h, w = img.shape[:2]
        views = [img,
                 cv2.warpPerspective(img, H_TRUE, (w, h)),
                 cv2.resize(img[h // 8:, w // 10:], None, fx=0.8, fy=0.8)]
        for i, view in enumerate(views):
            pil = Image.fromarray(view)
            pil.thumbnail((320, 320))
            pil.save(root / group / f"view{i}.png")
    return root


def _noisy_copy(groups_dir: Path, tmp_path: Path) -> Path:
    """The groups plus, in the astronaut group, a photo of a cat (label noise) and a corrupt file."""
    import shutil

    root = tmp_path / "noisy"
    shutil.copytree(groups_dir, root)
    Image.open(_skimage("chelsea.png")).convert("RGB").save(root / "astronaut" / "zz_cat.png")
    (root / "astronaut" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_verify_pairs_counts_and_classifies_every_sampled_pair(groups_dir):
    result = P.verify_pairs(str(groups_dir), pairs_per_group=50, workers=0, progress=False)
    assert result.counts()["sampled"] == 6  # 3 pairs in each group of 3
    assert {p.group for p in result.pairs} == {"astronaut", "coffee"}
    for p in result.pairs:
        assert Path(p.query).parent.name == Path(p.positive).parent.name == p.group
        assert p.inliers >= 5  # views of one photo all verify
        assert p.status == P.classify_pairs([p.inliers])[0]
    assert result.per_group()["coffee"]["images"] == 3


def test_cache_resumes_and_a_second_call_computes_nothing(groups_dir, tmp_path, monkeypatch):
    cache = tmp_path / "pairs.cache.jsonl"
    calls = []
    real = V.count_inliers

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "count_inliers", counted)  # as pairs.py calls it
    first = P.verify_pairs(groups_dir, workers=0, cache=cache, progress=False)
    assert len(calls) == 6 and len(cache.read_text().splitlines()) == 6
    calls.clear()
    again = P.verify_pairs(groups_dir, workers=0, cache=cache, progress=False)
    assert calls == [] and again.pairs == first.pairs
    # a run killed while writing: the half line is ignored and that one pair is counted again
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    resumed = P.verify_pairs(groups_dir, workers=0, cache=cache, progress=False)
    assert len(calls) == 1 and resumed.pairs == first.pairs
    assert all(json.loads(line)["inliers"] >= 0 for line in cache.read_text().splitlines()[-1:])
    # other settings do not reuse the counts
    calls.clear()
    P.verify_pairs(groups_dir, workers=0, cache=cache, progress=False, settings=V.MatchSettings(ratio=0.7))
    assert len(calls) == 6


def test_unreadable_file_is_listed_with_its_reason_and_noise_is_dropped(groups_dir, tmp_path):
    root = _noisy_copy(groups_dir, tmp_path)
    plain = P.verify_pairs(root, workers=0, progress=False)
    broken = str(root / "astronaut" / "broken.jpg")
    assert "corrupt" in plain.failed[broken] or "decode" in plain.failed[broken]
    statuses = {(Path(p.query).name, Path(p.positive).name): p.status for p in plain.pairs}
    assert statuses[("broken.jpg", "view0.png")] == "failed"
    assert statuses[("view0.png", "zz_cat.png")] == "too_hard"  # the cat is not the astronaut
    assert plain.counts("astronaut")["kept"] + plain.counts("astronaut")["too_easy"] == 3

    cleaned = P.verify_pairs(root, workers=0, progress=False, drop_unverified=True)
    assert [Path(d["path"]).name for d in cleaned.dropped] == ["zz_cat.png"]
    assert cleaned.dropped[0]["tried"] == 3 and cleaned.dropped[0]["best_inliers"] < 5
    assert broken in cleaned.failed
    used = {Path(p).name for pair in cleaned.pairs for p in (pair.query, pair.positive)}
    assert "zz_cat.png" not in used and "broken.jpg" not in used
    assert cleaned.counts()["sampled"] == 6 and cleaned.counts()["failed"] == 0


@pytest.mark.slow  # two spawned processes import remap_lib (and torch) first
def test_workers_give_the_same_pairs_as_one_process(groups_dir):
    one = P.verify_pairs(groups_dir, workers=0, progress=False)
    two = P.verify_pairs(groups_dir, workers=2, progress=False)
    assert two.pairs == one.pairs


def test_csv_holds_every_pair_and_load_pairs_returns_the_kept_ones(groups_dir, tmp_path):
    result = P.verify_pairs(groups_dir, workers=0, progress=False, max_inliers=200)  # coffee kept, astronaut too easy
    out, side = result.save(tmp_path / "out" / "pairs.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == P.CSV_COLUMNS and len(rows) == 6
    assert all(Path(r["query"]).is_absolute() and Path(r["query"]).exists() for r in rows)
    kept = P.load_pairs(out)
    assert kept == result.kept() and {p.group for p in kept} == {"coffee"} and len(kept) == 3
    assert len(P.load_pairs(out, statuses=None)) == 6
    report = json.loads(side.read_text())
    assert report["counts"]["sampled"] == 6 and report["settings"]["max_inliers"] == 200
    assert report["per_group"]["astronaut"]["sampled"] == 3


def test_load_pairs_reads_hand_written_files_and_explains_bad_ones(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "mine.csv").write_text("query,positive\nimgs/a.jpg,imgs/b.jpg\n/abs/c.jpg,imgs/d.jpg\n")
    pairs = P.load_pairs(tmp_path / "mine.csv")
    assert [(p.query, p.positive) for p in pairs] == [(str(tmp_path / "imgs/a.jpg"), str(tmp_path / "imgs/b.jpg")),
                                                      ("/abs/c.jpg", str(tmp_path / "imgs/d.jpg"))]
    assert all(p.status == "kept" and p.inliers is None for p in pairs)
    (tmp_path / "bad.csv").write_text("image,group\na.jpg,x\n")
    with pytest.raises(ValueError, match="'query' and 'positive'"):
        P.load_pairs(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("query,positive,inliers,status\na.jpg,b.jpg,12,maybe\n")
    with pytest.raises(ValueError, match="bad2.csv:2: unknown status"):
        P.load_pairs(tmp_path / "bad2.csv")
    with pytest.raises(FileNotFoundError, match="verify-pairs"):
        P.load_pairs(tmp_path / "missing.csv")


def test_dataset_without_groups_is_refused(tmp_path):
    from remap_lib.data.datasets import RetrievalDataset
    from remap_lib.data.images import ImageSpec

    ds = RetrievalDataset("flat", [ImageSpec("a.jpg")], [], {}, None)
    with pytest.raises(ValueError, match="no groups"):
        P.verify_pairs(ds, workers=0, progress=False)
    with pytest.raises(ValueError, match="method"):
        V.MatchSettings(method="affine")


def test_draw_matches_shows_both_images_and_the_count():
    picture = V.draw_matches(_skimage("motorcycle_left.png"), _skimage("motorcycle_right.png"),
                             settings=V.MatchSettings(max_side=400), show_outliers=True)
    assert picture.dtype == np.uint8 and picture.ndim == 3
    assert picture.shape[1] == 800 and picture.shape[0] == 28 + 270  # two 400 x 270 images and a title band
    assert (picture[28:, :, 1] > 150).sum() > 1000  # green inlier lines were drawn


# --------------------------------------------------------------------------- command line


def test_cli_verify_pairs_writes_the_csv_and_prints_a_summary(groups_dir, tmp_path, capsys):
    from remap_lib.app.cli import main

    out = tmp_path / "pairs.csv"
    assert main(["verify-pairs", str(groups_dir), "-o", str(out), "--workers", "0", "--max-side", "320",
                 "--drop-unverified", "--clean-tries", "2", "--max-inliers", "1000"]) == 0
    text = capsys.readouterr().out
    assert "6 pairs sampled" in text and "6 kept" in text and "0 images dropped" in text
    assert len(P.load_pairs(out)) == 6
    assert (tmp_path / "pairs.json").exists() and (tmp_path / "pairs.cache.jsonl").exists()
    assert main(["verify-pairs", str(groups_dir), "-o", str(out), "--min-inliers", "40", "--max-inliers", "30"]) == 2
    assert "min-inliers" in capsys.readouterr().err
