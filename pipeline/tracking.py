"""MLflow tracking that never stalls or kills training.

Every call is queued and sent by one background thread, so the training step never waits on the network. A
tracking server that goes away gets a warning and retries with back-off; what could not be sent stays queued
(bounded) and goes out when the server is back. One MLflow run per training job: a restarted worker group
reopens the run whose id the checkpoint carries, or finds it by the job's run name.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_NAME_TAG = "biggan.run_name"
MAX_PENDING = 20_000


def default_tracking_uri(cwd: str | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the working directory (MLflow's own default)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def quiet_http_retries() -> None:
    """MLflow's own HTTP retries back off for minutes; ours are shorter and off the training thread."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


class Tracker:
    """Sends params, metrics, tags and artifacts of one run. `enabled=False` (ranks > 0) makes every call a no-op."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        enabled: bool = True,
        retries: int = 3,
        retry_wait: float = 2.0,
    ):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.retries = max(1, retries)
        self.retry_wait = retry_wait
        self.failures = 0
        self._pending: deque[tuple[str, tuple]] = deque()
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._client = None
        self._thread = None
        if enabled:
            quiet_http_retries()
            self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
            self._thread.start()
            self._queue.put(("_ensure_run", ()))

    # -- public API (all non-blocking) -------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._put("_log_params", ({k: str(v)[:6000] for k, v in params.items()},))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put("_log_metrics", ({k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put("_set_tags", ({k: str(v) for k, v in tags.items()},))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._put("_log_artifact", (str(local_path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put("_log_text", (text, artifact_file))

    def log_inputs(self, datasets: list) -> None:
        """The run's input datasets (mlflow.entities.DatasetInput; see pipeline.run_metadata)."""
        self._put("_log_inputs", (list(datasets),))

    def set_status(self, status: str) -> None:
        """FINISHED, FAILED or KILLED; the run's outcome (e.g. collapsed) goes in a tag."""
        self._put("_set_status", (status,))

    def wait_for_run_id(self, timeout: float = 30.0) -> str | None:
        deadline = time.time() + timeout
        while self.enabled and self.run_id is None and time.time() < deadline:
            time.sleep(0.05)
        return self.run_id

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued has been sent (True) or the timeout passes (False)."""
        if not self.enabled:
            return True
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                idle = self._queue.empty() and not self._pending and not self._busy
            if idle:
                return True
            time.sleep(0.05)
        log.warning("mlflow: %d tracking calls still unsent after %.0fs", len(self._pending), timeout)
        return False

    def close(self, timeout: float = 60.0) -> None:
        if self.enabled and self._thread is not None:
            self.flush(timeout)
            self._queue.put(None)
            self._thread.join(timeout=5)

    # -- the sender thread -------------------------------------------------------------------------------------
    _busy = False

    def _put(self, op: str, args: tuple) -> None:
        if self.enabled:
            self._queue.put((op, args))

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.retry_wait if self._pending else None)
            except queue.Empty:
                item = "retry"
            if item is None:
                self._drain(final=True)
                return
            with self._lock:
                self._busy = True
                if item != "retry":
                    if len(self._pending) >= MAX_PENDING:
                        self._pending.popleft()
                        log.warning("mlflow: dropping the oldest unsent tracking call (over %d queued)", MAX_PENDING)
                    self._pending.append(item)
            try:
                self._drain()
            finally:
                with self._lock:
                    self._busy = False

    def _drain(self, final: bool = False) -> None:
        while self._pending:
            op, args = self._pending[0]
            ok = False
            for attempt in range(self.retries):
                try:
                    if op != "_ensure_run":
                        self._ensure_run()
                    getattr(self, op)(*args)
                    ok = True
                    break
                except Exception as err:  # noqa: BLE001 - any tracking failure must not reach training
                    self.failures += 1
                    log.warning(
                        "mlflow: %s failed (attempt %d/%d) at %s: %s", op, attempt + 1, self.retries,
                        self.tracking_uri, str(err).splitlines()[0][:200],
                    )
                    if attempt + 1 < self.retries:
                        time.sleep(self.retry_wait * (attempt + 1))
            if not ok:
                if final:
                    log.warning("mlflow: giving up on %d unsent tracking calls", len(self._pending))
                    self._pending.clear()
                return  # keep it queued; the loop retries later
            with self._lock:
                self._pending.popleft()

    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        client = self._mlflow()
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{self.run_name}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            log.info("mlflow: reopened run %s (%s)", self.run_name, self.run_id)
        else:
            run = client.create_run(exp_id, run_name=self.run_name, tags={RUN_NAME_TAG: self.run_name})
            self.run_id = run.info.run_id
            log.info("mlflow: created run %s (%s) at %s", self.run_name, self.run_id, self.tracking_uri)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        client, items = self._mlflow(), list(params.items())
        existing = client.get_run(self.run_id).data.params
        # NOTE: params are immutable in MLflow; a reopened run keeps the first values and we log only new keys
        items = [(k, v) for k, v in items if k not in existing]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])

    def _log_metrics(self, metrics: dict[str, float], step: int, ts: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self._mlflow().log_batch(self.run_id, metrics=batch[i : i + 1000])

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._mlflow().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_artifact(self, local_path: str, artifact_path: str | None) -> None:
        self._mlflow().log_artifact(self.run_id, local_path, artifact_path)

    def _log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow().log_text(self.run_id, text, artifact_file)

    def _log_inputs(self, datasets: list) -> None:
        self._mlflow().log_inputs(self.run_id, datasets=datasets)

    def _set_status(self, status: str) -> None:
        self._mlflow().set_terminated(self.run_id, status=status)
