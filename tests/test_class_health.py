"""Class-aware health signals (pipeline/class_health.py) with the real dataset classifier on real images."""

import logging

import pytest
import torch

from pipeline.evaluation import real_images
from tests.data_helpers import write_id_shards
from tests.trainer_harness import make_trainer, run_two_rank_script, tiny_config

CLASSIFIER = {"health.enabled": True, "eval.reference_images": 600, "eval.classifier_epochs": 3,
              "health.real_images": 600}


@pytest.fixture(scope="module")
def signals(tmp_path_factory, digits_shards):
    shards, n = digits_shards
    tmp = tmp_path_factory.mktemp("class-health")
    trainer = make_trainer(tiny_config(tmp, shards, n, **CLASSIFIER), tmp)
    trainer.class_signals.setup()
    images, labels = real_images(shards, count=600, batch_size=200, resolution=32)
    return trainer, trainer.class_signals, images, labels


def _batch_like(sig, images, labels, pick=lambda rows: rows):
    """Real images arranged as the health batch: samples_per_class of each health class."""
    per = sig.cfg.samples_per_class
    rows = [pick(images[labels == c][:per]) for c in sig.classes.tolist()]
    return torch.cat(rows)


def test_the_classifier_is_trained_once_and_cached_next_to_the_manifest(signals, digits_shards):
    trainer, sig, _, _ = signals
    assert sig.on and sig.off_reason is None
    # "_bf16" ends the name where the classifier trained in bf16 (eval.classifier_precision=auto)
    assert list(__import__("pathlib").Path(digits_shards[0]).glob("eval_classifier_32px_600_3ep*.pt"))
    assert sig.y.tolist() == sorted(sig.y.tolist()) and len(set(sig.y.tolist())) == 10  # class-balanced


def test_real_images_score_high_fidelity_and_the_diversity_of_real_data(signals):
    _, sig, images, labels = signals
    out = {k: float(v) for k, v in sig.measure(_batch_like(sig, images, labels)).items()}
    assert out["class_fidelity"] > 0.7
    assert 0.6 < out["class_diversity"] < 1.4  # 1 = as varied as the real images the spread was taken from
    assert out["class_fid"] > 0


def test_one_image_per_class_has_no_diversity_and_one_class_for_all_has_chance_fidelity(signals):
    _, sig, images, labels = signals
    real = {k: float(v) for k, v in sig.measure(_batch_like(sig, images, labels)).items()}
    copies = sig.measure(_batch_like(sig, images, labels, pick=lambda rows: rows[:1].expand_as(rows)))
    assert float(copies["class_diversity"]) == pytest.approx(0.0, abs=1e-3)  # mode collapse inside each class
    assert float(copies["class_fid"]) > real["class_fid"]
    same = images[labels == 3].repeat(2, 1, 1, 1)[: len(sig.y)]  # every label drawn as one digit: lost conditioning
    lost = {k: float(v) for k, v in sig.measure(same).items()}
    assert lost["class_fidelity"] <= 0.2 and lost["class_fid"] > 2 * real["class_fid"]


def test_a_trainer_reports_the_class_signals_at_each_check(signals):
    trainer, _, _, _ = signals
    out = trainer.health_signals({})
    assert {"class_fidelity", "class_diversity", "class_fid", "variety", "sigma0_g_first"} <= out.keys()
    assert 0.0 <= out["class_fidelity"] <= 1.0


