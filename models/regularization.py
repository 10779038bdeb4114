"""BigGAN's orthogonal regularization (Brock et al. 2019, Sec. 3.1, Eq. 3).

R_beta(W) = beta * || W W^T (.) (1 - I) ||_F^2 for each weight W viewed as (filters, fan_in): the
squared off-diagonal entries of the filters' Gram matrix, i.e. only the filters' mutual
orthogonality is pushed for, not their norms. Its gradient is 4 * beta * (W W^T (.) (1 - I)) W.
(ajbrock/BigGAN-PyTorch's utils.ortho adds 2 * strength * (...) W to the gradient instead, so
its ``strength`` is half this ``beta``.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["orthogonal_penalty", "offdiagonal_gram_sq"]


def offdiagonal_gram_sq(w: torch.Tensor) -> torch.Tensor:
    """|| W W^T (.) (1 - I) ||_F^2 of a (filters, fan_in) matrix, in fp32, differentiable.

    For tall matrices (more filters than fan_in, e.g. G's first linear layer) it uses
    ||W W^T||_F^2 = ||W^T W||_F^2 so the (filters x filters) Gram matrix is never formed.
    """
    w = w.float()
    rows, cols = w.shape
    if rows <= cols:
        gram = w @ w.t()
        off = gram * (1.0 - torch.eye(rows, device=w.device, dtype=w.dtype))
        return torch.sum(off * off)
    gram_t = w.t() @ w
    row_norms_sq = torch.sum(w * w, dim=1)
    return torch.sum(gram_t * gram_t) - torch.sum(row_norms_sq * row_norms_sq)


def orthogonal_penalty(G: nn.Module, beta: float = 1e-4,
                       exclude: Iterable[nn.Parameter] = ()) -> torch.Tensor:
    """beta * sum over G's weights of ||W W^T (.) (1 - I)||_F^2, a differentiable fp32 scalar.

    Applies to every parameter with at least 2 dims (linear, conv, and conditional-BN projection
    weights, spectrally normalized or not: the raw weight is used), except G's shared class
    embedding (``G.shared``) and anything in ``exclude``; biases, BN gains and attention gammas
    have fewer than 2 dims and are never included. Add the result to the G loss.
    """
    skipped = {id(p) for p in exclude}
    shared = getattr(G, "shared", None)
    if isinstance(shared, nn.Module):
        skipped.update(id(p) for p in shared.parameters())
    terms = [offdiagonal_gram_sq(p.flatten(1)) for p in G.parameters()
             if p.dim() >= 2 and id(p) not in skipped]
    if not terms:
        raise ValueError("orthogonal_penalty: the module has no weights with 2 or more dims")
    return beta * torch.stack(terms).sum()
