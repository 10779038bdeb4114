"""Recovery that holds, on a real in-process trainer: one NaN costs one rollback, an early collapse does not end
the run, the rollback budget and the mitigation survive a restart, warmup keeps relative rules quiet."""

import pytest
import torch

from pipeline.config import HealthConfig
from pipeline.health import HealthMonitor
from tests.trainer_harness import make_trainer, tiny_config

# the presets' shape (checks between log steps) at test size: log at 4, 8, ...; checks at 2, 4, 6, ...
BETWEEN_LOGS = {"health.enabled": True, "health.every": 2, "train.log_every": 4, "health.min_history": 3,
                "health.healthy_after": 2, "train.checkpoint_every": 4, "train.keep_last": 2}


def poison_d_once(trainer, after_step: int) -> None:
    """A NaN in D's weights once, after the given step (as one bad batch blows up a layer); a rollback undoes it."""
    done = []
    train_iteration = trainer.train_iteration

    def iteration():
        train_iteration()
        if trainer.step == after_step and not done:
            done.append(True)
            with torch.no_grad():
                next(trainer.D.parameters()).fill_(float("nan"))

    trainer.train_iteration = iteration


def test_nan_between_log_steps_costs_one_rollback(tmp_path, digits_shards):
    shards, n = digits_shards
    trainer = make_trainer(tiny_config(tmp_path, shards, n, **BETWEEN_LOGS, **{"train.steps": 16}), tmp_path)
    poison_d_once(trainer, after_step=9)  # step 10's losses are NaN; 10 is a check but not a log step
    result = trainer.fit()
    assert result["status"] == "finished" and result["step"] == 16
    assert result["rollbacks"] == 1, trainer.rollback_log
    assert trainer.rollback_log == [(10, 4)]  # 8 was saved but never had its quiet window
    assert all(torch.isfinite(p).all() for p in trainer.D.parameters())


def test_collapse_before_the_first_healthy_checkpoint_restarts_from_the_initial_weights(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{**BETWEEN_LOGS, "train.steps": 8, "train.checkpoint_every": 100})
    trainer = make_trainer(cfg, tmp_path)
    # weights only: EMA G's spectral-norm vectors are its own, refined by power iterations before each save
    initial = {k: v.detach().clone() for k, v in trainer.G.named_parameters()}
    poison_d_once(trainer, after_step=3)
    result = trainer.fit()
    assert result["status"] == "finished" and result["rollbacks"] == 1
    assert trainer.rollback_log == [(4, 0)]
    # the step-0 checkpoint holds the initial weights; the rollback re-committed it with the mitigation
    root = trainer.store.fetch(trainer.store.get(0), tmp_path / "dl")
    state = torch.load(root / "trainer.pt", weights_only=False)
    assert state["recovery"]["rollbacks"] == 1 and state["recovery"]["lr_scale"] == 0.5
    g0 = torch.load(root / "g_ema.pt", weights_only=True)["g_ema_state"]
    assert all(torch.equal(g0[k], initial[k]) for k in initial)


def test_alarm_with_no_checkpoint_at_all_mitigates_in_place(tmp_path, digits_shards):
    shards, n = digits_shards
    trainer = make_trainer(tiny_config(tmp_path, shards, n, **BETWEEN_LOGS), tmp_path)
    for _ in range(3):
        trainer.train_iteration()
    assert not trainer.store.list()  # as after retention removed every restore point
    decision = trainer.health.observe(trainer.step, {"sigma0_g_first": float("inf")})
    assert trainer.recovery.recover(decision)
    assert trainer.rollbacks == 1 and trainer.recovery.in_place == 1 and trainer.rollback_log == [(3, -1)]
    assert [c.step for c in trainer.store.list()] == [3]  # committed at once, with the count in it
    assert all(g["lr"] == pytest.approx(2e-4 * 0.5) for g in trainer.d_engine.optimizer.param_groups)
    with torch.no_grad():
        next(trainer.D.parameters()).fill_(float("nan"))
    assert not trainer.recovery.recover(decision), "non-finite weights and nothing to return to cannot go on"


def test_rollback_count_and_mitigation_survive_a_restart(tmp_path, digits_shards):
    shards, n = digits_shards
    overrides = {**BETWEEN_LOGS, "train.steps": 12, "train.keep_last": 10,
                 "health.mitigation": "halve_lr,double_r1,reseed_data"}
    first = make_trainer(tiny_config(tmp_path, shards, n, **overrides), tmp_path)
    poison_d_once(first, after_step=9)
    first.fit()
    assert first.rollbacks == 1 and first.rollback_log == [(10, 4)]
    # the rollback committed step 4 again, counted: a crash right after it resumes with the count
    root = first.store.fetch(first.store.get(4), tmp_path / "dl")
    assert torch.load(root / "trainer.pt", weights_only=False)["recovery"]["rollbacks"] == 1
    restarted = make_trainer(tiny_config(tmp_path, shards, n, **overrides), tmp_path)
    restarted.load_checkpoint(first.store.latest())
    assert restarted.step == 12 and restarted.rollbacks == 1 and restarted.rollback_log == [(10, 4)]
    assert restarted.cfg.loss.r1_gamma == pytest.approx(0.2)  # R1 was off: 0.1, doubled once
    assert restarted.data_seed == first.data_seed != first.cfg.train.seed
    for engine in (restarted.g_engine, restarted.d_engine):
        assert all(g["lr"] == pytest.approx(2e-4 * 0.5) for g in engine.optimizer.param_groups)
    # resumed with another R1 and learning rate: the user's new values win, the mitigation's lr scale stays
    changed = make_trainer(tiny_config(tmp_path, shards, n, **overrides, **{"loss.r1_gamma": 3.0, "optim.d_lr": 1e-3}),
                           tmp_path)
    changed.load_checkpoint(first.store.latest())
    assert changed.cfg.loss.r1_gamma == pytest.approx(3.0) and changed.rollbacks == 1
    assert all(g["lr"] == pytest.approx(1e-3 * 0.5) for g in changed.d_engine.optimizer.param_groups)


def test_collapse_ends_the_run_collapsed_when_the_budget_is_spent(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{**BETWEEN_LOGS, "train.steps": 12, "health.max_rollbacks": 1})
    trainer = make_trainer(cfg, tmp_path)
    poison_d_once(trainer, after_step=3)
    poison_d_once(trainer, after_step=5)
    assert trainer.fit()["status"] == "collapsed" and trainer.rollbacks == 1
    from pipeline.cli import exit_code

    assert exit_code("collapsed") == 3 and exit_code("preempted") == 75 and exit_code("finished") == 0


def test_warmup_keeps_relative_rules_quiet_but_not_nan():
    mon = HealthMonitor(HealthConfig(min_history=3, warmup_steps=100))
    for s in range(5):
        assert not mon.observe(s, {"sigma0_g_first": 1.0, "d_loss_real": 0.5, "d_loss_fake": 0.5}).alarm
    assert not mon.observe(50, {"sigma0_g_first": 50.0}).alarm  # a jump while warming up
    assert not mon.observe(60, {"d_loss_real": 0.0, "d_loss_fake": 0.0}).alarm
    assert mon.observe(70, {"d_loss_real": float("nan")}).alarm  # NaN is never quiet
    assert mon.observe(100, {"sigma0_g_first": 50.0}).alarm  # warmup over