def test_without_a_classifier_class_signals_are_off_and_the_other_rules_run(tmp_path, caplog):
    shards = tmp_path / "one-class"
    write_id_shards(shards, [48], num_classes=1, resolution=32)
    cfg = tiny_config(tmp_path, str(shards), 1, **CLASSIFIER, **{"train.steps": 6, "health.every": 2})
    trainer = make_trainer(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.class_health"):
        result = trainer.fit()
    lines = [r.getMessage() for r in caplog.records if "class signals off" in r.getMessage()]
    assert lines == ["health: class signals off: the data has a single class; the other health rules still run"]
    assert result["status"] == "finished"
    out = trainer.health_signals({})
    assert "class_fidelity" not in out and {"variety", "sigma0_g_first", "sigma0_d_max"} <= out.keys()


def test_class_fid_agrees_with_the_metrics_frechet_distance(signals):
    import numpy as np

    from pipeline.metrics.frechet import frechet_distance

    _, sig, images, _ = signals
    feats = sig.classifier.features(images[:100]).double()
    f = feats.numpy()
    expected = frechet_distance(f.mean(0), np.cov(f, rowvar=False), sig.mu, sig.sigma)
    assert sig._frechet(feats) == pytest.approx(expected, rel=1e-6)


# -- a natural failure: real settings, no injected tensors -------------------------------------------------------
# G at 50x D's learning rate, without orthogonal regularization: D stays alive (no NaN, G's gradient never 0, its
# spectra steady), so the rules from before the class signals see nothing, while EMA G's samples leave their
# classes (class FID several times its trailing median). A 24-step run has 12 checks: 4 of history, not the
# default 10, leave the relative rules time to act.
FAST_G = {"optim.g_lr": 1e-2, "optim.d_lr": 2e-4, "loss.ortho_beta": 0.0, "train.steps": 24, "health.every": 2,
          "train.checkpoint_every": 10, "health.healthy_after": 2, "health.min_history": 4}
CLASS_RULES = {"class_fid", "class_fidelity", "class_diversity"}
SEEDS = range(4)  # which seed's trajectory fails, and when, depends on the CPU's kernels: one of four must


def _fit(tmp_path, shards, n, **extra):
    trainer = make_trainer(tiny_config(tmp_path, shards, n, **CLASSIFIER, **FAST_G, **extra), tmp_path)
    alarms = []
    check = trainer.check_health

    def recorded(losses):
        decision = check(losses)
        if decision.alarm:
            alarms.append(decision)
        return decision

    trainer.check_health = recorded
    return trainer, trainer.fit(), alarms


def test_a_learning_rate_far_too_high_for_g_loses_classes_unseen_by_the_old_rules_and_caught_by_the_class_signals(
        tmp_path, digits_shards):
    shards, n = digits_shards
    seen = {}
    for seed in SEEDS:
        caught, result, alarms = _fit(tmp_path / f"new{seed}", shards, n, **{"train.seed": seed})
        seen[seed] = [a.reason for a in alarms]
        if alarms:
            break
    assert alarms, f"no seed of {list(SEEDS)} failed: {seen}"
    first = alarms[0]
    assert set(first.evidence) & CLASS_RULES, first.explain()  # a class rule fired, not NaN / sigma0 / dead D
    assert result["status"] in ("finished", "collapsed")
    # restored to a checkpoint from before the last healthy check, never to the failing state
    assert caught.rollback_log and caught.rollback_log[0][1] <= first.step - 2 * 2
    # the same run judged by the rules from before the class signals: nothing fires
    _, result, old_alarms = _fit(tmp_path / "old", shards, n, **{"train.seed": seed, "health.class_signals": False})
    assert [a.reason for a in old_alarms] == [] and result["rollbacks"] == 0 and result["status"] == "finished"


def test_two_ranks_split_the_health_batch_and_agree_with_one_rank(tmp_path, digits_shards, signals):
    shards, n = digits_shards
    one = make_trainer(tiny_config(tmp_path / "one", shards, n, **CLASSIFIER), tmp_path / "one")
    one.class_signals.setup()
    expected = {k: v for k, v in one.health_signals({}).items() if k.startswith("class_")}
    results = run_two_rank_script("tests.two_rank_class_health", tmp_path, shards, n)
    assert [r["share"] for r in results] == [[0, 50], [50, 100]]  # each rank generates half of the 100 samples
    assert results[0]["signals"] == results[1]["signals"]
    for key, value in expected.items():
        assert results[0]["signals"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
