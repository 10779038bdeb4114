"""Spectral normalization with a readable top singular value.

Every spectrally normalized layer (SNLinear, SNConv2d, SNEmbedding) keeps three buffers:

- ``u`` (out_features,) and ``v`` (fan_in,): the power-iteration vectors of the weight viewed as
  a matrix W of shape (out, fan_in),
- ``sigma0`` (0-dim): the estimate u^T W v of W's top singular value from the last training-mode
  forward (or from loading).

In training mode each forward runs ``num_itrs`` power-iteration steps (no grad), stores the new
u, v and sigma0, and divides the weight by sigma = u^T W v (with grad through W, as in Miyato et
al. 2018 and ajbrock/BigGAN-PyTorch). In eval mode u and v are not updated and sigma = u^T W v is
computed from the stored vectors, which is exactly what ``torch.nn.utils.spectral_norm`` does in
eval mode (so weights saved from it load unchanged).

Reading ``sigma0`` costs nothing: it is a buffer. ``sigma0s(module)`` collects them all; the
paper's collapse signal is the generator's first linear layer, ``first_layer_sigma0(G)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SpectralNorm",
    "SNLinear",
    "SNConv2d",
    "SNEmbedding",
    "sigma0s",
    "first_layer_sigma0",
    "power_iteration_",
    "set_spectral_norm",
]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Turn autocast off so sigma is computed in fp32 even inside a bf16 autocast region."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class SpectralNorm:
    """Mixin for a module with a ``weight`` parameter; call ``_init_spectral_norm`` after init."""

    weight: nn.Parameter
    u: torch.Tensor
    v: torch.Tensor
    sigma0: torch.Tensor
    sn_on: bool = True  # False: forward uses the raw weight; the power iteration still tracks sigma0

    def _init_spectral_norm(self, num_itrs: int = 1, eps: float = 1e-6) -> None:
        if num_itrs < 1:
            raise ValueError(f"num_sv_itrs must be a positive int, got {num_itrs}")
        self.num_itrs = num_itrs
        self.sn_eps = eps
        out_features = self.weight.shape[0]
        fan_in = self.weight[0].numel()
        factory = {"device": self.weight.device, "dtype": torch.float32}
        self.register_buffer("u", F.normalize(torch.randn(out_features, **factory), dim=0, eps=eps))
        self.register_buffer("v", F.normalize(torch.randn(fan_in, **factory), dim=0, eps=eps))
        self.register_buffer("sigma0", torch.ones((), **factory))

    @torch.no_grad()
    def reset_singular_vectors(self, num_itrs: int = 1) -> None:
        """Re-derive u, v and sigma0 from the current weight (after re-initializing it)."""
        if self.weight.is_meta:
            return
        power_iteration_(self, num_itrs)

    def normalized_weight(self) -> torch.Tensor:
        """W / sigma, updating u, v and sigma0 first when in training mode (W itself when `sn_on` is False)."""
        w = self.weight
        w_mat = w.flatten(1)
        if not self.sn_on:
            if self.training:  # sigma0 stays a live reading of the raw weight's scale, for the health check
                power_iteration_(self, self.num_itrs)
            return w
        if self.training:
            u, v = power_iteration_(self, self.num_itrs)
        else:
            # Copies, so a graph built in eval mode survives a later training-mode buffer update.
            u, v = self.u.clone(), self.v.clone()
        with _fp32_region(w.device):
            sigma = torch.dot(u.float(), torch.mv(w_mat.float(), v.float()))
        return w / sigma.to(w.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sn_itrs={self.num_itrs}, sn_eps={self.sn_eps}"


@torch.no_grad()
def power_iteration_(layer: SpectralNorm, num_itrs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``num_itrs`` power-iteration steps on ``layer``; store and return fresh (u, v).

    The returned tensors are new tensors (not the buffers), so autograd graphs that saved them
    survive later in-place buffer updates (e.g. D called on fake and real before one backward).
    """
    w_mat = layer.weight.detach().flatten(1)
    with _fp32_region(w_mat.device):
        w32 = w_mat.float()
        u = layer.u.float()
        v = layer.v.float()
        for _ in range(num_itrs):
            v = F.normalize(torch.mv(w32.t(), u), dim=0, eps=layer.sn_eps)
            u = F.normalize(torch.mv(w32, v), dim=0, eps=layer.sn_eps)
        sigma = torch.dot(u, torch.mv(w32, v))
    layer.u.copy_(u)
    layer.v.copy_(v)
    layer.sigma0.copy_(sigma)
    return u, v


class SNLinear(SpectralNorm, nn.Linear):
    """``nn.Linear`` with spectral normalization."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 num_itrs: int = 1, eps: float = 1e-6, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_spectral_norm(num_itrs, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class SNConv2d(SpectralNorm, nn.Conv2d):
    """``nn.Conv2d`` with spectral normalization (weight viewed as out x (in * kh * kw))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1,
                 bias: bool = True, *, num_itrs: int = 1, eps: float = 1e-6, device=None,
                 dtype=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, padding=padding, bias=bias,
                           device=device, dtype=dtype)
        self._init_spectral_norm(num_itrs, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class SNEmbedding(SpectralNorm, nn.Embedding):
    """``nn.Embedding`` with spectral normalization (weight is num_embeddings x dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, num_itrs: int = 1,
                 eps: float = 1e-6, device=None, dtype=None) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, device=device, dtype=dtype)
        self._init_spectral_norm(num_itrs, eps)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.normalized_weight())


def set_spectral_norm(module: nn.Module, on: bool) -> int:
    """Switch the normalization of every spectrally normalized layer in module on or off; returns their count.

    Off is an ablation (the paper's D without spectral norm): the layers keep their buffers, so checkpoints load
    either way and sigma0 still reads the raw weight's top singular value."""
    layers = [m for m in module.modules() if isinstance(m, SpectralNorm)]
    for layer in layers:
        layer.sn_on = on
    return len(layers)


def sigma0s(module: nn.Module) -> dict[str, torch.Tensor]:
    """Map each spectrally normalized layer's qualified name to its ``sigma0`` buffer (no compute).

    The tensors are the live buffers: read them (``torch.stack(list(d.values()))``) and detach or
    clone if they must outlive the next training step.
    """
    return {name: m.sigma0 for name, m in module.named_modules() if isinstance(m, SpectralNorm)}


def first_layer_sigma0(generator: nn.Module) -> torch.Tensor:
    """sigma0 of G's first linear layer (``G.linear``), the paper's collapse signal (Sec. 4.1)."""
    layer = getattr(generator, "linear", None)
    if not isinstance(layer, SpectralNorm):
        raise ValueError("generator has no spectrally normalized first layer named 'linear'")
    return layer.sigma0
