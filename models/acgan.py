"""AC-GAN auxiliary classifier head (Odena et al. 2017): an alternative to the projection discriminator.

`ACGANDiscriminator(D)` wraps a discriminator that exposes
  - `features(x) -> (N, F)`: its penultimate features, computed without labels,
  - `linear`: its unconditional output layer, a module mapping (N, F) -> (N, 1),
and returns (adv_logits (N,), class_logits (N, num_classes)) from one forward pass. A projection
discriminator's class embedding (`embed`) is removed from the wrapped D: the classifier replaces it, and weights
that never get a gradient would only confuse optimizers and data-parallel engines. The AC loss is
`pipeline.losses.acgan_loss`. DCGAN's and BigGAN's D qualify.

With `projection=True` the wrapped D keeps its projection term and the classifier is added beside it
(model.d_head='projection+acgan'): the adversarial logit is then the projection D's own, class-aware one.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

logger = logging.getLogger(__name__)


class ACGANDiscriminator(nn.Module):
    """D(x, y) -> (adv_logits, class_logits). y is used only by a kept projection term (projection=True)."""

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, projection: bool = False) -> None:
        super().__init__()
        missing = [name for name in ("features", "linear") if not hasattr(backbone, name)]
        if missing:
            raise TypeError(
                f"{type(backbone).__name__} cannot take an AC-GAN head (model.d_head='acgan'): it lacks {missing}; "
                "it needs features(x) -> (N, F) penultimate features and an unconditional output layer `linear`"
            )
        if getattr(backbone, "conditioning", None) == "concat":
            raise ValueError(
                "AC-GAN head on a D with conditioning='concat': its features need the labels; "
                "use conditioning='projection' or 'none' (the class term is replaced by the classifier)"
            )
        num_classes = getattr(backbone, "num_classes", None) if num_classes is None else num_classes
        if num_classes is None or num_classes < 2:
            raise ValueError(f"AC-GAN needs at least 2 classes, got num_classes={num_classes}")
        if projection and getattr(backbone, "embed", None) is None:
            raise ValueError(f"{type(backbone).__name__} has no projection embedding to keep beside the AC-GAN head")
        self.projection = projection
        if not projection and getattr(backbone, "embed", None) is not None:
            logger.info("AC-GAN head: removing %s's projection embedding", type(backbone).__name__)
            backbone.embed = None
            if hasattr(backbone, "conditioning"):
                backbone.conditioning = "none"
        self.backbone = backbone
        self.num_classes = num_classes
        self.resolution = getattr(backbone, "resolution", None)
        feature_dim = getattr(backbone, "feature_dim", None) or backbone.linear.in_features
        self.classifier = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, 0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.backbone.features(x)
        adv = self.backbone.linear(h).squeeze(1)
        if self.projection:
            adv = adv + (self.backbone.embed(y.long()) * h).sum(1)
        return adv, self.classifier(h)
