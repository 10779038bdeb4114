"""Wrap G and D in two DeepSpeed engines (data parallel, ZeRO 0/1, bf16 on GPU, fp32 on CPU).

Each engine gets its own config dict and a plain torch Adam: DeepSpeed's own `{"type": "Adam"}` compiles
FusedAdam for minutes on CPU (STACK-NOTES), and torch's fused Adam is as fast on GPU.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from pipeline.config import RunConfig, grad_accumulation_steps

log = logging.getLogger(__name__)


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    if cfg.train.precision == "bf16":
        return True
    if cfg.train.precision == "fp32":
        return False
    return device.type == "cuda"


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
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def build_engines(cfg: RunConfig, G: nn.Module, D: nn.Module, device: torch.device, world_size: int):
    """Returns (g_engine, d_engine). Call on every rank after the process group exists."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    bf16 = use_bf16(cfg, device)
    G, D = G.to(device), D.to(device)
    if cfg.train.compile:
        # in place, so both the engines and direct module calls (D in the G step, R1) run compiled code
        G.compile()
        D.compile()
    engines = []
    for model, lr in ((G, cfg.optim.g_lr), (D, cfg.optim.d_lr)):
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=adam(model.parameters(), lr, cfg, device),
            config=ds_config(cfg, world_size, bf16),
            dist_init_required=False,
        )
        engines.append(engine)
    return engines[0], engines[1]
