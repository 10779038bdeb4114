"""DiffAugment (Zhao et al., 2020): differentiable augmentation of every image D sees, real and fake alike.

`diff_augment(x, "color,translation,cutout", generator=g)` works on (N, C, H, W) images in [-1, 1] on whatever
device they live on; gradients flow back to x (and so to G for fakes). Each call draws new per-image
parameters, all of them from `generator` (a `torch.Generator` on x's device): give each data-parallel rank its
own (`augment_generator`) so ranks augment differently, and checkpoint its state so a resumed run draws what
the uninterrupted one would. Translation uses kornia; the colour ops and cutout are written out because
kornia's colour ops clip to [0, 1] (cutting the gradient wherever a pixel saturates) and its random erasing
draws from the global generator.
"""

from __future__ import annotations

from collections.abc import Callable

import kornia
import torch

TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the image side
CUTOUT_RATIO = 0.5  # erase a square of half the image side


AUGMENT_SEED_STRIDE = 104_729  # keeps the per-rank streams of different seeds apart


def augment_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The DiffAugment generator of one data-parallel rank, on the training device."""
    return torch.Generator(device=device).manual_seed(seed * AUGMENT_SEED_STRIDE + 17 * rank + 1)


def _rand(x: torch.Tensor, g: torch.Generator | None, *shape: int) -> torch.Tensor:
    """U(0, 1) of shape (N, *shape), drawn in fp32 (so bf16 runs draw the same numbers), in x's dtype."""
    return torch.rand(x.shape[0], *shape, device=x.device, generator=g).to(x.dtype)


def brightness(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """Add U(-0.5, 0.5) to every pixel of an image."""
    return kornia.enhance.adjust_brightness(x, _rand(x, g) - 0.5, clip_output=False)


def saturation(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """Scale each pixel's distance from its channel mean by U(0, 2)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, g, 1, 1, 1) * 2) + mean


def contrast(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """Scale each image's distance from its mean by U(0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, g, 1, 1, 1) + 0.5) + mean


def translation(x: torch.Tensor, g: torch.Generator | None = None, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift by whole pixels, up to `ratio` of the side each way; uncovered pixels become 0 (mid grey)."""
    _, _, h, w = x.shape
    limit = torch.tensor([int(w * ratio + 0.5), int(h * ratio + 0.5)], device=x.device)
    shift = torch.floor(_rand(x, g, 2).float() * (2 * limit + 1)) - limit
    return kornia.geometry.transform.translate(x, shift.to(x.dtype), mode="nearest", padding_mode="zeros",
                                               align_corners=True)


def cutout(x: torch.Tensor, g: torch.Generator | None = None, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Set a random square of `ratio` x the side, inside the image, to 0 (mid grey) in each image."""
    n, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    corner = _rand(x, g, 2).float()
    top = (corner[:, 0] * (h - size_h + 1)).long().view(n, 1, 1)
    left = (corner[:, 1] * (w - size_w + 1)).long().view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


POLICIES: dict[str, list[Callable[..., torch.Tensor]]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the comma-separated policy ("" or "none" = identity) to a batch of images in [-1, 1], drawing
    every random parameter from `generator` (None: torch's default generator of x's device)."""
    names = [p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; known: {sorted(POLICIES)}")
    for name in names:
        for op in POLICIES[name]:
            x = op(x, generator)
    return x.contiguous()
