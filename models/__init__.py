"""BigGAN and BigGAN-deep generators and discriminators (Brock et al. 2019), as plain nn.Modules.

Entry points:

- ``build_generator(arch, resolution, num_classes=1000, **overrides)`` and
  ``build_discriminator(...)``: arch in ``available_archs()`` ("biggan", "biggan-deep");
  ``register_arch`` adds one. G: ``G(z, y, truncation=None)`` -> (N, C, R, R) in [-1, 1]; D:
  ``D(x, y)`` -> (N,) logits.
- ``models.spectral``: ``sigma0s(module)``, ``first_layer_sigma0(G)``.
- ``models.regularization``: ``orthogonal_penalty(G, beta=1e-4)``.
- ``models.sampling``: ``truncated_normal``, ``standing_stats``.
- ``models.pretrained``: ``load_biggan_deep(path)`` (sampling), ``init_generator_from_pretrained(G, path)``
  (fine-tuning).
- ``models.layers``: batch norms take an optional ``batch_stats`` function (``BatchStats``) that turns
  local per-channel sums into the sums over the batch to normalize with (cross-replica BatchNorm).
"""

from . import dcgan as _dcgan  # noqa: E402,F401  (registers "dcgan")
from .config import OVERRIDE_KEYS, RESOLUTIONS, NetworkConfig
from .registry import available_archs, build_discriminator, build_generator, register_arch

__all__ = [
    "build_generator",
    "build_discriminator",
    "register_arch",
    "available_archs",
    "NetworkConfig",
    "OVERRIDE_KEYS",
    "RESOLUTIONS",
]
