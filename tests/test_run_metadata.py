"""What a reviewer reads in MLflow, from a real (short) training run against a real MLflow server on
127.0.0.1: system metrics of the node, the shard set as the run's input, source tags, the description, and
flat params named the same in every run."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from pipeline import run_metadata
from pipeline.data import read_manifest
from pipeline.run_metadata import RunReview, flat_params, flatten
from pipeline.tracking import Tracker
from tests.trainer_harness import make_trainer, tiny_config

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def test_flatten_makes_dotted_keys_and_consistent_text():
    flat = flatten({"a": {"b": 1, "c": {"d": None, "e": True}}, "f": [1, 2], "g": "x", "h": 1e-4, "i": {}})
    assert flat == {"a.b": "1", "a.c.d": "null", "a.c.e": "true", "f": "[1, 2]", "g": "x", "h": "0.0001", "i": "{}"}
    long = flatten({"k": "y" * 7000})["k"]
    assert len(long) == run_metadata.PARAM_VALUE_MAX and long.endswith("…")


def test_a_training_run_is_readable_in_mlflow(tmp_path, digits_shards, mlflow_server):
    shards, n = digits_shards
    experiment = f"review-{uuid.uuid4().hex[:6]}"
    cfg = tiny_config(tmp_path, shards, n, **{"train.steps": 4, "tracking.system_metrics_every": 0.2})
    tracker = Tracker(mlflow_server.uri, experiment, "run-a", retry_wait=0.2)
    trainer = make_trainer(cfg, tmp_path, tracker=tracker)
    review = RunReview.begin(tracker, cfg, tags={"preset": cfg.preset})
    assert review.monitor is not None  # rank 0 is the first (only) rank of this node
    result = trainer.fit()
    review.end(trainer.status, trainer.step)
    tracker.set_status("FINISHED")
    tracker.close()
    assert result["status"] == "finished"

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    # system metrics of this node, from MLflow's own monitor
    node = review.node
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage",
                "network_receive_megabytes"):
        assert f"system/{node}/{key}" in run.data.metrics, sorted(run.data.metrics)
    # the shard set as the training input, with the manifest's digest and numbers
    manifest = read_manifest(shards)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == run_metadata.manifest_sha256(manifest)[:32]
    assert shards in inp.dataset.source and {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    profile = json.loads(inp.dataset.profile)
    assert profile["num_samples"] == manifest["num_samples"] and profile["num_classes"] == n
    assert profile["classes"] == manifest["classes"] and profile["num_shards"] == len(manifest["shards"])
    # standard source tags and the description, updated at the end
    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=run_metadata.ROOT).stdout
    assert tags["mlflow.source.git.commit"] == head.strip() and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"] and "git_commit" not in tags
    note = tags["mlflow.note.content"]
    assert "**demo**" in note and shards in note and f"{manifest['num_samples']} images" in note
    assert "world size 1" in note and "status: **finished** at step 4/4" in note
    assert run.data.params == flat_params(cfg) and run.data.params["preset"] == "demo"
    config_json = client.download_artifacts(tracker.run_id, "config.json", str(tmp_path))
    assert json.loads(open(config_json).read())["train"]["steps"] == 4

    # another run with other overrides: the same param names, other values, comparable column by column
    other = tiny_config(tmp_path, shards, n, **{"train.steps": 2, "data.flip": False, "model.g_ch": 8,
                                                "tracking.system_metrics_every": 0})
    tracker2 = Tracker(mlflow_server.uri, experiment, "run-b", retry_wait=0.2)
    review2 = RunReview.begin(tracker2, other)
    assert review2.monitor is None  # system_metrics_every 0: off
    review2.end("finished", 2)
    tracker2.close()
    params2 = client.get_run(tracker2.run_id).data.params
    assert set(params2) == set(run.data.params)
    assert (params2["train.steps"], params2["data.flip"], params2["model.g_ch"]) == ("2", "false", "8")
    assert (run.data.params["data.flip"], run.data.params["model.g_ch"]) == ("true", "4")
