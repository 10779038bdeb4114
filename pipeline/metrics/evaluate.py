"""Evaluate a conditional generator: FID, Inception Score, precision/recall; truncation sweeps.

G is a plain nn.Module, G(z, y) -> images in [-1, 1]; it runs in eval mode under no_grad and its previous
train/eval mode is restored. Run standing statistics on it first if it was trained with batch norm
(models.sampling.standing_stats). Latents come from a CPU generator seeded with `seed`, so the same seed
gives the same z and y on every device, and a truncation sweep compares thresholds on the same draws.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.metrics.extractors import FeatureExtractor
from pipeline.metrics.frechet import FeatureStats, frechet_distance
from pipeline.metrics.inception_score import DEFAULT_SPLITS, inception_score
from pipeline.metrics.precision_recall import DEFAULT_K, precision_recall
from pipeline.metrics.reference import ReferenceStats

logger = logging.getLogger(__name__)

DEFAULT_PR_SAMPLES = 10_000


def truncated_normal(n: int, dim_z: int, truncation: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """(n, dim_z) standard normal z on the CPU with entries |z| > truncation resampled; truncation 0 = none.

    Uses models.sampling.truncated_normal when the models package provides it.
    """
    threshold = float(truncation) if truncation and truncation > 0 else None
    try:
        from models.sampling import truncated_normal as models_truncated_normal
    except ImportError:  # pragma: no cover - the models package ships it
        models_truncated_normal = None
    if models_truncated_normal is not None:
        return models_truncated_normal(n, dim_z, threshold, generator=generator, device="cpu")
    z = torch.randn(n, dim_z, generator=generator)
    if threshold is not None:
        while (bad := z.abs() > threshold).any():
            z[bad] = torch.randn(int(bad.sum()), generator=generator)
    return z


def balanced_labels(n: int, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """n labels, each class ceil/floor(n / num_classes) times, in random order."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]


def _param_of(G: nn.Module) -> Tensor | None:
    return next(iter(G.parameters()), None)


@torch.no_grad()
def generate(
    G: nn.Module,
    *,
    num_classes: int,
    dim_z: int,
    num_samples: int,
    batch_size: int,
    truncation: float = 0.0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    labels: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (images float32 in [-1, 1] on `device`, labels on the CPU) batches from G in eval mode."""
    gen = torch.Generator().manual_seed(int(seed))
    y_all = balanced_labels(num_samples, num_classes, gen) if labels is None else torch.as_tensor(labels).long()
    z_all = truncated_normal(num_samples, dim_z, truncation, gen)
    param = _param_of(G)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = G.training
    G.eval()
    try:
        for start in range(0, num_samples, batch_size):
            z = z_all[start:start + batch_size].to(device, dtype)
            y = y_all[start:start + batch_size]
            images = G(z, y.to(device)).float().clamp_(-1.0, 1.0)
            yield images, y
    finally:
        G.train(was_training)


def _load_ref(ref_stats: ReferenceStats | str | os.PathLike) -> ReferenceStats:
    return ref_stats if isinstance(ref_stats, ReferenceStats) else ReferenceStats.load(ref_stats)


def evaluate_generator(
    G: nn.Module,
    *,
    num_classes: int,
    dim_z: int,
    num_samples: int,
    batch_size: int,
    extractor: FeatureExtractor,
    ref_stats: ReferenceStats | str | os.PathLike,
    truncation: float = 0.0,  # |z| threshold; 0 = no truncation
    device: str | torch.device = "cpu",
    seed: int = 0,
    is_splits: int = DEFAULT_SPLITS,
    pr_k: int = DEFAULT_K,
    pr_samples: int = DEFAULT_PR_SAMPLES,  # generated/real feature rows compared for precision/recall
) -> dict[str, float]:
    """{'fid', 'is_mean', 'is_std', 'precision', 'recall'} for num_samples class-balanced samples of G.

    is_mean/is_std are present when the extractor has logits; precision/recall when ref_stats keeps feature
    rows (both sets are cut to the same size, at most pr_samples). Non-finite images give NaN metrics.
    """
    ref = _load_ref(ref_stats)
    if ref.extractor != extractor.name:
        raise ValueError(f"reference statistics were made with {ref.extractor!r}, not the extractor {extractor.name!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    stats, logits, kept = FeatureStats(), [], []
    finite = True
    batches = generate(G, num_classes=num_classes, dim_z=dim_z, num_samples=num_samples, batch_size=batch_size,
                       truncation=truncation, device=device, seed=seed)
    with contextlib.closing(batches):
        for images, _ in batches:
            if not torch.isfinite(images).all():
                finite = False
                break
            feats, lg = extractor.features_and_logits(images)
            stats.update(feats.numpy())
            if lg is not None:
                logits.append(lg.numpy())
            if sum(len(k) for k in kept) < pr_samples:
                kept.append(feats.numpy())
    if not finite:
        logger.warning("generator produced non-finite images; reporting NaN metrics")
        nan = {"fid": math.nan, "precision": math.nan, "recall": math.nan}
        return {**nan, **({"is_mean": math.nan, "is_std": math.nan} if extractor.has_logits else {})}

    out = {"fid": frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)}
    if logits:
        out["is_mean"], out["is_std"] = inception_score(np.concatenate(logits), splits=is_splits)
    if ref.features is not None:
        fake = np.concatenate(kept)
        n = min(len(fake), len(ref.features), pr_samples)
        if n > pr_k:
            out["precision"], out["recall"] = precision_recall(ref.features[:n], fake[:n], pr_k, device=device)
        else:
            logger.warning("precision/recall skipped: %d samples is not more than k=%d", n, pr_k)
    return out


def truncation_sweep(
    G: nn.Module,
    thresholds: Sequence[float],
    *,
    num_classes: int,
    dim_z: int,
    num_samples: int,
    batch_size: int,
    extractor: FeatureExtractor,
    ref_stats: ReferenceStats | str | os.PathLike,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **kwargs,
) -> list[dict[str, float]]:
    """evaluate_generator at each truncation threshold (same seed, so the same underlying draws).

    Returns [{'truncation': t, 'fid': ..., 'is_mean': ..., ...}, ...] in the order given.
    """
    ref = _load_ref(ref_stats)
    results = []
    for t in thresholds:
        metrics = evaluate_generator(
            G, num_classes=num_classes, dim_z=dim_z, num_samples=num_samples, batch_size=batch_size,
            extractor=extractor, ref_stats=ref, truncation=t, device=device, seed=seed, **kwargs,
        )
        results.append({"truncation": float(t), **metrics})
        logger.info("truncation %.3g: %s", t, metrics)
    return results
