"""MLflow tracking against a real server on 127.0.0.1: one run per job, and outages don't stop training."""

import http.server
import json
import threading
import time

from mlflow.tracking import MlflowClient

from pipeline.backlog import Backlog
from pipeline.tracking import REPLACES_TAG, RUN_NAME_TAG, Tracker
from tests.conftest import MlflowServer, free_port


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


def test_a_new_launch_without_a_checkpoint_gets_a_new_run_not_the_earlier_launchs(mlflow_server, caplog):
    """`make demo` again after `rm -rf runs` (checkpoints gone, mlflow.db kept): the same run name starts at step
    0 again, and must not append a second step-0 series to the earlier run. Within one launch (a worker restart
    before the first checkpoint) the run is still reopened."""

    def log_once(launch: str, value: float) -> str:
        tracker = Tracker(mlflow_server.uri, "t-launch", "demo-x", retry_wait=0.2, launch=launch)
        tracker.log_metrics({"g_loss": value}, step=1)
        assert tracker.flush(30)
        tracker.close()
        return tracker.run_id

    first = log_once("launch-a", 1.0)
    assert log_once("launch-a", 0.9) == first  # the same launch: reopened
    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        second = log_once("launch-b", 0.5)
    assert second != first
    assert any("has a run from an earlier launch" in r.getMessage() and second in r.getMessage()
               for r in caplog.records)
    client = MlflowClient(mlflow_server.uri)
    assert [m.value for m in client.get_metric_history(first, "g_loss")] == [1.0, 0.9]
    assert [m.value for m in client.get_metric_history(second, "g_loss")] == [0.5]
    assert client.get_run(second).data.tags[RUN_NAME_TAG] == "demo-x"


def test_server_outage_warns_retries_and_keeps_going(tmp_path, caplog):
    """Down then back: nothing lost, in order, through a backlog that spills to disk past 3 calls in memory;
    a file handed over with delete_after stays until its upload succeeded."""
    server = MlflowServer(tmp_path).start()
    spill = tmp_path / "spill.jsonl"
    tracker = Tracker(server.uri, "t-outage", "job-2", retries=2, retry_wait=0.2, max_wait=1.0, max_pending=3,
                      spill_path=spill)
    tracker.log_metrics({"d_loss": 1.0}, step=1)
    assert tracker.flush(30)
    run_id = tracker.run_id
    server.stop()
    t0 = time.time()
    for step in range(2, 12):  # training goes on while the server is gone: no call blocks or raises
        tracker.log_metrics({"d_loss": 1.0 / step}, step=step)
    sample = tmp_path / "samples_00000011.png"
    sample.write_bytes(b"png")
    tracker.log_artifact(sample, "samples", delete_after=True)
    assert time.time() - t0 < 1.0
    deadline = time.time() + 20  # the sender meets the outage within a try or two (seconds)
    while not (spill.exists() and tracker.failures > 0) and time.time() < deadline:
        time.sleep(0.1)
    assert tracker.failures > 0 and tracker.dropped == 0
    assert any("mlflow" in r.message and "failed" in r.message for r in caplog.records)
    assert spill.exists() and len(tracker._backlog.memory) <= 3  # bounded in memory, the rest on disk
    assert sample.exists()  # not uploaded yet: not deleted
    server.start()  # same port, same store: the queued calls go out, in order
    t0 = time.time()
    assert tracker.flush(60)
    assert time.time() - t0 < 20
    tracker.close()
    client = MlflowClient(server.uri)
    history = client.get_metric_history(run_id, "d_loss")
    assert [m.step for m in history] == list(range(1, 12))
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/samples_00000011.png"]
    assert not sample.exists() and not spill.exists()
    server.stop()


def test_an_outage_past_the_retry_cap_and_the_close_loses_nothing(mlflow_server, tmp_path, caplog):
    """The server is unreachable (nothing listens on its port) for longer than the back-off cap and still at
    the end of the run: the close is bounded, nothing is dropped, the unsent calls wait in the run's folder
    and the run's next start, with the server reachable, sends them in order."""
    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment("t-long")
    run_id = client.create_run(exp_id, run_name="job-long").info.run_id
    run_dir = tmp_path / "run"
    away = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(away, "t-long", "job-long", run_id=run_id, retries=2, retry_wait=0.1, max_wait=0.3,
                      max_pending=4, state_dir=run_dir)
    t0 = time.time()
    for step in range(1, 21):  # a log step every 0.1 s for 2 s: the back-off reaches its cap several times
        tracker.log_metrics({"g_loss": 1.0 / step}, step=step)
        time.sleep(0.1)
    assert time.time() - t0 < 4  # training never waits on tracking
    assert tracker.failures >= 3 and tracker.dropped == 0
    assert tracker._wait == 0.3  # capped
    assert list(run_dir.glob("biggan-tracking-spill-*.jsonl"))  # the spill lives in the run's folder, not /tmp
    t0 = time.time()
    tracker.close(timeout=1.0)
    assert time.time() - t0 < 15  # bounded by the timeout plus one attempt in flight
    unsent = run_dir / "tracking-unsent.jsonl"
    assert tracker.dropped == 0 and len(unsent.read_text().splitlines()) == 20
    assert not list(run_dir.glob("biggan-tracking-spill-*.jsonl"))
    assert any("kept in" in r.message and "tracking-unsent.jsonl" in r.message for r in caplog.records)
    again = Tracker(mlflow_server.uri, "t-long", "job-long", run_id=run_id, retry_wait=0.1, state_dir=run_dir)
    again.log_metrics({"g_loss": 0.01}, step=21)
    assert again.flush(60)
    again.close()
    history = client.get_metric_history(run_id, "g_loss")
    assert [m.step for m in history] == list(range(1, 22))  # in order, each once
    assert not unsent.exists() and again.dropped == 0


