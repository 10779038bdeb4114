"""Truncation-trick sampling and standing statistics."""

from __future__ import annotations

import math

import pytest
import torch

from models import build_generator
from models.layers import StatsBatchNorm
from models.sampling import standing_stats, truncated_normal
from models.spectral import sigma0s


@pytest.mark.parametrize("threshold", [0.04, 0.5, 1.0, 2.0])
def test_truncated_normal_stays_within_threshold_with_the_truncated_distribution(threshold):
    g = torch.Generator().manual_seed(0)
    z = truncated_normal(400, 256, threshold, generator=g)
    assert z.shape == (400, 256) and z.dtype == torch.float32
    assert z.abs().max() <= threshold
    # Resampling beyond the threshold gives N(0, 1) conditioned on |z| <= t, whose variance is
    # 1 - 2 t phi(t) / (2 Phi(t) - 1); clamping instead would pile mass at +-t and inflate it.
    phi = math.exp(-threshold**2 / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(threshold / math.sqrt(2))
    expected_std = math.sqrt(1 - 2 * threshold * phi / mass)
    assert z.std().item() == pytest.approx(expected_std, rel=0.02)
    assert z.mean().abs().item() < 0.02 * threshold
    assert (z.abs() == threshold).float().mean() < 1e-3


def test_truncated_normal_is_reproducible_and_untruncated_without_threshold():
    a = truncated_normal(8, 16, 0.5, generator=torch.Generator().manual_seed(1))
    b = truncated_normal(8, 16, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    z = truncated_normal(1000, 64, None, generator=torch.Generator().manual_seed(2))
    assert z.abs().max() > 3.0  # a plain normal reaches past 3 in 64k draws
    assert truncated_normal(2, 3, 1.0, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="threshold"):
        truncated_normal(2, 3, 0.0)


def test_standing_stats_average_the_batch_statistics_of_the_passes():
    torch.manual_seed(0)
    G = build_generator("biggan", 32, 10, ch=8, shared_dim=8)
    G.train()
    G(torch.randn(4, G.dim_z), torch.randint(10, (4,)))  # some momentum-averaged running stats
    G.eval()
    bn = G.blocks[1][0].bn1
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    sig_before = {k: v.clone() for k, v in sigma0s(G).items()}
    u_before = G.linear.u.clone()

    standing_stats(G, num_passes=5, batch_size=6, generator=torch.Generator().manual_seed(3))
    hook.remove()

    assert len(seen) == 5
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    expected_var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-4, atol=1e-5)
    # Modes and momentum restored; spectral-norm state untouched.
    assert not any(m.training for m in G.modules())
    assert all(m.momentum == 0.1 for m in G.modules() if isinstance(m, StatsBatchNorm))
    assert torch.equal(G.linear.u, u_before)
    assert all(torch.equal(v, sig_before[k]) for k, v in sigma0s(G).items())


def test_standing_stats_change_eval_outputs_and_restore_training_mode():
    torch.manual_seed(0)
    G = build_generator("biggan-deep", 32, 10, ch=4, dim_z=8, shared_dim=8).train()
    z, y = torch.randn(3, 8), torch.tensor([1, 2, 3])
    G.eval()
    with torch.no_grad():
        before = G(z, y)
    G.train()
    standing_stats(G, num_passes=2, batch_size=8, truncation=0.5)
    assert all(m.training for m in G.modules())
    G.eval()
    with torch.no_grad():
        after = G(z, y)
    assert (before - after).abs().max() > 1e-3
