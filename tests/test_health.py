"""Collapse detection and automatic rollback."""

import math

import pytest
import torch

from pipeline.config import HealthConfig
from pipeline.health import HealthMonitor
from tests.trainer_harness import make_trainer, tiny_config


def _steady(mon: HealthMonitor, steps, **extra):
    for s in steps:
        d = mon.observe(s, {"sigma0_g_first": 1.0 + 0.01 * (s % 3), "sigma0_d_max": 2.0, "variety": 0.5,
                            "d_loss_real": 0.6 + 0.01 * (7 * s % 3), "d_loss_fake": 0.6, "g_loss": 1.0, **extra})
        assert not d.alarm, d.explain()


def test_relative_rules_judge_against_the_runs_own_history():
    mon = HealthMonitor(HealthConfig(min_history=5, sigma_ratio=3.0))
    # a big absolute sigma0 is fine if it has always been big: rules are relative
    for s in range(10):
        assert not mon.observe(s, {"sigma0_g_first": 50.0 + s % 2, "d_loss_real": 0.5 + 0.01 * (7 * s % 3),
                                   "d_loss_fake": 0.5}).alarm
    d = mon.observe(10, {"sigma0_g_first": 200.0, "d_loss_real": 0.5, "d_loss_fake": 0.5})
    assert d.alarm and "sigma0_g_first" in d.reason and d.onset_step == 9
    assert d.evidence["sigma0_g_first"]["trailing_median"] == pytest.approx(50.5)


def test_no_alarm_before_enough_history():
    mon = HealthMonitor(HealthConfig(min_history=5))
    _steady(mon, range(3))
    assert not mon.observe(3, {"sigma0_g_first": 100.0}).alarm


@pytest.mark.parametrize("signal, value, word", [
    ("sigma0_d_max", 20.0, "sigma0_d_max"),
    ("variety", 0.01, "variety"),
])
def test_d_sigma_jump_and_lost_variety_raise_alarms(signal, value, word):
    mon = HealthMonitor(HealthConfig(min_history=5))
    _steady(mon, range(10))
    d = mon.observe(10, {"sigma0_g_first": 1.0, "sigma0_d_max": 2.0, "variety": 0.5, signal: value})
    assert d.alarm and word in d.reason


def _d_jump(mon: HealthMonitor, class_fid: float):
    _steady(mon, range(10), class_fid=20.0)
    for s in range(10, 12):  # the class FID's history: 20, 21, 19; its best is 19
        assert not mon.observe(s, {"sigma0_g_first": 1.0, "sigma0_d_max": 2.0, "variety": 0.5, "d_loss_real": 0.6 + s / 100,
                                   "d_loss_fake": 0.6, "class_fid": 20.0 + (0, 1, -1)[s % 3]}).alarm
    return mon.observe(12, {"sigma0_g_first": 1.0, "sigma0_d_max": 12.0, "variety": 0.5, "d_loss_real": 0.7,
                            "d_loss_fake": 0.6, "class_fid": class_fid})


def test_a_d_sigma_jump_needs_gs_class_fid_to_follow():
    # bench/detector.py's lr_d_high: D's sigma0 jumped 6x while EMA G's samples were as good as before
    held = _d_jump(HealthMonitor(HealthConfig(min_history=5)), class_fid=21.0)
    assert not held.alarm and held.evidence["held"]["sigma0_d_max"] == 12.0 and "no alarm" in held.reason
    fired = _d_jump(HealthMonitor(HealthConfig(min_history=5)), class_fid=30.0)
    assert fired.alarm and "sigma0_d_max" in fired.reason and "1.6x the window's best 19" in fired.reason
    # ratio 0: D's jump alone is enough, as without class signals (test above)
    alone = _d_jump(HealthMonitor(HealthConfig(min_history=5, d_sigma_quality_ratio=0.0)), class_fid=21.0)
    assert alone.alarm and "sigma0_d_max" in alone.reason


def test_non_finite_losses_raise_at_once():
    mon = HealthMonitor(HealthConfig())
    d = mon.observe(1, {"d_loss_real": math.nan, "g_loss": 1.0})
    assert d.alarm and "non-finite" in d.reason and "d_loss_real" in d.reason


def test_d_loss_near_zero_needs_patience():
    mon = HealthMonitor(HealthConfig(d_loss_floor=0.05, d_loss_patience=3))
    for s in range(2):
        assert not mon.observe(s, {"d_loss_real": 0.01, "d_loss_fake": 0.01}).alarm
    assert mon.observe(2, {"d_loss_real": 0.01, "d_loss_fake": 0.01}).alarm


