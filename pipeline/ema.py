"""G_ema (Brock et al. 2019): an exponential moving average of G's fp32 weights, the G that samples, health
checks, evaluations and checkpoints use.

Three things make it the paper's G_ema rather than a copy of whatever the module holds:
- it averages the fp32 master weights. Under DeepSpeed bf16 the module holds bf16 weights and each rank's
  optimizer holds the fp32 masters of a slice of them (`engines.fp32_master_slices`); each rank averages the
  slice it holds, and `ready()` assembles the whole average (one all-reduce) before anything reads it. In fp32
  runs the module's weights are the masters.
- its spectral norms are estimated for its own weights: `ready()` runs power iterations on the EMA copy's
  u and v (warm-started from its previous ones) instead of borrowing the live G's, which belong to other
  weights. BigGAN-PyTorch gets there by averaging u along with the weights and re-iterating at sampling time.
- batch-norm running statistics are copied from G (evaluation replaces them with standing statistics).

It is built from the device-resident module (after `build_engines`), so the copy lives on the training device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from models.spectral import SpectralNorm, power_iteration_
from pipeline.engines import MasterSlice

SN_BUFFERS = ("u", "v", "sigma0")  # a SpectralNorm layer's own estimate: never copied from G


def strip_engine_hooks(module: nn.Module) -> None:
    """Drop the forward hooks DeepSpeed put on the engine's module (timers, throughput counters, input casts):
    a deep copy keeps them, and they would run the engine's bookkeeping on every EMA forward."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if getattr(fn, "__module__", "").startswith("deepspeed")]:
            del hooks[key]
            for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                          module._forward_hooks_always_called):
                extra.pop(key, None)


class EMA:
    """An fp32 average of `source`'s weights. Before `start_step` the copy tracks G exactly; after it, it decays.

    `masters()` returns `engines.fp32_master_slices` of G's engine (None: average the module's weights).
    Call `ready()` on every rank before reading `model`: it is a collective when the masters are split over
    ranks, and a no-op when nothing changed since the last call.
    """

    def __init__(self, source: nn.Module, decay: float, start_step: int, *,
                 masters: Callable[[], dict[str, MasterSlice | None] | None] | None = None,
                 power_iterations: int = 8):
        if power_iterations < 1:
            raise ValueError(f"ema.sn_itrs: must be > 0, got {power_iterations}")
        self.decay, self.start_step, self.power_iterations = decay, start_step, power_iterations
        self.source = source
        self.masters = masters or (lambda: None)
        self.model = copy.deepcopy(source).float().eval().requires_grad_(False)
        for m in self.model.modules():
            # NOTE: `Module.compile()` keeps a compiled *bound method of the source*: a deep copy would still run G
            m._compiled_call_impl = None
            strip_engine_hooks(m)
        self._sn_buffers = {f"{name}.{b}" if name else b for name, m in self.model.named_modules()
                            if isinstance(m, SpectralNorm) for b in SN_BUFFERS}
        self._split = False  # some averaged slices live on other ranks until ready()
        self._stale = True  # spectral-norm estimates not yet made for the current weights
        self.update(step=0, decay=0.0)  # start from the fp32 masters, not from their bf16 rounding

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def update(self, step: int, decay: float | None = None) -> None:
        if decay is None:
            decay = self.decay if step >= self.start_step else 0.0
        weight = 1.0 - decay
        slices = self.masters()
        src = dict(self.source.named_parameters())
        for name, p in self.model.named_parameters():
            own = src[name]
            if own.device != p.device:
                raise RuntimeError(f"EMA copy of {name} is on {p.device} but G's parameter is on {own.device}: "
                                   "build the EMA from the device-resident module (after build_engines)")
            if slices is None or name not in slices:  # fp32 run, or a parameter the optimizer does not train
                p.lerp_(own.detach().float(), weight)
            elif (piece := slices[name]) is not None:
                p.view(-1).narrow(0, piece.start, piece.numel).lerp_(piece.master.float(), weight)
        # split: this rank lacks some slice; under partitioning every rank does, under replication none does
        self._split = slices is not None and any(
            piece is None or piece.numel < src[name].numel() for name, piece in slices.items()
        )
        src_b = dict(self.source.named_buffers())
        for name, b in self.model.named_buffers():
            if name not in self._sn_buffers:
                b.copy_(src_b[name])
        self._stale = True

    @torch.no_grad()
    def ready(self) -> nn.Module:
        """Assemble the average from every rank's slices and estimate its spectral norms; returns `model`."""
        if self._split:
            self._gather(self.masters())
            self._split = False
        if self._stale:
            for m in self.model.modules():
                if isinstance(m, SpectralNorm):
                    power_iteration_(m, self.power_iterations)
            self._stale = False
        return self.model

    def _gather(self, slices: dict[str, MasterSlice | None]) -> None:
        """Each element is averaged on exactly one rank: the others contribute zeros, so a sum assembles it."""
        params = [(name, p) for name, p in self.model.named_parameters() if name in slices]
        flat = torch.zeros(sum(p.numel() for _, p in params), device=self.device, dtype=torch.float32)
        offset = 0
        for name, p in params:
            piece = slices[name]
            if piece is not None:
                flat.narrow(0, offset + piece.start, piece.numel).copy_(p.view(-1).narrow(0, piece.start, piece.numel))
            offset += p.numel()
        dist.all_reduce(flat)
        offset = 0
        for _, p in params:
            p.view(-1).copy_(flat.narrow(0, offset, p.numel()))
            offset += p.numel()

    def state_dict(self) -> dict:
        """The whole average with its own spectral-norm estimates (call `ready()` first on every rank)."""
        if self._split:
            raise RuntimeError("EMA.state_dict() before ready(): the average is still split over ranks")
        self.ready()
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
        self._split, self._stale = False, False
