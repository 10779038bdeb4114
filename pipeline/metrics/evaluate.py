"""Evaluate a conditional generator: FID, Inception Score, precision/recall; truncation sweeps.

G is a plain nn.Module, G(z, y) -> images in [-1, 1]; it runs in eval mode under no_grad and its previous
train/eval mode is restored. Run standing statistics on it first if it was trained with batch norm
(models.sampling.standing_stats). Latents come from a CPU generator seeded with `seed`, so the same seed
gives the same z and y on every device, and a truncation sweep compares thresholds on the same draws.

Over a data-parallel group (`group`, a Collective), each rank generates and embeds its contiguous share of
the global sample indices: every rank draws the whole (cheap) set of z and y and keeps its slice, so sample i
is the same whatever the world size. What each metric needs from the ranks:

  FID            feature sums and sums of outer products, all-reduced (FeatureStats.all_reduce)
  IS             per-split sums of p(y|x) and p log p, all-reduced (InceptionScoreStats.all_reduce)
  precision/     the features of the first pr_samples samples, gathered on every rank; the k-NN radii and
  recall         coverage counts are then split over the ranks again (precision_recall(group=...))

and every rank computes the same numbers from the same reduced statistics. CAS (cas.py) trains one classifier on
all generated images: the ranks share the sampling, rank 0 trains it.
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

from pipeline.metrics.collective import LOCAL, Collective
from pipeline.metrics.extractors import FeatureExtractor
from pipeline.metrics.frechet import FeatureStats, frechet_distance
from pipeline.metrics.inception_score import DEFAULT_SPLITS, InceptionScoreStats
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


# G's forward on a CPU in pieces of this many samples: the demo's G takes 2.7-3.1 ms an image in batches of 25-32
# and 5.4-8.0 ms in batches of 250, whose activations overflow the caches (bench/RESULTS.md, "Session 19")
CPU_SAMPLE_CHUNK = 32


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
    start: int = 0,  # only the samples with global index in [start, stop): one rank's share
    stop: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (images float32 in [-1, 1] on `device`, labels on the CPU) batches from G in eval mode.

    Sample i is the same for any [start, stop) that holds it: the whole set of z and y is drawn, then sliced.
    """
    gen = torch.Generator().manual_seed(int(seed))
    y_all = balanced_labels(num_samples, num_classes, gen) if labels is None else torch.as_tensor(labels).long()
    z_all = truncated_normal(num_samples, dim_z, truncation, gen)
    stop = num_samples if stop is None else min(stop, num_samples)
    param = _param_of(G)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = G.training
    G.eval()
    chunk = CPU_SAMPLE_CHUNK if torch.device(device).type == "cpu" else batch_size
    try:
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            # G in eval mode treats samples alone, so chunks change no image; their bounds are multiples of the
            # chunk in global indices, the same on any rank layout (last bits can depend on the batch's size)
            bounds = [lo, *range((lo // chunk + 1) * chunk, hi, chunk), hi]
            images = torch.cat([G(z_all[a:b].to(device, dtype), y_all[a:b].to(device)).float()
                                for a, b in zip(bounds, bounds[1:])]).clamp_(-1.0, 1.0)
            yield images, y_all[lo:hi]
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
    pr_spaces: Sequence[tuple[FeatureExtractor, ReferenceStats]] = (),  # more feature spaces for precision/recall
    group: Collective = LOCAL,  # the ranks that share the work; every one of them calls this
) -> dict[str, float]:
    """{'fid', 'is_mean', 'is_std', 'precision_<space>', 'recall_<space>'} for num_samples class-balanced samples.

    <space> names the features precision/recall ran in (extractor.space: "inception", "classifier", and one
    pair more per entry of pr_spaces, e.g. "vgg16", each with real features kept in its ReferenceStats).
    is_mean/is_std are present when the extractor has logits; precision/recall when the reference keeps feature
    rows: in the extractor's space both sets are cut to the same size (at most pr_samples); in a pr_spaces
    space all the kept real rows face the first pr_samples generated ones, as NVIDIA's pr50k3 (200k real
    images at most against 50k generated) does. Non-finite images give NaN metrics. With several
    ranks every rank returns the same numbers; a failure on any rank raises RankFailed on every rank.
    """
    ref = _load_ref(ref_stats)
    if ref.extractor != extractor.name:
        raise ValueError(f"reference statistics were made with {ref.extractor!r}, not the extractor {extractor.name!r}")
    for ex, r in pr_spaces:
        if r.extractor != ex.name or r.features is None:
            raise ValueError(f"precision/recall in {ex.name!r} needs real {ex.name!r} features, got {r.extractor!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    spaces = [(extractor, ref), *pr_spaces]
    pr_n = min(num_samples, pr_samples)  # the generated rows precision/recall use: global indices < pr_n
    lo, hi = group.share(num_samples)
    stats = FeatureStats()
    is_stats = InceptionScoreStats(num_samples, is_splits) if extractor.has_logits else None
    kept: list[list[np.ndarray]] = [[] for _ in spaces]
    finite, error = True, None
    try:
        batches = generate(G, num_classes=num_classes, dim_z=dim_z, num_samples=num_samples, batch_size=batch_size,
                           truncation=truncation, device=device, seed=seed, start=lo, stop=hi)
        with contextlib.closing(batches):
            index = lo  # global index of the batch's first sample
            for images, _ in batches:
                if not torch.isfinite(images).all():
                    finite = False
                    break
                feats, lg = extractor.features_and_logits(images)
                stats.update(feats.numpy())
                if is_stats is not None and lg is not None:
                    is_stats.update(lg.numpy(), start=index)
                take = max(0, min(pr_n - index, images.shape[0]))
                if take:
                    kept[0].append(feats[:take].numpy())
                    for rows, (ex, _) in zip(kept[1:], spaces[1:]):
                        rows.append(ex.features(images[:take]).numpy())
                index += images.shape[0]
    except Exception as err:  # noqa: BLE001 - every rank must learn of it (raise_if_failed), or the others hang
        error = err
    group.raise_if_failed(error)
    if not group.all_true(finite):
        logger.warning("generator produced non-finite images; reporting NaN metrics")
        out = {"fid": math.nan}
        if extractor.has_logits:
            out |= {"is_mean": math.nan, "is_std": math.nan}
        for ex, r in spaces:
            if r.features is not None:
                out |= {f"precision_{ex.space}": math.nan, f"recall_{ex.space}": math.nan}
        return out

    stats = stats.all_reduce(group)
    out = {"fid": frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)}
    if is_stats is not None and group.all_true(is_stats.p_sum is not None or lo == hi):
        out["is_mean"], out["is_std"] = is_stats.all_reduce(group).score()
    for i, (rows, (ex, r)) in enumerate(zip(kept, spaces)):
        if r.features is None:
            continue
        fake = group.gather_rows(np.concatenate(rows) if rows else np.zeros((0, 0), np.float32))
        # the main space compares equal numbers of rows; pr_spaces follow pr50k3: every kept real row against
        # the first pr_samples generated ones
        n_real = min(len(fake), len(r.features), pr_samples) if i == 0 else len(r.features)
        n_fake = min(len(fake), pr_samples) if i else n_real
        if min(n_real, n_fake) > pr_k:
            out[f"precision_{ex.space}"], out[f"recall_{ex.space}"] = precision_recall(
                r.features[:n_real], fake[:n_fake], pr_k, device=device, group=group)
        else:
            logger.warning("precision/recall (%s) skipped: %d samples is not more than k=%d", ex.space,
                           min(n_real, n_fake), pr_k)
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
