"""GAN objectives against hand-computed values, the gradient penalty against analytic gradients and per-sample
autograd, label smoothing/flipping rates, and the refused config combinations."""

from __future__ import annotations

import math

import pytest
import torch

from models.dcgan import DCGANDiscriminator
from pipeline.config import ConfigError, RunConfig
from pipeline.losses import (
    acgan_loss,
    bce_targets,
    check_combination,
    d_loss,
    g_loss,
    gradient_penalty,
    mode_seeking_penalty,
    paired_labels,
    r1_penalty,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Hand-computed losses -------------------------------------------------------------------------------------------
def test_hinge_d_loss_matches_hand_computation():
    # real: relu(1 - 0.5) = 0.5, relu(1 - 2) = 0 -> 0.25;  fake: relu(1 - 2) = 0, relu(1 + 0.5) = 1.5 -> 0.75
    loss, parts = d_loss("hinge", t(0.5, 2.0), t(-2.0, 0.5))
    assert loss.item() == pytest.approx(1.0)
    assert parts["d_loss_real"].item() == pytest.approx(0.25)
    assert parts["d_loss_fake"].item() == pytest.approx(0.75)


def test_hinge_and_wgan_g_loss_is_minus_mean_fake_logit():
    assert g_loss("hinge", t(-2.0, 0.5)).item() == pytest.approx(0.75)
    assert g_loss("wgan-gp", t(0.5, 1.5)).item() == pytest.approx(-1.0)


def test_bce_d_loss_matches_hand_computation():
    # BCE(x, 1) = log(1 + e^-x): x = 0 -> ln 2, x = ln 3 -> ln(4/3).  BCE(x, 0) = log(1 + e^x): same for -x.
    loss, parts = d_loss("bce", t(0.0, LN3), t(0.0, -LN3))
    half = (LN2 + math.log(4 / 3)) / 2
    assert parts["d_loss_real"].item() == pytest.approx(half, rel=1e-6)
    assert parts["d_loss_fake"].item() == pytest.approx(half, rel=1e-6)
    assert loss.item() == pytest.approx(math.log(8 / 3), rel=1e-6)


def test_bce_one_sided_label_smoothing_matches_hand_computation():
    # target 0.9: BCE = 0.9 log(1 + e^-x) + 0.1 log(1 + e^x).  x = 0 -> ln 2;  x = ln 3 -> 0.9 ln(4/3) + 0.1 ln 4
    loss, parts = d_loss("bce", t(0.0, LN3), t(0.0, -LN3), label_smoothing=0.1)
    real = (LN2 + 0.9 * math.log(4 / 3) + 0.1 * math.log(4)) / 2
    assert parts["d_loss_real"].item() == pytest.approx(real, rel=1e-6)
    # one-sided: the fake half is unchanged by smoothing
    assert parts["d_loss_fake"].item() == pytest.approx((LN2 + math.log(4 / 3)) / 2, rel=1e-6)
    real_t, fake_t = bce_targets(t(0.0, 1.0), t(0.0, 1.0), label_smoothing=0.1)
    assert torch.equal(real_t, t(0.9, 0.9)) and torch.equal(fake_t, t(0.0, 0.0))


def test_bce_g_loss_is_non_saturating():
    # -log sigmoid(x): x = 0 -> ln 2, x = ln 3 -> ln(4/3)
    assert g_loss("bce", t(0.0, LN3)).item() == pytest.approx((LN2 + math.log(4 / 3)) / 2, rel=1e-6)
    # where D confidently rejects the fakes, G's gradient is still about -1/N per logit (log(1 - D) would vanish)
    logits = t(-10.0, -10.0).requires_grad_(True)
    g_loss("bce", logits).backward()
    assert logits.grad.tolist() == pytest.approx([-0.5, -0.5], rel=1e-4)


def test_wgan_d_loss_matches_hand_computation():
    # -mean(real) + mean(fake) = -2 + 1
    loss, parts = d_loss("wgan-gp", t(1.0, 3.0), t(0.5, 1.5))
    assert loss.item() == pytest.approx(-1.0)
    assert parts["d_loss_real"].item() == pytest.approx(-2.0)
    assert parts["wasserstein_estimate"].item() == pytest.approx(1.0)


def test_acgan_loss_matches_hand_computation():
    # softmax([0, 0])[0] = 1/2 -> ln 2;  softmax([ln 3, 0])[1] = 1/4 -> ln 4
    loss = acgan_loss(torch.tensor([[0.0, 0.0], [LN3, 0.0]]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(1.5 * LN2, rel=1e-6)


def test_unknown_loss_and_smoothing_outside_bce_are_refused():
    with pytest.raises(ValueError, match="loss.kind"):
        d_loss("lsgan", t(0.0), t(0.0))
    with pytest.raises(ValueError, match="loss.kind"):
        g_loss("lsgan", t(0.0))
    with pytest.raises(ValueError, match="bce"):
        d_loss("hinge", t(0.0), t(0.0), label_smoothing=0.1)


# Label flipping ---------------------------------------------------------------------------------------------------
def test_bce_label_flip_rate_and_smoothing_seen_through_the_loss():
    # With every logit equal to L, BCE(L, target) = softplus(L) - L * target, so the mean target can be read back
    # from the loss: real targets average 0.9 (1 - p), fake targets 0.9 p.
    n, p, s, L = 20_000, 0.25, 0.1, 2.0
    logits = torch.full((n,), L)
    loss, parts = d_loss("bce", logits, logits, label_smoothing=s, label_flip=p,
                         generator=torch.Generator().manual_seed(0))
    softplus_l = math.log1p(math.exp(L))
    mean_real_t = (softplus_l - parts["d_loss_real"].item()) / L
    mean_fake_t = (softplus_l - parts["d_loss_fake"].item()) / L
    sigma = math.sqrt(p * (1 - p) / n)
    assert 1 - mean_real_t / (1 - s) == pytest.approx(p, abs=4 * sigma)
    assert mean_fake_t / (1 - s) == pytest.approx(p, abs=4 * sigma)
    assert parts["d_label_flip_frac"].item() == pytest.approx(p, abs=4 * sigma / math.sqrt(2))


def test_bce_label_flips_swap_targets_and_follow_the_generator():
    real, fake = torch.zeros(1000), torch.zeros(1000)
    a = bce_targets(real, fake, label_smoothing=0.2, label_flip=0.3, generator=torch.Generator().manual_seed(7))
    b = bce_targets(real, fake, label_smoothing=0.2, label_flip=0.3, generator=torch.Generator().manual_seed(7))
    c = bce_targets(real, fake, label_smoothing=0.2, label_flip=0.3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # a flipped real becomes a fake (0), a flipped fake becomes a (smoothed) real
    assert a[0].unique().tolist() == pytest.approx([0.0, 0.8])
    assert a[1].unique().tolist() == pytest.approx([0.0, 0.8])


# Gradient penalties -----------------------------------------------------------------------------------------------
class ClassLinearCritic(torch.nn.Module):
    """D(x, y) = <W[y], x>: grad_x D = W[y] for every x, so ||grad|| = ||W[y]|| exactly."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x, y):
        return (x.flatten(1) * self.weight[y]).sum(1)


def test_gradient_penalty_of_linear_critic_is_analytic():
    d = 2 * 3 * 3
    w = torch.zeros(2, d)
    w[0, 0] = 0.5  # ||W[0]|| = 0.5 -> (0.5 - 1)^2 = 0.25
    w[1, :4] = 1.5  # ||W[1]|| = 3  -> (3 - 1)^2 = 4
    critic = ClassLinearCritic(w)
    labels = torch.tensor([0, 1, 1, 0])
    real, fake = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    gp = gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx((0.25 + 4 + 4 + 0.25) / 4, rel=1e-6)
    # d gp / d W[k] = (count_k / N) * 2 (||W[k]|| - 1) W[k] / ||W[k]||, kept in the graph for the critic's update
    gp.backward()
    assert torch.allclose(critic.weight.grad[0], 0.5 * 2 * (0.5 - 1) * w[0] / 0.5, atol=1e-6)
    assert torch.allclose(critic.weight.grad[1], 0.5 * 2 * (3 - 1) * w[1] / 3, atol=1e-6)


def test_gradient_penalty_uses_interpolates_between_real_and_fake():
    # D(x) = ||x||^2 / 2 so grad = x_hat. real = u, fake = -u with ||u|| = 2: x_hat = (2e - 1) u, ||x_hat|| <= 2,
    # and with real == fake the interpolate is that point whatever e is.
    def critic(x, y):
        return 0.5 * x.flatten(1).pow(2).sum(1)

    u = torch.zeros(64, 1, 2, 2)
    u[:, 0, 0, 0] = 2.0
    gp = gradient_penalty(critic, u, -u, torch.zeros(64, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    # E over e ~ U[0,1) of (2|2e - 1| - 1)^2 = E over v ~ U[0,1) of (2v - 1)^2 = 1/3
    assert 0.15 < gp.item() < 0.55
    same = gradient_penalty(critic, u, u, torch.zeros(64, dtype=torch.long))
    assert same.item() == pytest.approx(1.0)  # (||u|| - 1)^2 = 1


def test_gradient_penalty_matches_per_sample_autograd_on_a_layernorm_dcgan_critic():
    torch.manual_seed(0)
    critic = DCGANDiscriminator(16, 3, ch=4, in_channels=1, norm="layer", conditioning="projection")
    real, fake = torch.randn(5, 1, 16, 16), torch.randn(5, 1, 16, 16)
    labels = torch.tensor([0, 1, 2, 1, 0])
    gp = gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(3))
    # independent computation: same interpolation weights (the generator's first draw), one sample at a time
    eps = torch.rand((5, 1, 1, 1), generator=torch.Generator().manual_seed(3))
    norms = []
    for i in range(5):
        x_hat = (eps[i] * real[i] + (1 - eps[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x_hat, labels[i : i + 1]).sum(), x_hat)
        norms.append(grad.norm())
    expected = torch.stack([(n - 1) ** 2 for n in norms]).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-4)


def test_gradient_penalty_takes_adv_logits_of_an_acgan_critic():
    lin = ClassLinearCritic(torch.full((1, 4), 1.0))  # ||w|| = 2 -> (2 - 1)^2 = 1

    def critic(x, y):
        return lin(x, torch.zeros_like(y)), torch.zeros(x.shape[0], 3)

    gp = gradient_penalty(critic, torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    assert gp.item() == pytest.approx(1.0)


def test_r1_penalty_of_linear_critic_is_squared_weight_norm():
    critic = ClassLinearCritic(torch.full((1, 4), 1.5))  # ||w||^2 = 4 * 2.25 = 9
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    assert r1_penalty(critic(x, torch.zeros(3, dtype=torch.long)), x).item() == pytest.approx(9.0)


# Refused combinations ---------------------------------------------------------------------------------------------
def _cfg(**loss) -> RunConfig:
    cfg = RunConfig()
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg


def test_wgan_gp_with_batchnorm_dcgan_critic_is_refused_naming_the_fix():
    cfg = _cfg(kind="wgan-gp", d_steps=5)
    cfg.model.arch = "dcgan"  # d_norm absent from ModelConfig: the DCGAN default, BatchNorm
    with pytest.raises(ConfigError, match=r"loss.kind='wgan-gp'.*model.d_norm='batch'.*model.d_norm='layer'"):
        check_combination(cfg)
    cfg.model.d_norm = "batch"
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_combination(cfg)
    cfg.model.d_norm = "layer"
    check_combination(cfg)
    cfg.model.arch, cfg.model.d_norm = "biggan", "batch"  # d_norm only describes DCGAN's D
    check_combination(cfg)


def test_label_smoothing_or_flip_without_bce_is_refused():
    for kind in ("hinge", "wgan-gp"):
        for field in ("label_smoothing", "label_flip"):
            with pytest.raises(ConfigError, match=rf"loss.{field}.*loss.kind=bce"):
                check_combination(_cfg(kind=kind, **{field: 0.1}))
    check_combination(_cfg(kind="bce", label_smoothing=0.1, label_flip=0.05))


def test_other_meaningless_combinations_are_refused():
    with pytest.raises(ConfigError, match="loss.gp_lambda"):
        check_combination(_cfg(kind="wgan-gp", gp_lambda=0.0))
    cfg = _cfg(acgan_weight=0.0)
    cfg.model.d_head, cfg.model.arch = "acgan", "biggan-deep"
    with pytest.raises(ConfigError, match=r"model.d_head='acgan' is not available for model.arch='biggan-deep'"):
        check_combination(cfg)
    cfg.model.arch = "dcgan"
    with pytest.raises(ConfigError, match="loss.acgan_weight"):
        check_combination(cfg)
    cfg.loss.acgan_weight = 1.0
    check_combination(cfg)
    cfg.model.d_head, cfg.model.d_conditioning = "projection+acgan", "concat"
    with pytest.raises(ConfigError, match=r"'projection\+acgan' needs model.d_conditioning='projection', not 'concat'"):
        check_combination(cfg)
    cfg.model.d_conditioning = "projection"
    check_combination(cfg)
    cfg.model.arch = "biggan"
    check_combination(cfg)
    with pytest.raises(ConfigError, match="loss.kind"):
        check_combination(_cfg(kind="lsgan"))
    check_combination(RunConfig())


def test_mode_seeking_penalty_is_large_for_a_collapsed_pair_and_small_for_distinct_images():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    same = torch.rand(4, 1, 8, 8).repeat(2, 1, 1, 1)  # each image of the first half repeated in the second
    distinct = torch.rand(8, 1, 8, 8)
    collapsed, spread = mode_seeking_penalty(same, z), mode_seeking_penalty(distinct, z)
    assert collapsed > 1e4 and spread < 10 and torch.isfinite(collapsed)
    # the gradient pushes the pairs apart: a step against it raises the images' distance
    x = distinct.clone().requires_grad_(True)
    mode_seeking_penalty(x, z).backward()
    moved = (x - 0.1 * x.grad).detach()
    assert (moved[:4] - moved[4:]).abs().mean() > (distinct[:4] - distinct[4:]).abs().mean()
    with pytest.raises(ValueError, match="at least 2"):
        mode_seeking_penalty(distinct[:1], z[:1])


def test_paired_labels_repeat_the_first_half_and_leave_the_input_alone():
    y = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    assert paired_labels(y).tolist() == [3, 1, 4, 3, 1, 4, 2]
    assert y.tolist() == [3, 1, 4, 1, 5, 9, 2]
