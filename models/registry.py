"""Architecture registry: ``build_generator`` / ``build_discriminator`` by architecture name.

Adding an architecture is one line, e.g. in its module:
``register_arch("dcgan", generator=dcgan.build_generator, discriminator=dcgan.build_discriminator)``
where each builder is ``(resolution, num_classes, **overrides) -> nn.Module`` and raises
ValueError for bad values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import biggan, biggan_deep
from .config import resolve_config

__all__ = ["ArchSpec", "register_arch", "available_archs", "build_generator", "build_discriminator"]

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    generator: Builder
    discriminator: Builder


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str, *, generator: Builder, discriminator: Builder) -> None:
    """Register (or replace) an architecture's G and D builders under ``name``."""
    _ARCHS[name] = ArchSpec(generator=generator, discriminator=discriminator)


def available_archs() -> list[str]:
    return sorted(_ARCHS)


def _spec(arch: str) -> ArchSpec:
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {available_archs()}, got {arch!r}")
    return _ARCHS[arch]


def build_generator(arch: str, resolution: int, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build ``arch``'s generator for ``resolution`` px and ``num_classes`` classes.

    For biggan / biggan-deep, overrides are ch, dim_z, shared_dim, hier, depth (biggan-deep only),
    attention, out_channels, in_channels (D only), bn_eps, sn_eps, num_sv_itrs. None or missing
    means the paper default, except attention, where None/0 means none. Keys a network does not
    use are validated and ignored, so one settings dict can feed both builders (see
    ``models.config.resolve_config``). Bad values raise ValueError naming the field.
    """
    return _spec(arch).generator(resolution, num_classes, **overrides)


def build_discriminator(arch: str, resolution: int, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build ``arch``'s discriminator; same overrides as ``build_generator`` (G-only ones ignored)."""
    return _spec(arch).discriminator(resolution, num_classes, **overrides)


def _biggan_builders(arch: str, g_cls: type[nn.Module], d_cls: type[nn.Module]) -> dict[str, Builder]:
    def generator(resolution: int, num_classes: int = 1000, **overrides: Any) -> nn.Module:
        return g_cls(resolve_config(arch, "G", resolution, num_classes, **overrides))

    def discriminator(resolution: int, num_classes: int = 1000, **overrides: Any) -> nn.Module:
        return d_cls(resolve_config(arch, "D", resolution, num_classes, **overrides))

    return {"generator": generator, "discriminator": discriminator}


register_arch("biggan", **_biggan_builders("biggan", biggan.Generator, biggan.Discriminator))
register_arch("biggan-deep", **_biggan_builders("biggan-deep", biggan_deep.DeepGenerator,
                                                biggan_deep.DeepDiscriminator))
