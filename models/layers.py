"""Building blocks shared by BigGAN and BigGAN-deep: batch norms, self-attention, init.

Batch norms here (``ConditionalBatchNorm2d`` for the residual blocks, ``BatchNorm2d`` for G's
output layer) have three sources of normalization statistics:

- training mode: the batch's statistics; the running statistics are updated with ``momentum``,
  or, while ``momentum is None`` (standing statistics, see ``models.sampling.standing_stats``),
  with a cumulative average over the passes since ``reset_running_stats()``;
- eval mode: the running statistics;
- eval mode with a truncation-statistics table attached (pretrained BigGAN-deep weights) and a
  truncation passed to ``forward``: the table's statistics interpolated at that truncation.

Batch statistics are the local batch's unless a ``batch_stats`` function is set on the module
(``BatchStats``): it receives the local per-channel sums (sum of x, sum of x^2, count) in fp32 and
returns the sums over whatever batch the statistics should cover (``pipeline.cross_replica`` sums
them over the data-parallel ranks: cross-replica BatchNorm). The models know nothing about who
computes them. Copies of a module keep whatever ``copy.deepcopy`` makes of the function.

Self-attention computes its logits and softmax in fp32 (autocast off) and casts the attention map
back to the activations' dtype: bf16 logits of magnitude ~50 carry an absolute error ~0.1, which
the exponential turns into a ~10% error in the attention weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .spectral import SNConv2d, SNLinear, SpectralNorm, _fp32_region

__all__ = [
    "BatchStats",
    "StatsBatchNorm",
    "ConditionalBatchNorm2d",
    "BatchNorm2d",
    "Attention",
    "orthogonal_init_",
]


# (3 * C,) fp32 local sums [sum x (C), sum x^2 (C), count (repeated C times)] -> the same sums over
# the batch the statistics should cover; must be differentiable (gradients flow back through it).
BatchStats = Callable[[torch.Tensor], torch.Tensor]


class StatsBatchNorm(nn.Module):
    """Parameter-free batch norm over (N, H, W) with running and truncation-indexed statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        # NOTE: a Python counter, not a buffer, so the cumulative average needs no host sync.
        self._num_accumulated = 0
        # NOTE: a plain attribute, not a submodule or buffer: see BatchStats (None: this batch's own)
        self.batch_stats: BatchStats | None = None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    # Statistics ----------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self._num_accumulated = 0

    @property
    def has_truncation_stats(self) -> bool:
        return "stat_means" in self._buffers

    def set_truncation_stats(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        """Attach (n_stats, C) tables of statistics for truncations k / (n_stats - 1), k = 0..n-1."""
        if means.shape != variances.shape or means.dim() != 2 or means.shape[1] != self.num_features:
            raise ValueError(
                f"truncation stats must both be (n_stats, {self.num_features}), "
                f"got {tuple(means.shape)} and {tuple(variances.shape)}"
            )
        if means.shape[0] < 2:
            raise ValueError("truncation stats need at least 2 rows (n_stats >= 2)")
        factory = {"device": self.running_mean.device, "dtype": self.running_mean.dtype}
        self.register_buffer("stat_means", means.detach().to(**factory).clone())
        self.register_buffer("stat_vars", variances.detach().to(**factory).clone())

    def truncation_stats(self, truncation: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's (mean, var) at ``truncation`` in (0, 1].

        NOTE: reproduces pytorch-pretrained-biggan 0.1.1 exactly, including its weighting: with
        truncation / step = k + f, row k gets weight f and row k + 1 gets weight 1 - f.
        """
        if not 0.0 < truncation <= 1.0:
            raise ValueError(f"truncation must be in (0, 1] with truncation stats, got {truncation}")
        step = 1.0 / (self.stat_means.shape[0] - 1)
        frac, whole = math.modf(truncation / step)
        k = int(whole)
        if frac == 0.0:
            return self.stat_means[k], self.stat_vars[k]
        mean = self.stat_means[k] * frac + self.stat_means[k + 1] * (1 - frac)
        var = self.stat_vars[k] * frac + self.stat_vars[k + 1] * (1 - frac)
        return mean, var

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A checkpoint of a model that had truncation tables attached carries them: make room.
        means = state_dict.get(prefix + "stat_means")
        variances = state_dict.get(prefix + "stat_vars")
        if means is not None and variances is not None and not self.has_truncation_stats:
            self.set_truncation_stats(torch.zeros_like(means, device="cpu"),
                                      torch.ones_like(variances, device="cpu"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # Forward -------------------------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor, truncation: float | None,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.running_mean.dtype:
            # bf16 activations with fp32 statistics (mixed precision casts parameters, not buffers):
            # normalize in the statistics' precision
            stats_dtype = self.running_mean.dtype
            return self._normalize(x.to(stats_dtype), truncation, None if weight is None else weight.to(stats_dtype),
                                   None if bias is None else bias.to(stats_dtype)).to(x.dtype)
        if self.training:
            if self.momentum is None:
                self._num_accumulated += 1
                factor = 1.0 / self._num_accumulated
            else:
                factor = self.momentum
            if self.batch_stats is not None:
                return self._normalize_with_sums(x, factor, weight, bias)
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True, factor,
                                self.eps)
        if truncation is not None and self.has_truncation_stats:
            mean, var = self.truncation_stats(truncation)
        else:
            mean, var = self.running_mean, self.running_var
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)

    def _normalize_with_sums(self, x: torch.Tensor, factor: float, weight: torch.Tensor | None,
                             bias: torch.Tensor | None) -> torch.Tensor:
        """Training-mode batch norm with statistics from ``batch_stats`` of the local sums, all in fp32.

        Same result as ``F.batch_norm`` over the batch the sums cover (biased variance to normalize,
        unbiased for the running variance), with gradients through the statistics.
        """
        c = self.num_features
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = xf.new_full((c,), x.numel() // c)  # per channel, so the sums split into three equal parts
        total = self.batch_stats(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        sum_x, sum_x2, n = total.split(c)
        mean = sum_x / n
        # NOTE: E[x^2] - E[x]^2 in fp32; clamped, as cancellation can make it slightly negative
        var = (sum_x2 / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            unbiased = var * n / (n - 1).clamp_min(1.0)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = (1, c) + (1,) * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if weight is not None:
            out = out * weight.float().view(shape)
        if bias is not None:
            out = out + bias.float().view(shape)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ConditionalBatchNorm2d(StatsBatchNorm):
    """Batch norm whose gain and bias are linear projections of a conditioning vector.

    out = BN(x) * (1 + gain(c)) + bias(c), with ``gain`` and ``bias`` bias-free SN linears
    (BigGAN's class-conditional BN fed with [shared class embedding, z chunk]).
    """

    def __init__(self, num_features: int, cond_dim: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, *, sn_itrs: int = 1, sn_eps: float = 1e-6) -> None:
        super().__init__(num_features, eps, momentum)
        self.cond_dim = cond_dim
        self.gain = SNLinear(cond_dim, num_features, bias=False, num_itrs=sn_itrs, eps=sn_eps)
        self.bias = SNLinear(cond_dim, num_features, bias=False, num_itrs=sn_itrs, eps=sn_eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, truncation: float | None = None) -> torch.Tensor:
        gain = (1 + self.gain(cond)).unsqueeze(-1).unsqueeze(-1)
        bias = self.bias(cond).unsqueeze(-1).unsqueeze(-1)
        return self._normalize(x, truncation) * gain + bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cond_dim={self.cond_dim}"


class BatchNorm2d(StatsBatchNorm):
    """Unconditional batch norm with a learned per-channel gain (``weight``) and ``bias``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor, truncation: float | None = None) -> torch.Tensor:
        return self._normalize(x, truncation, self.weight, self.bias)


class Attention(nn.Module):
    """Self-attention (non-local) block of SA-GAN as used in BigGAN.

    theta/phi project to C/8 channels and g to C/2; phi and g are 2x2 max-pooled; the attended
    g is projected back to C by ``o`` and added to the input scaled by a learned ``gamma`` (init 0).
    """

    def __init__(self, channels: int, *, sn_itrs: int = 1, sn_eps: float = 1e-6) -> None:
        super().__init__()
        if channels < 8:
            raise ValueError(f"attention needs at least 8 channels, got {channels}")
        self.channels = channels
        conv = {"kernel_size": 1, "padding": 0, "bias": False, "num_itrs": sn_itrs, "eps": sn_eps}
        self.theta = SNConv2d(channels, channels // 8, **conv)
        self.phi = SNConv2d(channels, channels // 8, **conv)
        self.g = SNConv2d(channels, channels // 2, **conv)
        self.o = SNConv2d(channels // 2, channels, **conv)
        # NOTE: shape (1,), not a 0-dim scalar: DeepSpeed cannot flatten 0-dim parameters
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).reshape(n, c // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).reshape(n, c // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).reshape(n, c // 2, h * w // 4)
        with _fp32_region(x.device):
            logits = torch.bmm(theta.transpose(1, 2).float(), phi.float())  # (n, hw, hw/4), fp32
            attn = F.softmax(logits, dim=-1).to(g.dtype)
        out = torch.bmm(g, attn.transpose(1, 2)).reshape(n, c // 2, h, w)
        return x + self.gamma * self.o(out)


@torch.no_grad()
def orthogonal_init_(module: nn.Module, sv_itrs: int = 10) -> None:
    """Orthogonal init of every conv, linear and embedding weight (BigGAN's G_init/D_init 'ortho').

    Spectrally normalized layers then get u, v and sigma0 re-derived from the new weight. Biases
    keep PyTorch's defaults. Modules on the meta device are left alone.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding) and not m.weight.is_meta:
            nn.init.orthogonal_(m.weight)
            if isinstance(m, SpectralNorm):
                m.reset_singular_vectors(sv_itrs)