def test_checkpoint_becomes_healthy_after_a_quiet_window():
    mon = HealthMonitor(HealthConfig(healthy_after=2, min_history=3))
    _steady(mon, range(5))
    mon.checkpoint_saved(5)
    _steady(mon, [6])
    assert mon.newly_healthy() == []
    _steady(mon, [7])
    assert mon.newly_healthy() == [5]
    mon.checkpoint_saved(8)
    assert mon.observe(9, {"sigma0_g_first": 99.0}).alarm  # an alarm inside the window: never healthy
    _steady(mon, [10, 11, 12])
    assert mon.newly_healthy() == []


def test_state_round_trip():
    mon = HealthMonitor(HealthConfig(min_history=3))
    _steady(mon, range(6))
    mon.checkpoint_saved(6)
    other = HealthMonitor(HealthConfig(min_history=3))
    other.load_state_dict(mon.state_dict())
    assert other.observe(7, {"sigma0_g_first": 10.0}).alarm == mon.observe(7, {"sigma0_g_first": 10.0}).alarm


# -- the trainer, for real ------------------------------------------------------------------------------------
HEALTH = {"health.enabled": True, "health.every": 2, "health.min_history": 3, "health.healthy_after": 2,
          "train.checkpoint_every": 4, "train.keep_last": 1}


def test_injected_collapse_is_detected_and_rolled_back(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **HEALTH, **{"train.steps": 30})
    trainer = make_trainer(cfg, tmp_path, inject_collapse_at=20)
    result = trainer.fit()
    assert result["status"] == "finished" and result["rollbacks"] == 1
    assert trainer.injected and trainer.step == 30
    # sigma0 is refreshed by the next training forward, so the check at 22 sees the jump; the last quiet
    # check was at 20 (the onset), and checkpoint 16 had passed its quiet window (checks 18, 20) by then
    assert trainer.rollback_log == [(22, 16)]
    assert trainer.store.labels()["healthy"][:5] == [0, 4, 8, 12, 16]  # 0: the initial weights
    # health returned: checkpoints after the rollback became healthy again
    assert max(trainer.store.labels()["healthy"]) >= 24
    for group in trainer.d_engine.optimizer.param_groups:  # the injected D lr x100 is gone, then halved
        assert group["lr"] == pytest.approx(cfg.optim.d_lr * 0.5)


def test_nan_triggers_rollback(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **HEALTH, **{"train.steps": 14})
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.fit()["rollbacks"] == 0
    with torch.no_grad():
        next(trainer.D.parameters()).fill_(float("nan"))
    trainer.cfg.train.steps = 20
    result = trainer.fit()
    assert result["rollbacks"] == 1 and result["status"] == "finished"
    assert all(torch.isfinite(p).all() for p in trainer.D.parameters())


def test_rollbacks_exhausted_stop_cleanly_as_collapsed(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **HEALTH, **{"train.steps": 30, "health.max_rollbacks": 0})
    trainer = make_trainer(cfg, tmp_path, inject_collapse_at=20)
    result = trainer.fit()
    assert result["status"] == "collapsed" and trainer.step == 22 and result["rollbacks"] == 0
    labels = trainer.store.labels()
    assert labels["best"]["step"] == max(labels["healthy"])  # the best checkpoint is marked for the user
    assert labels["best"]["step"] in [c.step for c in trainer.store.list()]


def test_healthy_run_of_hundreds_of_steps_never_rolls_back(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"health.enabled": True, "health.every": 5, "train.steps": 300,
                                              "data.batch_size": 4, "train.global_batch": 4,
                                              "train.checkpoint_every": 50, "train.log_every": 5})
    trainer = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    assert result == {**result, "status": "finished", "rollbacks": 0, "step": 300}


def test_a_new_fid_is_judged_once_at_the_next_check(tmp_path, digits_shards):
    shards, n = digits_shards
    trainer = make_trainer(tiny_config(tmp_path, shards, n), tmp_path)
    trainer.evaluator.last_fid = 42.0
    assert trainer.health_signals({})["fid"] == 42.0
    assert "fid" not in trainer.health_signals({})  # handed over once
    assert {"sigma0_g_first", "sigma0_d_max", "variety"} <= trainer.health_signals({}).keys()


