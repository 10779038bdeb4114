"""Start or join Ray the same way everywhere: a cluster when RAY_ADDRESS is set, else an embedded local Ray
that listens on 127.0.0.1 only."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from pipeline.loopback import LOOPBACK

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
PROJECT_PACKAGES = ("pipeline", "models", "data_prep")
# NOTE: set in every process a run starts (setdefault: a user's own value wins). Ray Train V2 routes a worker's
# print() through the root logger *and* tees it to stdout, so every line of ours arrived twice; MLflow sets its
# own logger to INFO when imported (database set-up, the system-metrics monitor) and draws a progress bar for
# every artifact it moves, which in a worker's log are noise
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# NOTE: Ray Train's preemption watcher polls for nodes being drained by an autoscaler; a one-node embedded Ray
# is never drained (our SIGTERM handler covers the machine going away), and the watcher's start logs an error
# line about its own restart policy (ray-project/ray#53727)
EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def quiet_console_env() -> None:
    """WORKER_ENV in this process's environment (a value already set wins). A worker of a submitted job or of a
    cluster started elsewhere calls it too: there the driver's environment does not reach it."""
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)


def init_ray(num_cpus: int | None = None, object_store_mb: int = 512, dashboard: bool = False) -> bool:
    """Start embedded local Ray on loopback, or join RAY_ADDRESS; returns True if this call started Ray.

    Left alone, Ray binds the machine's network address even when given _node_ip_address=127.0.0.1. With
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment (read when `ray` is imported, here and by every
    process Ray starts) it stays on loopback; the node address is checked after start. Gloo's sockets are
    pinned to the loopback interface too (GLOO_SOCKET_IFNAME=lo), inherited by the local workers. `dashboard`
    starts Ray's dashboard on 127.0.0.1 (Ray Train's state queries need it; make_shards does not).
    """
    quiet_console_env()
    if os.environ.get("RAY_ADDRESS"):
        import ray  # noqa: PLC0415

        if ray.is_initialized():
            return False
        # a submitted job's runtime env (--working-dir) already ships this checkout; a driver that merely
        # connects ships the project's packages itself
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        modules = [str(Path(REPO_ROOT) / p) for p in PROJECT_PACKAGES]
        env = {"py_modules": modules, "env_vars": {k: os.environ[k] for k in WORKER_ENV}}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=None if in_job else env, log_to_driver=True)
        return True
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    for name, value in EMBEDDED_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _private_auth_token()
    import ray  # noqa: PLC0415
    from ray._private import ray_constants  # noqa: PLC0415

    if ray.is_initialized():
        return False
    # NOTE: if `ray` was imported before the variable was set, its copy of the constant is stale
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
             _node_ip_address=LOOPBACK,
             object_store_memory=object_store_mb << 20, runtime_env=_runtime_env(), log_to_driver=True,
             logging_level=logging.WARNING)
    ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if ips != {LOOPBACK}:
        ray.shutdown()
        raise RuntimeError(f"embedded Ray is not on loopback (node addresses {sorted(ips)})")
    return True


def _private_auth_token() -> None:
    """Token auth for the embedded cluster (Ray 2.60 turns it on for a new local cluster) with a token of this
    process's own, in the environment that every Ray process it starts inherits. Left to itself Ray would
    write one to ~/.ray/auth_token: shared by every run of the user, and impossible on a read-only home. An
    explicit RAY_AUTH_MODE=disabled, or a token already configured, is respected."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _runtime_env() -> dict | None:
    """Local workers start in the driver's working directory with its environment; only when neither puts
    this checkout on the path do they need it set (a runtime env costs a fresh worker pool, seconds)."""
    paths = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    if any(p and os.path.realpath(p) == os.path.realpath(REPO_ROOT) for p in paths):
        return None
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": pythonpath}}
