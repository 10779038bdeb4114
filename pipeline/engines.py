"""Wrap G and D in two DeepSpeed engines (data parallel, ZeRO 0/1, bf16 or fp32 as pipeline/performance.py decides).

Each engine gets its own config dict and a plain torch Adam: DeepSpeed's own `{"type": "Adam"}` compiles
FusedAdam for minutes on CPU (STACK-NOTES), and torch's fused Adam is as fast on GPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import process_group
from pipeline.config import RunConfig, grad_accumulation_steps
from pipeline.performance import resolve

log = logging.getLogger(__name__)


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    return resolve(cfg, device).bf16.on


def ds_config(cfg: RunConfig, world_size: int, bf16: bool) -> dict:
    accum = grad_accumulation_steps(cfg)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.data.batch_size * accum * world_size,
        "zero_optimization": {"stage": cfg.optim.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def adam(params, lr: float, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": lr, "betas": (cfg.optim.beta1, cfg.optim.beta2), "eps": cfg.optim.eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.Adam([p for p in params if p.requires_grad], **kwargs)


def init_single_process_group() -> None:
    """World size 1 over gloo for in-process training (benchmarks, tests): a file rendezvous, so nothing listens
    on a port, and gloo pinned to the loopback interface."""
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "GLOO_SOCKET_IFNAME": "lo"})
        store = tempfile.NamedTemporaryFile(prefix="pg-", delete=False).name
        process_group.join("gloo", init_method=f"file://{store}", rank=0, world_size=1)


# printed (not logged) by DeepSpeed's comm backend in every worker when its CPU shared-memory op loads
DS_SHM_BANNER = re.compile(r"^DeepSpeed \S+ built successfully$")


@contextlib.contextmanager
def _without_ds_banner() -> Iterator[None]:
    """Standard output without DeepSpeed's op banner; anything else printed meanwhile is passed on."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [line for line in buf.getvalue().splitlines() if not DS_SHM_BANNER.match(line.strip())]
        if kept:
            print("\n".join(kept), flush=True)


def build_engines(cfg: RunConfig, G: nn.Module, D: nn.Module, device: torch.device, world_size: int):
    """Returns (g_engine, d_engine). Call on every rank after the process group exists."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    plan = resolve(cfg, device)
    bf16 = plan.bf16.on
    G, D = G.to(device), D.to(device)
    if plan.compile.on:
        # in place, so both the engines and direct module calls (D in the G step, R1) run compiled code
        G.compile()
        D.compile()
    engines = []
    for model, lr in ((G, cfg.optim.g_lr), (D, cfg.optim.d_lr)):
        with _without_ds_banner():
            engine, *_ = deepspeed.initialize(
                model=model,
                optimizer=adam(model.parameters(), lr, cfg, device),
                config=ds_config(cfg, world_size, bf16),
                dist_init_required=False,
            )
        engines.append(engine)
    return engines[0], engines[1]


# -- what lives inside the engines: fp32 master weights and Adam's state -----------------------------------------
@dataclass
class MasterSlice:
    """The part of one parameter whose fp32 master weights this rank holds: flat elements [start, start + numel)
    of the parameter, and `master`, a view of them inside the optimizer's fp32 partition (updated in place)."""

    start: int
    numel: int
    master: torch.Tensor


def master_slices(engine) -> dict[str, MasterSlice | None] | None:
    """Where the optimizer keeps its own fp32 copy of the weights: each trained parameter's slice of it on this
    rank (None: another rank holds all of it); None when the optimizer steps the module's parameters themselves
    (ZeRO 0 in fp32).

    DeepSpeed 0.19.8 picks the optimizer wrapper from the ZeRO stage and the dtypes, and copies the masters
    into the module after each step:
    - ZeRO 0 + bf16 (bf16 gradient accumulation, our config): `FP16_UnfusedOptimizer`, one whole fp32 copy
      per parameter on every rank (`fp32_groups`, parallel to `fp16_groups`);
    - ZeRO 1 in any precision: `DeepSpeedZeroOptimizer`, flat fp32 partitions, one per data-parallel rank
      (`single_partition_of_fp32_groups`);
    - bf16 with fp32 gradient accumulation: `BF16_Optimizer`, partitioned the same way.
    The partitioned ones link each module parameter to its piece as `param._hp_mapping` (DeepSpeed's own
    `safe_get_full_fp32_param` reads it too); the links are rebuilt when a checkpoint loads, so look them up
    again after that rather than keeping them.
    """
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        whole = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
        return {name: MasterSlice(0, p.numel(), whole[id(p)].view(-1))
                for name, p in engine.module.named_parameters() if id(p) in whole}
    groups = getattr(opt, "bf16_groups", None) or getattr(opt, "bit16_groups", None)
    if groups is None:
        if engine.bfloat16_enabled():
            raise RuntimeError(f"bf16 engine with an unknown optimizer {type(opt).__name__}: no fp32 masters found")
        return None
    trained = {id(p) for group in groups for p in group}
    out: dict[str, MasterSlice | None] = {}
    for name, p in engine.module.named_parameters():
        if id(p) not in trained:
            continue
        link = getattr(p, "_hp_mapping", None)
        out[name] = None if link is None else MasterSlice(
            link.lp_fragment_address.start, link.lp_fragment_address.numel, link.hp_fragment
        )
    return out


def fp32_master_slices(engine) -> dict[str, MasterSlice | None] | None:
    """`master_slices` under bf16, where the module's weights are only a rounding of the masters; None in fp32
    runs, where the module's (whole, all-gathered) weights equal them."""
    return master_slices(engine) if engine.bfloat16_enabled() else None


@torch.no_grad()
def scale_weight_(engine, name: str, factor: float) -> None:
    """Multiply one parameter by `factor` in the module and in the optimizer's master copy (if it keeps one),
    so the change survives the next step's master-to-module copy."""
    dict(engine.module.named_parameters())[name].mul_(factor)
    piece = (master_slices(engine) or {}).get(name)
    if piece is not None:
        piece.master.mul_(factor)


def reset_adam(engine) -> int:
    """Forget everything Adam knows (both moments and the step count), so its next update is a first step
    (|update| = lr per element for beta1 = 0); returns how many parameter states were reset.

    Zeroing only the moments would keep bias correction near 1 and make the next step sqrt(1 / (1 - beta2))
    times too large (about 32x at beta2 0.999). Tensors are reset in place, not dropped: DeepSpeed links its
    checkpoint views to them.
    """
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in opt.state.values():
        for key, value in list(state.items()):
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = type(value)(0)
    return len(opt.state)
