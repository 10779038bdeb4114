"""GAN objectives: hinge, non-saturating BCE and WGAN-GP, their regularizers, and the rule for which go together.

Each D loss returns (loss, parts) where parts are detached scalars for logging. A trainer step looks like:

    loss, parts = d_loss(cfg.loss.kind, D(x, y), D(G(z, y_f).detach(), y_f),
                         label_smoothing=..., label_flip=..., generator=rng)
    if cfg.loss.kind == "wgan-gp":
        loss = loss + cfg.loss.gp_lambda * gradient_penalty(D, x, fake, y, generator=rng)

WGAN-GP wants about 5 critic steps per G step (`D_STEPS_RECOMMENDED`); the trainer reads `loss.d_steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import ConfigError

LOSSES = ("hinge", "bce", "wgan-gp")
# D steps per G step that each loss is usually trained with (presets pick from this).
D_STEPS_RECOMMENDED = {"hinge": 2, "bce": 1, "wgan-gp": 5}
# The norm a DCGAN discriminator gets when ModelConfig has no `d_norm` field (classic DCGAN: BatchNorm).
DCGAN_D_NORM_DEFAULT = "batch"
# Archs whose D exposes features(x) and `linear`, which models.acgan.ACGANDiscriminator needs.
ACGAN_ARCHS = ("dcgan", "biggan")
# model.d_head values with models.acgan's classifier: alone, or beside the projection term.
ACGAN_HEADS = ("acgan", "projection+acgan")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's own device (so a CPU generator works for CUDA tensors)."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def bce_targets(
    real_logits: Tensor,
    fake_logits: Tensor,
    *,
    label_smoothing: float = 0.0,
    label_flip: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """D's BCE targets for a real and a fake batch, after one-sided smoothing and random flipping.

    A sample labelled "real" has target 1 - label_smoothing, one labelled "fake" has target 0 (one-sided: fakes
    are never smoothed). With label_flip = p each sample's label is swapped with probability p, independently,
    so a flipped real gets 0 and a flipped fake gets 1 - label_smoothing. Draws come from `generator`, real batch
    first, so a run resumed with the same generator state flips the same labels.
    """
    real_value = 1.0 - label_smoothing
    real_t = torch.full_like(real_logits, real_value, dtype=torch.float32)
    fake_t = torch.zeros_like(fake_logits, dtype=torch.float32)
    if label_flip > 0:
        flip_real = _rand(tuple(real_logits.shape), generator, real_logits) < label_flip
        flip_fake = _rand(tuple(fake_logits.shape), generator, fake_logits) < label_flip
        real_t = real_t.masked_fill(flip_real, 0.0)
        fake_t = fake_t.masked_fill(flip_fake, real_value)
    return real_t, fake_t


def d_loss(
    kind: str,
    real_logits: Tensor,
    fake_logits: Tensor,
    *,
    label_smoothing: float = 0.0,
    label_flip: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """D's loss on a real and a fake batch. Returns the scalar loss and its real/fake parts.

    hinge:   mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))
    bce:     BCE(D(x), 1 - s) + BCE(D(G(z)), 0), with labels flipped at rate label_flip (see `bce_targets`)
    wgan-gp: -mean(D(x)) + mean(D(G(z))); add gp_lambda * `gradient_penalty` yourself
    label_smoothing and label_flip are only meaningful for bce; other kinds refuse non-zero values.
    """
    if kind not in LOSSES:
        raise ValueError(f"loss.kind: {kind!r} is not one of {list(LOSSES)}")
    if kind != "bce" and (label_smoothing or label_flip):
        raise ValueError(f"label_smoothing/label_flip apply only to loss.kind='bce', not {kind!r}")
    parts: dict[str, Tensor] = {}
    if kind == "hinge":
        real = F.relu(1.0 - real_logits.float()).mean()
        fake = F.relu(1.0 + fake_logits.float()).mean()
    elif kind == "bce":
        real_t, fake_t = bce_targets(
            real_logits, fake_logits, label_smoothing=label_smoothing, label_flip=label_flip, generator=generator
        )
        real = F.binary_cross_entropy_with_logits(real_logits.float(), real_t)
        fake = F.binary_cross_entropy_with_logits(fake_logits.float(), fake_t)
        if label_flip > 0:
            flipped = (real_t == 0).sum() + (fake_t != 0).sum()
            parts["d_label_flip_frac"] = (flipped.float() / (real_t.numel() + fake_t.numel())).detach()
    else:  # wgan-gp
        real = -real_logits.float().mean()
        fake = fake_logits.float().mean()
        parts["wasserstein_estimate"] = (-(real + fake)).detach()
    parts = {"d_loss_real": real.detach(), "d_loss_fake": fake.detach(), **parts}
    return real + fake, parts


def g_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """G's loss on D's logits for a fake batch: -mean(D(G(z))) for hinge and wgan-gp, and for bce the
    non-saturating BCE(D(G(z)), 1) = mean(softplus(-D(G(z)))), i.e. G maximizes log D(G(z))."""
    if kind in ("hinge", "wgan-gp"):
        return -fake_logits.float().mean()
    if kind == "bce":
        logits = fake_logits.float()
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    raise ValueError(f"loss.kind: {kind!r} is not one of {list(LOSSES)}")


def acgan_loss(class_logits: Tensor, labels: Tensor) -> Tensor:
    """AC-GAN auxiliary classification loss: mean cross-entropy of D's class logits (N, K) against labels (N,).

    D minimizes it on real and fake batches, G on fake ones, each weighted by `loss.acgan_weight`.
    """
    return F.cross_entropy(class_logits.float(), labels.long())


def mode_seeking_penalty(images: Tensor, z: Tensor, eps: float = 1e-5) -> Tensor:
    """Mode-seeking regularizer (Mao et al. 2019, MSGAN): 1 / (mean |x1 - x2| / mean |z1 - z2|), where the batch's
    two halves are pairs with the same labels. G minimizes it: two latents of one class may not give one image.

    The ratio is bounded below by `eps` so a collapsed pair gives a large but finite penalty.
    """
    half = images.shape[0] // 2
    if half == 0:
        raise ValueError("mode_seeking_penalty needs a batch of at least 2 (pairs of images)")
    x1, x2 = images[:half].float(), images[half : 2 * half].float()
    z1, z2 = z[:half].float(), z[half : 2 * half].float()
    ratio = (x1 - x2).abs().mean() / (z1 - z2).abs().mean().clamp_min(eps)
    return 1.0 / (ratio + eps)


def paired_labels(y: Tensor) -> Tensor:
    """Labels whose second half repeats the first, the pairs `mode_seeking_penalty` compares (odd batch: the last
    sample keeps its own label)."""
    half = y.shape[0] // 2
    out = y.clone()
    out[half : 2 * half] = y[:half]
    return out


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """Mean over the batch of ||grad_x D(x)||^2 on real images (Mescheder et al. 2018); needs x.requires_grad."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def gradient_penalty(
    critic: Callable[[Tensor, Tensor], Any],
    real: Tensor,
    fake: Tensor,
    labels: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP: mean of (||grad_x D(x_hat, y)|| - 1)^2 on random interpolates x_hat = e*real + (1-e)*fake,
    e ~ U[0, 1) per sample (Gulrajani et al. 2017). The graph is kept so the penalty trains the critic.

    `labels` are the real batch's; an AC-GAN critic's (adv, class) output is reduced to its adv logits.
    """
    eps = _rand((real.shape[0],) + (1,) * (real.dim() - 1), generator, real).to(real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x_hat, labels)
    out = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return (grad.float().flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def check_combination(cfg: Any) -> None:
    """Refuse loss/model/trick combinations that train badly or mean nothing; raise ConfigError naming the fields.

    - loss.label_smoothing / loss.label_flip only with loss.kind='bce'.
    - loss.kind='wgan-gp' needs loss.gp_lambda > 0 (a WGAN critic without the penalty is unconstrained).
    - loss.kind='wgan-gp' with a BatchNorm critic: the penalty is a per-sample gradient norm, and BatchNorm
      makes each sample's output depend on the whole batch (Gulrajani et al. 2017, sec. 4). For arch 'dcgan'
      the critic's norm is `model.d_norm` (BatchNorm when the field is absent).
    - model.d_head='acgan' / 'projection+acgan' only for archs whose D exposes its features (ACGAN_ARCHS), with
      loss.acgan_weight > 0, with labels (model.num_classes != 1), and the latter with a projection D.
    """
    loss, model = cfg.loss, cfg.model
    if loss.kind not in LOSSES:
        raise ConfigError(f"loss.kind: {loss.kind!r} is not one of {list(LOSSES)}")
    if loss.kind != "bce" and (loss.label_smoothing or loss.label_flip):
        raise ConfigError(
            f"loss.label_smoothing={loss.label_smoothing} / loss.label_flip={loss.label_flip}: only apply to "
            f"loss.kind='bce', not {loss.kind!r}; set them to 0 or use loss.kind=bce"
        )
    if loss.kind == "wgan-gp":
        if loss.gp_lambda <= 0:
            raise ConfigError(
                f"loss.gp_lambda={loss.gp_lambda}: loss.kind='wgan-gp' needs a positive gradient-penalty "
                "weight (10 is the paper's value)"
            )
        d_norm = getattr(model, "d_norm", DCGAN_D_NORM_DEFAULT)
        if model.arch == "dcgan" and d_norm == "batch":
            raise ConfigError(
                "loss.kind='wgan-gp' with model.arch='dcgan' and model.d_norm='batch': the gradient penalty is "
                "per sample and BatchNorm couples the samples of a batch; use model.d_norm='layer' (or 'none'), "
                "or loss.kind='hinge'/'bce' to keep BatchNorm in D"
            )
    head = getattr(model, "d_head", "projection")
    if head in ACGAN_HEADS:
        if model.arch not in ACGAN_ARCHS:
            raise ConfigError(
                f"model.d_head={head!r} is not available for model.arch={model.arch!r}: its D does not expose "
                f"features(x) yet; use model.d_head='projection' or model.arch in {list(ACGAN_ARCHS)}"
            )
        if loss.acgan_weight <= 0:
            raise ConfigError(
                f"loss.acgan_weight={loss.acgan_weight}: model.d_head={head!r} needs a positive weight for the "
                "auxiliary classification loss; use model.d_head='projection' to train without it"
            )
        if model.num_classes == 1:
            raise ConfigError(f"model.d_head={head!r} with model.num_classes=1: nothing to classify; use 'projection'")
        if head == "projection+acgan" and model.arch == "dcgan" and getattr(model, "d_conditioning", "") != "projection":
            raise ConfigError(
                f"model.d_head='projection+acgan' needs model.d_conditioning='projection', not "
                f"{model.d_conditioning!r}: it keeps D's projection term beside the classifier"
            )
