"""The embedded demo benchmark (remap_lib.data.demo_data)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remap_lib.data import demo_data as D
from remap_lib.config import ModelConfig
from remap_lib.data.datasets import load_demo_set
from remap_lib.evaluation.evaluate import COLOUR_HISTOGRAM, evaluate

PACKAGES = D.default_demo_dir().parent / "packages"  # shared download cache (ignored by git)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return D.build_demo_set(tmp_path_factory.mktemp("demo"), package_cache=PACKAGES)


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "jpg").iterdir())}


def test_build_is_deterministic(built, tmp_path):
    again = D.build_demo_set(tmp_path / "again", package_cache=PACKAGES)
    assert _digests(again) == _digests(built)
    assert (again / "gnd.json").read_text() == (built / "gnd.json").read_text()


def test_structure_and_ground_truth(built):
    ds = load_demo_set(built, build=False)
    n_mv, n_gen, n_dis = len(D.MULTIVIEW), len(D.GENERATED), len(D.DISTRACTORS)
    assert len(ds.queries) == n_mv + n_gen == 21
    assert len(ds.images) == 3 * n_mv + 5 * n_gen + 4 * n_dis == 153
    meta = json.loads((built / "gnd.json").read_text())
    kinds = meta["kinds"]
    assert kinds.count("multiview") == n_mv and kinds.count("distractor") == 4 * n_dis
    for c in D.CHALLENGES:
        expected = n_gen + (n_mv if c in ("perspective", "clutter") else 0)
        assert kinds.count(c) == expected, c
    for q, entry in enumerate(ds.gnd["all"]):
        assert len(entry["ok"]) == (3 if q < n_mv else 5)
        assert all(ds.groups[i] == q for i in entry["ok"])
    # per-challenge protocols: that challenge's views positive, the query's other positives junk
    for c in D.CHALLENGES:
        for e_all, e in zip(ds.gnd["all"], ds.gnd[c]):
            assert sorted(e["ok"] + e["junk"]) == sorted(e_all["ok"])
            assert all(kinds[i] == c for i in e["ok"])
    assert not set(D.BACKGROUNDS) & set(D.GENERATED)  # backgrounds never carry a positive


def test_every_image_has_provenance_with_a_licence(built):
    provenance = json.loads((built / "provenance.json").read_text())
    meta = json.loads((built / "gnd.json").read_text())
    assert set(provenance) == set(meta["imlist"]) | set(meta["qimlist"])
    for info in provenance.values():
        for key in info["sources"]:
            src = meta["sources"][key]
            assert src["licence"] and src["package"] and src["member"]
    assert meta["archives"]["opencv"]["sha256"] == D.ARCHIVES["opencv"].sha256


def test_real_multiview_pairs_come_from_the_packages(built):
    reader = D._SourceReader(PACKAGES)
    graf = reader.open("graf3")
    stored = Image.open(built / "jpg" / "g01_graf3.jpg")
    assert stored.size == graf.size == (640, 512)  # 800x640 shipped, stored at 640 px
    diff = np.abs(np.asarray(stored, np.int16) - np.asarray(graf, np.int16)).mean()
    assert diff < 3  # the same photo, JPEG-compressed


def test_corrupt_archive_is_refused(tmp_path):
    bad = tmp_path / D.ARCHIVES["vismatch"].filename
    bad.write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="SHA-256"):
        D.fetch_archive("vismatch", tmp_path)


def test_identity_perspective_and_challenge_views_keep_size():
    src = [(0, 0), (10, 0), (10, 8), (0, 8)]
    assert np.allclose(D._perspective_coeffs(src, src), [1, 0, 0, 0, 1, 0, 0, 0], atol=1e-12)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    other = Image.new("RGB", (100, 70), (0, 255, 0))
    rng = np.random.default_rng
    for view in (D.view_scale(img, rng(1)), D.view_perspective(img, rng(1)), D.view_illumination(img, rng(1)),
                 D.view_occlusion(img, rng(1), other)):
        assert view.size == (80, 60)
    occluded = np.asarray(D.view_occlusion(img, rng(2), other))
    green = (occluded == [0, 255, 0]).all(-1).mean()
    assert 0.44 <= green <= 0.61  # 45-60 % of the image covered
    assert D.view_clutter(img, rng(3), other).size == (100, 70)


def test_demo_set_is_not_trivial(built):
    """A colour histogram does clearly worse than a CNN, and the CNN is not perfect."""
    ds = load_demo_set(built, build=False)
    res = evaluate({"colour": COLOUR_HISTOGRAM, "rmac": ModelConfig(head="rmac", image_sizes=[320])},
                   {"demo": ds}, progress=False)
    colour, rmac = (r.scores["all"]["map"] for r in res)
    assert colour < 0.7 and rmac < 0.95 and rmac > colour + 0.1
    assert res[0].scores["illumination"]["map"] < 0.3  # colour casts defeat colour histograms


@pytest.mark.parametrize("options, expected", [([], ("auto", "f32")),
                                               (["--engine", "torch", "--precision", "bf16"], ("torch", "bf16"))])
def test_remap_demo_passes_engine_and_precision_to_evaluate(tmp_path, monkeypatch, options, expected):
    """`remap demo --engine/--precision` reach the backbone passes; without them the defaults as before."""
    from remap_lib.app import demo
    from remap_lib.app.cli import main

    class Described(Exception):
        pass

    seen = {}

    def fake_evaluate(methods, datasets, *args, **kwargs):
        seen.update(kwargs)
        raise Described  # stop before any image is described

    class FakeSet:
        def summary(self):
            return "demo set"

    monkeypatch.setattr(demo, "load_demo_set", lambda: FakeSet())
    monkeypatch.setattr(demo, "evaluate", fake_evaluate)
    with pytest.raises(Described):
        main(["demo", "-q", "-o", str(tmp_path / "out"), *options])
    assert (seen["engine"], seen["precision"]) == expected


def test_remap_demo_refuses_an_unknown_engine(capsys):
    from remap_lib.app.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--engine", "tpu"])
    assert "--engine" in capsys.readouterr().err
