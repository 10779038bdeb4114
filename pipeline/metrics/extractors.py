"""Feature extractors the metrics run on, and the registry that builds them by name.

An extractor maps images (N, C, H, W) in [-1, 1] (any device, C = 1 or 3) to features (N, D) and, when it
has a classification head, logits (N, K). FID and precision/recall use the features, Inception Score the
logits. `name` identifies the extractor in reference-statistics files: statistics are only comparable when
computed with the same extractor.

Built in:
  inception   the 2015-12-05 TF Inception-v3 (pool3 features, 1008-way logits where the weights have them);
              kwargs: weights (path; "" = $BIGGAN_INCEPTION_WEIGHTS), device, batch_size
  classifier  a small CNN trained on the dataset itself (pipeline/metrics/classifier.py); kwargs: path, device
  vgg16       NVIDIA's TorchScript VGG16 (pipeline/metrics/vgg16.py), features only, for precision/recall as
              StyleGAN's pr50k3 computes it; kwargs: weights (path; "" = $BIGGAN_VGG16_WEIGHTS), device, batch_size

Add one with `register_extractor("name", factory)` where factory(**kwargs) returns a FeatureExtractor.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class FeatureExtractor(abc.ABC):
    """Images in [-1, 1] -> float32 CPU features (and logits, if `has_logits`)."""

    name: str = "extractor"
    feature_dim: int = 0
    has_logits: bool = False

    @property
    def space(self) -> str:
        """The feature space in metric names (precision_<space>): the name without a weights digest."""
        return self.name.split("-", 1)[0]

    @abc.abstractmethod
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """One forward pass: ((N, D) features, (N, K) logits or None), float32 on the CPU."""

    def features(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        if not self.has_logits:
            raise NotImplementedError(f"extractor {self.name!r} has no classification logits")
        logits = self.features_and_logits(images)[1]
        assert logits is not None
        return logits

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim}, has_logits={self.has_logits})"


ExtractorFactory = Callable[..., FeatureExtractor]
_EXTRACTORS: dict[str, ExtractorFactory] = {}


def register_extractor(name: str, factory: ExtractorFactory) -> None:
    """Register (or replace) the factory that `build_extractor(name, **kwargs)` calls."""
    _EXTRACTORS[name] = factory


def available_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def build_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build a registered extractor, e.g. build_extractor("inception", weights="/path/inception.pt")."""
    if name not in _EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; registered: {available_extractors()}")
    return _EXTRACTORS[name](**kwargs)


def to_uint8_levels(images: Tensor) -> Tensor:
    """[-1, 1] floats -> float32 in {0, ..., 255}: what writing the images to PNG and reading them back gives."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0.0, 255.0)


def _inception_factory(**kwargs: Any) -> FeatureExtractor:
    from pipeline.metrics.inception import InceptionExtractor

    return InceptionExtractor.from_weights(**kwargs)


def _classifier_factory(**kwargs: Any) -> FeatureExtractor:
    from pipeline.metrics.classifier import ClassifierExtractor

    return ClassifierExtractor.from_file(**kwargs)


def _vgg16_factory(**kwargs: Any) -> FeatureExtractor:
    from pipeline.metrics.vgg16 import VGG16Extractor

    return VGG16Extractor.from_weights(**kwargs)


register_extractor("inception", _inception_factory)
register_extractor("classifier", _classifier_factory)
register_extractor("vgg16", _vgg16_factory)


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Run an extractor over a large tensor in batches."""
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        f, lg = extractor.features_and_logits(images[start:start + batch_size])
        feats.append(f)
        if lg is not None:
            logits.append(lg)
    return torch.cat(feats), (torch.cat(logits) if logits else None)
