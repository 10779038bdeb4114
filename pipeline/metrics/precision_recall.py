"""Improved precision and recall (Kynkäänniemi et al. 2019) from k-nearest-neighbour manifolds.

Each set of feature vectors defines a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour in the same set (the point itself excluded). Precision is the
share of generated samples inside the real manifold; recall is the share of real samples inside the
generated manifold. A sample exactly on a ball's boundary counts as inside. k = 3 as in the paper, and as
NVIDIA's `pr50k3` (which computes distances in float16; here they are float64).

Both feature sets are on every rank; with a Collective of several ranks each rank computes the radii and the
coverage of its own share of the rows, and the ranks exchange radii (one float per row) and counts, so every
rank ends with the same precision and recall.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.metrics.collective import LOCAL, Collective

DEFAULT_K = 3


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a||^2 + ||b||^2 - 2 a.b in float64: exact enough that a point's distance to itself rounds to ~0
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0).sqrt_()


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, chunk: int = 1024, group: Collective = LOCAL) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (each rank computes its share of the rows)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    lo, hi = group.share(n)
    radii = [features.new_zeros(0)]
    for start in range(lo, hi, chunk):
        d = _pairwise_distances(features[start:min(start + chunk, hi)], features)
        # the k+1-th smallest, since each row's own distance (0) is the smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    mine = torch.cat(radii)
    if not group.distributed:
        return mine
    every = group.gather_rows(mine.cpu().numpy()[:, None])[:, 0]
    return torch.from_numpy(every).to(features.device, features.dtype)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int,
              group: Collective = LOCAL) -> float:
    lo, hi = group.share(queries.shape[0])
    inside = 0
    for start in range(lo, hi, chunk):
        d = _pairwise_distances(queries[start:min(start + chunk, hi)], support)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return float(group.sum(float(inside))) / queries.shape[0]


def precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = DEFAULT_K,
    *,
    device: str | torch.device = "cpu",
    chunk: int = 1024,
    group: Collective = LOCAL,  # ranks that share the distance computations (all of them pass the same features)
) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` against real features `real` (both (N, D))."""
    r = torch.as_tensor(np.asarray(real) if not torch.is_tensor(real) else real).to(device, torch.float64)
    f = torch.as_tensor(np.asarray(fake) if not torch.is_tensor(fake) else fake).to(device, torch.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features must be (N, D) with the same D, got {tuple(r.shape)}, {tuple(f.shape)}")
    precision = _coverage(f, r, knn_radii(r, k, chunk, group), chunk, group)
    recall = _coverage(r, f, knn_radii(f, k, chunk, group), chunk, group)
    return precision, recall
