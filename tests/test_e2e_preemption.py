"""Preemption end to end on an embedded local Ray (127.0.0.1): SIGTERM to a worker of a 2-worker run, then to
the driver, then the same command again. Run under the Ray lock (`flock /tmp/ray-tests.lock pytest ...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import preemption
from pipeline.checkpoint import CheckpointStore
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TINY = ["--set", "model.g_ch=4", "--set", "model.d_ch=4", "--set", "model.dim_z=16", "--set", "model.shared_dim=8",
        "--set", "data.batch_size=8", "--set", "train.global_batch=16", "--set", "data.backend=wds",
        "--set", "train.log_every=1", "--set", "train.sample_every=1000", "--set", "train.checkpoint_every=1000",
        "--set", "health.enabled=false",
        "--set", "eval.every=0", "--set", "eval.truncation_sweep=", "--set", "eval.cas_samples=0"]  # the demo's evaluations are not what these runs test

STEPS = 40  # the preempted run's length


def _launch(tmp_path, shards, steps: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", preemption.REGISTRY_ENV: str(tmp_path / "reg")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "launch/demo.py", "--data", shards, *TINY, "--set", f"train.steps={steps}",
           "--set", f"train.output_dir={tmp_path / 'runs'}", "--run-name", "preempt-e2e"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _until(proc, marker: str, log: list[str], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        log.append(line)
        if marker in line:
            return
    raise AssertionError(f"{marker!r} not seen:\n{''.join(log[-40:])}")


def _finish(proc, log: list[str], timeout: float) -> tuple[int, str]:
    """The rest of the output and the exit code; a process still running after `timeout` is killed, group and all."""
    try:
        log.append(proc.stdout.read())
        return proc.wait(timeout=timeout), "".join(log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _worker_pids(tmp_path) -> dict[int, int]:
    out = {}
    for f in (tmp_path / "reg").glob("*.json"):
        e = json.loads(f.read_text())
        if e["role"] == "worker":
            out[e["rank"]] = e["pid"]
    return out


def test_sigterm_to_a_worker_then_the_driver_and_the_rerun_resumes_the_same_mlflow_run(tmp_path, digits_shards):
    shards, _ = digits_shards
    # long enough that the driver's SIGTERM lands while training runs: the workers hear of it within ~1 s
    # (the stop board's poll), and a run that ends first exits 0 `finished`, rightly, failing this test
    log: list[str] = []
    proc = _launch(tmp_path, shards, steps=STEPS)
    try:
        _until(proc, f"[step 3/{STEPS}]", log)
        deadline = time.time() + 30
        while len(_worker_pids(tmp_path)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        os.kill(_worker_pids(tmp_path)[1], signal.SIGTERM)  # a node drain of one worker: not a failure
        _until(proc, "relaunching", log)
        _until(proc, "[resume] from step", log)
        _until(proc, "[step", log)
        os.kill(proc.pid, signal.SIGTERM)  # the driver: the job is being stopped
        log.append(proc.stdout.read())
        assert proc.wait(timeout=120) == preemption.EXIT_PREEMPTED, "".join(log[-60:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(log)
    assert '"status": "preempted"' in out and '"preempted_relaunches": 1' in out
    store = CheckpointStore(str(tmp_path / "runs" / "preempt-e2e" / "checkpoints"))
    stopped = store.latest().step
    assert 3 < stopped < STEPS

    again = _launch(tmp_path, shards, steps=STEPS)
    rest, _ = again.communicate(timeout=400)
    assert again.returncode == 0, rest[-4000:]
    assert f"[resume] from step {stopped}" in rest and f"[finished] step {STEPS}" in rest
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("biggan")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`biggan.run_name` = 'preempt-e2e'")
    assert len(runs) == 1, "a preempted run resumes in the same MLflow run"
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "g_loss")})
    assert steps == list(range(1, STEPS + 1)), steps  # every step logged once the run is whole: nothing lost, no gap
    assert runs[0].data.tags["status"] == "finished" and runs[0].info.status == "FINISHED"
    assert Path(tmp_path / "reg").is_dir() and not list((tmp_path / "reg").glob("*.json"))


def test_sigterm_to_the_driver_while_ray_starts_is_a_preemption_not_a_crash(tmp_path, digits_shards):
    """The launch script's handler is in place before Ray is imported or started: a job stopped that early
    exits 75 (run the same command to go on), not killed by the signal; no worker is started for it."""
    shards, _ = digits_shards
    log: list[str] = []
    proc = _launch(tmp_path, shards, steps=14)
    try:
        _until(proc, "[plan]", log)  # Ray is imported and started after this line
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    os.kill(proc.pid, signal.SIGTERM)
    rc, out = _finish(proc, log, timeout=120)
    assert rc == preemption.EXIT_PREEMPTED, out[-3000:]
    assert "[preempted] before training started (SIGTERM" in out and "[step" not in out


def test_a_data_fault_past_the_budget_ends_the_job_once_with_exit_65_naming_the_shard(tmp_path, digits_shards):
    """A shard missing from a set where it is 1/6 of the samples (budget 1%): every rank stops at the same log
    step and the job ends with status data-fault, exit 65, naming the shard. No Ray retry is spent on it (a
    retry would meet it again, and the job would end as a crash, exit 1)."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards[0], shards)
    victim = sorted(shards.glob("*.tar"))[1]
    victim.unlink()
    log: list[str] = []
    rc, out = _finish(_launch(tmp_path, str(shards), steps=6), log, timeout=300)
    assert rc == preemption.EXIT_DATA_FAULT, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("[error]")]
    assert error and victim.name in error[0] and "max_bad_fraction" in error[0], out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("biggan").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["data/bad_shards"] == 1.0
