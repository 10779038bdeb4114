"""BigGAN generator and projection discriminator (Brock et al. 2019, Appendix B, Tables 4-6).

G: shared class embedding; z split into one chunk for the first linear layer and one per stage
(skip-z / hierarchical latents), each stage chunk concatenated with the shared embedding and
projected into every conditional BatchNorm of that stage; residual up-blocks; self-attention;
BN-ReLU-conv-tanh output. D: residual down-blocks, self-attention, ReLU, global sum pooling and a
projection head (linear + <embed(y), h>). Spectral norm on every layer except G's shared
embedding; orthogonal init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetworkConfig, discriminator_stages, generator_stages
from .layers import Attention, BatchNorm2d, ConditionalBatchNorm2d, orthogonal_init_
from .spectral import SNConv2d, SNEmbedding, SNLinear

__all__ = ["GBlock", "DBlock", "Generator", "Discriminator", "embed_classes"]


def embed_classes(shared: nn.Embedding, y: torch.Tensor) -> torch.Tensor:
    """Class indices (N,) through the shared embedding; a float (N, shared_dim) passes through.

    Passing embeddings directly allows class interpolation (ajbrock's G takes G.shared(y)).
    """
    if y.is_floating_point():
        if y.dim() != 2 or y.shape[1] != shared.embedding_dim:
            raise ValueError(f"float y must be (N, {shared.embedding_dim}) embeddings, got {tuple(y.shape)}")
        return y
    return shared(y)


class GBlock(nn.Module):
    """BN-ReLU-up-conv3x3-BN-ReLU-conv3x3 with a 1x1 conv on the upsampled shortcut."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, *, upsample: bool,
                 bn_eps: float, sn_itrs: int, sn_eps: float) -> None:
        super().__init__()
        sn = {"num_itrs": sn_itrs, "eps": sn_eps}
        bn = {"eps": bn_eps, "sn_itrs": sn_itrs, "sn_eps": sn_eps}
        self.upsample = upsample
        self.bn1 = ConditionalBatchNorm2d(in_channels, cond_dim, **bn)
        self.conv1 = SNConv2d(in_channels, out_channels, **sn)
        self.bn2 = ConditionalBatchNorm2d(out_channels, cond_dim, **bn)
        self.conv2 = SNConv2d(out_channels, out_channels, **sn)
        self.conv_sc = (SNConv2d(in_channels, out_channels, kernel_size=1, padding=0, **sn)
                        if in_channels != out_channels or upsample else None)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, truncation: float | None = None) -> torch.Tensor:
        h = F.relu(self.bn1(x, cond, truncation))
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.bn2(h, cond, truncation)))
        if self.conv_sc is not None:
            x = self.conv_sc(x)
        return h + x


