"""Improved precision and recall (Kynkäänniemi et al. 2019) from k-nearest-neighbour manifolds.

Each set of feature vectors defines a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour in the same set (the point itself excluded). Precision is the
share of generated samples inside the real manifold; recall is the share of real samples inside the
generated manifold. A sample exactly on a ball's boundary counts as inside. k = 3 as in the paper.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_K = 3


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a||^2 + ||b||^2 - 2 a.b in float64: exact enough that a point's distance to itself rounds to ~0
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0).sqrt_()


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    radii = []
    for start in range(0, n, chunk):
        d = _pairwise_distances(features[start:start + chunk], features)
        # the k+1-th smallest, since each row's own distance (0) is the smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = []
    for start in range(0, queries.shape[0], chunk):
        d = _pairwise_distances(queries[start:start + chunk], support)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = DEFAULT_K,
    *,
    device: str | torch.device = "cpu",
    chunk: int = 1024,
) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` against real features `real` (both (N, D))."""
    r = torch.as_tensor(np.asarray(real) if not torch.is_tensor(real) else real).to(device, torch.float64)
    f = torch.as_tensor(np.asarray(fake) if not torch.is_tensor(fake) else fake).to(device, torch.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features must be (N, D) with the same D, got {tuple(r.shape)}, {tuple(f.shape)}")
    precision = _coverage(f, r, knn_radii(r, k, chunk), chunk)
    recall = _coverage(r, f, knn_radii(f, k, chunk), chunk)
    return precision, recall
