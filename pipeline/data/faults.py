"""Data faults during training: ranks agree on the shards to quarantine, and the run stops past a budget.

A rank meets a fault alone (ranks read disjoint shards), but the schedule must stay the same on every rank.
So a rank only *marks* a shard bad (its samples are then replaced inside their batches, as bad samples
are) and `agree` unions the marks of all ranks in one all-reduce at a step boundary that every rank
reaches (the trainer's log step). An agreed shard is quarantined from the next epoch on: it leaves the
schedule on every rank at the same epoch, so ranks stay disjoint and equal, and the quarantine (shard name
-> first epoch without it) is part of the loader's position, plain types, restored on resume: a restart
neither re-reads the shard nor re-plans differently.

Lost samples (those of quarantined shards, plus the distinct bad samples each rank met, summed over ranks:
an upper bound when two ranks meet the same bad sample in different epochs) may not exceed
`max_bad_fraction` of the set; past it `DataFaultError` names the shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class DataFaultError(RuntimeError):
    """More of the data set is lost than data.max_bad_fraction allows. `metrics` holds the data/* metrics of
    the agreement that broke the budget, so the run's tracking shows why it stopped."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


@dataclass(frozen=True)
class Agreement:
    bad_shards: frozenset[int]  # marked bad on some rank (or quarantined already)
    skipped: int  # samples replaced in yielded batches, all ranks
    bad_samples: int  # distinct bad samples (not counting those of bad shards), summed over ranks


def agree(num_shards: int, bad: set[int], skipped: int, bad_samples: int, device: torch.device,
          world_size: int) -> Agreement:
    """Union of the bad-shard marks and sums of the counts over ranks (one all-reduce on `device`, which
    must be the device of the process group's backend: the training device)."""
    v = np.zeros(num_shards + 2, np.float64)
    v[sorted(bad)] = 1.0
    v[num_shards:] = skipped, bad_samples
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        t = torch.from_numpy(v).to(device)
        dist.all_reduce(t)
        v = t.cpu().numpy()
    return Agreement(frozenset(np.flatnonzero(v[:num_shards] > 0).tolist()), int(v[num_shards]),
                     int(v[num_shards + 1]))


def check_budget(names: list[str], counts: tuple[int, ...], agreed: Agreement, reasons: dict[int, str],
                 max_bad_fraction: float) -> int:
    """Lost samples; raises DataFaultError naming the bad shards when they exceed the budget."""
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    total = sum(counts)
    lost = sum(counts[i] for i in agreed.bad_shards) + agreed.bad_samples
    if lost > max_bad_fraction * total:
        shards = "; ".join(f"{names[i]} ({counts[i]} samples: {reasons.get(i, 'reported by another rank')})"
                           for i in sorted(agreed.bad_shards)) or "none"
        raise DataFaultError(
            f"{lost} of {total} samples lost ({lost / max(total, 1):.2%}), more than data.max_bad_fraction="
            f"{max_bad_fraction}: bad shards: {shards}; bad samples: {agreed.bad_samples}. Fix or remove those "
            "shards (and re-index the set), or raise data.max_bad_fraction.",
            metrics(agreed),
        )
    return lost


def metrics(agreed: Agreement) -> dict[str, float]:
    """The data/* metrics of an agreement (sums over ranks)."""
    return {"data/skipped": float(agreed.skipped), "data/bad_shards": float(len(agreed.bad_shards)),
            "data/bad_samples": float(agreed.bad_samples)}
