"""MLflow tracking against a real server on 127.0.0.1: one run per job, and outages don't stop training."""

import time

from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker
from tests.conftest import MlflowServer


def test_one_run_per_job_reopened_by_name(mlflow_server):
    first = Tracker(mlflow_server.uri, "t-reopen", "job-1", retry_wait=0.2)
    first.log_params({"train.steps": 10})
    first.log_metrics({"g_loss": 1.0}, step=1)
    assert first.flush(30)
    first.close()
    # a restarted worker group without the run id in a checkpoint finds the run by name
    second = Tracker(mlflow_server.uri, "t-reopen", "job-1", retry_wait=0.2)
    second.log_params({"train.steps": 10, "train.seed": 0})
    second.log_metrics({"g_loss": 0.5}, step=2)
    assert second.flush(30)
    second.close()
    assert second.run_id == first.run_id
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("t-reopen")
    assert len(client.search_runs([exp.experiment_id])) == 1
    history = client.get_metric_history(first.run_id, "g_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert client.get_run(first.run_id).data.params == {"train.steps": "10", "train.seed": "0"}


def test_server_outage_warns_retries_and_keeps_going(tmp_path, caplog):
    server = MlflowServer(tmp_path).start()
    tracker = Tracker(server.uri, "t-outage", "job-2", retries=2, retry_wait=0.2)
    tracker.log_metrics({"d_loss": 1.0}, step=1)
    assert tracker.flush(30)
    run_id = tracker.run_id
    server.stop()
    t0 = time.time()
    for step in range(2, 12):  # training goes on while the server is gone: no call blocks or raises
        tracker.log_metrics({"d_loss": 1.0 / step}, step=step)
    assert time.time() - t0 < 1.0
    time.sleep(1.0)
    assert tracker.failures > 0
    assert any("mlflow" in r.message and "failed" in r.message for r in caplog.records)
    server.start()  # same port, same store: the queued metrics go out
    assert tracker.flush(60)
    tracker.close()
    history = MlflowClient(server.uri).get_metric_history(run_id, "d_loss")
    assert [m.step for m in history] == list(range(1, 12))
    server.stop()


def test_disabled_tracker_on_other_ranks_does_nothing(mlflow_server):
    quiet = Tracker(mlflow_server.uri, "t-disabled", "job-3", enabled=False)
    quiet.log_metrics({"x": 1}, step=1)
    assert quiet.flush(1) and quiet.run_id is None
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name("t-disabled") is None
