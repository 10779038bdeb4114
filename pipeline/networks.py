"""G and D from `config.model`: the one place that turns a RunConfig into networks.

The trainer builds both from it and every reader of a checkpoint (sampling, evaluation, the MLflow model)
rebuilds G from it, so a checkpoint's weights always meet the architecture that wrote them. Two readings of
the same config once disagreed on `model.attention: None` (the registry's "none" vs the paper's placement) and
every 128 px checkpoint failed to load.
"""

from __future__ import annotations

from torch import nn

import models
from models.acgan import ACGANDiscriminator
from models.spectral import set_spectral_norm
from pipeline.config import RunConfig
from pipeline.losses import ACGAN_HEADS


def _spectral_kwargs(m) -> dict:
    kw = {"sn_eps": m.sn_eps, "num_sv_itrs": m.num_sv_itrs, "depth": m.depth}
    if m.attention is not None:  # None: where the paper puts it for this arch and resolution
        kw["attention"] = m.attention
    return kw


def generator(cfg: RunConfig, num_classes: int | None = None) -> nn.Module:
    """G of `cfg.model`; `num_classes` where the config leaves it 0 (read from the data or the checkpoint)."""
    m = cfg.model
    kw = {"ch": m.g_ch, "dim_z": m.dim_z, "shared_dim": m.shared_dim, "bn_eps": m.bn_eps}
    if m.arch != "dcgan":
        kw |= {"hier": m.hier, **_spectral_kwargs(m)}
    return models.build_generator(m.arch, m.resolution, num_classes or m.num_classes, **kw)


def discriminator(cfg: RunConfig) -> nn.Module:
    m = cfg.model
    kw = {"ch": m.d_ch}
    if m.arch == "dcgan":
        kw |= {"norm": m.d_norm, "conditioning": "none" if m.d_head == "acgan" else m.d_conditioning}
    else:
        kw |= _spectral_kwargs(m)
    D = models.build_discriminator(m.arch, m.resolution, m.num_classes, **kw)
    if not m.d_spectral_norm:
        set_spectral_norm(D, False)
    if m.d_head in ACGAN_HEADS:
        D = ACGANDiscriminator(D, m.num_classes, projection=m.d_head == "projection+acgan")
    return D


def build_models(cfg: RunConfig) -> tuple[nn.Module, nn.Module]:
    return generator(cfg), discriminator(cfg)
