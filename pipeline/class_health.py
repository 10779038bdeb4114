"""Class-aware health signals of EMA G, in the dataset classifier's feature space.

A GAN can lose its class conditioning while its spectra, losses and pixel variety all look calm (issue #17:
every row of the grid the same garment). These signals look at what the samples *are*, on a fixed,
class-balanced batch of latents (`health.classes` classes evenly spaced over the data's, `health.samples_per_class`
each), with the small CNN of `pipeline/metrics/classifier.py` that `eval.features=classifier` uses:

- `class_fidelity`: the classifier's top-1 accuracy on the batch (chance = 1 / num_classes);
- `class_diversity`: mean pairwise feature distance within each class, relative to real images' (1 = as
  varied as the data, 0 = one image per class), averaged over the batch's classes;
- `class_fid`: Fréchet distance of the batch's features to the cached real statistics (a small-sample FID:
  biased upwards by the small batch, so only comparable with itself).

Where the classifier comes from: `setup()` runs on every rank at the start of `fit()`. Rank 0 loads the
classifier and reference statistics from the evaluation cache next to the manifest (training them once there
when absent, exactly as evaluation would, so both share one file) and broadcasts them; the other ranks never
read the cache. That is the robust choice: nodes need not share a filesystem, a rank never races another's
half-written file, and the data-prep step needs no knowledge of health checks. The real per-class feature
spread comes from the first `health.real_images` real images, also on rank 0, and is broadcast with it.
When no classifier can be had (the shards have one class, or no readable labelled images) the signals are
off with one log line, and every other rule still runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from pipeline import metrics
from pipeline.checkpoint import rng_state, set_rng_state
from pipeline.metrics.frechet import ReferenceFrechet

if TYPE_CHECKING:
    from pipeline.trainer import Trainer

log = logging.getLogger(__name__)

SEED = 4321  # the health batch's latents: the same at every check of every run


def health_classes(num_classes: int, wanted: int) -> Tensor:
    """`wanted` classes evenly spaced over [0, num_classes) (all of them when there are fewer)."""
    n = min(num_classes, wanted)
    return torch.linspace(0, num_classes - 1, n).round().long().unique()


def within_class_spread(features: Tensor, labels: Tensor, classes: Tensor) -> Tensor:
    """Mean pairwise Euclidean distance of the features of each class (NaN where a class has < 2 rows)."""
    out = torch.full((len(classes),), float("nan"))
    for i, c in enumerate(classes.tolist()):
        rows = features[labels == c]
        if rows.shape[0] >= 2:
            out[i] = torch.pdist(rows.float()).mean()
    return out


class ClassSignals:
    """The fixed health batch and the classifier that judges it; one per Trainer (every rank)."""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.cfg = trainer.cfg.health
        self.classifier: metrics.SmallClassifier | None = None
        self.mu: np.ndarray | None = None
        self.sigma: np.ndarray | None = None
        self.real_spread: Tensor | None = None  # per health class
        self._ref: ReferenceFrechet | None = None  # the class FID against the real statistics
        self.off_reason: str | None = None if self.cfg.class_signals else "health.class_signals=false"
        self._set_up = False
        classes = health_classes(trainer.cfg.model.num_classes, self.cfg.classes)
        self.classes = classes
        self.y = classes.repeat_interleave(self.cfg.samples_per_class)
        gen = torch.Generator().manual_seed(SEED)
        self.z = torch.randn(len(self.y), trainer.G.dim_z, generator=gen)

    @property
    def group(self) -> metrics.Collective:
        return metrics.Collective(self.t.rank, self.t.world_size, self.t.device)

    @property
    def on(self) -> bool:
        return self._set_up and self.off_reason is None

    # -- once per fit() ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Every rank (collective): get the classifier, the real statistics and the real per-class spread."""
        if self._set_up:
            return
        self._set_up = True
        t = self.t
        if self.off_reason is None and t.cfg.model.num_classes < 2:
            self.off_reason = "the data has a single class"
        if self.off_reason is not None:
            self._say_off()
            return
        group = self.group
        kept = rng_state()  # training a classifier seeds torch: training's random stream must not notice
        try:
            ref = self._reference_set()
            ref.prepare(group)  # rank 0 loads (or trains once and caches) them; the others receive them
            spread, error = None, None
            if t.rank == 0:
                try:
                    spread = self._real_spread(ref)
                except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
                    error = err
            group.raise_if_failed(error)
            self.real_spread = group.broadcast(spread)
            self.classifier = ref.classifier().eval().requires_grad_(False)
            stats = ref.reference()
            self.mu, self.sigma = stats.mu, stats.sigma
        except Exception as err:  # noqa: BLE001 - health checks go on without the class signals
            self.off_reason = f"no dataset classifier ({type(err).__name__}: {err})"
            self._say_off()
        finally:
            set_rng_state(kept)

    def _reference_set(self):
        from pipeline.evaluation import ReferenceSet

        t = self.t
        if t.cfg.eval.features == "classifier":
            return t.evaluator.reference  # the very same cached classifier and statistics
        ecfg = dataclasses.replace(t.cfg.eval, features="classifier")
        return ReferenceSet(ecfg, t.cfg.data.shards, resolution=t.cfg.model.resolution,
                            num_classes=t.cfg.model.num_classes, output_dir=t.cfg.train.output_dir, device=t.device)

    def _real_spread(self, ref) -> Tensor:
        from pipeline.evaluation import real_images

        images, labels = real_images(self.t.cfg.data.shards, count=min(self.cfg.real_images, ref.count),
                                     batch_size=256, resolution=self.t.cfg.model.resolution)
        spread = within_class_spread(ref.classifier().features(images.to(self.t.device)).cpu(), labels, self.classes)
        if not torch.isfinite(spread).any():
            raise ValueError(f"fewer than 2 of the first {images.shape[0]} real images in every health class")
        return spread

    def _say_off(self) -> None:
        if self.t.rank == 0:
            log.warning("health: class signals off: %s; the other health rules still run", self.off_reason)

    # -- every health check --------------------------------------------------------------------------------------
    def _autocast(self):
        """Training's precision for the check's forwards too: bf16 makes them about 3x cheaper on CPU and GPU."""
        device = self.t.device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.t.dtype == torch.bfloat16)

    def _share(self) -> slice:
        """This rank's contiguous part of the health batch: ranks split the forwards, then gather the features."""
        return slice(*self.group.share(len(self.y)))

    @torch.no_grad()
    def images(self, G) -> Tensor:
        """EMA G's samples of this rank's share of the fixed health batch (float, on the trainer's device)."""
        p, part = next(G.parameters()), self._share()
        with self._autocast():
            return G(self.z[part].to(p.device, p.dtype), self.y[part].to(p.device)).float()

    def _frechet(self, feats: Tensor) -> float:
        if self._ref is None:
            self._ref = ReferenceFrechet(self.mu, self.sigma)
        return self._ref(feats)

    @torch.no_grad()
    def measure(self, images: Tensor) -> dict[str, Tensor]:
        """class_fidelity, class_diversity and class_fid of the health batch (0-dim tensors, the same on every rank),
    from this rank's share of its images (`images`); every rank calls it."""
        if not self.on:
            return {}
        with self._autocast():
            feats = self.classifier.features(images).float()
        # every rank's share in batch order: from here on every rank computes the same numbers
        feats = torch.from_numpy(self.group.gather_rows(feats.cpu().numpy()))
        with self._autocast():
            logits = self.classifier.head(feats.to(self.t.device)).float().cpu()
        fidelity = (logits.argmax(dim=1) == self.y).float().mean()
        spread = within_class_spread(feats, self.y, self.classes)
        ratio = spread / self.real_spread
        diversity = ratio[torch.isfinite(ratio)].mean()
        if torch.isfinite(feats).all():
            fid = self._frechet(feats.double())
        else:
            fid = float("nan")  # a non-finite G is caught by the loss and sigma0 rules; FID has nothing to add
        device = self.t.device
        return {"class_fidelity": fidelity.to(device), "class_diversity": diversity.to(device),
                "class_fid": torch.tensor(fid, dtype=torch.float32, device=device)}
