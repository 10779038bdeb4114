"""Run identity and the resume policy: the same command, run again, continues the same run.

A run is named by `--run-name` / `tracking.run_name`. Without one the name is `<preset>-<digest>`, the digest
covering what is being trained (model, data, optimizer, loss, tricks, EMA, seed, batch), not how long, where
or on how many workers: resubmitting the same job, or the same job with more steps or workers, resumes the
same run instead of starting again at step 0 under a new name. The name keys the checkpoint folder
(`<output_dir>/<name>/checkpoints` or `<storage>/<name>/checkpoints`), the Ray Train run and the MLflow run.

`--resume` (checked once, by the driver, before any worker starts):
- `auto` (default): resume the named run if it has a committed checkpoint, else start it.
- `never`: start fresh; refuse (exit 2, naming what exists) if the name already has checkpoints or an MLflow run.
- `must`: refuse if there is nothing to resume.
Inside a job (worker restarts, relaunches after a preemption) the workers always resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.checkpoint import CheckpointInfo, CheckpointStore
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

POLICIES = ("auto", "never", "must")
IDENTITY_SECTIONS = ("model", "data", "optim", "loss", "tricks", "ema")
IDENTITY_FIELDS = ("train.seed", "train.global_batch", "train.precision")


class ResumeError(ValueError):
    """The resume policy cannot be met for this run name (nothing to resume, or a fresh start would mix runs)."""


def identity_digest(cfg: RunConfig) -> str:
    """8 hex digits of what is being trained; equal for runs that only differ in length, place or workers."""
    d = cfg.to_dict()
    ident = {s: d[s] for s in IDENTITY_SECTIONS}
    ident["data"] = {k: v for k, v in ident["data"].items() if k not in ("num_threads", "backend")}
    if ident["data"]["shards"] and "://" not in ident["data"]["shards"]:
        ident["data"]["shards"] = str(Path(ident["data"]["shards"]).resolve())
    ident["model"] = {k: v for k, v in ident["model"].items() if k != "num_classes"}  # the data decides it
    for key in IDENTITY_FIELDS:
        section, name = key.split(".")
        ident[key] = d[section][name]
    ident["preset"] = cfg.preset
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.preset}-{identity_digest(cfg)}"


def resume_point(store: CheckpointStore) -> CheckpointInfo | None:
    """The checkpoint a (re)start continues from. The one place that asks the store: a store that verifies and
    falls back past a corrupt newest checkpoint (`newest_good`) is used when it has one."""
    newest_good = getattr(store, "newest_good", None)
    return newest_good() if callable(newest_good) else store.latest()


def choose(store: CheckpointStore, rank: int, world_size: int, device: torch.device) -> CheckpointInfo | None:
    """Every rank: rank 0 picks the resume step and broadcasts it, so all ranks load the same checkpoint."""
    step = torch.tensor([-1], dtype=torch.int64, device=device)
    if rank == 0:
        found = resume_point(store)
        step[0] = found.step if found else -1
    if world_size > 1:
        dist.broadcast(step, src=0)
    s = int(step.item())
    if s < 0:
        return None
    return found if rank == 0 else store.get(s)


def _mlflow_run_exists(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """The id of an MLflow run with this run name, if the tracking server answers and has one."""
    from pipeline.tracking import RUN_NAME_TAG, quiet_http_retries

    quiet_http_retries()
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                   max_results=1)
        return found[0].info.run_id if found else None
    except Exception as err:  # noqa: BLE001 - an unreachable tracking server must not block the launch
        log.warning("could not ask MLflow at %s whether run %s exists: %s", tracking_uri, run_name, err)
        return None


def check_policy(cfg: RunConfig, checkpoints: str, policy: str) -> CheckpointInfo | None:
    """The driver, once per launch: what this launch resumes from, or a ResumeError saying why it may not."""
    if policy not in POLICIES:
        raise ResumeError(f"--resume: {policy!r} is not one of {list(POLICIES)}")
    name = cfg.tracking.run_name
    found = resume_point(CheckpointStore(checkpoints))
    if policy == "never":
        if found is not None:
            raise ResumeError(
                f"--resume never: run {name!r} already has checkpoints (newest: step {found.step} in {checkpoints}); "
                "pass another --run-name for a fresh run, or --resume auto to continue this one"
            )
        run_id = _mlflow_run_exists(cfg.tracking.tracking_uri, cfg.tracking.experiment, name)
        if run_id:
            raise ResumeError(
                f"--resume never: MLflow already has a run named {name!r} (id {run_id}) in experiment "
                f"{cfg.tracking.experiment!r}; pass another --run-name so the two runs' metrics do not mix"
            )
    if policy == "must" and found is None:
        raise ResumeError(f"--resume must: run {name!r} has no committed checkpoint in {checkpoints}")
    if found is not None and found.step >= cfg.train.steps:
        log.warning("run %s is already at step %d of %d: nothing to train; pass another --run-name for a fresh run "
                    "(its checkpoints are in %s)", name, found.step, cfg.train.steps, checkpoints)
    return found
