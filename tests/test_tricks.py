"""Instance noise, the replay buffer and latent sampling."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.tricks import ReplayBuffer, add_instance_noise, instance_noise_std, sample_z


# Latents ------------------------------------------------------------------------------------------------------------
def test_sample_z_normal_by_default_and_uniform_on_request():
    z = sample_z(4000, 16, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4000, 16)
    assert z.mean().item() == pytest.approx(0.0, abs=0.02) and z.std().item() == pytest.approx(1.0, abs=0.02)
    u = sample_z(4000, 16, "uniform", generator=torch.Generator().manual_seed(0))
    assert u.min().item() >= -1.0 and u.max().item() < 1.0
    assert u.mean().item() == pytest.approx(0.0, abs=0.02) and u.var().item() == pytest.approx(1 / 3, abs=0.01)


def test_sample_z_is_reproducible_and_rejects_unknown_distributions():
    a = sample_z(8, 4, "uniform", torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_z(8, 4, "uniform", torch.Generator().manual_seed(5)))
    assert sample_z(8, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uniform"):
        sample_z(8, 4, "laplace")


# Instance noise ---------------------------------------------------------------------------------------------------
def test_instance_noise_std_decays_linearly_to_zero_and_stays_there():
    assert instance_noise_std(0, 0.1, 100) == pytest.approx(0.1)
    assert instance_noise_std(25, 0.1, 100) == pytest.approx(0.075)
    assert instance_noise_std(50, 0.1, 100) == pytest.approx(0.05)
    assert instance_noise_std(100, 0.1, 100) == 0.0
    assert instance_noise_std(10_000, 0.1, 100) == 0.0
    assert instance_noise_std(0, 0.0, 100) == 0.0  # off by default
    with pytest.raises(ValueError, match="instance_noise_decay_steps"):
        instance_noise_std(0, 0.1, 0)


def test_add_instance_noise_has_the_requested_std_and_is_reproducible():
    x = torch.zeros(64, 3, 16, 16)
    assert add_instance_noise(x, 0.0) is x
    a = add_instance_noise(x, 0.5, torch.Generator().manual_seed(1))
    assert a.std().item() == pytest.approx(0.5, rel=0.02) and a.mean().item() == pytest.approx(0.0, abs=0.01)
    assert torch.equal(a, add_instance_noise(x, 0.5, torch.Generator().manual_seed(1)))
    assert a.dtype == x.dtype and a.shape == x.shape


# Replay buffer ----------------------------------------------------------------------------------------------------
def _batch(ids: range | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel is their id, labelled id % 10, so any sample can be traced back."""
    ids_t = torch.tensor(list(ids), dtype=torch.float32)
    return ids_t[:, None, None, None].expand(-1, 1, 2, 2).clone(), ids_t.long() % 10


def test_replay_buffer_waits_until_it_holds_a_batch():
    buf = ReplayBuffer(capacity=100, fraction=0.5, seed=0)
    fresh = _batch([-1] * 10)
    buf.push(*_batch(range(5)))
    images, labels = buf.mix(*fresh)
    assert images is fresh[0] and labels is fresh[1] and buf.last_replayed == 0
    buf.push(*_batch(range(5, 10)))
    images, _ = buf.mix(*fresh)
    assert (images[:, 0, 0, 0] >= 0).sum().item() == 5


def test_replay_buffer_replaces_the_configured_fraction_with_stored_pairs():
    buf = ReplayBuffer(capacity=64, fraction=0.25, seed=3)
    for step in range(10):
        buf.push(*_batch(range(step * 16, step * 16 + 16)))
    fresh_images, fresh_labels = torch.full((16, 1, 2, 2), -1.0), torch.full((16,), -1)
    for _ in range(20):
        images, labels = buf.mix(fresh_images, fresh_labels)
        replayed = images[:, 0, 0, 0] >= 0
        assert replayed.sum().item() == 4 == buf.last_replayed  # round(0.25 * 16)
        ids = images[replayed, 0, 0, 0].long()
        assert torch.equal(labels[replayed], ids % 10)  # images keep their own labels
        assert len(set(ids.tolist())) == 4  # drawn without replacement
        assert (labels[~replayed] == -1).all()
    assert (fresh_images == -1).all()  # the input batch is not modified
    assert buf.stats() == {"replay_size": 64.0, "replay_seen": 160.0, "replay_mixed": 4.0}


def test_replay_buffer_reservoir_keeps_every_pushed_image_with_equal_probability():
    # capacity 50 out of 500 pushed (in batches of 10): each image is kept with probability 0.1. Over 200 seeds,
    # each block of 100 ids should hold 200 * 50 / 5 = 2000 kept images (binomial sd about 40).
    counts = torch.zeros(500)
    for seed in range(200):
        buf = ReplayBuffer(capacity=50, fraction=0.5, seed=seed)
        for start in range(0, 500, 10):
            buf.push(*_batch(range(start, start + 10)))
        kept = buf.state_dict()["images"][:, 0, 0, 0].long()
        assert len(kept) == 50 and len(set(kept.tolist())) == 50
        counts[kept] += 1
    blocks = counts.view(5, 100).sum(1)
    assert ((blocks - 2000).abs() < 160).all(), blocks.tolist()
    assert counts.min().item() > 2 and counts.max().item() < 42  # per id: mean 20, sd about 4.2


def test_replay_buffer_state_round_trip_resumes_exactly():
    a = ReplayBuffer(capacity=32, fraction=0.5, seed=11)
    for step in range(6):
        a.push(*_batch(range(step * 8, step * 8 + 8)))
        a.mix(*_batch([-1] * 8))
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b = ReplayBuffer(capacity=32, fraction=0.5, seed=999)
    b.load_state_dict(torch.load(saved, weights_only=True))
    assert len(b) == len(a) and b.seen == a.seen
    for step in range(6, 12):
        fresh = _batch([-1] * 8)
        out_a, out_b = a.mix(*fresh), b.mix(*fresh)
        assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
        a.push(*_batch(range(step * 8, step * 8 + 8)))
        b.push(*_batch(range(step * 8, step * 8 + 8)))
    assert torch.equal(a.state_dict()["images"], b.state_dict()["images"])


def test_replay_buffer_refuses_a_checkpoint_of_another_size_and_is_inert_when_off():
    a = ReplayBuffer(capacity=8, fraction=0.5)
    a.push(*_batch(range(8)))
    with pytest.raises(ValueError, match="tricks.replay_size"):
        ReplayBuffer(capacity=16, fraction=0.5).load_state_dict(a.state_dict())
    off = ReplayBuffer(capacity=0, fraction=0.5)
    off.push(*_batch(range(8)))
    fresh = _batch(range(8))
    assert off.mix(*fresh)[0] is fresh[0] and len(off) == 0
    empty = ReplayBuffer(capacity=4, fraction=0.5, seed=1)
    restored = ReplayBuffer(capacity=4, fraction=0.5)
    restored.load_state_dict(empty.state_dict())
    assert len(restored) == 0
