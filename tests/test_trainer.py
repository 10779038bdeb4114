"""The trainer in one process on real shards: step ratio, R1, accumulation, checkpoints, exact resume."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import losses
from tests.trainer_harness import make_trainer, state_fingerprint, tiny_config


@pytest.mark.parametrize("d_steps, global_batch", [(2, 8), (3, 16)])
def test_d_to_g_step_ratio_and_accumulation(tmp_path, digits_shards, d_steps, global_batch):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"loss.d_steps": d_steps, "train.global_batch": global_batch})
    trainer = make_trainer(cfg, tmp_path)
    accum = global_batch // 8
    start = trainer.loader.state()
    for _ in range(3):
        trainer.train_iteration()
    assert trainer.step == 3 and trainer.d_steps_done == 3 * d_steps
    assert trainer.g_engine.global_steps == 3  # optimizer steps, after accumulation
    assert trainer.d_engine.global_steps == 3 * d_steps
    assert trainer.d_engine.micro_steps == 3 * d_steps * accum
    consumed = 3 * d_steps * accum  # every D micro-step takes one real batch, G steps take none
    end = trainer.loader.state()
    per_epoch = trainer.loader.batches_per_epoch
    assert (end["epoch"] * per_epoch + end["offset"]) - (start["epoch"] * per_epoch + start["offset"]) == consumed


def test_r1_penalty_matches_per_sample_autograd():
    torch.manual_seed(0)
    d = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    got = losses.r1_penalty(d(x).squeeze(1), x)
    want = []
    for i in range(5):  # an independent reference: one sample at a time
        xi = x[i : i + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(d(xi).sum(), xi)
        want.append(g.pow(2).sum())
    assert torch.allclose(got, torch.stack(want).mean(), rtol=1e-5)
    # and on a linear D the value is known in closed form: ||w||^2
    lin = nn.Linear(12, 1, bias=False)
    x = torch.randn(4, 12, requires_grad=True)
    assert torch.allclose(losses.r1_penalty(lin(x).squeeze(1), x), lin.weight.pow(2).sum())
    # its gradient reaches D's weights (create_graph), which is what makes it a regularizer
    got.backward()
    assert d[0].weight.grad is not None and d[0].weight.grad.abs().sum() > 0


def test_lazy_r1_runs_every_interval_d_steps(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"loss.r1_gamma": 1.0, "loss.r1_interval": 4, "loss.d_steps": 2})
    trainer = make_trainer(cfg, tmp_path)
    for _ in range(4):  # 8 D steps: R1 at D steps 0 and 4
        trainer.train_iteration()
    assert trainer._sums["r1__n"] == 2
    assert trainer._sums["d_loss__n"] == 8


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_exact_resume_bit_for_bit(tmp_path, digits_shards, zero_stage):
    shards, n = digits_shards
    overrides = {"optim.zero_stage": zero_stage, "train.steps": 6, "train.checkpoint_every": 3,
                 "loss.r1_gamma": 0.5, "loss.r1_interval": 2, "ema.start_step": 2, "ema.decay": 0.9}
    straight = make_trainer(tiny_config(tmp_path / "a", shards, n, **overrides), tmp_path / "a")
    straight.fit()
    want = state_fingerprint(straight)
    assert [c.step for c in straight.store.list()] == [3, 6]

    # a new trainer (as after a crash) resumes from step 3 of the same store and runs to 6
    resumed = make_trainer(tiny_config(tmp_path / "a", shards, n, **overrides), tmp_path / "a")
    resumed.load_checkpoint(straight.store.get(3))
    assert resumed.step == 3
    resumed.fit()
    got = state_fingerprint(resumed)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"


def test_checkpoint_holds_everything_and_exports_weights_only(tmp_path, digits_shards):
    shards, n = digits_shards
    trainer = make_trainer(tiny_config(tmp_path, shards, n, **{"train.steps": 2, "train.checkpoint_every": 2}), tmp_path)
    trainer.tracker.run_id = "run-abc"
    trainer.fit()
    info = trainer.store.latest()
    root = trainer.store.fetch(info, tmp_path / "dl")
    state = torch.load(root / "trainer.pt", weights_only=True)  # tensors and plain types only
    assert {"step", "ema", "data_position", "mlflow_run_id", "health", "config", "class_names"} <= state.keys()
    assert state["mlflow_run_id"] == "run-abc" and state["step"] == 2
    rank = torch.load(root / "rank0.pt", weights_only=True)
    assert {"rng", "noise", "replay"} <= rank.keys()
    assert (root / "g" / "ckpt").is_dir() and (root / "d" / "ckpt").is_dir()  # both engines with optimizers
    exported = torch.load(root / "g_ema.pt", weights_only=True)  # safe to load from anywhere
    assert exported["step"] == 2 and len(exported["class_names"]) == n
    assert set(exported["g_ema_state"]) == set(trainer.ema.model.state_dict())


def test_a_finished_run_writes_a_labelled_final_grid_and_an_interpolation_sheet(tmp_path, digits_shards):
    shards, n = digits_shards
    trainer = make_trainer(tiny_config(tmp_path, shards, n, **{"train.steps": 2, "train.checkpoint_every": 2}), tmp_path)
    trainer.class_names = [f"digit-{k}" for k in range(n)]
    assert trainer.fit()["status"] == "finished"
    review = trainer.work_dir / "review"
    with Image.open(review / "final_grid.png") as grid, Image.open(review / "interpolation.png") as sheet:
        # 10 samples of each of the n classes, enlarged 3x, plus a margin on the left for the class names
        assert grid.mode == "RGB" and grid.height == 3 * (n * (32 + 2) + 2) and grid.width > 3 * (10 * 34 + 2)
        margin = np.asarray(grid)[:, : grid.width - 3 * (10 * 34 + 2)]
        assert (margin < 128).any() and (margin == 255).mean() > 0.5  # dark text on white
        assert sheet.size == grid.size  # 10 slerp steps per class, the same layout


@pytest.mark.parametrize("preset_overrides", [
    {"model.arch": "dcgan", "model.d_norm": "batch", "loss.kind": "bce", "loss.d_steps": 1, "loss.ortho_beta": 0.0,
     "loss.label_smoothing": 0.1, "loss.label_flip": 0.05, "tricks.instance_noise": 0.1, "tricks.replay_size": 16},
    {"model.arch": "dcgan", "model.d_norm": "layer", "loss.kind": "wgan-gp", "loss.d_steps": 5,
     "loss.ortho_beta": 0.0, "tricks.z_dist": "uniform"},
    {"model.arch": "dcgan", "model.d_head": "acgan", "model.d_norm": "none", "loss.kind": "hinge",
     "loss.ortho_beta": 0.0},
    {"model.d_head": "projection+acgan"},
], ids=["dcgan-bce-tricks", "wgan-gp", "acgan", "biggan-projection+acgan"])
def test_classic_gans_and_tricks_train_with_health_checks(tmp_path, digits_shards, preset_overrides):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"model.g_ch": 8, "model.d_ch": 8, "health.enabled": True,
                                              "health.every": 1, "train.steps": 3, "train.log_every": 1,
                                              **preset_overrides})
    trainer = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    assert result["status"] == "finished" and result["rollbacks"] == 0
    assert trainer.d_engine.global_steps == 3 * cfg.loss.d_steps
    trainer.train_iteration()  # one more, to look at what an iteration accumulates for logging
    expected = {"wgan-gp": "gp", "bce": "d_label_flip_frac"}.get(cfg.loss.kind)
    if expected:
        assert expected in trainer._sums
    if cfg.model.d_head != "projection":
        assert "d_acgan" in trainer._sums
    if cfg.model.arch == "dcgan" and cfg.model.d_norm == "batch":  # d_norm is DCGAN's; BigGAN's D has no BatchNorm
        assert trainer.d_has_batchnorm
    if cfg.tricks.replay_size:
        assert len(trainer.replay) > 0 and "tricks/replay_size" in trainer.trick_metrics()
    if cfg.tricks.instance_noise:
        assert 0 < trainer.trick_metrics()["tricks/instance_noise_std"] < 0.1


def test_bf16_attention_and_channels_last_train(tmp_path, digits_shards):
    """The GPU defaults on CPU: bf16 engines (fp32 master weights, fp32 BatchNorm statistics), self-attention."""
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.precision": "bf16", "model.attention": 16,
                                              "train.channels_last": True, "train.steps": 2, "optim.zero_stage": 1})
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.fit()["status"] == "finished"
    assert next(trainer.G.parameters()).dtype == torch.bfloat16
    gammas = [m.gamma for m in trainer.G.modules() if hasattr(m, "gamma")]
    assert gammas and all(torch.isfinite(g).all() for g in gammas)
    assert all(torch.isfinite(p.float()).all() for p in trainer.D.parameters())


def test_the_eta_is_the_steady_pace_not_the_first_iterations_compilation(tmp_path, digits_shards, capsys):
    """The first iteration of a compiled run takes minutes; the progress line's ETA must not multiply that by the
    steps left (the demo's first line said 01:05:33 for a run that had 6 minutes to go)."""
    import re
    import time

    from pipeline.trainer import eta_seconds

    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.steps": 8, "train.log_every": 4})
    trainer = make_trainer(cfg, tmp_path)
    iteration, calls = trainer.train_iteration, []

    def first_one_slow():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(15)  # as a compilation would
        return iteration()

    trainer.train_iteration = first_one_slow
    assert trainer.fit()["status"] == "finished"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[step 4/8]")]
    h, m, s = map(int, re.search(r"eta (\d+):(\d+):(\d+)", lines[0]).groups())
    assert h * 3600 + m * 60 + s < 15, lines[0]  # at the raw pace of the window: 4 x (15 s + 3 steps) / 4 > 15 s
    assert eta_seconds(10, 12.0, 4, warmup_s=9.0) == pytest.approx(10.0)
    assert eta_seconds(10, 12.0, 4) == pytest.approx(30.0) and eta_seconds(10, 12.0, 1, warmup_s=9.0) == 120.0


def test_the_mode_seeking_term_trains_on_same_class_pairs_and_is_logged(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"loss.mode_seeking": 1.0, "train.steps": 2})
    trainer = make_trainer(cfg, tmp_path)
    seen = []
    g_forward = trainer.g_engine.forward
    trainer.g_engine.forward = lambda z, y: seen.append(y.clone()) or g_forward(z, y)
    assert trainer.fit()["status"] == "finished"
    assert seen and all(torch.equal(y[:4], y[4:8]) for y in seen)  # batch 8: four same-class pairs
    trainer.train_iteration()
    ms = trainer.take_metrics()["mode_seeking"]
    assert math.isfinite(ms) and ms > 0
