"""DiffAugment (Zhao et al., 2020): differentiable augmentation of every image D sees, real and fake alike.

`diff_augment(x, "color,translation,cutout")` works on (N, C, H, W) images in [-1, 1] on whatever device
they live on; gradients flow back to x (and so to G for fakes). Each call draws new per-image parameters.
Geometry and erasing use kornia; the colour ops are written out because kornia's versions clip to [0, 1],
which would cut the gradient wherever a pixel saturates.
"""

from __future__ import annotations

from collections.abc import Callable

import kornia
import torch

TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the image side
CUTOUT_RATIO = 0.5  # erase a square of half the image side


def _rand(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, device=x.device, dtype=x.dtype)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Add U(-0.5, 0.5) to every pixel of an image."""
    return kornia.enhance.adjust_brightness(x, _rand(x) - 0.5, clip_output=False)


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's distance from its channel mean by U(0, 2)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, 1, 1, 1) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Scale each image's distance from its mean by U(0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, 1, 1, 1) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift by whole pixels, up to `ratio` of the side each way; uncovered pixels become 0 (mid grey)."""
    n, _, h, w = x.shape
    limit = torch.tensor([int(w * ratio + 0.5), int(h * ratio + 0.5)], device=x.device)
    shift = torch.floor(torch.rand(n, 2, device=x.device) * (2 * limit + 1)) - limit
    return kornia.geometry.transform.translate(x, shift.to(x.dtype), mode="nearest", padding_mode="zeros",
                                               align_corners=True)


def cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Set a random square of `ratio` x the side to 0 (mid grey) in each image."""
    area = ratio * ratio
    erase = kornia.augmentation.RandomErasing(scale=(area, area), ratio=(1.0, 1.0), value=0.0, p=1.0)
    return erase(x)


POLICIES: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout") -> torch.Tensor:
    """Apply the comma-separated policy ("" or "none" = identity) to a batch of images in [-1, 1]."""
    names = [p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; known: {sorted(POLICIES)}")
    for name in names:
        for op in POLICIES[name]:
            x = op(x)
    return x.contiguous()
