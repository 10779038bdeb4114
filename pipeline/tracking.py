"""MLflow tracking that never stalls or kills training.

Every call is queued and sent by one background thread, so the training step never waits on the network.
Failures are sorted by what they mean:
- transient (connection refused or reset, timeouts): the server is away. The call stays at the head of the
  queue and is retried with doubling back-off (capped at `max_wait`); it goes out when the server is back.
- server-side (5xx, 429): retried up to `retries` attempts, then dropped.
- permanent (other 4xx, a missing local file): dropped at once.
A dropped call is counted (`tracking/dropped`, sent with the next metrics) and logged once per kind of
failure. A run deleted under us is replaced by a new run of the same name, tagged with the old id, and
the call is sent there. The queue is bounded in memory: beyond `max_pending` calls it spills to a local file
(under the run's folder, `state_dir`) and replays in order; past the file's limit new calls are dropped and
counted. Files handed over with `log_artifact(..., delete_after=True)` are deleted only once their upload
succeeded.

Closing waits for the queue up to a bound. What the server did not take by then is not dropped: with a
`state_dir` it is written to `<state_dir>/tracking-unsent.jsonl`, and the next tracker of the run (a restart,
a resume, the same command run again) sends it first, in order.

One MLflow run per training job: a restarted worker group reopens the run whose id the checkpoint carries,
or finds it by the job's run name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.backlog import Backlog

log = logging.getLogger(__name__)

RUN_NAME_TAG = "biggan.run_name"
# the launch (one command run: its worker restarts and relaunches) that made a run: a run without a checkpoint to
# resume is reopened by name only within its own launch, so a fresh start never appends to an earlier run's metrics
LAUNCH_TAG = "biggan.launch"
REPLACES_TAG = "biggan.replaces_run"  # on a run made because the job's run was deleted: the deleted run's id
MAX_PENDING = 10_000  # calls kept in memory; more spill to a local file
UNSENT_FILE = "tracking-unsent.jsonl"  # in state_dir: calls a closed tracker could not send
_RETRY, _STOP, _ABANDON = "retry", "stop", "abandon"  # words to the sender thread (calls are tuples)


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


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def classify(err: BaseException) -> str:
    """"transient" (the server is unreachable), "server" (5xx, 429: retry a few times) or "permanent"."""
    import requests

    chain = list(_chain(err))
    if any(isinstance(e, requests.exceptions.RetryError) for e in chain):
        return "server"  # urllib3 gave up on repeated 5xx / 429 answers
    if any(isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError
                      | TimeoutError) for e in chain):
        return "transient"
    if isinstance(err, FileNotFoundError | IsADirectoryError):
        return "permanent"
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return "server" if status == 429 or status >= 500 else "permanent"
    return "server"  # unknown: retried a few times, never forever


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
        max_wait: float = 30.0,
        max_pending: int = MAX_PENDING,
        spill_path: str | Path | None = None,
        state_dir: str | Path | None = None,
        launch: str | None = None,
    ):
        self.enabled = enabled
        self.launch = launch
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.retries = max(1, retries)
        self.retry_wait = retry_wait
        self.max_wait = max(max_wait, retry_wait)
        self.failures = 0  # failed attempts of any kind
        self.dropped = 0  # calls given up on (permanent failures, server errors past `retries`, a full backlog)
        self._dropped_sent = 0
        self._dropped_kinds: set[tuple[str, str]] = set()
        self._params: dict[str, str] = {}  # everything logged as params: re-sent to a replacement run
        self._last_step = 0
        self.unsent_path = Path(state_dir) / UNSENT_FILE if state_dir else None
        if spill_path is None and enabled:
            spill_dir = Path(state_dir) if state_dir else Path(tempfile.gettempdir())
            spill_path = spill_dir / f"biggan-tracking-spill-{os.getpid()}-{id(self):x}.jsonl"
        self._backlog = Backlog(spill_path, max_memory=max_pending)
        self._head_attempts = 0
        self._wait = retry_wait
        self._retry_at = 0.0  # no attempt before this (the back-off); flush() and close() try at once
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._client = None
        self._thread = None
        if enabled:
            quiet_http_retries()
            if self.unsent_path is not None and (n := self._backlog.adopt(self.unsent_path)):
                log.warning("mlflow: %d tracking calls an earlier tracker of this run could not send: sending "
                            "them first", n)
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

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None, delete_after: bool = False) -> None:
        """Upload a file; with delete_after the tracker deletes it once the upload succeeded (kept otherwise)."""
        self._put("_log_artifact", (str(local_path), artifact_path, delete_after))

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

    @property
    def pending(self) -> int:
        return len(self._backlog) + self._queue.qsize()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued has been sent or dropped (True) or the timeout passes (False)."""
        if not self.enabled:
            return True
        self._queue.put(_RETRY)  # do not sit out a back-off: try now
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                idle = self._queue.empty() and not len(self._backlog) and not self._busy
            if idle:
                return True
            time.sleep(0.05)
        log.warning("mlflow: %d tracking calls still unsent after %.0fs", self.pending, timeout)
        return False

    def close(self, timeout: float = 60.0) -> None:
        """Wait up to `timeout` for the queue to go out; what is left is kept for the run's next tracker
        (with a state_dir), else dropped and counted."""
        if self.enabled and self._thread is not None:
            if self.dropped != self._dropped_sent:
                self.log_metrics({}, self._last_step)  # carries tracking/dropped
            sent = self.flush(timeout)
            self._queue.put(_STOP if sent else _ABANDON)  # abandon: no further attempt, keep what is left
            # an attempt in flight ends within MLflow's request timeout (quiet_http_retries)
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                log.warning("mlflow: the tracking thread did not end; %d calls may be lost", self.pending)

    # -- the sender thread -------------------------------------------------------------------------------------
    _busy = False

    def _put(self, op: str, args: tuple) -> None:
        if self.enabled:
            self._queue.put((op, args))

    def _take_queued(self, first) -> set[str]:
        """Move what was queued into the backlog; returns the control words seen (_RETRY, _STOP, _ABANDON)."""
        item, seen = first, set()
        while True:
            if isinstance(item, str):
                seen.add(item)
                if item != _RETRY:
                    return seen  # close(): nothing is queued after it
            else:
                self._backlog.append(item)
                self.dropped += self._backlog.dropped  # a full backlog refuses new calls
                self._backlog.dropped = 0
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return seen

    def _loop(self) -> None:
        while True:
            wait = max(0.0, self._retry_at - time.time()) if len(self._backlog) else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = _RETRY
            with self._lock:
                self._busy = True
                seen = self._take_queued(item)
            try:
                if _ABANDON in seen:
                    self._give_up()
                    return
                if seen:
                    self._retry_at = 0.0
                if time.time() >= self._retry_at:  # new calls during a back-off just join the queue
                    self._drain(final=_STOP in seen)
            finally:
                with self._lock:
                    self._busy = False
            if _STOP in seen:
                return

    def _drain(self, final: bool = False) -> None:
        while (head := self._backlog.peek()) is not None:
            op, args = head
            outcome = self._attempt(op, args)
            if outcome == "wait":
                if final:
                    self._give_up()
                self._retry_at = time.time() + self._wait
                return  # the loop comes back after the back-off
            with self._lock:
                self._backlog.pop()
            self._head_attempts, self._wait = 0, self.retry_wait

    def _give_up(self) -> None:
        """Closing with calls the server has not taken: keep them for the run's next tracker, or drop them."""
        if self.unsent_path is None:
            n = self._backlog.clear()
            self.dropped += n
            log.warning("mlflow: giving up on %d unsent tracking calls at %s", n, self.tracking_uri)
            return
        kept, lost = self._backlog.keep(self.unsent_path)
        self.dropped += lost
        log.warning("mlflow: %s unreachable at close: %d tracking calls kept in %s (the next start of this run "
                    "sends them: run the same command again)%s", self.tracking_uri, kept, self.unsent_path,
                    f"; {lost} that cannot be written down dropped" if lost else "")

    def _attempt(self, op: str, args: tuple) -> str:
        """Send one call: "done" (sent or dropped for good) or "wait" (retry it after the back-off)."""
        for _ in range(2):  # a second go only after replacing a deleted run
            try:
                if op != "_ensure_run":
                    self._ensure_run()
                getattr(self, op)(*args)
                return "done"
            except Exception as err:  # noqa: BLE001 - any tracking failure must not reach training
                self.failures += 1
                kind = classify(err)
                if kind == "permanent" and op != "_ensure_run" and self._replace_deleted_run():
                    continue
                return self._failed(op, err, kind)
        return "done"

    def _failed(self, op: str, err: BaseException, kind: str) -> str:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        self._head_attempts += 1
        if kind == "transient" or (kind == "server" and self._head_attempts < self.retries):
            if self._head_attempts == 1 or self._head_attempts % 10 == 0:
                log.warning("mlflow: %s failed (%s, attempt %d) at %s: %s; retrying in %.1fs", op, kind,
                            self._head_attempts, self.tracking_uri, reason, self._wait)
            self._wait = min(self._wait * 2, self.max_wait) if self._head_attempts > 1 else self._wait
            return "wait"
        self.dropped += 1
        key = (op, f"{kind}:{type(err).__name__}:{getattr(err, 'error_code', '')}")
        if key not in self._dropped_kinds:  # once per kind of failure; the count says how many
            self._dropped_kinds.add(key)
            log.warning("mlflow: dropped %s (%s failure, not retried further) at %s: %s", op, kind,
                        self.tracking_uri, reason)
        return "done"

    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        client = self._mlflow()
        exp = client.get_experiment_by_name(self.experiment)
        return exp.experiment_id if exp else client.create_experiment(self.experiment)

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        client = self._mlflow()
        exp_id = self._experiment_id()
        by_name = f"tags.`{RUN_NAME_TAG}` = '{self.run_name}'"
        this_launch = f" and tags.`{LAUNCH_TAG}` = '{self.launch}'" if self.launch else ""
        found = client.search_runs([exp_id], filter_string=by_name + this_launch, max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            log.info("mlflow: reopened run %s (%s)", self.run_name, self.run_id)
            return
        run = client.create_run(exp_id, run_name=self.run_name, tags=self._identity_tags())
        self.run_id = run.info.run_id
        earlier = client.search_runs([exp_id], filter_string=by_name, max_results=2) if self.launch else []
        if any(r.info.run_id != self.run_id for r in earlier):
            log.warning("mlflow: run name %s has a run from an earlier launch and no checkpoint to resume: this launch "
                        "starts at step 0 in a new MLflow run (%s), the earlier one is left as it is",
                        self.run_name, self.run_id)
        log.info("mlflow: created run %s (%s) at %s", self.run_name, self.run_id, self.tracking_uri)

    def _identity_tags(self) -> dict[str, str]:
        return {RUN_NAME_TAG: self.run_name, **({LAUNCH_TAG: self.launch} if self.launch else {})}

    def _replace_deleted_run(self) -> bool:
        """After a permanent failure: if our run was deleted, continue in a new run tagged with the old id
        (the same replacement on every later restart) and re-send the params. True if it did."""
        from mlflow.exceptions import MlflowException

        client, old = self._mlflow(), self.run_id
        if old is None:
            return False
        try:
            if client.get_run(old).info.lifecycle_stage != "deleted":
                return False
        except MlflowException as err:
            if err.get_http_status_code() != 404:
                return False
        exp_id = self._experiment_id()
        found = client.search_runs([exp_id], filter_string=f"tags.`{REPLACES_TAG}` = '{old}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            tags = {**self._identity_tags(), REPLACES_TAG: old}
            self.run_id = client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
        log.warning("mlflow: run %s was deleted; continuing in run %s (tag %s)", old, self.run_id, REPLACES_TAG)
        if self._params:
            self._log_params(dict(self._params))
        return True

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._params.update(params)
        client, items = self._mlflow(), list(params.items())
        existing = client.get_run(self.run_id).data.params
        # NOTE: params are immutable in MLflow; a reopened run keeps the first values and we log only new keys
        items = [(k, v) for k, v in items if k not in existing]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])

    def _log_metrics(self, metrics: dict[str, float], step: int, ts: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = ts or int(time.time() * 1000)
        self._last_step = max(self._last_step, step)
        batch = [Metric(k, v, ts, step) for k, v in metrics.items()]
        dropped = self.dropped
        if dropped != self._dropped_sent:
            batch.append(Metric("tracking/dropped", float(dropped), ts, step))
        for i in range(0, len(batch), 1000):
            self._mlflow().log_batch(self.run_id, metrics=batch[i : i + 1000])
        self._dropped_sent = dropped

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._mlflow().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_artifact(self, local_path: str, artifact_path: str | None, delete_after: bool = False) -> None:
        if not os.path.isfile(local_path):
            raise FileNotFoundError(f"{local_path}: no such file to upload")
        self._mlflow().log_artifact(self.run_id, local_path, artifact_path)
        if delete_after:
            with contextlib.suppress(OSError):
                os.unlink(local_path)

    def _log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow().log_text(self.run_id, text, artifact_file)

    def _log_inputs(self, datasets: list) -> None:
        self._mlflow().log_inputs(self.run_id, datasets=datasets)

    def _set_status(self, status: str) -> None:
        self._mlflow().set_terminated(self.run_id, status=status)
