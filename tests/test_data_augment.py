"""DiffAugment: differentiable, shape-preserving, the same policy for real and fake inputs of D."""

from __future__ import annotations

import pytest
import torch

from pipeline.augment import POLICIES, diff_augment


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_gradients_flow_back_to_the_input(policy):
    torch.manual_seed(0)
    x = (torch.rand(6, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = diff_augment(x, policy)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_fake_images_pass_gradients_to_the_generator_weights():
    torch.manual_seed(0)
    g = torch.nn.Conv2d(3, 3, 3, padding=1)
    fake = torch.tanh(g(torch.randn(4, 3, 16, 16)))
    diff_augment(fake).mean().backward()
    assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0


def test_empty_policy_is_identity_and_unknown_policy_fails():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(diff_augment(x, ""), x) and torch.equal(diff_augment(x, "none"), x)
    with pytest.raises(ValueError, match="unknown"):
        diff_augment(x, "colour")
    assert set(POLICIES) == {"color", "translation", "cutout"}


def test_translation_shifts_whole_pixels_and_fills_with_zero():
    torch.manual_seed(1)
    x = torch.zeros(16, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    y = diff_augment(x, "translation")
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}  # exact whole-pixel moves
    assert (y.sum(dim=(1, 2, 3)) == 16).all()  # the square stays inside (max shift 2 px)
    assert not all(torch.equal(y[i], x[i]) for i in range(16))


def test_cutout_erases_a_quarter_of_each_image():
    y = diff_augment(torch.ones(8, 3, 32, 32), "cutout")
    assert torch.allclose((y == 0).float().mean(dim=(1, 2, 3)), torch.full((8,), 0.25))


def test_each_call_draws_new_parameters_for_real_and_fake_alike():
    torch.manual_seed(2)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    a, b = diff_augment(real), diff_augment(real)
    assert not torch.equal(a, b)
    assert torch.isfinite(a).all()


def test_draws_come_from_the_given_generator_per_rank_and_replay_from_its_state():
    from pipeline.augment import augment_generator

    x = torch.rand(6, 3, 16, 16) * 2 - 1
    rank0, rank1 = augment_generator(0, 0, x.device), augment_generator(0, 1, x.device)
    saved = rank0.get_state()
    torch.manual_seed(0)
    a = diff_augment(x, "color,translation,cutout", generator=rank0)
    torch.manual_seed(1)  # the global generator plays no part
    assert not torch.equal(a, diff_augment(x, "color,translation,cutout", generator=rank1))  # ranks differ
    rank0.set_state(saved)
    assert torch.equal(a, diff_augment(x, "color,translation,cutout", generator=rank0))  # a resume replays


def test_trainer_checkpoints_the_diffaugment_generator_and_resumes_exactly(tmp_path, digits_shards):
    from tests.trainer_harness import make_trainer, state_fingerprint, tiny_config

    shards, n = digits_shards
    overrides = {"data.diffaug": "color,translation,cutout", "train.steps": 4, "train.checkpoint_every": 2}
    straight = make_trainer(tiny_config(tmp_path, shards, n, **overrides), tmp_path)
    assert straight.augment_rng.device == straight.device
    straight.fit()
    want = state_fingerprint(straight)
    root = straight.store.fetch(straight.store.get(2), tmp_path / "dl")
    assert "augment_rng" in torch.load(root / "rank0.pt", weights_only=True)  # per-rank state: a plain tensor
    resumed = make_trainer(tiny_config(tmp_path, shards, n, **overrides), tmp_path)
    resumed.load_checkpoint(straight.store.get(2))
    resumed.fit()
    got = state_fingerprint(resumed)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert torch.equal(resumed.augment_rng.get_state(), straight.augment_rng.get_state())