def test_backlog_keeps_unsent_calls_in_order_and_a_later_backlog_adopts_them(tmp_path):
    first = Backlog(tmp_path / "spill-a.jsonl", max_memory=3)
    for i in range(8):
        first.append(("_log_metrics", ({"x": float(i)}, i, 0)))
    first.append(("_log_inputs", ([object()],)))  # JSON cannot hold it: waits in memory while it runs ...
    assert first.spilled and len(first) == 8  # ... but behind spilled calls it cannot wait in order: refused
    assert first.dropped == 1
    kept, lost = first.keep(tmp_path / "unsent.jsonl")
    assert (kept, lost) == (8, 0) and len(first) == 0 and not (tmp_path / "spill-a.jsonl").exists()
    later = Backlog(tmp_path / "spill-b.jsonl", max_memory=3)
    assert later.adopt(tmp_path / "unsent.jsonl") == 8 and not (tmp_path / "unsent.jsonl").exists()
    later.append(("_log_metrics", ({"x": 8.0}, 8, 0)))
    got = []
    while (item := later.peek()) is not None:
        got.append(item[1][1])
        later.pop()
    assert got == list(range(9))


def test_permanent_failures_are_dropped_counted_and_logged_once(mlflow_server, tmp_path, caplog):
    tracker = Tracker(mlflow_server.uri, "t-permanent", "job-4xx", retries=3, retry_wait=0.2)
    t0 = time.time()
    for step in range(3):  # an invalid metric name: the server answers 400 each time
        tracker.log_metrics({"bad name?!": 1.0}, step=step)
    tracker.log_artifact(tmp_path / "never-written.png", "samples")  # a missing local file
    tracker.log_metrics({"g_loss": 0.5}, step=3)  # later calls are not blocked
    assert tracker.flush(30)
    assert time.time() - t0 < 15  # dropped at once, not retried with back-off
    assert tracker.dropped == 4
    tracker.close()
    client = MlflowClient(mlflow_server.uri)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "g_loss")] == [0.5]
    assert client.get_metric_history(tracker.run_id, "tracking/dropped")[-1].value == 4.0
    dropped_logs = [r.message for r in caplog.records if "dropped _log_metrics" in r.message]
    assert len(dropped_logs) == 1, dropped_logs  # once per kind of failure
    assert any("dropped _log_artifact" in r.message for r in caplog.records)


class _AlwaysFailing(http.server.BaseHTTPRequestHandler):
    """A real HTTP server on 127.0.0.1 that answers every request with the status in its class."""

    status = 503
    hits = 0

    def _answer(self):
        type(self).hits += 1
        body = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down for maintenance"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_server_errors_are_retried_with_a_cap_then_dropped(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    handler = type("Failing", (_AlwaysFailing,), {"status": 503, "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracker = Tracker(f"http://127.0.0.1:{server.server_port}", "t-5xx", "job-5xx", run_id="r" * 32,
                          retries=2, retry_wait=0.1, max_wait=0.2)
        t0 = time.time()
        tracker.log_metrics({"g_loss": 1.0}, step=1)
        tracker.set_tags({"k": "v"})
        assert tracker.flush(30)  # bounded: each call gets `retries` attempts, then it is dropped
        assert time.time() - t0 < 20
        assert tracker.dropped == 2 and tracker.failures >= 4
        tracker.close(timeout=5)
    finally:
        server.shutdown()


def test_a_deleted_run_is_replaced_by_a_new_run_tagged_with_the_old_id(mlflow_server):
    tracker = Tracker(mlflow_server.uri, "t-deleted", "job-del", retry_wait=0.2)
    tracker.log_params({"train.steps": 10})
    tracker.log_metrics({"g_loss": 1.0}, step=1)
    assert tracker.flush(30)
    old = tracker.run_id
    client = MlflowClient(mlflow_server.uri)
    client.delete_run(old)
    tracker.log_metrics({"g_loss": 0.5}, step=2)
    tracker.set_tags({"status": "finished"})
    assert tracker.flush(30)
    tracker.close()
    assert tracker.run_id != old and tracker.dropped == 0
    run = client.get_run(tracker.run_id)
    assert run.data.tags[REPLACES_TAG] == old and run.data.tags["status"] == "finished"
    assert run.data.params == {"train.steps": "10"}
    assert [m.value for m in client.get_metric_history(tracker.run_id, "g_loss")] == [0.5]
    # a restarted job that still carries the old id ends up in the same replacement
    again = Tracker(mlflow_server.uri, "t-deleted", "job-del", run_id=old, retry_wait=0.2)
    again.log_metrics({"g_loss": 0.25}, step=3)
    assert again.flush(30)
    again.close()
    assert again.run_id == tracker.run_id


def test_backlog_spills_in_order_and_drops_past_its_file_limit(tmp_path):
    backlog = Backlog(tmp_path / "spill.jsonl", max_memory=4, max_spill_bytes=400)
    for i in range(30):
        backlog.append(("_log_metrics", ({"x": float(i)}, i, 0)))
    assert len(backlog.memory) == 4 and backlog.spilled > 0 and backlog.dropped > 0
    assert len(backlog) + backlog.dropped == 30
    got = []
    while (item := backlog.peek()) is not None:
        got.append(item[1][1])
        backlog.pop()
    assert got == list(range(len(got)))  # first in, first out, across memory and file
    assert not (tmp_path / "spill.jsonl").exists()


def test_disabled_tracker_on_other_ranks_does_nothing(mlflow_server):
    quiet = Tracker(mlflow_server.uri, "t-disabled", "job-3", enabled=False)
    quiet.log_metrics({"x": 1}, step=1)
    assert quiet.flush(1) and quiet.run_id is None
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name("t-disabled") is None
