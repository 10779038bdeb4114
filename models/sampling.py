"""Sampling helpers: the truncation trick and standing statistics (Brock et al. 2019, Sec. 3.1, App. C)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import StatsBatchNorm

__all__ = ["truncated_normal", "sample_classes", "standing_stats"]


def truncated_normal(n: int, dim_z: int, threshold: float | None, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z ~ N(0, I) of shape (n, dim_z) with every entry whose magnitude exceeds ``threshold`` resampled.

    Resampling until an entry lands in [-threshold, threshold] yields N(0, 1) conditioned on
    |z| <= threshold; the offending entries are drawn from that distribution directly (inverse
    CDF in float64), so there is no loop and no host sync. ``threshold`` None or inf: plain normal.
    """
    z = torch.randn(n, dim_z, generator=generator, device=device, dtype=torch.float32)
    if threshold is None or math.isinf(threshold):
        return z.to(dtype)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive (or None for no truncation), got {threshold}")
    lo = 0.5 * math.erfc(threshold / math.sqrt(2.0))  # Phi(-threshold)
    hi = 1.0 - lo
    u = torch.rand(n, dim_z, generator=generator, device=z.device, dtype=torch.float64)
    redrawn = torch.special.ndtri(lo + u * (hi - lo)).clamp_(-threshold, threshold).to(z.dtype)
    return torch.where(z.abs() > threshold, redrawn, z).to(dtype)


def sample_classes(n: int, num_classes: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """n uniformly random class indices (int64)."""
    return torch.randint(num_classes, (n,), generator=generator, device=device)


@torch.no_grad()
def standing_stats(G: nn.Module, num_passes: int = 16, batch_size: int = 64, *,
                   truncation: float | None = None, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Replace G's BatchNorm running statistics with standing statistics (BigGAN App. C).

    Resets every batch norm's running mean/var, then runs ``num_passes`` no-grad forwards of
    ``batch_size`` random (z, y) with only the batch norms in training mode, so the stored
    statistics become the plain average of the passes' batch statistics. Spectral-norm vectors
    are untouched (the SN layers stay in eval mode). z is truncated at ``truncation`` if given
    (use the same threshold you will sample with). Every module's train/eval mode and momentum
    are restored afterwards; evaluate with ``G.eval()``. Returns G.
    """
    if num_passes < 1 or batch_size < 1:
        raise ValueError(f"num_passes and batch_size must be positive, got {num_passes}, {batch_size}")
    param = next(G.parameters())
    device = param.device if device is None else device
    norms = [m for m in G.modules() if isinstance(m, StatsBatchNorm)]
    modes = {m: m.training for m in G.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        G.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
            m.training = True  # NOTE: not m.train(): its SN gain/bias projections stay in eval mode
        for _ in range(num_passes):
            z = truncated_normal(batch_size, G.dim_z, truncation, generator=generator, device=device,
                                 dtype=param.dtype)
            if G.num_classes > 0:
                G(z, sample_classes(batch_size, G.num_classes, generator=generator, device=device))
            else:  # an unconditional generator
                G(z)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return G
