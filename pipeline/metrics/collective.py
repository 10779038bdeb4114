"""Metric work shared by the ranks of a data-parallel group: who takes which samples, and the few collectives
the metrics need.

    group = Collective(rank, world_size, device)      # or Collective() for one process (no torch.distributed)
    lo, hi = group.share(num_samples)                 # this rank's contiguous slice of the global sample indices
    total = group.sum(local_sums)                     # float64 arrays, added over ranks
    rows = group.gather_rows(local_rows)              # every rank's rows, in rank order (= global index order)
    group.raise_if_failed(error)                      # after local work: every rank raises if any rank failed

With one process every call is a no-op, so single-process metrics run the very same code. Tensors that travel
live on `device`: the CPU for gloo, the rank's GPU for NCCL (its `torch.cuda.current_device()` must be that GPU,
as it is in a training process). Collectives are only called where every rank reaches them in the same order;
a rank whose local work fails must still call `raise_if_failed`, which is what keeps the others from waiting
forever.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Metric work failed on at least one rank; raised on every rank, naming each failed rank and why."""


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass(frozen=True)
class Collective:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collective tensors live
    group: Any = None  # a torch.distributed process group; None = the default (world) group

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a group of world size {self.world_size}")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, n: int) -> tuple[int, int]:
        """[lo, hi): this rank's contiguous part of n items; parts differ in size by at most one, rank order."""
        lo = self.rank * n // self.world_size
        return lo, (self.rank + 1) * n // self.world_size

    # -- collectives (identity for one process) -----------------------------------------------------------------
    def sum(self, array: np.ndarray | float) -> np.ndarray:
        """The float64 sum over ranks of an array of the same shape on every rank."""
        a = np.asarray(array, dtype=np.float64)
        if not self.distributed:
            return a
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy().reshape(a.shape)

    def max(self, value: float) -> float:
        """The largest of the ranks' values."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff flag is true on every rank."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item() > 0.5)

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's (n_r, D) rows concatenated in rank order. n_r may differ and be 0 (such a rank may pass
        any empty array of the same dtype); D is taken from the ranks that have rows."""
        local = np.asarray(rows)
        if not self.distributed:
            return local
        if local.shape[0] and local.ndim != 2:
            raise ValueError(f"gather_rows takes (N, D) rows, got shape {local.shape}")
        sizes = torch.zeros(self.world_size, 2, dtype=torch.int64, device=self.device)
        sizes[self.rank, 0] = local.shape[0]
        sizes[self.rank, 1] = local.shape[1] if local.shape[0] else 0
        dist.all_reduce(sizes, group=self.group)
        counts, widths = sizes[:, 0].tolist(), {w for n, w in sizes.tolist() if n}
        if not widths:
            return local.reshape(0, 0)
        if len(widths) > 1:
            raise ValueError(f"ranks hold rows of different widths: {sorted(widths)}")
        width, most = widths.pop(), max(counts)
        dtype = torch.from_numpy(np.zeros(0, local.dtype)).dtype
        padded = torch.zeros(most, width, dtype=dtype, device=self.device)
        if local.shape[0]:
            padded[: local.shape[0]] = torch.from_numpy(np.ascontiguousarray(local)).to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, counts)])

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """src's picklable object on every rank (others pass anything, e.g. None)."""
        if not self.distributed:
            return obj
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == src else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=src, group=self.group)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buf, src=src, group=self.group)
        return obj if self.rank == src else pickle.loads(buf.cpu().numpy().tobytes())

    def raise_if_failed(self, error: BaseException | None) -> None:
        """Every rank calls this after a stretch of local work, with the exception it caught (or None).

        One process: re-raises its own error. Several: if any rank failed, every rank raises RankFailed naming
        each failed rank and its reason (chained to this rank's own error, if it had one).
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        if self.all_true(error is None):
            return
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, _reason(error) if error is not None else "", group=self.group)
        failed = "; ".join(f"rank {r}: {msg}" for r, msg in enumerate(gathered) if msg)
        raise RankFailed(failed) from error


LOCAL = Collective()
