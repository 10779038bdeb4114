"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

Same conventions as torch-fidelity (and, up to the shuffle, the original improved-gan code): logits are
turned into class probabilities with a softmax in float64, the samples are shuffled with a fixed seed and
cut into `splits` equal chunks (chunk i is rows [i*N//splits, (i+1)*N//splits)), p(y) is each chunk's mean
prediction, and the result is the mean and population standard deviation of the per-chunk scores.
For Inception these logits are the 1008-way output without its bias, as torch-fidelity's default
('logits_unbiased') and NVIDIA's StyleGAN metrics use.

The score is a function of per-split sums: with m = mean of p over the split, the split's mean KL is
mean(sum_y p log p) - sum_y m log m. `InceptionScoreStats` accumulates those sums for samples given by their
global index (which fixes their split), so ranks that each see a part of the samples add their sums
(`all_reduce`) and get exactly the score of all samples together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.metrics.collective import Collective

DEFAULT_SPLITS = 10
DEFAULT_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(
    logits: np.ndarray,
    splits: int = DEFAULT_SPLITS,
    shuffle: bool = True,
    seed: int = DEFAULT_SHUFFLE_SEED,
) -> tuple[float, float]:
    """(mean, std) of the Inception Score of (N, C) logits (or log-probabilities).

    With fewer than `splits` samples the number of splits drops to N, so that no chunk is empty.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"logits must be (N, C) with N > 0, got shape {x.shape}")
    stats = InceptionScoreStats(x.shape[0], splits=splits, shuffle=shuffle, seed=seed)
    stats.update(x, start=0)
    return stats.score()


class InceptionScoreStats:
    """Per-split sums of the Inception Score of `num_samples` samples, fed in any order and in parts.

    Sample i (its global index) lands in the split that `inception_score` puts row i of all logits in.
    """

    def __init__(self, num_samples: int, splits: int = DEFAULT_SPLITS, shuffle: bool = True,
                 seed: int = DEFAULT_SHUFFLE_SEED):
        n = int(num_samples)
        if n <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.splits = n, max(1, min(int(splits), n))
        order = np.random.RandomState(seed).permutation(n) if shuffle else np.arange(n)
        position = np.empty(n, np.int64)
        position[order] = np.arange(n)  # after the shuffle, sample order[j] sits at row j
        bounds = np.array([i * n // self.splits for i in range(self.splits + 1)])
        self.split_of = np.searchsorted(bounds, position, side="right") - 1
        self.count = np.zeros(self.splits)
        self.p_sum: np.ndarray | None = None  # (splits, C): sum of p(y|x)
        self.plogp_sum = np.zeros(self.splits)  # sum of sum_y p log p

    def update(self, logits: np.ndarray, start: int) -> None:
        """Logits (B, C) of the samples with global indices start, ..., start + B - 1."""
        x = np.asarray(logits, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"logits must be (N, C), got shape {x.shape}")
        if start < 0 or start + x.shape[0] > self.num_samples:
            raise ValueError(f"samples {start}..{start + x.shape[0] - 1} are outside 0..{self.num_samples - 1}")
        if self.p_sum is None:
            self.p_sum = np.zeros((self.splits, x.shape[1]))
        split = self.split_of[start:start + x.shape[0]]
        log_p = _log_softmax(x)
        p = np.exp(log_p)
        plogp = (p * log_p).sum(axis=1)
        # rows grouped by split, then one summed run per split (np.add.at on (B, C) rows is far slower)
        order = np.argsort(split, kind="stable")
        grouped = split[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(grouped) else np.zeros(0, int)
        if len(starts) == 0:
            return
        ids = grouped[starts]
        self.p_sum[ids] += np.add.reduceat(p[order], starts, axis=0)
        self.plogp_sum[ids] += np.add.reduceat(plogp[order], starts)
        self.count[ids] += np.diff(np.r_[starts, len(grouped)])

    def all_reduce(self, group: Collective) -> InceptionScoreStats:
        """Every rank's sums added, in place: the same on every rank (one process: unchanged)."""
        if not group.distributed:
            return self
        classes = int(group.max(self.p_sum.shape[1] if self.p_sum is not None else 0))
        p_sum = self.p_sum if self.p_sum is not None else np.zeros((self.splits, classes))
        packed = group.sum(np.concatenate([self.count, self.plogp_sum, p_sum.ravel()]))
        s = self.splits
        self.count, self.plogp_sum, self.p_sum = packed[:s], packed[s:2 * s], packed[2 * s:].reshape(s, -1)
        return self

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits; every sample must have been added."""
        if self.p_sum is None or self.count.sum() != self.num_samples:
            raise ValueError(f"Inception Score needs all {self.num_samples} samples, has {int(self.count.sum())}")
        m = self.p_sum / self.count[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            mlogm = np.where(m > 0, m * np.log(m), 0.0).sum(axis=1)
        scores = np.exp(self.plogp_sum / self.count - mlogm)
        return float(np.mean(scores)), float(np.std(scores))
