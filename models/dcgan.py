"""Class-conditional DCGAN (Radford et al. 2016), the classic baseline next to BigGAN.

G: [z, embed(y)] -> 4x4 transposed conv -> (transposed conv x2 up, BatchNorm, ReLU)* -> tanh.
D: (strided conv x2 down, norm, LeakyReLU 0.2)* to 4x4 -> flattened features h -> linear(h) + class term,
   where the class term is a projection <embed(y), h> (Miyato & Koyama 2018) or, with "concat", one-hot label
   maps concatenated to the image channels (Mirza & Osindero 2014). "none" is unconditional (the backbone for
   an AC-GAN head, see models/acgan.py).

Same interface as BigGAN: G(z, y) -> (N, C, R, R) in [-1, 1] with G.dim_z, G.num_classes, G.resolution;
D(x, y) -> (N,) logits with D.num_classes, D.resolution. num_classes = 0 makes G and D unconditional.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import BatchNorm2d as StatsBatchNorm2d
from .registry import register_arch

logger = logging.getLogger(__name__)

RESOLUTIONS = (16, 32, 64, 128)
D_NORMS = ("batch", "none", "layer")
D_CONDITIONINGS = ("projection", "concat", "none")
# The BigGAN builder's override keys (models.config.OVERRIDE_KEYS) that mean nothing for DCGAN: accepted and
# ignored (logged) so one override dict built from ModelConfig feeds every arch. Other unknown keys: ValueError.
G_IGNORED = frozenset({"in_channels", "hier", "depth", "attention", "sn_eps", "num_sv_itrs"})
D_IGNORED = frozenset({"out_channels", "dim_z", "shared_dim", "hier", "depth", "attention", "sn_eps", "num_sv_itrs"})


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or resolution not in RESOLUTIONS:
        raise ValueError(f"DCGAN resolution must be one of {list(RESOLUTIONS)}, got {resolution!r}")
    return int(math.log2(resolution)) - 2  # number of x2 stages between 4x4 and the image


def _positive_int(name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"DCGAN {name} must be a positive int, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"DCGAN {name} must be a positive number, got {value!r}")
    return float(value)


def _num_classes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"DCGAN num_classes must be an int >= 0 (0 = unconditional), got {value!r}")
    return int(value)


def _check_extra(network: str, overrides: dict[str, Any], ignored: frozenset[str]) -> None:
    unknown = sorted(set(overrides) - ignored)
    if unknown:
        raise ValueError(f"DCGAN {network} got unknown option(s) {unknown}")
    used = sorted(k for k, v in overrides.items() if v is not None)
    if used:
        logger.info("DCGAN %s ignores BigGAN-only option(s): %s", network, ", ".join(used))


def _dcgan_init_(module: nn.Module) -> None:
    """DCGAN's init: conv/linear/embedding weights N(0, 0.02), norm gains N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | StatsBatchNorm2d | nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """G(z, y) -> images in [-1, 1].

    ch: width multiplier (the last hidden layer has ch channels, the 4x4 one ch * R / 8); dim_z: latent size;
    shared_dim: size of the class embedding concatenated to z; out_channels: image channels; bn_eps: BatchNorm eps.
    None for any of them means the default. The BatchNorms are BigGAN's (models.layers), so
    `models.sampling.standing_stats` works on DCGAN's G too.
    """

    def __init__(
        self,
        resolution: int = 64,
        num_classes: int = 0,
        *,
        ch: int | None = None,  # default 64
        dim_z: int | None = None,  # default 100
        shared_dim: int | None = None,  # default 128
        out_channels: int | None = None,  # default 3
        bn_eps: float | None = None,  # default 1e-5
        **ignored: Any,
    ) -> None:
        super().__init__()
        _check_extra("generator", ignored, G_IGNORED)
        n_up = _check_resolution(resolution)
        self.resolution, self.num_classes = resolution, _num_classes(num_classes)
        self.ch = ch = _positive_int("ch", ch, 64)
        self.dim_z = dim_z = _positive_int("dim_z", dim_z, 100)
        shared_dim = _positive_int("shared_dim", shared_dim, 128)
        self.out_channels = out_channels = _positive_int("out_channels", out_channels, 3)
        bn_eps = _positive_float("bn_eps", bn_eps, 1e-5)
        self.embed = nn.Embedding(num_classes, shared_dim) if num_classes > 0 else None
        in_dim = dim_z + (shared_dim if num_classes > 0 else 0)
        widths = [ch * 2 ** (n_up - 1 - i) for i in range(n_up)]  # e.g. 64 px: 8ch, 4ch, 2ch, ch
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_dim, widths[0], 4, 1, 0, bias=False),
            StatsBatchNorm2d(widths[0], eps=bn_eps),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                StatsBatchNorm2d(c_out, eps=bn_eps),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _dcgan_init_(self)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError(f"this DCGAN generator is conditional ({self.num_classes} classes): pass labels y")
            z = torch.cat([z, self.embed(y.long()).to(z.dtype)], dim=1)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """D(x, y) -> (N,) logits.

    ch: width multiplier (first layer ch channels, doubling per stage; default 64); in_channels: image channels
    (default 3); norm: "batch" (classic; not with WGAN-GP) | "layer" (LayerNorm over C,H,W) | "none", never on the
    first layer; conditioning: "projection" | "concat" | "none"; bn_eps: eps of either norm.
    `features(x, y)` returns the penultimate (N, feature_dim) features and `linear` is the unconditional output
    layer: what an AC-GAN head (models/acgan.py) needs.
    """

    def __init__(
        self,
        resolution: int = 64,
        num_classes: int = 0,
        *,
        ch: int | None = None,
        in_channels: int | None = None,
        norm: str = "batch",
        conditioning: str = "projection",
        bn_eps: float | None = None,
        **ignored: Any,
    ) -> None:
        super().__init__()
        _check_extra("discriminator", ignored, D_IGNORED)
        n_down = _check_resolution(resolution)
        if norm not in D_NORMS:
            raise ValueError(f"DCGAN D norm must be one of {list(D_NORMS)}, got {norm!r}")
        if conditioning not in D_CONDITIONINGS:
            raise ValueError(f"DCGAN D conditioning must be one of {list(D_CONDITIONINGS)}, got {conditioning!r}")
        self.resolution, self.num_classes = resolution, _num_classes(num_classes)
        self.ch = ch = _positive_int("ch", ch, 64)
        self.in_channels = in_channels = _positive_int("in_channels", in_channels, 3)
        bn_eps = _positive_float("bn_eps", bn_eps, 1e-5)
        self.norm = norm
        self.conditioning = conditioning = "none" if num_classes == 0 else conditioning
        widths = [ch * 2**i for i in range(n_down)]  # e.g. 64 px: ch, 2ch, 4ch, 8ch
        c_in = in_channels + (num_classes if conditioning == "concat" else 0)
        layers: list[nn.Module] = []
        for i, c_out in enumerate(widths):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=(i == 0 or norm == "none")))
            if i > 0 and norm == "batch":
                layers.append(StatsBatchNorm2d(c_out, eps=bn_eps))  # fp32 statistics under bf16, as G's
            elif i > 0 and norm == "layer":
                layers.append(nn.GroupNorm(1, c_out, eps=bn_eps))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.net = nn.Sequential(*layers)
        self.feature_dim = widths[-1] * 4 * 4
        # NOTE: a linear layer on the flattened 4x4 map is DCGAN's final 4x4 conv to one channel.
        self.linear = nn.Linear(self.feature_dim, 1)
        self.embed = nn.Embedding(num_classes, self.feature_dim) if conditioning == "projection" else None
        _dcgan_init_(self)

    def features(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Penultimate features (N, feature_dim); y is used only with conditioning="concat"."""
        if self.conditioning == "concat":
            if y is None:
                raise ValueError("DCGAN D with conditioning='concat' needs labels y")
            onehot = F.one_hot(y.long(), self.num_classes).to(x.dtype)
            x = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
        return self.net(x).flatten(1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.features(x, y)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("DCGAN D with conditioning='projection' needs labels y")
            out = out + (self.embed(y.long()) * h).sum(1)
        return out


def build_generator(resolution: int, num_classes: int, **overrides: Any) -> DCGANGenerator:
    """Registry builder: ch, dim_z, shared_dim, out_channels, bn_eps; BigGAN-only keys are ignored."""
    return DCGANGenerator(resolution, num_classes, **overrides)


def build_discriminator(resolution: int, num_classes: int, **overrides: Any) -> DCGANDiscriminator:
    """Registry builder: ch, in_channels, bn_eps, norm, conditioning; BigGAN-only and G-only keys are ignored."""
    return DCGANDiscriminator(resolution, num_classes, **overrides)


register_arch("dcgan", generator=build_generator, discriminator=build_discriminator)
