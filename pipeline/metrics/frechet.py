"""Fréchet distance between Gaussians fitted to features (FID when the features are Inception pool3).

FID = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^(1/2))   (Heusel et al. 2017).

The trace of the matrix square root is computed from symmetric eigendecompositions,
Tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i(A S_2 A)) with A = S_1^(1/2), which is exact for the positive
semi-definite covariances FID compares and never produces the complex round-off that the general
`scipy.linalg.sqrtm(S_1 @ S_2)` used by pytorch-fid / TTUR has to discard. On well-conditioned inputs both
agree to about 1e-6 relative (tests/test_metrics.py checks it against both reference formulas).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.metrics.collective import Collective


class FeatureStats:
    """Streaming mean and covariance of feature rows, accumulated in float64.

    Rows are centred on the first batch's mean before accumulating, so that the covariance does not suffer
    from cancellation when features have a large common offset (Inception pool3 features are all positive).
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(x.shape[1])
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature size changed from {self._shift.shape[0]} to {x.shape[1]}")
        c = x - self._shift
        self._sum += c.sum(axis=0)
        self._outer += c.T @ c
        self.count += x.shape[0]

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self._shift + self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by N - 1, like np.cov)."""
        self._need(2)
        m = self._sum / self.count
        cov = (self._outer - self.count * np.outer(m, m)) / (self.count - 1)
        return (cov + cov.T) / 2

    def all_reduce(self, group: Collective) -> FeatureStats:
        """The statistics of every rank's rows together, the same on every rank (one process: self).

        Each rank's sums are moved to a shared centre, the count-weighted mean of the ranks' centres, then
        added: the result equals streaming all rows through one FeatureStats, up to float64 round-off.
        """
        if not group.distributed:
            return self
        dim = int(group.max(self._shift.shape[0] if self.count else 0))
        out = FeatureStats()
        if dim == 0:
            return out
        n = self.count
        if n and self._shift.shape[0] != dim:
            raise ValueError(f"feature size {self._shift.shape[0]} on this rank, {dim} on another")
        shift = self._shift if n else np.zeros(dim)
        total = group.sum(np.concatenate([[n], n * shift]))
        centre = total[1:] / total[0]
        d = shift - centre
        s = self._sum if n else np.zeros(dim)
        outer = self._outer if n else np.zeros((dim, dim))
        moved = np.concatenate([s + n * d, (outer + np.outer(s, d) + np.outer(d, s) + n * np.outer(d, d)).ravel()])
        summed = group.sum(moved)
        out.count, out._shift = int(round(total[0])), centre
        out._sum, out._outer = summed[:dim], summed[dim:].reshape(dim, dim)
        return out

    def _need(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"need at least {n} feature rows, have {self.count}")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features: float64 mean and unbiased covariance."""
    acc = FeatureStats()
    acc.update(features)
    return acc.mean, acc.cov


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite sigma1, sigma2."""
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("statistics contain NaN or inf (did the generator produce non-finite images?)")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class ReferenceFrechet:
    """`frechet_distance` of feature rows to fixed reference statistics, in torch (float64): for a check that runs
    beside training, where numpy's BLAS starts a thread per core that fights training's (measured 0.11 s against
    0.013 s for one 128-d FID at load 9 on 2 cores). The reference's square root is taken once."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        import torch  # noqa: PLC0415 - the numpy metrics above need no torch

        self.mu, self.sigma = torch.from_numpy(mu).double(), torch.from_numpy(sigma).double()
        w, v = torch.linalg.eigh(self.sigma)
        self.root = (v * w.clamp(min=0).sqrt()) @ v.T

    def __call__(self, features) -> float:
        import torch  # noqa: PLC0415

        feats = features.double()
        cov = torch.cov(feats.T)
        middle = self.root @ cov @ self.root
        tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
        diff = feats.mean(dim=0) - self.mu
        return float(diff @ diff + self.sigma.trace() + cov.trace() - 2 * tr_covmean)
