"""PCA-whitening learned from descriptors (Jégou & Chum 2012; paper §III-C).

``y = P (x - μ)`` with ``P = diag(λ)^(-1/2) Uᵀ`` from the eigen-decomposition
of the descriptors' covariance, optionally keeping only the ``d`` leading
components.  It is exactly a fully connected layer with weight ``P`` and bias
``-P μ``, which is how the REMAP network initialises its FC layer before
end-to-end training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["PCAWhitening", "learn_pca_whitening"]

log = logging.getLogger(__name__)


@dataclass
class PCAWhitening:
    """Mean ``(D,)``, projection ``(d, D)`` and the kept eigenvalues ``(d,)``."""

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray

    @property
    def input_dim(self) -> int:
        return self.projection.shape[1]

    @property
    def output_dim(self) -> int:
        return self.projection.shape[0]

    def apply(self, x: np.ndarray, normalise: bool = True) -> np.ndarray:
        """Whiten ``(N, D)`` descriptors (and L2-normalise the result by default)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"whitening expects {self.input_dim}-d descriptors, got {x.shape[-1]}-d")
        y = (x - self.mean) @ self.projection.T
        if normalise:
            y /= np.linalg.norm(y, axis=-1, keepdims=True) + 1e-12
        return y.astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (no pickles), atomically."""
        path = os.fspath(path)
        tmp = path + ".tmp.npz"
        np.savez(tmp, mean=self.mean, projection=self.projection, eigenvalues=self.eigenvalues)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCAWhitening":
        try:
            with np.load(os.fspath(path), allow_pickle=False) as z:
                return cls(z["mean"], z["projection"], z["eigenvalues"])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a whitening file saved by remap: {exc}") from exc


def learn_pca_whitening(descriptors: np.ndarray, dim: int | None = None) -> PCAWhitening:
    """Learn PCA-whitening from ``(N, D)`` descriptors.

    Args:
        descriptors: training descriptors, one per row.
        dim: components to keep; ``None`` keeps every component the data can
            support, ``min(D, rank)`` (logged).  Asking for more than the rank
            of the centred data is an error: those directions have (near) zero
            variance and whitening would blow noise up to unit variance.

    The covariance is the biased one, ``XcᵀXc / N``, so the whitened training
    data has exactly identity covariance under that definition.
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors contain NaN or infinite values")
    n, d_in = x.shape
    mean = x.mean(0)
    xc = x - mean
    eigval, eigvec = np.linalg.eigh(xc.T @ xc / n)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    rank = int((eigval > eigval[0] * 1e-10).sum()) if eigval[0] > 0 else 0
    if dim is None:
        dim = rank
        if dim < d_in:
            log.info("PCA-whitening: %d descriptors of dimension %d support %d components", n, d_in, dim)
    if not 1 <= dim <= rank:
        raise ValueError(
            f"cannot learn {dim}-d whitening from {n} descriptors of dimension {d_in}: "
            f"their covariance has rank {rank}. Use dim <= {rank} or more training images."
        )
    if dim > n / 2:
        log.warning("PCA-whitening to %d dimensions from only %d descriptors: the training descriptors "
                    "themselves become nearly equidistant (at %d they would be exactly); fine for other "
                    "images, but learn from more images or use fewer dimensions to train with it", dim, n, n - 1)
    projection = eigvec[:, :dim].T / np.sqrt(eigval[:dim])[:, None]
    return PCAWhitening(mean=mean, projection=projection, eigenvalues=eigval[:dim])
