"""Failures provoked on purpose, to prove that detection and recovery work: a training collapse and a dying worker.

Both act on a live `Trainer` and are off unless asked for (`inject_collapse_at`, BIGGAN_FAIL_ONCE_AT).
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline.engines import scale_weight_

log = logging.getLogger(__name__)

COLLAPSE_WEIGHT_SCALE = 25.0  # G's first layer
COLLAPSE_D_LR_SCALE = 100.0


@torch.no_grad()
def inject_collapse(trainer) -> None:
    """Blow up G's first layer and D's learning rate. The weight is scaled in the optimizer's fp32 masters too:
    under bf16 (and ZeRO 1) DeepSpeed copies the masters back into the module at the next step, which would
    undo a change made to the module alone."""
    trainer.injected = True
    scale_weight_(trainer.g_engine, "linear.weight", COLLAPSE_WEIGHT_SCALE)
    for group in trainer.d_engine.optimizer.param_groups:
        group["lr"] *= COLLAPSE_D_LR_SCALE
    log.warning("rank %d: injected a collapse at step %d", trainer.rank, trainer.step)


def fail_once(trainer) -> None:
    """Kill this process (the last rank) once at `trainer.fail_once_at = (step, flag file)`, as a crashed
    worker would die; the flag file keeps the restarted worker alive."""
    if not trainer.fail_once_at or trainer.step != trainer.fail_once_at[0] or trainer.rank != trainer.world_size - 1:
        return
    flag = trainer.fail_once_at[1]
    if not flag.exists():
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text(str(trainer.step))
        log.error("rank %d: dying on purpose at step %d (BIGGAN_FAIL_ONCE_AT)", trainer.rank, trainer.step)
        os._exit(1)
