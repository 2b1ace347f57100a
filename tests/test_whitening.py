"""PCA-whitening (remap_lib.layers.whitening)."""

from __future__ import annotations

import numpy as np
import pytest

from remap_lib.layers.whitening import PCAWhitening, learn_pca_whitening


def _correlated(n=500, d=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def test_whitened_training_data_has_identity_covariance():
    x = _correlated()
    w = learn_pca_whitening(x)
    y = (x - w.mean) @ w.projection.T
    assert np.allclose(y.mean(0), 0, atol=1e-10)
    assert np.allclose(y.T @ y / len(y), np.eye(20), atol=1e-8)
    assert np.all(np.diff(w.eigenvalues) <= 0)  # leading components first


def test_dimension_reduction_keeps_leading_components():
    x = _correlated()
    w5 = learn_pca_whitening(x, dim=5)
    full = learn_pca_whitening(x)
    assert w5.projection.shape == (5, 20)
    assert np.allclose(np.abs(w5.projection), np.abs(full.projection[:5]))
    y = (x - w5.mean) @ w5.projection.T
    assert np.allclose(y.T @ y / len(y), np.eye(5), atol=1e-8)


def test_rank_deficient_request_is_refused():
    with pytest.raises(ValueError, match="rank 9"):
        learn_pca_whitening(_correlated(n=10), dim=15)
    assert learn_pca_whitening(_correlated(n=10)).output_dim == 9
    with pytest.raises(ValueError, match="NaN"):
        learn_pca_whitening(np.array([[np.nan, 1.0], [0.0, 1.0]]))


def test_save_load_round_trip(tmp_path):
    w = learn_pca_whitening(_correlated(), dim=8)
    w.save(tmp_path / "w.npz")
    v = PCAWhitening.load(tmp_path / "w.npz")
    x = _correlated(seed=1)
    assert np.array_equal(w.apply(x), v.apply(x))
    assert np.allclose(np.linalg.norm(v.apply(x), axis=1), 1.0, atol=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a whitening file"):
        PCAWhitening.load(tmp_path / "bad.npz")
