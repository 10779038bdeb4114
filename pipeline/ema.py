"""Exponential moving average of G's weights (the G that samples and evaluations use)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps an fp32 copy of G. Before `start_step` the copy tracks G exactly; after it, it decays."""

    def __init__(self, model: nn.Module, decay: float, start_step: int):
        self.decay = decay
        self.start_step = start_step
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay if step >= self.start_step else 0.0
        src = dict(model.named_parameters())
        for name, p in self.model.named_parameters():
            p.lerp_(src[name].detach().float(), 1.0 - decay)
        # NOTE: buffers (BN running stats, SN vectors) are copied, not averaged, as in BigGAN-PyTorch
        src_b = dict(model.named_buffers())
        for name, b in self.model.named_buffers():
            b.copy_(src_b[name])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
