"""Fréchet distance between Gaussians and the streaming moments it is computed from.

FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
Eq. 6) is the Fréchet (2-Wasserstein) distance between two Gaussians fitted to feature sets:

    d² = ||μ1 − μ2||² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½)

The trace of the matrix square root is computed without forming the (non-symmetric) product Σ1 Σ2: with
S = Σ1^½ (symmetric, from an eigendecomposition of Σ1), the matrix S Σ2 S is symmetric positive semi-definite and
similar to Σ1 Σ2 (S⁻¹ (S Σ2 S) S = Σ1 Σ2 when Σ1 is invertible; by continuity otherwise), so

    tr((Σ1 Σ2)^½) = Σ_i sqrt(λ_i(S Σ2 S)).

Both eigendecompositions are of symmetric matrices (``numpy.linalg.eigh``/``eigvalsh``): real eigenvalues, no
complex round-off to discard, no ε-regularised retry as scipy.linalg.sqrtm needs in pytorch-fid. Eigenvalues at
round-off level (below D · ε · λ_max, negative ones included) are set to 0. Everything is float64.
"""

from __future__ import annotations

import numpy as np


def _check_moments(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")


def _clip_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are round-off: below D · ε · λ_max (numpy's rank tolerance)."""
    tolerance = eigenvalues.size * np.finfo(np.float64).eps * max(eigenvalues.max(), 0.0)
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)  # (D,), (D, D)
    return (eigenvectors * np.sqrt(_clip_round_off(eigenvalues))) @ eigenvectors.T  # V diag(√λ) Vᵀ


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance d² between N(mu1, sigma1) and N(mu2, sigma2), in float64 (see module docstring).

    Notation: mu (D,) means, sigma (D, D) covariances, S = Σ1^½, M = S Σ2 S.
    1. Symmetrise both covariances (they are symmetric up to round-off).
    2. S from the eigendecomposition of Σ1; M = S Σ2 S, symmetrised.
    3. tr((Σ1 Σ2)^½) = Σ sqrt(eigenvalues of M).
    In steps 2 and 3 eigenvalues below D · ε · λ_max are round-off and set to 0: with fewer samples than
    dimensions the covariances are singular, and the square roots of their noise eigenvalues (~1e-8 each, D of
    them) would otherwise add up to errors of ~1e-4.
    4. d² = ||μ1 − μ2||² + tr Σ1 + tr Σ2 − 2 tr((Σ1 Σ2)^½), clamped at 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_moments(mu1, sigma1, "first statistics")
    _check_moments(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    # 1.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    # 2.
    s = _sqrt_psd(sigma1)  # (D, D)
    m = s @ sigma2 @ s  # (D, D)
    m = (m + m.T) / 2
    # 3.
    trace_sqrt = np.sqrt(_clip_round_off(np.linalg.eigvalsh(m))).sum()
    # 4.
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # d² >= 0: identical statistics may round to -1e-13


class RunningMoments:
    """Mean and unbiased covariance of feature batches, accumulated in float64 without keeping the features.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979, "Updating Formulae and a Pairwise
    Algorithm for Computing Sample Variances"): for counts n_a, n_b, means μ_a, μ_b, centred scatter matrices
    M_a, M_b and δ = μ_b − μ_a,
        μ = μ_a + δ n_b / n,   M = M_a + M_b + δ δᵀ n_a n_b / n,   n = n_a + n_b,
    which avoids the cancellation of the Σx xᵀ − n μ μᵀ form. The covariance is M / (n − 1), as numpy.cov.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, np.float64)  # (D,)
        self.scatter = np.zeros((dim, dim), np.float64)  # (D, D)

    def update(self, features: np.ndarray) -> None:
        """Add a batch of features (N, D)."""
        x = np.asarray(features, np.float64)
        N, D = x.shape
        if N == 0:
            return
        if D != self.mean.shape[0]:
            raise ValueError(f"features have dimension {D}, expected {self.mean.shape[0]}")
        batch_mean = x.mean(axis=0)  # (D,)
        centred = x - batch_mean  # (N, D)
        total = self.count + N
        delta = batch_mean - self.mean  # (D,)
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * N / total)
        self.mean += delta * (N / total)
        self.count = total

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (D, D); needs at least two samples."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        return self.scatter / (self.count - 1)
