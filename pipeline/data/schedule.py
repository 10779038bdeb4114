"""Which sample every rank reads at every step: a pure function of (manifest counts, seed, epoch, rank).

Every backend reads the order computed here, so ranks are disjoint and equal by construction and a position
(epoch, batch offset) names exactly the same batch whatever the backend, the number of threads, or whether
the loader was restarted in between.

Per epoch e (all ranks compute the same thing):
1. shards in a random order (seed, e); the samples of the set laid end to end in that order;
2. cut to world_size * batches_per_epoch * batch_size samples: drop_last drops the tail (a different tail
   every epoch), otherwise the order wraps around from its start to fill the last batches;
3. rank r takes the r-th contiguous slice, so it streams whole runs of a few shards (cheap from s3);
4. within a rank's slice, samples are shuffled inside windows of `shuffle_window` (seed, e, r, window), the
   way a WebDataset shuffle buffer mixes samples, but reproducibly and addressable by position.
Shards already mix classes (make_shards spreads images over them in a seeded random order).

`excluded` shards (quarantined after a fault, see faults.py) keep their place in the shard permutation and
their global ids, but contribute no samples: the other shards' order is the same with or without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AugParams:
    """Per-sample augmentation draws, shared by all backends so they crop and flip alike."""

    crop_frac: np.ndarray  # float32: crop side as a fraction of the image's short side
    crop_x: np.ndarray  # float32 in [0, 1]: crop position along the free horizontal range
    crop_y: np.ndarray  # float32 in [0, 1]
    flip: np.ndarray  # int32 0/1: mirror horizontally


@dataclass(frozen=True)
class EpochPlan:
    counts: tuple[int, ...]  # samples per shard, manifest order
    batch_size: int
    world_size: int = 1
    seed: int = 0
    drop_last: bool = True
    shuffle_window: int = 4096  # samples shuffled together within a rank's slice
    random_crop: bool = False
    min_crop: float = 0.8  # random_crop: side of the crop drawn from [min_crop, 1] x the short side
    flip: bool = True
    excluded: frozenset[int] = frozenset()  # shard indices (manifest order) left out of the epoch
    _starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        if self.num_samples == 0:
            raise ValueError("the shard set has no samples" + (" left outside quarantine" if self.excluded else ""))
        if self.drop_last and self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} samples cannot fill one batch of {self.batch_size} on each of "
                f"{self.world_size} ranks (use drop_last=False or a smaller batch)"
            )
        if not 0.0 < self.min_crop <= 1.0:
            raise ValueError("min_crop must be in (0, 1]")
        starts = np.zeros(len(self.counts), np.int64)
        starts[1:] = np.cumsum(self.counts)[:-1]
        object.__setattr__(self, "_starts", starts)

    @property
    def num_samples(self) -> int:
        return int(sum(c for i, c in enumerate(self.counts) if i not in self.excluded))

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (the same on all ranks)."""
        per_step = self.world_size * self.batch_size
        return self.num_samples // per_step if self.drop_last else -(-self.num_samples // per_step)

    @property
    def samples_per_rank(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global sample ids (positions in the manifest's shard order) for the whole epoch, all ranks."""
        rng = np.random.default_rng([self.seed, epoch, 0])
        perm = rng.permutation(len(self.counts))
        seq = np.concatenate([np.arange(self._starts[s], self._starts[s] + self.counts[s]) for s in perm
                              if s not in self.excluded])
        total = self.world_size * self.samples_per_rank
        return seq[:total] if total <= len(seq) else np.resize(seq, total)

    def rank_order(self, epoch: int, rank: int) -> np.ndarray:
        """Global sample ids rank `rank` reads in epoch `epoch`, in reading order (len samples_per_rank)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size {self.world_size}")
        n = self.samples_per_rank
        mine = self.epoch_order(epoch)[rank * n : (rank + 1) * n].copy()
        rng = np.random.default_rng([self.seed, epoch, 1, rank])
        w = max(1, self.shuffle_window)
        for start in range(0, n, w):
            mine[start : start + w] = rng.permutation(mine[start : start + w])
        return mine

    def window_of(self, position: int) -> int:
        return position // max(1, self.shuffle_window)

    def aug_params(self, epoch: int, rank: int, batch: int) -> AugParams:
        """Random crop and flip draws for one batch, from (seed, epoch, rank, batch) alone."""
        n = self.batch_size
        rng = np.random.default_rng([self.seed, epoch, 2, rank, batch])
        flip = rng.integers(0, 2, n).astype(np.int32) if self.flip else np.zeros(n, np.int32)
        if self.random_crop:
            frac = rng.uniform(self.min_crop, 1.0, n).astype(np.float32)
            cx, cy = rng.uniform(0.0, 1.0, (2, n)).astype(np.float32)
        else:  # the center square
            frac, cx, cy = np.ones(n, np.float32), np.full(n, 0.5, np.float32), np.full(n, 0.5, np.float32)
        return AugParams(frac, cx, cy, flip)
