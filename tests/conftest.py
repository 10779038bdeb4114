"""Shared fixtures: free loopback ports and a real MLflow tracking server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# PostgreSQL, moto S3 and the k8s manifest's MLflow server: one of each per session, for every module
from pipeline.loopback import free_port
from tests.servers import mlflow_pg_s3_server, postgres_server, s3_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Small CPU workloads on 2 cores: one torch thread is as fast as two, and far faster when test processes
    share the cores (threads spin against each other). Ray workers and servers are other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store; can be stopped and started again on the same port."""

    def __init__(self, root: Path, port: int | None = None, extra_args: list[str] | None = None):
        self.root, self.port = root, port or free_port()
        self.backend = f"sqlite:///{root / 'mlflow.db'}"
        self.extra_args = extra_args or ["--default-artifact-root", str(root / "artifacts")]
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", self.backend, *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_http(f"{self.uri}/health", timeout=90, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Real labelled images (scikit-learn's digits, 10 classes) as 32 px WebDataset shards, made once."""
    from data_prep.make_shards import make_shards

    out = tmp_path_factory.mktemp("digits-shards")
    manifest = make_shards("digits", str(out), resolution=32, shard_size=300, workers=2, progress=False)
    return str(out), manifest.num_classes
