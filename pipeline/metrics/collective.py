"""Metric work shared by the ranks of a data-parallel group: who takes which samples, and the few collectives
the metrics need.

    group = Collective(rank, world_size, device)      # or Collective() for one process (no torch.distributed)
    lo, hi = group.share(num_samples)                 # this rank's contiguous slice of the global sample indices
    total = group.sum(local_sums)                     # float64 arrays, added over ranks
    rows = group.gather_rows(local_rows)              # every rank's rows, in rank order (= global index order)
    group.raise_if_failed(error)                      # after local work: every rank raises if any rank failed
    out = group.on_rank0(train)                       # train() on rank 0 alone, with this node's cores; out on all

With one process every call is a no-op, so single-process metrics run the very same code. Tensors that travel
live on `device`: the CPU for gloo, the rank's GPU for NCCL (its `torch.cuda.current_device()` must be that GPU,
as it is in a training process). Collectives are only called where every rank reaches them in the same order;
a rank whose local work fails must still call `raise_if_failed`, which is what keeps the others from waiting
forever.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


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

    def on_rank0(self, work: Callable[[], T]) -> T:
        """work() on rank 0 alone, its (picklable) result on every rank; every rank calls this, and a failure on
        rank 0 raises on all. On a CPU, rank 0 borrows the threads of its node's other ranks, which wait here."""
        result, error = None, None
        if self.rank == 0:
            try:
                with node_threads(self.device, self.world_size):
                    result = work()
            except Exception as err:  # noqa: BLE001 - the other ranks must hear of it
                error = err
        self.raise_if_failed(error)
        return self.broadcast(result)


@contextlib.contextmanager
def node_threads(device: torch.device, world_size: int) -> Iterator[int]:
    """Within the block, torch on this CPU rank runs on the threads of every rank of its node (LOCAL_WORLD_SIZE
    ranks, as Ray Train and torchrun set it), at most the cores this process may use: for work one rank does
    while the node's others block in a collective. Yields the thread count; a no-op on GPUs and for one process.
    A small CNN's training takes 10.8 s an epoch on one thread and 5.3 s on two (bench/RESULTS.md, "Session 19")."""
    before = torch.get_num_threads()
    local_ranks = min(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), world_size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = min(before * max(local_ranks, 1), cores)
    if device.type != "cpu" or threads <= before:
        yield before
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


LOCAL = Collective()