class DBlock(nn.Module):
    """(ReLU)-conv3x3-ReLU-conv3x3-(avgpool) with a 1x1 conv shortcut ("wide" D: hidden = out)."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool, preactivation: bool,
                 sn_itrs: int, sn_eps: float) -> None:
        super().__init__()
        sn = {"num_itrs": sn_itrs, "eps": sn_eps}
        self.downsample = downsample
        self.preactivation = preactivation
        self.conv1 = SNConv2d(in_channels, out_channels, **sn)
        self.conv2 = SNConv2d(out_channels, out_channels, **sn)
        self.conv_sc = (SNConv2d(in_channels, out_channels, kernel_size=1, padding=0, **sn)
                        if in_channels != out_channels or downsample else None)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # With preactivation the 1x1 conv runs before pooling (cheaper), else after (ajbrock).
        if self.preactivation:
            if self.conv_sc is not None:
                x = self.conv_sc(x)
            return F.avg_pool2d(x, 2) if self.downsample else x
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        return self.conv_sc(x) if self.conv_sc is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self.shortcut(x)


class Generator(nn.Module):
    """BigGAN G: ``forward(z, y, truncation=None)`` -> images (N, out_channels, R, R) in [-1, 1]."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.config = cfg
        self.resolution = cfg.resolution
        self.num_classes = cfg.num_classes
        self.dim_z = cfg.dim_z
        self.hier = cfg.hier
        stages = generator_stages(cfg.arch, cfg.resolution, cfg.ch, cfg.attention)
        self.num_slots = len(stages) + 1 if cfg.hier else 1
        self.z_chunk = cfg.dim_z // self.num_slots
        cond_dim = cfg.shared_dim + (self.z_chunk if cfg.hier else 0)
        sn = {"num_itrs": cfg.num_sv_itrs, "eps": cfg.sn_eps}

        # NOTE: G's shared embedding is a plain nn.Embedding (SN on it "cripples G", ajbrock).
        self.shared = nn.Embedding(cfg.num_classes, cfg.shared_dim)
        self.bottom_width = 4
        self.linear = SNLinear(self.z_chunk, stages[0].in_channels * self.bottom_width ** 2, **sn)
        self.blocks = nn.ModuleList()
        for stage in stages:
            layers: list[nn.Module] = [GBlock(stage.in_channels, stage.out_channels, cond_dim,
                                              upsample=True, bn_eps=cfg.bn_eps,
                                              sn_itrs=cfg.num_sv_itrs, sn_eps=cfg.sn_eps)]
            if stage.attention:
                layers.append(Attention(stage.out_channels, sn_itrs=cfg.num_sv_itrs, sn_eps=cfg.sn_eps))
            self.blocks.append(nn.ModuleList(layers))
        self.output_bn = BatchNorm2d(stages[-1].out_channels, eps=cfg.bn_eps)
        self.output_conv = SNConv2d(stages[-1].out_channels, cfg.out_channels, **sn)
        orthogonal_init_(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor, truncation: float | None = None) -> torch.Tensor:
        """z (N, dim_z), y (N,) int64 classes (or (N, shared_dim) embeddings).

        ``truncation`` only matters in eval mode for batch norms that carry truncation-statistics
        tables (pretrained weights); otherwise it is ignored.
        """
        cond = embed_classes(self.shared, y)
        if self.hier:
            zs = torch.split(z, self.z_chunk, dim=1)
            h = self.linear(zs[0])
            conds = [torch.cat([cond, zc], dim=1) for zc in zs[1:]]
        else:
            h = self.linear(z)
            conds = [cond] * len(self.blocks)
        h = h.view(h.shape[0], -1, self.bottom_width, self.bottom_width)
        for stage, c in zip(self.blocks, conds):
            for layer in stage:
                h = layer(h, c, truncation) if isinstance(layer, GBlock) else layer(h)
        h = F.relu(self.output_bn(h, truncation))
        return torch.tanh(self.output_conv(h))


class Discriminator(nn.Module):
    """BigGAN projection D: ``forward(x, y)`` -> logits (N,)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.config = cfg
        self.resolution = cfg.resolution
        self.num_classes = cfg.num_classes
        stages = discriminator_stages(cfg.arch, cfg.resolution, cfg.ch, cfg.attention, cfg.in_channels)
        sn = {"num_itrs": cfg.num_sv_itrs, "eps": cfg.sn_eps}
        self.blocks = nn.ModuleList()
        for index, stage in enumerate(stages):
            layers: list[nn.Module] = [DBlock(stage.in_channels, stage.out_channels,
                                              downsample=stage.resample, preactivation=index > 0,
                                              sn_itrs=cfg.num_sv_itrs, sn_eps=cfg.sn_eps)]
            if stage.attention:
                layers.append(Attention(stage.out_channels, sn_itrs=cfg.num_sv_itrs, sn_eps=cfg.sn_eps))
            self.blocks.append(nn.ModuleList(layers))
        self.feature_dim = stages[-1].out_channels
        self.linear = SNLinear(self.feature_dim, 1, **sn)
        self.embed = SNEmbedding(cfg.num_classes, self.feature_dim, **sn)
        orthogonal_init_(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (N, feature_dim) features: the blocks' output, ReLU'd and summed over space."""
        h = x
        for stage in self.blocks:
            for layer in stage:
                h = layer(h)
        return torch.sum(F.relu(h), dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:  # None under an AC-GAN head that replaces the projection
            out = out + torch.sum(self.embed(y) * h, dim=1)
        return out
