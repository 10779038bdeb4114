"""BigGAN-deep generator and projection discriminator (Brock et al. 2019, Appendix B, Figure 16).

Differences from BigGAN: bottleneck residual blocks (1x1 down to a quarter of the channels, two
3x3, 1x1 up), ``depth`` blocks per stage (2 in the paper: a plain block, then one that upsamples
or, in D, a downsampling block then a plain one), identity skips that drop channels (G) or
concatenate a 1x1 conv's extra channels (D), and the whole z concatenated with the shared class
embedding as the conditioning vector of the first linear layer and of every conditional BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .biggan import embed_classes
from .config import NetworkConfig, discriminator_stages, generator_stages
from .layers import Attention, BatchNorm2d, ConditionalBatchNorm2d, orthogonal_init_
from .spectral import SNConv2d, SNEmbedding, SNLinear

__all__ = ["DeepGBlock", "DeepDBlock", "DeepGenerator", "DeepDiscriminator"]


class DeepGBlock(nn.Module):
    """BN-ReLU-1x1-BN-ReLU-(up)-3x3-BN-ReLU-3x3-BN-ReLU-1x1; skip keeps the first ``out`` channels."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, *, upsample: bool,
                 bn_eps: float, sn_itrs: int, sn_eps: float, channel_ratio: int = 4) -> None:
        super().__init__()
        if out_channels > in_channels:
            raise ValueError("a BigGAN-deep G block can only keep or drop channels")
        hidden = in_channels // channel_ratio
        sn = {"num_itrs": sn_itrs, "eps": sn_eps}
        bn = {"eps": bn_eps, "sn_itrs": sn_itrs, "sn_eps": sn_eps}
        self.in_channels, self.out_channels, self.upsample = in_channels, out_channels, upsample
        self.bn1 = ConditionalBatchNorm2d(in_channels, cond_dim, **bn)
        self.conv1 = SNConv2d(in_channels, hidden, kernel_size=1, padding=0, **sn)
        self.bn2 = ConditionalBatchNorm2d(hidden, cond_dim, **bn)
        self.conv2 = SNConv2d(hidden, hidden, **sn)
        self.bn3 = ConditionalBatchNorm2d(hidden, cond_dim, **bn)
        self.conv3 = SNConv2d(hidden, hidden, **sn)
        self.bn4 = ConditionalBatchNorm2d(hidden, cond_dim, **bn)
        self.conv4 = SNConv2d(hidden, out_channels, kernel_size=1, padding=0, **sn)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, truncation: float | None = None) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x, cond, truncation)))
        h = F.relu(self.bn2(h, cond, truncation))
        if self.out_channels != self.in_channels:
            x = x[:, : self.out_channels]
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv2(h)
        h = self.conv3(F.relu(self.bn3(h, cond, truncation)))
        h = self.conv4(F.relu(self.bn4(h, cond, truncation)))
        return h + x


