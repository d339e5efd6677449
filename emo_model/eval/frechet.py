"""Fréchet distance between two Gaussians fitted to feature sets (FID, FVD and E-FID all use it).

    d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)

``tr((S1 S2)^½)`` is computed as the sum of the square roots of the eigenvalues of the symmetric
PSD matrix ``S1^½ S2 S1^½`` (same eigenvalues as ``S1 S2``), in float64. That is exact, needs no
complex arithmetic, and stays finite when the covariances are singular (fewer samples than
feature dimensions, the usual case for FVD and for small test sets), where ``scipy.linalg.sqrtm``
of the product (pytorch-fid) can lose precision. tests/test_eval_metrics.py checks the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GaussianStats:
    mu: np.ndarray       # [D] float64
    sigma: np.ndarray    # [D, D] float64
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        """Mean and unbiased covariance (``np.cov``, as pytorch-fid) of ``[N, D]`` features."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least 2 feature vectors of shape [N, D], got {x.shape}")
        return cls(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), count=len(x))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # identical sets give ~-1e-12 from rounding; a distance is never negative
    return max(value, 0.0)


def frechet_distance_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians of two ``[N, D]`` feature sets.

    Same value as :func:`frechet_distance` on their :class:`GaussianStats`, computed from the
    centred features X1, X2 without forming D x D matrices:
    ``tr((S1 S2)^½) = ||X1 X2ᵀ||_* / sqrt((n1 - 1)(n2 - 1))`` (the non-zero eigenvalues of
    X1ᵀX1 X2ᵀX2 are those of M Mᵀ with M = X1 X2ᵀ, whose square roots are M's singular values).
    For 2048-d Inception features of a few hundred frames this takes milliseconds, not seconds.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two [N>=2, D] feature sets of the same D, got {a.shape} and {b.shape}")
    n1, n2, d = len(a), len(b), a.shape[1]
    if min(n1, n2) >= d:  # full-rank covariances: the D x D route is as cheap
        sa, sb = GaussianStats.of(a), GaussianStats.of(b)
        return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    x1, x2 = a - mu1, b - mu2
    tr1 = float(np.einsum("ij,ij->", x1, x1)) / (n1 - 1)
    tr2 = float(np.einsum("ij,ij->", x2, x2)) / (n2 - 1)
    nuclear = float(np.linalg.svd(x1 @ x2.T, compute_uv=False).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + tr1 + tr2 - 2.0 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))
    return max(value, 0.0)
