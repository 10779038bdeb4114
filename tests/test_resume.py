"""Run identity and the resume policy, against a real checkpoint store and a real MLflow store."""

from __future__ import annotations

import pytest
import torch

from pipeline import resume
from pipeline.checkpoint import CheckpointStore, digests
from pipeline.cli import main
from pipeline.presets import get_preset


def _commit(root, step: int) -> CheckpointStore:
    store = CheckpointStore(str(root))
    staging = root.parent / f"stage-{step}"
    staging.mkdir(parents=True)
    torch.save({"step": step}, staging / "trainer.pt")
    store.begin(step)
    store.publish(step, staging)
    store.commit(step, digests(staging), {"mlflow_run_id": "abc"})
    return store


def test_default_name_is_stable_for_what_is_trained_and_changes_with_it(tmp_path):
    a, b = get_preset("demo"), get_preset("demo")
    a.data.shards = b.data.shards = str(tmp_path / "shards")
    b.train.steps, b.cluster.num_workers, b.train.log_every = 9999, 8, 3  # longer, wider: the same run
    assert resume.default_run_name(a) == resume.default_run_name(b)
    assert resume.default_run_name(a).startswith("demo-") and len(resume.default_run_name(a)) == len("demo-") + 8
    b.optim.g_lr = 1e-3  # another experiment: another name
    assert resume.default_run_name(a) != resume.default_run_name(b)


def test_policies_against_a_real_store(tmp_path):
    cfg = get_preset("demo")
    cfg.tracking.run_name, cfg.tracking.tracking_uri = "r1", f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "ckpt"
    assert resume.check_policy(cfg, str(root), "auto") is None
    assert resume.check_policy(cfg, str(root), "never") is None
    with pytest.raises(resume.ResumeError, match="--resume must: run 'r1' has no committed checkpoint"):
        resume.check_policy(cfg, str(root), "must")
    _commit(root, 7)
    assert resume.check_policy(cfg, str(root), "auto").step == 7
    assert resume.check_policy(cfg, str(root), "must").step == 7
    with pytest.raises(resume.ResumeError, match="already has checkpoints .newest: step 7"):
        resume.check_policy(cfg, str(root), "never")


def test_a_run_already_past_its_steps_says_how_to_start_a_fresh_one(tmp_path, caplog):
    """Lowering train.steps keeps the run's name, so the launch finds the old, longer run: the warning says that
    nothing will train and how to get a fresh run."""
    cfg = get_preset("demo")
    cfg.tracking.run_name, cfg.train.steps = "r2", 5
    root = tmp_path / "ckpt"
    _commit(root, 7)
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        assert resume.check_policy(cfg, str(root), "auto").step == 7
    (message,) = [r.getMessage() for r in caplog.records if r.name == "pipeline.resume"]
    assert "already at step 7 of 5: nothing to train" in message and "--run-name" in message and str(root) in message


def test_never_refuses_a_name_mlflow_already_has(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RUN_NAME_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("biggan"), run_name="taken", tags={RUN_NAME_TAG: "taken"})
    cfg = get_preset("demo")
    cfg.tracking.run_name, cfg.tracking.tracking_uri = "taken", uri
    with pytest.raises(resume.ResumeError, match="MLflow already has a run named 'taken'"):
        resume.check_policy(cfg, str(tmp_path / "none"), "never")


def test_rank0_choice_is_what_every_rank_loads(tmp_path):
    store = _commit(tmp_path / "ckpt", 3)
    _commit(tmp_path / "ckpt", 5)
    assert resume.choose(store, 0, 1, torch.device("cpu")).step == 5


def test_launch_refuses_must_without_a_checkpoint_before_starting_ray(tmp_path, digits_shards, capsys):
    shards, _ = digits_shards
    with pytest.raises(SystemExit) as exit_info:
        main("demo", ["--data", shards, "--run-name", "nothing-here", "--resume", "must",
                      "--set", f"train.output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "--resume must: run 'nothing-here' has no committed checkpoint" in capsys.readouterr().err
