"""The search index (remap_lib.index) and expansion (remap_lib.expansion)."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from remap_lib.cli import main  # noqa: E402
from remap_lib.config import ModelConfig  # noqa: E402
from remap_lib.expansion import (alpha_query_expansion, average_query_expansion,  # noqa: E402
                                 database_side_augmentation)
from remap_lib.index import IndexFileError, ModelMismatchError, RetrievalIndex, truncate_descriptors  # noqa: E402


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pq_adc_equals_brute_force_numpy():
    db, q = _unit(10000, 32, 0), _unit(20, 32, 1)
    index = RetrievalIndex(32, "PQ8")
    index.add(db, [f"img{i}" for i in range(len(db))])
    assert index.bytes_per_vector() == 8
    pq_index = faiss.downcast_index(index.index)
    m, ksub, dsub = pq_index.pq.M, pq_index.pq.ksub, pq_index.pq.dsub
    centroids = faiss.vector_to_array(pq_index.pq.centroids).reshape(m, ksub, dsub)
    codes = faiss.vector_to_array(pq_index.codes).reshape(len(db), m)
    # asymmetric distance: the query stays exact, the database vectors are their codes
    lut = np.einsum("nmd,mkd->nmk", q.reshape(len(q), m, dsub), centroids)  # (queries, M, 256)
    scores = lut[:, np.arange(m)[None, :], codes].sum(-1)  # (queries, database)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    got_scores, got = index.search(q, 10)
    assert np.array_equal(got, expected)
    assert np.allclose(got_scores, np.take_along_axis(scores, expected, 1), atol=1e-4)


def test_truncation_keeps_leading_dimensions_normalised():
    x = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    assert np.allclose(truncate_descriptors(x, 2), [[0.6, 0.8]])
    with pytest.raises(ValueError):
        truncate_descriptors(x, 4)
    index = RetrievalIndex(2, "Flat", truncate=2)
    index.add(np.array([[3.0, 4.0, 12.0], [0.0, 1.0, 0.0]], np.float32) / 13.0, ["a", "b"])
    assert index.search_paths(np.array([[0.6, 0.8, 0.0]], np.float32), 2)[0][0] == ("a", pytest.approx(1.0))


def test_query_expansion_hand_computed():
    db = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    q = np.array([[0.8, 0.6]], dtype=np.float32)
    # sims: 0.8, 0.96, 0.6 -> top-2: db1 (0.96), db0 (0.8); AQE = L2(q + db1 + db0) = L2([2.4, 1.4])
    assert np.allclose(average_query_expansion(q, db, k=2), np.array([[2.4, 1.4]]) / np.hypot(2.4, 1.4), atol=1e-6)
    # alpha = 1: L2(q + 0.96 db1 + 0.8 db0) = L2([0.8 + 0.576 + 0.8, 0.6 + 0.768])
    v = np.array([0.8 + 0.96 * 0.6 + 0.8, 0.6 + 0.96 * 0.8])
    assert np.allclose(alpha_query_expansion(q, db, k=2, alpha=1.0), v / np.linalg.norm(v), atol=1e-6)
    assert np.array_equal(alpha_query_expansion(q, db, k=0), q)


def test_database_side_augmentation_hand_computed():
    db = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    out = database_side_augmentation(db, k=1)
    # db0's nearest other is db1 (0.6); db1's is db2 (0.8); db2's is db1 (0.8)
    expect = np.array([[1.6, 0.8], [0.6, 1.8], [0.6, 1.8]])
    assert np.allclose(out, expect / np.linalg.norm(expect, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("factory", ["Flat", "PQ8", "IVF16,PQ8", "OPQ8,IVF16,PQ8"])
def test_save_load_round_trip(tmp_path, factory):
    db, q = _unit(5000, 32, 2), _unit(5, 32, 3)
    cfg = ModelConfig(head="rmac").to_dict()
    index = RetrievalIndex(32, factory, cfg)
    index.nprobe = 4
    index.add(db, [f"img{i}.jpg" for i in range(len(db))])
    index.save(tmp_path / "i.remap")
    loaded = RetrievalIndex.load(tmp_path / "i.remap")
    a, b = index.search(q, 10), loaded.search(q, 10)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert loaded.paths == index.paths and loaded.model_digest == index.model_digest and loaded.nprobe == 4
    loaded.add(db[:3], ["x", "y", "z"])  # incremental add after loading
    assert len(loaded) == 5003 and loaded.search_paths(db[:1], 1)[0][0][0] in ("img0.jpg", "x")


def test_model_mismatch_and_corrupt_files_are_refused(tmp_path):
    index = RetrievalIndex(8, "Flat", ModelConfig(head="rmac", levels=3).to_dict())
    index.add(_unit(10, 8, 4), [str(i) for i in range(10)])
    index.check_model(ModelConfig(head="rmac", levels=3).to_dict())
    with pytest.raises(ModelMismatchError, match="levels"):
        index.check_model(ModelConfig(head="rmac", levels=4).to_dict())
    index.save(tmp_path / "i.remap")
    data = (tmp_path / "i.remap").read_bytes()
    (tmp_path / "cut.remap").write_bytes(data[:-10])
    with pytest.raises(IndexFileError, match="truncated"):
        RetrievalIndex.load(tmp_path / "cut.remap")
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    (tmp_path / "flip.remap").write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="corrupt"):
        RetrievalIndex.load(tmp_path / "flip.remap")
    (tmp_path / "other.remap").write_bytes(b"hello world, not an index")
    with pytest.raises(IndexFileError, match="not a remap index"):
        RetrievalIndex.load(tmp_path / "other.remap")
    with pytest.raises(ValueError, match="8-d"):
        index.add(_unit(2, 16, 5), ["a", "b"])


def test_cli_build_search_add(tmp_path, photo_dir, capsys):
    desc = tmp_path / "desc"
    common = ["--head", "gem", "--image-size", "64", "-q", "--workers", "0"]
    assert main(["extract", str(photo_dir), "-o", str(desc)] + common) == 0
    assert main(["index", "build", str(desc), "-o", str(tmp_path / "i.remap")]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(tmp_path / "i.remap"), str(photo_dir / "coffee.png"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("coffee.png") and lines[1].split()[2].endswith("coffee.png")
    assert float(lines[1].split()[1]) == pytest.approx(1.0, abs=1e-4)  # the image finds itself first
    assert main(["index", "search", str(tmp_path / "i.remap"), str(photo_dir / "coffee.png"), "--qe", "2"]) == 0
    other = tmp_path / "other"
    assert main(["extract", str(photo_dir / "chelsea.png"), "-o", str(other), "--head", "mac", "--image-size",
                 "64", "-q", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["index", "add", str(tmp_path / "i.remap"), str(other)]) == 2
    assert "not the index's model" in capsys.readouterr().err


def test_synthetic_distractors_follow_the_real_moments():
    from remap_lib.index import synthetic_distractors

    rng = np.random.default_rng(6)
    real = rng.normal(size=(4000, 6)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + np.array([5.0, 0, 0, 0, 0, 0])
    fake = synthetic_distractors(real, 20000, seed=1)
    assert fake.shape == (20000, 6) and np.allclose(np.linalg.norm(fake, axis=1), 1, atol=1e-5)
    real_n = real / np.linalg.norm(real, axis=1, keepdims=True)
    assert np.allclose(fake.mean(0), real_n.mean(0), atol=0.02)  # same mean direction and spread
    assert np.allclose(np.cov(fake, rowvar=False), np.cov(real_n, rowvar=False), atol=0.02)
    assert np.array_equal(fake[:10], synthetic_distractors(real, 10, seed=1))
