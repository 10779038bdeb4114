"""Orthogonal regularization: value and gradient on hand-computed matrices, and what it covers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_generator
from models.regularization import orthogonal_penalty


class _Toy(nn.Module):
    """A shared embedding (excluded), a linear layer with bias (bias excluded) and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(3, 2)
        self.linear = nn.Linear(2, 2)
        self.conv = nn.Conv2d(2, 3, kernel_size=1, bias=False)
        self.gain = nn.Parameter(torch.ones(4))
        with torch.no_grad():
            self.shared.weight.copy_(torch.tensor([[1.0, 5.0], [2.0, 7.0], [3.0, 1.0]]))
            self.linear.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            self.linear.bias.copy_(torch.tensor([10.0, -10.0]))
            # (3 filters, fan-in 2): more filters than fan-in, the other code path.
            self.conv.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]).view(3, 2, 1, 1))


def test_value_and_gradient_match_hand_computation():
    toy = _Toy()
    beta = 1e-4
    penalty = orthogonal_penalty(toy, beta=beta)
    # linear: W W^T = [[5, 11], [11, 25]] -> off-diagonal squares 2 * 11^2 = 242.
    # conv filters (1,0), (1,1), (0,2): dot products 1, 0, 2 -> 2 * (1 + 0 + 4) = 10.
    assert penalty.dim() == 0 and penalty.requires_grad
    assert penalty.item() == pytest.approx(beta * (242 + 10), rel=1e-6)

    penalty.backward()
    # d/dW = 4 * beta * (W W^T with zero diagonal) @ W.
    torch.testing.assert_close(toy.linear.weight.grad, 4 * beta * torch.tensor([[33.0, 44.0], [11.0, 22.0]]))
    torch.testing.assert_close(toy.conv.weight.grad.view(3, 2),
                               4 * beta * torch.tensor([[1.0, 1.0], [1.0, 4.0], [2.0, 2.0]]))
    assert toy.shared.weight.grad is None
    assert toy.linear.bias.grad is None and toy.gain.grad is None


def test_orthogonal_filters_cost_nothing_and_beta_scales():
    toy = _Toy()
    with torch.no_grad():
        toy.linear.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -2.0]]))  # orthogonal, not orthonormal
        toy.conv.weight.zero_()
    assert orthogonal_penalty(toy).item() == 0.0
    with torch.no_grad():
        toy.linear.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))  # one product of 1
    assert orthogonal_penalty(toy, beta=0.5).item() == pytest.approx(0.5 * 2.0)


def test_generator_penalty_reaches_every_weight_but_the_shared_embedding():
    torch.manual_seed(0)
    G = build_generator("biggan", 32, 5, ch=8, shared_dim=8)
    with torch.no_grad():
        for p in G.parameters():
            if p.dim() >= 2:
                p.add_(0.1 * torch.randn_like(p))  # leave orthogonal init
    penalty = orthogonal_penalty(G)
    assert penalty.item() > 0
    penalty.backward()
    assert G.shared.weight.grad is None
    for name, p in G.named_parameters():
        if p.dim() >= 2 and not name.startswith("shared"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif p.dim() < 2:
            assert p.grad is None, name