def test_a_run_says_what_its_health_checks_cost_against_its_training_steps(tmp_path, digits_shards, capsys):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"health.enabled": True, "health.class_signals": False,
                                               "train.steps": 6, "health.every": 2})
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.fit()["status"] == "finished"
    assert trainer.health_checks == 3 and 0 < trainer.health_time < trainer.train_time
    finished = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[finished]")]
    share = 100 * trainer.health_time / trainer.train_time
    assert len(finished) == 1 and "3 health checks took" in finished[0] and f"{share:.1f}% of the training" in finished[0]


# -- class-aware rules and the sigma0 trend (synthetic signals; the real-training tests are in test_class_health.py)
def _classy(mon: HealthMonitor, steps, fidelity=0.6, diversity=0.8, fid=40.0, sigma=1.0):
    for s in steps:
        d = mon.observe(s, {"sigma0_g_first": sigma, "class_fidelity": fidelity + 0.01 * (s % 2),
                            "class_diversity": diversity, "class_fid": fid,
                            "d_loss_real": 0.6 + 0.01 * (7 * s % 3), "d_loss_fake": 0.6})
        assert not d.alarm, d.explain()


def test_fidelity_near_chance_is_a_collapse_once_the_run_had_learned_classes():
    mon = HealthMonitor(HealthConfig(min_history=100, fidelity_floor=2.0), num_classes=10)
    _classy(mon, range(0, 50, 5), fidelity=0.1)  # an untrained G sits at chance: nothing to fall from
    _classy(mon, range(50, 100, 5), fidelity=0.5)
    d = mon.observe(100, {"class_fidelity": 0.12})
    assert d.alarm and "class fidelity 0.12 is below 2 x chance" in d.reason and d.onset_step == 95
    assert d.evidence["class_fidelity"]["peak"] == pytest.approx(0.51)


def test_fidelity_still_at_chance_by_the_deadline_is_a_collapse():
    mon = HealthMonitor(HealthConfig(min_history=100, fidelity_by_step=60), num_classes=10)
    _classy(mon, range(0, 60, 5), fidelity=0.1)
    d = mon.observe(60, {"class_fidelity": 0.1})
    assert d.alarm and "still, at step 60" in d.reason


@pytest.mark.parametrize("signal, value, word", [
    ("class_fidelity", 0.25, "class_fidelity = 0.25 is below 0.5 x its trailing median"),
    ("class_diversity", 0.2, "class_diversity = 0.2 is below 0.3 x its trailing median"),
    ("class_fid", 130.0, "class_fid = 130 is above 3.0 x its trailing median"),
])
def test_class_signals_are_judged_against_their_trailing_median(signal, value, word):
    mon = HealthMonitor(HealthConfig(min_history=5), num_classes=10)
    _classy(mon, range(10))
    d = mon.observe(10, {"class_fidelity": 0.6, "class_diversity": 0.8, "class_fid": 40.0, signal: value})
    assert d.alarm and word in d.reason, d.reason


def test_diversity_floor_and_fid_ceiling_hold_whatever_the_history():
    # a slow decline that drags the trailing median along: the relative rule never fires, the floor does
    mon = HealthMonitor(HealthConfig(min_history=3, window=3), num_classes=10)
    values = [0.8 * 0.85**i for i in range(12)]
    fired = [mon.observe(i, {"class_diversity": v}).alarm for i, v in enumerate(values)]
    assert fired.index(True) == next(i for i, v in enumerate(values) if v < 0.3)
    mon = HealthMonitor(HealthConfig(min_history=3, window=3), num_classes=10)
    fids = [200.0, 150, 110, 80, 60, 70, 90, 120, 150, 185]
    fired = [mon.observe(i, {"class_fid": v}).alarm for i, v in enumerate(fids)]
    assert fired == [False] * 9 + [True]  # 185 >= 0.9 x 200 (the untrained G's), after it had fallen to 60


