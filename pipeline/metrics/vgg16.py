"""NVIDIA's VGG16 feature network, the one StyleGAN2-ADA / StyleGAN3's `pr50k3` precision/recall uses.

Nothing is downloaded. The file is NVIDIA's TorchScript `vgg16.pt`, given by `eval.vgg16_weights` or
$BIGGAN_VGG16_WEIGHTS. Its interface, which is all this module relies on: `module(images, return_features=True)`
takes uint8 RGB images (N, 3, H, W) in [0, 255] of any size (it resizes them to 224x224 itself) and returns
(N, 4096) features. Images in [-1, 1] are quantised to 8-bit levels first, as NVIDIA quantises generator output;
grayscale is repeated to three channels. With these features, k = 3 and 50k generated images against the real
set, `precision_recall` gives the numbers papers quote as P&R (pr50k3); our distances are float64, NVIDIA's
float16, which can move a sample that lies on a ball's boundary.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.metrics.extractors import FeatureExtractor, to_uint8_levels

logger = logging.getLogger(__name__)

ENV_VAR = "BIGGAN_VGG16_WEIGHTS"
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt"


class VGG16WeightsNotFound(FileNotFoundError):
    """The configured VGG16 file does not exist (or none is configured where one is required)."""


def _how_to_get_weights() -> str:
    return (
        f"Set eval.vgg16_weights (--set eval.vgg16_weights=PATH) or ${ENV_VAR} to NVIDIA's TorchScript vgg16.pt: "
        f"{NVIDIA_URL}\nDownload it on a machine with internet access and copy it here (to every node); nothing is "
        "downloaded at run time."
    )


def vgg16_weights_path(path: str | os.PathLike | None = None) -> Path | None:
    """The configured VGG16 file (`path`, else $BIGGAN_VGG16_WEIGHTS); None when neither is set (VGG16 off)."""
    source = "eval.vgg16_weights"
    if not path:
        path, source = os.environ.get(ENV_VAR, ""), f"${ENV_VAR}"
    if not path:
        return None
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise VGG16WeightsNotFound(f"VGG16 file {str(resolved)!r} (from {source}) does not exist.\n{_how_to_get_weights()}")
    return resolved


def locate_vgg16_weights(path: str | os.PathLike | None = None) -> Path:
    found = vgg16_weights_path(path)
    if found is None:
        raise VGG16WeightsNotFound(f"No VGG16 weights configured.\n{_how_to_get_weights()}")
    return found


def _uint8_rgb(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    x = to_uint8_levels(images).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class VGG16Extractor(FeatureExtractor):
    """Features (N, 4096) of NVIDIA's TorchScript VGG16; no logits."""

    name = "vgg16"

    def __init__(self, network: nn.Module, *, device: str | torch.device = "cpu", batch_size: int = 32,
                 source: str = ""):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.batch_size = batch_size
        self.source = source
        self.feature_dim = int(self._forward(torch.zeros(1, 3, 32, 32, device=self.device)).shape[1])

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                     batch_size: int = 32) -> VGG16Extractor:
        path = locate_vgg16_weights(weights)
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{path}: not a TorchScript file (expected NVIDIA's vgg16.pt, {NVIDIA_URL})") from err
        try:
            extractor = cls(network, device=device, batch_size=batch_size, source=str(path))
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(
                f"{path}: not NVIDIA's VGG16 interface (module(uint8 images, return_features=True) -> (N, D)): {err}"
            ) from err
        logger.info("VGG16 weights: %s (%d features)", path, extractor.feature_dim)
        return extractor

    @torch.no_grad()
    def _forward(self, images: Tensor) -> Tensor:
        out = self.network(_uint8_rgb(images.to(self.device)), return_features=True)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"expected features (N, D) for N={images.shape[0]} images, got {shape}")
        return out.float().cpu()

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return torch.cat([self._forward(images[i:i + self.batch_size])
                          for i in range(0, images.shape[0], self.batch_size)]), None
