"""Evaluation in the training loop: FID after checkpoints to a real MLflow server, best checkpoint in the store
and the Model Registry, failures that only warn, cached reference statistics, and the truncation sweep."""

from __future__ import annotations

import json
import logging
import math
import shutil
import types
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import config as C
from pipeline import evaluation
from pipeline.tracking import Tracker
from tests.trainer_harness import make_trainer, tiny_config

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

# classifier features on a few real images: an evaluation costs about a second on one CPU thread
FAST_EVAL = {
    "eval.features": "classifier", "eval.num_samples": 60, "eval.batch_size": 30, "eval.reference_images": 300,
    "eval.classifier_epochs": 1, "eval.pr_samples": 60, "eval.standing_stats_passes": 2,
}


@pytest.fixture()
def shards_copy(digits_shards, tmp_path):
    """The session's digits shards in a folder of this test's own, so caches written next to the manifest
    start empty."""
    src, n = digits_shards
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    return str(dst), n


def test_evaluation_in_training_logs_fid_marks_best_and_registers_the_model(tmp_path, shards_copy, mlflow_server):
    shards, n = shards_copy
    name = f"biggan-test-{uuid.uuid4().hex[:8]}"
    cfg = tiny_config(tmp_path, shards, n, **FAST_EVAL, **{
        "train.steps": 4, "train.checkpoint_every": 2, "eval.every": 2, "eval.register_model": name,
        "eval.truncation_sweep": "0.5,0",
    })
    tracker = Tracker(mlflow_server.uri, "eval-test", f"eval-{uuid.uuid4().hex[:6]}", retry_wait=0.2)
    trainer = make_trainer(cfg, tmp_path, tracker=tracker)
    result = trainer.fit()
    tracker.close()
    assert result["status"] == "finished" and trainer.evaluator.failures == 0

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = tracker.run_id
    history = client.get_metric_history(run_id, "eval/fid")
    assert sorted(m.step for m in history) == [2, 4]
    assert all(math.isfinite(m.value) and m.value >= 0 for m in history)
    logged = client.get_run(run_id).data.metrics
    for key in ("eval/is_mean", "eval/precision_classifier", "eval/recall_classifier", "truncation/0.5/fid",
                "truncation/none/fid"):
        assert key in logged

    # the best evaluation marks its checkpoint, and its g_ema.pt is a registered model version
    fids = {m.step: m.value for m in history}
    best_step = min(fids, key=fids.get)
    best = trainer.store.labels()["best"]
    assert best["step"] == best_step and best["metric"] == "fid" and best["fid"] == pytest.approx(fids[best_step])
    versions = client.search_model_versions(f"name = '{name}'")
    assert versions and all(v.run_id == run_id for v in versions)
    top = client.get_model_version_by_alias(name, "best")
    assert top.tags["step"] == str(best_step) and float(top.tags["fid"]) == pytest.approx(fids[best_step])
    assert top.source == f"runs:/{run_id}/checkpoints/step-{best_step:08d}"
    assert [f.path for f in client.list_artifacts(run_id, f"checkpoints/step-{best_step:08d}")] == [
        f"checkpoints/step-{best_step:08d}/g_ema.pt"
    ]
    # the health monitor's input: the newest FID, handed over once
    assert trainer.evaluator.take_fid() == pytest.approx(fids[4]) and trainer.evaluator.take_fid() is None
    # the truncation sweep: a plot and the numbers as artifacts
    artifacts = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert {"eval/truncation_sweep.png", "eval/truncation_sweep.json"} <= artifacts


def test_a_failing_evaluation_warns_and_training_goes_on(tmp_path, digits_shards, caplog):
    shards, n = digits_shards
    missing = tmp_path / "no-such-inception.pt"
    cfg = tiny_config(tmp_path, shards, n, **{
        "train.steps": 4, "train.checkpoint_every": 2, "eval.every": 2, "eval.features": "inception",
        "eval.inception_weights": str(missing), "eval.num_samples": 8, "eval.truncation_sweep": "1.0",
    })
    trainer = make_trainer(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation"):
        result = trainer.fit()
    assert result["status"] == "finished" and result["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.evaluation"]
    assert len(warnings) == 3  # two evaluations and the sweep
    assert all("InceptionWeightsNotFound" in w and str(missing) in w and "training goes on" in w for w in warnings)
    assert trainer.evaluator.last_fid is None and trainer.store.labels()["best"] is None


def test_reference_statistics_are_cached_next_to_the_manifest_and_reused(tmp_path, shards_copy, monkeypatch):
    shards, n = shards_copy
    cfg = tiny_config(tmp_path, shards, n, **FAST_EVAL)

    def reference_set():
        return evaluation.ReferenceSet(cfg.eval, shards, resolution=32, num_classes=n, output_dir=tmp_path / "out")

    first = reference_set().reference()
    assert first.count == 300 and first.features.shape[0] == 60
    cached = sorted(p.name for p in (tmp_path / "shards").iterdir() if p.name.startswith(("fid_stats_", "eval_")))
    assert cached == ["eval_classifier_32px_300_1ep.pt", f"fid_stats_{first.extractor}_32_300.npz"]

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(evaluation, "build_loader", no_reading)
    again = reference_set().reference()
    assert again.extractor == first.extractor
    assert (again.mu == first.mu).all() and (again.sigma == first.sigma).all()


def test_remote_shards_cache_under_the_output_dir(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation"):
        where = evaluation.eval_cache_dir("s3://bucket/shards", tmp_path / "run")
    assert where == tmp_path / "run" / "eval_cache"
    assert "s3://bucket/shards are remote" in caplog.text and str(where) in caplog.text


def test_eval_every_must_be_a_multiple_of_checkpoint_every():
    cfg = C.RunConfig()
    cfg.train.checkpoint_every, cfg.eval.every = 1000, 1500
    with pytest.raises(C.ConfigError, match="eval.every"):
        C.validate(cfg)
    cfg.eval.every = 2000
    C.validate(cfg)
    cfg.eval.truncation_sweep = "0.5,x"
    with pytest.raises(C.ConfigError, match="eval.truncation_sweep"):
        C.validate(cfg)


def _evaluate_on_two_ranks(rank: int, rendezvous: str, results: str) -> None:
    """One of two gloo ranks: rank 0 'evaluates' (a fixed FID, or a failure), every rank reports what it got."""
    torch.set_num_threads(1)  # a spawned process: conftest's session fixture does not reach it
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    got = []
    for outcome in (12.5, "fail"):
        trainer = types.SimpleNamespace(
            rank=rank, world_size=2, device=torch.device("cpu"), cfg=C.RunConfig(),
            tracker=Tracker("", "", "", enabled=False),
        )
        trainer.cfg.eval.every = 2
        ev = evaluation.Evaluator(trainer)

        def fake(step, info, outcome=outcome):
            if outcome == "fail":
                raise RuntimeError("no evaluation today")
            return outcome

        ev._evaluate = fake
        got.append([ev.after_checkpoint(1, None), ev.after_checkpoint(2, None), ev.last_fid])
    with open(f"{results}.{rank}", "w") as f:
        json.dump(got, f)
    dist.destroy_process_group()


def test_rank0_fid_reaches_every_rank(tmp_path):
    results = str(tmp_path / "got")
    mp.spawn(_evaluate_on_two_ranks, args=(str(tmp_path / "pg"), results), nprocs=2, join=True)
    for rank in (0, 1):
        with open(f"{results}.{rank}") as f:
            # not due at step 1; at step 2 rank 0's FID everywhere, and None everywhere when rank 0 failed
            assert json.load(f) == [[None, 12.5, 12.5], [None, None, None]]