def test_a_slow_steady_sigma0_climb_fires_the_trend_rule():
    cfg = HealthConfig(min_history=5, sigma_trend_checks=10, sigma_trend_factor=1.8, sigma_ratio=3.0)
    mon = HealthMonitor(cfg)
    _steady(mon, range(0, 50, 5))  # flat at ~1
    sigmas = [1.0 * 1.07**i for i in range(1, 40)]  # +7% per check: never 3x its trailing median
    for i, sigma in enumerate(sigmas):
        step = 50 + 5 * i
        d = mon.observe(step, {"sigma0_g_first": sigma})
        if d.alarm:
            break
    assert d.alarm and "sigma0_g_first rose" in d.reason and "R^2" in d.reason
    assert d.onset_step == step - 5  # the last quiet check: an early warning returns to the newest healthy point
    mon.reset_after_rollback()
    assert not mon.observe(step + 5, {"sigma0_g_first": sigma}).alarm  # the window starts afresh
    assert d.evidence["sigma0_trend"]["rise"] >= 1.8


def test_sigma0_that_jumps_about_is_no_trend():
    mon = HealthMonitor(HealthConfig(min_history=100, sigma_trend_checks=10))
    for i in range(30):  # noisy around 1 with one excursion: big ratio last/first but no steady climb
        assert not mon.observe(5 * i, {"sigma0_g_first": [1.0, 0.6, 1.3, 0.9][i % 4]}).alarm


def test_new_state_round_trips():
    mon = HealthMonitor(HealthConfig(min_history=3, sigma_trend_checks=5), num_classes=10)
    _classy(mon, range(6), fidelity=0.5)
    other = HealthMonitor(HealthConfig(min_history=3, sigma_trend_checks=5), num_classes=10)
    other.load_state_dict(mon.state_dict())
    assert list(other.trend) == list(mon.trend) and other.extremes == mon.extremes
    assert other.observe(7, {"class_fidelity": 0.1}).alarm


def test_a_sigma0_climb_while_the_class_fid_holds_its_best_is_how_the_run_learns_not_an_alarm():
    """bench/detector.py's no_ortho_high_lr: sigma0 rose 1.78x in 200 steps while quality still improved."""
    def climb(fids):
        cfg = HealthConfig(min_history=100, sigma_trend_checks=10, sigma_trend_factor=1.8, sigma_ratio=3.0,
                           class_fid_ratio=100.0)
        mon = HealthMonitor(cfg, num_classes=10)
        for i, fid in enumerate(fids):
            d = mon.observe(5 * i, {"sigma0_g_first": 1.07**i, "class_fid": fid})
            if d.alarm:
                return d
        return None

    improving = [100.0 - 2 * i for i in range(40)]
    assert climb(improving) is None
    # the same climb, the class FID 1.3x its best in the window: the climb is corroborated
    worsening = [60.0] * 12 + [60.0 * 1.05**i for i in range(1, 29)]
    d = climb(worsening)
    assert d is not None and "sigma0_g_first rose" in d.reason and "x the window's best 60" in d.reason
    assert d.evidence["sigma0_trend"]["class_fid"] >= 1.25 * 60
    # without class signals the climb alone decides (test_a_slow_steady_sigma0_climb_fires_the_trend_rule)


def test_a_d_whose_losses_stop_moving_is_dead_and_the_onset_is_before_it_froze():
    """bench/detector.py's no_ortho_high_lr (D lr 8e-3): from step ~170 D gave every input the same output, the
    hinge losses stuck at d_real 1.482, d_fake 0.518 (sum 2: a constant D), and nothing learned any more."""
    mon = HealthMonitor(HealthConfig(every=5, min_history=100, d_frozen_checks=4))
    healthy = [(1.0 + 0.03 * (i % 3), 0.9 - 0.02 * (i % 4)) for i in range(30)]
    for i, (real, fake) in enumerate(healthy):
        assert not mon.observe(5 * i, {"d_loss_real": real, "d_loss_fake": fake}).alarm
    steps = []
    for j in range(8):  # one mixed window, then frozen
        step = 150 + 5 * j
        real, fake = (1.3, 0.6) if j == 0 else (1.482, 0.518)
        d = mon.observe(step, {"d_loss_real": real, "d_loss_fake": fake})
        steps.append(step)
        if d.alarm:
            break
    assert d.alarm and "D's losses have not moved for 4 checks" in d.reason
    assert d.step == 175 and d.onset_step == 145  # frozen at 160-175; restore from before the window that froze
    mon.reset_after_rollback()
    assert not mon.observe(180, {"d_loss_real": 1.482, "d_loss_fake": 0.518}).alarm  # counting starts afresh
    # a D that wins outright (both losses 0) is the d_loss_floor rule's, not a dead D
    winning = HealthMonitor(HealthConfig(min_history=100, d_frozen_checks=4, d_loss_patience=50))
    assert not any(winning.observe(5 * i, {"d_loss_real": 0.0, "d_loss_fake": 0.0}).alarm for i in range(10))
    # a healthy run's window means never repeat to 1e-4 for four checks; off with d_frozen_checks=0
    off = HealthMonitor(HealthConfig(min_history=100, d_frozen_checks=0))
    assert not any(off.observe(5 * i, {"d_loss_real": 1.482, "d_loss_fake": 0.518}).alarm for i in range(10))
    restored = HealthMonitor(HealthConfig(min_history=100, d_frozen_checks=4))
    restored.load_state_dict(mon.state_dict())
    assert restored.prev_d == mon.prev_d and restored.frozen == mon.frozen