class DeepDBlock(nn.Module):
    """ReLU-1x1-ReLU-3x3-ReLU-3x3-ReLU-(avgpool)-1x1; skip pools and appends 1x1-conv channels."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool, sn_itrs: int,
                 sn_eps: float, channel_ratio: int = 4) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("a BigGAN-deep D block can only keep or add channels")
        hidden = out_channels // channel_ratio
        sn = {"num_itrs": sn_itrs, "eps": sn_eps}
        self.downsample = downsample
        self.conv1 = SNConv2d(in_channels, hidden, kernel_size=1, padding=0, **sn)
        self.conv2 = SNConv2d(hidden, hidden, **sn)
        self.conv3 = SNConv2d(hidden, hidden, **sn)
        self.conv4 = SNConv2d(hidden, out_channels, kernel_size=1, padding=0, **sn)
        self.conv_sc = (SNConv2d(in_channels, out_channels - in_channels, kernel_size=1, padding=0, **sn)
                        if out_channels != in_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        h = F.relu(self.conv3(F.relu(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
            x = F.avg_pool2d(x, 2)
        h = self.conv4(h)
        if self.conv_sc is not None:
            x = torch.cat([x, self.conv_sc(x)], dim=1)
        return h + x


class DeepGenerator(nn.Module):
    """BigGAN-deep G: ``forward(z, y, truncation=None)`` -> images (N, out_channels, R, R) in [-1, 1].

    The conditioning vector is cat([z, shared(y)]) (z first, as in the released TF Hub / pytorch-
    pretrained-biggan models) when ``hier``; with ``hier=False`` the first linear layer sees z alone
    and the BNs the class embedding alone.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.config = cfg
        self.resolution = cfg.resolution
        self.num_classes = cfg.num_classes
        self.dim_z = cfg.dim_z
        self.hier = cfg.hier
        stages = generator_stages(cfg.arch, cfg.resolution, cfg.ch, cfg.attention)
        cond_dim = cfg.shared_dim + cfg.dim_z if cfg.hier else cfg.shared_dim
        sn = {"num_itrs": cfg.num_sv_itrs, "eps": cfg.sn_eps}
        block = {"bn_eps": cfg.bn_eps, "sn_itrs": cfg.num_sv_itrs, "sn_eps": cfg.sn_eps}

        self.shared = nn.Embedding(cfg.num_classes, cfg.shared_dim)
        self.bottom_width = 4
        linear_in = cfg.dim_z + cfg.shared_dim if cfg.hier else cfg.dim_z
        self.linear = SNLinear(linear_in, stages[0].in_channels * self.bottom_width ** 2, **sn)
        self.blocks = nn.ModuleList()
        for stage in stages:
            # depth - 1 blocks keep the channels, the last one upsamples and drops channels.
            layers: list[nn.Module] = [
                DeepGBlock(stage.in_channels, stage.in_channels, cond_dim, upsample=False, **block)
                for _ in range(cfg.depth - 1)
            ]
            layers.append(DeepGBlock(stage.in_channels, stage.out_channels, cond_dim, upsample=True, **block))
            if stage.attention:
                layers.append(Attention(stage.out_channels, sn_itrs=cfg.num_sv_itrs, sn_eps=cfg.sn_eps))
            self.blocks.append(nn.ModuleList(layers))
        self.output_bn = BatchNorm2d(stages[-1].out_channels, eps=cfg.bn_eps)
        self.output_conv = SNConv2d(stages[-1].out_channels, cfg.out_channels, **sn)
        orthogonal_init_(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor, truncation: float | None = None) -> torch.Tensor:
        """z (N, dim_z), y (N,) int64 classes (or (N, shared_dim) embeddings).

        ``truncation`` selects the pretrained truncation-statistics of the batch norms in eval
        mode (see ``models.pretrained``); it is ignored where no such table is attached.
        """
        embedded = embed_classes(self.shared, y)
        if self.hier:
            cond = torch.cat([z, embedded], dim=1)
            h = self.linear(cond)
        else:
            cond = embedded
            h = self.linear(z)
        h = h.view(h.shape[0], -1, self.bottom_width, self.bottom_width)
        for stage in self.blocks:
            for layer in stage:
                h = layer(h, cond, truncation) if isinstance(layer, DeepGBlock) else layer(h)
        h = F.relu(self.output_bn(h, truncation))
        return torch.tanh(self.output_conv(h))


class DeepDiscriminator(nn.Module):
    """BigGAN-deep projection D: ``forward(x, y)`` -> logits (N,)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.config = cfg
        self.resolution = cfg.resolution
        self.num_classes = cfg.num_classes
        stages = discriminator_stages(cfg.arch, cfg.resolution, cfg.ch, cfg.attention)
        sn = {"num_itrs": cfg.num_sv_itrs, "eps": cfg.sn_eps}
        self.input_conv = SNConv2d(cfg.in_channels, stages[0].in_channels, **sn)
        self.blocks = nn.ModuleList()
        for stage in stages:
            # The first block downsamples and widens, the other depth - 1 keep the shape.
            layers: list[nn.Module] = [
                DeepDBlock(stage.in_channels if i == 0 else stage.out_channels, stage.out_channels,
                           downsample=stage.resample and i == 0, sn_itrs=cfg.num_sv_itrs,
                           sn_eps=cfg.sn_eps)
                for i in range(cfg.depth)
            ]
            if stage.attention:
                layers.append(Attention(stage.out_channels, sn_itrs=cfg.num_sv_itrs, sn_eps=cfg.sn_eps))
            self.blocks.append(nn.ModuleList(layers))
        feat = stages[-1].out_channels
        self.linear = SNLinear(feat, 1, **sn)
        self.embed = SNEmbedding(cfg.num_classes, feat, **sn)
        orthogonal_init_(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.input_conv(x)
        for stage in self.blocks:
            for layer in stage:
                h = layer(h)
        h = torch.sum(F.relu(h), dim=(2, 3))
        return self.linear(h).squeeze(1) + torch.sum(self.embed(y) * h, dim=1)
