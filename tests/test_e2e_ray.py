"""The product's main job for real: `ray job submit` of a launch script to a local two-node Ray cluster on
127.0.0.1, DeepSpeed on gloo, tracked by an MLflow server on 127.0.0.1. The cluster runs with token
authentication, as the Kubernetes deployment does: the token is this module's own (RAY_AUTH_TOKEN in the
environment of the nodes and of the client), never a file in the shared home directory."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
TINY = ["--set", "model.g_ch=4", "--set", "model.d_ch=4", "--set", "model.dim_z=16", "--set", "model.shared_dim=8",
        "--set", "data.batch_size=8", "--set", "train.global_batch=16", "--set", "data.backend=wds",
        "--set", "train.log_every=2", "--set", "train.sample_every=4", "--set", "train.checkpoint_every=2",
        "--set", "eval.every=0", "--set", "eval.truncation_sweep=", "--set", "eval.cas_samples=0"]  # the demo's evaluations are not what these runs test


TOKEN = secrets.token_hex(32)


def _env(**auth: str) -> dict:
    """The nodes' and the client's environment: token auth on with this module's token, unless `auth` says
    otherwise."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo",
           # the job's `python` is whatever PATH the cluster was started with: this venv's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, **auth}
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and a second node, both raylets on this machine, every address 127.0.0.1."""
    port, dash = free_port(), free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}", "--include-dashboard=true", *common],
                       check=True, env=_env(), capture_output=True, timeout=120)
        subprocess.run([sys.executable, str(ROOT / "tests" / "ray_start_loopback.py"), "start",
                        f"--address=127.0.0.1:{port}", *common],
                       check=True, env=_env(), capture_output=True, timeout=120)
        deadline = time.time() + 60
        while len(_alive_node_addresses(f"127.0.0.1:{port}")) < 2 and time.time() < deadline:
            time.sleep(2)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=_env(), capture_output=True, timeout=120)


def _alive_node_addresses(gcs: str) -> list[str]:
    code = (f"import ray, json; ray.init(address='{gcs}', logging_level='ERROR'); "
            "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def submit(cluster, args: list[str], env_vars: dict, timeout: int = 420) -> subprocess.CompletedProcess:
    runtime_env = {"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                "GLOO_SOCKET_IFNAME": "lo", **env_vars}}
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def test_the_cluster_refuses_clients_without_its_token(ray_cluster, tmp_path):
    """What the Kubernetes deployment relies on: without the token, or with another one, the dashboard (job
    submission) and the GCS turn the client away."""
    home = {"HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    listing = [RAY, "job", "list", "--address", ray_cluster["dashboard"]]
    ok = subprocess.run(listing, env=_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for auth in ({"RAY_AUTH_TOKEN": None, **home}, {"RAY_AUTH_TOKEN": secrets.token_hex(32), **home},
                 {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None, **home}):
        refused = subprocess.run(listing, env=_env(**auth), capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, f"`ray job list` with {auth} was let in:\n{refused.stdout}"
        out = (refused.stdout + refused.stderr).lower()
        assert "token" in out or "401" in out or "unauthenticated" in out or "authentication" in out, out[-2000:]
    code = f"import ray; ray.init(address='{ray_cluster['gcs']}', logging_level='ERROR'); print('joined')"
    try:
        joined = subprocess.run([sys.executable, "-c", code], env=_env(RAY_AUTH_TOKEN=secrets.token_hex(32), **home),
                                capture_output=True, text=True, timeout=90).stdout
    except subprocess.TimeoutExpired as err:  # still knocking: refused all the same
        joined = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    assert "joined" not in joined, "a driver with the wrong token joined the cluster"


def _run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("biggan")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`biggan.run_name` = '{name}'")
    return runs


def test_job_submit_on_two_nodes_is_tracked(ray_cluster, mlflow_server, digits_shards, tmp_path):
    assert _alive_node_addresses(ray_cluster["gcs"]) == ["127.0.0.1", "127.0.0.1"]
    shards, _ = digits_shards
    name = f"e2e-two-node-{int(time.time())}"
    head = _head()
    job = submit(ray_cluster, ["launch/demo.py", "--data", shards, *TINY, "--set", "train.steps=8",
                               "--set", "cluster.placement_strategy=STRICT_SPREAD", "--set", f"tracking.run_name={name}",
                               "--set", f"train.output_dir={tmp_path}"],
                 # the job's working-dir copy has no .git: the submitter names the commit
                 {"MLFLOW_TRACKING_URI": mlflow_server.uri, "BIGGAN_GIT_COMMIT": head})
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "[step 8/8]" in job.stdout and "[finished] step 8" in job.stdout
    # the console carries our lines only: Ray Train's per-report notes and a finished worker's shutdown are quiet
    assert "Reporting training result" not in job.stdout and "SIGTERM received" not in job.stdout
    # nor MLflow's INFO notes (its system-metrics monitor runs in this job) and artifact progress bars
    assert "system_metrics_monitor" not in job.stdout and "Downloading artifacts" not in job.stdout
    client = MlflowClient(mlflow_server.uri)
    runs = _run(client, name)
    assert len(runs) == 1
    run = runs[0]
    for key in ("d_loss_real", "d_loss_fake", "g_loss", "ortho", "images_per_s", "step_time_s", "data_wait_s",
                "grad_norm/G", "grad_norm/D"):
        assert key in run.data.metrics, f"missing metric {key}: {sorted(run.data.metrics)}"
    assert any(k.startswith("sigma0/G/") for k in run.data.metrics)
    assert any(k.startswith("sigma0/D/") for k in run.data.metrics)
    assert run.data.params["train.steps"] == "8" and run.data.params["model.arch"] == "biggan"
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["num_nodes"] == "2"  # one worker on each node
    assert tags["ray_job_id"] and tags["mlflow.source.git.commit"] == head and tags["status"] == "finished"
    assert "status: **finished** at step 8/8" in tags["mlflow.note.content"] and run.inputs.dataset_inputs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts, "no sample grid logged"
    assert "config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_killed_worker_restarts_and_resumes_the_same_run(ray_cluster, mlflow_server, digits_shards, tmp_path):
    shards, _ = digits_shards
    name = f"e2e-restart-{int(time.time())}"
    job = submit(ray_cluster, ["launch/demo.py", "--data", shards, *TINY, "--set", "train.steps=8",
                               "--set", f"tracking.run_name={name}", "--set", f"train.output_dir={tmp_path}",
                               "--set", "cluster.max_failures=2"],
                 {"MLFLOW_TRACKING_URI": mlflow_server.uri, "BIGGAN_FAIL_ONCE_AT": "5"})
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert (tmp_path / name / "failed_once.flag").exists(), "the worker never died"
    assert "[resume] from step 4" in job.stdout
    client = MlflowClient(mlflow_server.uri)
    runs = _run(client, name)
    assert len(runs) == 1, "a restart must reopen the run, not make a new one"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "g_loss")]
    assert max(steps) == 8 and runs[0].data.tags["status"] == "finished"


def test_two_workers_agree_on_an_injected_collapse(ray_cluster, mlflow_server, digits_shards, tmp_path):
    shards, _ = digits_shards
    name = f"e2e-collapse-{int(time.time())}"
    health = ["--set", "health.every=2", "--set", "health.min_history=3", "--set", "health.healthy_after=2",
              "--set", "train.checkpoint_every=4"]
    job = submit(ray_cluster, ["launch/demo.py", "--data", shards, *TINY, *health, "--set", "train.steps=24",
                               "--set", f"tracking.run_name={name}", "--set", f"train.output_dir={tmp_path}",
                               "--inject-collapse-at", "16"],
                 {"MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "[health] collapse at step 18" in job.stdout and "rolled back from step 18 to 12" in job.stdout
    client = MlflowClient(mlflow_server.uri)
    run = _run(client, name)[0]
    assert run.data.metrics["rollbacks"] == 1
    evidence = [a.path for a in client.list_artifacts(run.info.run_id, "rollbacks")]
    assert len(evidence) == 1
    text = client.download_artifacts(run.info.run_id, evidence[0], str(tmp_path / "dl"))
    body = Path(text).read_text()
    assert "sigma0_g_first" in body and "rolled back from step 18 to step 12" in body