def test_g_without_any_gradient_is_a_dead_d_two_checks_in():
    """bench/detector.py's no_ortho_high_lr (session 5): grad_norm/G exactly 0 from step 35 on, D's losses
    bit-identical only from 40; the frozen-loss rule fired at 55, four checks after the offline onset (35)."""
    mon = HealthMonitor(HealthConfig(every=5, min_history=100))
    recorded = [(5, 16.4), (10, 6.91), (15, 4.86), (20, 0.399), (25, 0.0572), (30, 1.01), (35, 0.0), (40, 0.0)]
    decisions = [mon.observe(step, {"grad_norm/G": norm}) for step, norm in recorded]
    assert not any(d.alarm for d in decisions[:-1])
    d = decisions[-1]
    assert d.alarm and "G's gradient norm has been exactly 0 for 2 checks" in d.reason and d.onset_step == 30
    # checks between logged steps carry no gradient norm: they neither count nor break the run of zeros
    mon = HealthMonitor(HealthConfig(every=5, min_history=100))
    assert not mon.observe(25, {"grad_norm/G": 0.5}).alarm and not mon.observe(50, {"grad_norm/G": 0.0}).alarm
    assert not mon.observe(55, {}).alarm
    d = mon.observe(75, {"grad_norm/G": 0.0})
    assert d.alarm and d.onset_step == 25
    # a tiny but real gradient is not zero; off with g_grad_zero_checks=0; the count survives a restart
    mon = HealthMonitor(HealthConfig(every=5, min_history=100))
    assert not any(mon.observe(5 * i, {"grad_norm/G": 1e-12}).alarm for i in range(10))
    off = HealthMonitor(HealthConfig(every=5, min_history=100, g_grad_zero_checks=0))
    assert not any(off.observe(5 * i, {"grad_norm/G": 0.0}).alarm for i in range(10))
    half = HealthMonitor(HealthConfig(every=5, min_history=100))
    half.observe(5, {"grad_norm/G": 1.0})
    half.observe(10, {"grad_norm/G": 0.0})
    restored = HealthMonitor(HealthConfig(every=5, min_history=100))
    restored.load_state_dict(half.state_dict())
    d = restored.observe(15, {"grad_norm/G": 0.0})
    assert d.alarm and d.onset_step == 5


def test_g_gradient_that_vanishes_against_its_history_is_a_dead_d_too():
    """bench/detector.py's lr_d_high (session 6): D died at step 510 (its outputs' spread 0 on 1,000 images), but
    ortho reg kept G's gradient norm at 0.008 instead of 0; the frozen-loss rule fired only at 530."""
    recorded = [12.2, 41.2, 58.4, 28.1, 37.7, 23.9, 33.1, 23.5, 6.6, 12.6, 4.4, 5.6]  # healthy, steps 5-60
    mon = HealthMonitor(HealthConfig(every=5, min_history=10))
    assert not any(mon.observe(5 * (i + 1), {"grad_norm/G": n}).alarm for i, n in enumerate(recorded))
    assert not mon.observe(65, {"grad_norm/G": 2.31}).alarm  # D's lr x25 at work: smaller, not gone
    assert not mon.observe(70, {"grad_norm/G": 0.008}).alarm
    d = mon.observe(75, {"grad_norm/G": 0.007})
    assert d.alarm and "below 0.01 x its trailing median" in d.reason and d.onset_step == 65
    # ratio 0: only exact zeros count
    exact = HealthMonitor(HealthConfig(every=5, min_history=10, g_grad_vanish_ratio=0.0))
    assert not any(exact.observe(5 * (i + 1), {"grad_norm/G": n}).alarm for i, n in enumerate([*recorded, 0.008, 0.007]))
