"""Cross-replica BatchNorm: G's batch statistics summed over the data-parallel ranks (Brock et al. 2019, Sec. 4).

The models compute batch norm from per-channel sums through a pluggable ``batch_stats`` function
(``models.layers.BatchStats``); this module installs one that all-reduces those sums, so every rank
normalizes with the statistics of the global batch. It is autograd-correct: the backward all-reduces
the gradients of the sums, so the input and parameter gradients equal those of one process
normalizing the concatenated batch (after DeepSpeed's gradient averaging, the loss is the mean over
ranks of each rank's loss).

Which batch the statistics cover: one micro-batch on every rank, i.e. each forward's global batch is
``data.batch_size x cluster.num_workers`` samples. With gradient accumulation every micro-step
normalizes with its own global statistics (the paper's cross-replica BN is per step of one global
micro-batch). All ranks run the same number of G forwards in the same order (the trainer's D and G
steps), which the collective requires.

Copies of G (EMA G, evaluation copies, exported models) do not inherit the reduction: their
train-mode forwards (standing statistics) may run on one rank only and must stay local.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from models.layers import StatsBatchNorm

log = logging.getLogger(__name__)

__all__ = ["CrossReplicaSum", "install_cross_replica_bn", "remove_cross_replica_bn"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of each rank's input is the sum of every rank's output gradient.

    Functional collectives rather than ``dist.all_reduce``: torch.compile traces them into the graph, so G's
    forward stays one graph (an eager collective inside the block loop made dynamo skip the whole forward and
    compile each batch norm alone; found by the H200 check, bench/RESULTS.md "GPU paths"). Our own backward
    rather than the autograd that newer torch registers for them: the GPU image's torch 2.11 may lack it.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return _sum(tensor, group_name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum(grad.contiguous(), ctx.group_name), None


def _sum(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_reduce(tensor, "sum", group_name))


class CrossReplicaSum:
    """A ``BatchStats`` function: fp32 local sums -> the sums over ``group`` (None: the default group).

    Build it after the process group exists.
    """

    def __init__(self, group=None) -> None:
        self.group = group
        self.group_name = (group if group is not None else dist.group.WORLD).group_name

    def __call__(self, local_sums: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(local_sums.float(), self.group_name)

    def __deepcopy__(self, memo) -> None:
        # copies of G normalize locally (see the module docstring)
        return None

    def __repr__(self) -> str:
        return f"CrossReplicaSum(group={self.group!r})"


def install_cross_replica_bn(G: nn.Module, group=None) -> int:
    """Make every BigGAN batch norm of ``G`` normalize with statistics over ``group``; returns how many.

    Call on every rank after the process group exists (after the engines are built: the hook is an
    attribute of the layers, so DeepSpeed's wrapping and in-place ``compile`` keep it).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("model.cross_replica_bn needs an initialized torch.distributed process group")
    reducer = CrossReplicaSum(group)
    norms = [m for m in G.modules() if isinstance(m, StatsBatchNorm)]
    if not norms:
        from pipeline.config import ConfigError

        raise ConfigError(
            f"model.cross_replica_bn: {type(G).__name__} has no BigGAN batch norms to reduce across replicas "
            "(the biggan, biggan-deep and dcgan generators have them); set model.cross_replica_bn=false"
        )
    for m in norms:
        m.batch_stats = reducer
    log.info("cross-replica BatchNorm on %d layers over %d ranks", len(norms), dist.get_world_size(group))
    return len(norms)


def remove_cross_replica_bn(G: nn.Module) -> None:
    """Back to per-rank statistics."""
    for m in G.modules():
        if isinstance(m, StatsBatchNorm):
            m.batch_stats = None
