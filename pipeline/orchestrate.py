"""Run the trainer on a Ray cluster with Ray Train: one worker per data-parallel rank.

With RAY_ADDRESS set the job joins that cluster (what `ray job submit` does); without it an embedded local Ray
runs the same code on this machine, on 127.0.0.1 only. A worker that dies makes Ray restart the whole group
(FailureConfig), and every rank resumes from the newest committed checkpoint of this run.

Preemption (pipeline/preemption.py): SIGTERM/SIGINT to the driver is posted on the run's stop board (a named
Ray actor) that every worker polls; SIGTERM/SIGINT to a worker raises its own flag. Either way all ranks stop
at the same step and commit. A driver that was signalled returns status `preempted`; one whose workers were
signalled (a node drain) launches the group again, which resumes there: Ray's FailureConfig never sees a
preemption, so preemptions use none of `cluster.max_failures` (at most `cluster.max_preemptions` relaunches).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from pathlib import Path

from pipeline import preemption, resume
from pipeline.config import ConfigError, RunConfig, from_dict
from pipeline.ray_local import init_ray, quiet_console_env
from pipeline.run_metadata import RunReview, source_tags
from pipeline.tracking import default_tracking_uri

log = logging.getLogger(__name__)

# a collapsed run failed (the job reports failure); a preempted one is resumed by running the command again
MLFLOW_STATUS = {"finished": "FINISHED", "collapsed": "FAILED", "data-fault": "FAILED", "preempted": "KILLED"}
PREEMPTED_FLUSH_S = 20.0  # a preempted worker's wait for tracking: within the pod's grace period after the save


def run_paths(cfg: RunConfig) -> dict[str, str]:
    """Where this run keeps things; absolute, because Ray workers run in another working directory."""
    out = Path(cfg.train.output_dir).resolve() / cfg.tracking.run_name
    storage = cfg.cluster.storage_path or str(out / "ray")
    ckpt_root = f"{storage.rstrip('/')}/{cfg.tracking.run_name}/checkpoints" if "://" in storage else str(out / "checkpoints")
    return {"output_dir": str(out), "storage": storage if "://" in storage else str(Path(storage).resolve()),
            "checkpoints": ckpt_root}


def finalize(cfg: RunConfig) -> RunConfig:
    """Fill in what the driver decides once for every worker and retry: run name, tracking URI, class count."""
    cfg.tracking.tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri()
    if "://" not in cfg.data.shards:
        cfg.data.shards = str(Path(cfg.data.shards).resolve())  # workers run in another working directory
    from data_prep.shard_format import read_manifest

    manifest = read_manifest(cfg.data.shards)
    n = manifest.num_classes
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = n
    elif cfg.model.num_classes != n:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} but the data at {cfg.data.shards} has {n} classes")
    if cfg.model.resolution != manifest.resolution and not cfg.data.random_crop:
        raise ConfigError(
            f"model.resolution: {cfg.model.resolution} but the shards at {cfg.data.shards} are {manifest.resolution} px"
        )
    if not cfg.tracking.run_name:  # after the data is resolved: the digest covers it
        cfg.tracking.run_name = resume.default_run_name(cfg)
    return cfg


def run_training(cfg: RunConfig, inject_collapse_at: int | None = None, resume_policy: str = "auto") -> dict:
    import ray

    cfg = finalize(cfg)
    paths = run_paths(cfg)
    found = resume.check_policy(cfg, paths["checkpoints"], resume_policy)
    init_ray(dashboard=True)
    preemption.install_handlers()  # after ray.init, which sets its own SIGTERM handler (exit at once)
    step0 = found.step if found else 0
    if preemption.requested():  # signalled while Ray started (the launch script's handler): nothing to commit
        print(f"[preempted] before training started ({preemption.reason()}); run the same command to "
              f"{'resume from step ' + str(step0) if found else 'start'}", flush=True)
        return _outcome(cfg, paths, {"status": "preempted", "step": step0})
    board = preemption.open_board(cfg.tracking.run_name)
    ray.get(board.clear.remote())  # a stop posted by an earlier driver of this run is not for this one
    preemption.forward_to_board(board)
    job_id = os.environ.get("RAY_JOB_SUBMISSION_ID") or ray.get_runtime_context().get_job_id()
    start = f"resuming from step {found.step}" if found else "starting"
    print(f"[run] {cfg.tracking.run_name}: {start}; checkpoints {paths['checkpoints']}, "
          f"tracking {cfg.tracking.tracking_uri}", flush=True)
    train_config = {
        "cfg": cfg.to_dict(), "paths": paths, "inject_collapse_at": inject_collapse_at, "launch": uuid.uuid4().hex[:12],
        "tags": {**source_tags(), "ray_job_id": job_id, "world_size": cfg.cluster.num_workers,
                 "preset": cfg.preset},
    }
    relaunches = 0
    with preemption.Registration(cfg.tracking.run_name, "driver"):
        while True:
            metrics = _fit_once(cfg, paths, train_config)
            worker_preempted = metrics.get("status") == "preempted" and not preemption.requested()
            if not worker_preempted or relaunches >= cfg.cluster.max_preemptions:
                break
            relaunches += 1
            print(f"[preempt] workers were preempted at step {metrics.get('step')}; relaunching "
                  f"({relaunches}/{cfg.cluster.max_preemptions}), resuming there", flush=True)
    return _outcome(cfg, paths, metrics, relaunches)


def _outcome(cfg: RunConfig, paths: dict, metrics: dict, relaunches: int = 0) -> dict:
    return {
        "status": metrics.get("status", "unknown"),
        "step": metrics.get("step"),
        **({"error": metrics["error"]} if metrics.get("error") else {}),
        "rollbacks": metrics.get("rollbacks", 0),
        "preempted_relaunches": relaunches,
        "mlflow_run_id": metrics.get("mlflow_run_id"),
        "run_name": cfg.tracking.run_name,
        "checkpoints": paths["checkpoints"],
        "tracking_uri": cfg.tracking.tracking_uri,
    }


def _fit_once(cfg: RunConfig, paths: dict, train_config: dict) -> dict:
    """One Ray Train run of the worker group; its last report (the outcome) as a dict."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker=worker_main,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})},
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        torch_config=preemption.preemptible_torch_config("nccl" if cfg.cluster.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=cfg.tracking.run_name,
            storage_path=paths["storage"],
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    return dict(result.metrics or {})


def _quiet_ray_train_reports() -> None:
    """Ray Train notes each report and pointer checkpoint at INFO, on every rank: our progress lines say it once.
    Its report logger is named after its file, not its module."""
    import importlib.util

    logging.getLogger("ray.train.v2._internal.execution").setLevel(logging.WARNING)
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def worker_main(config: dict) -> None:
    """One data-parallel rank: build loader, engines and trainer, resume, train, report."""
    import ray
    import ray.train
    import torch

    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.data.faults import DataFaultError
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    quiet_console_env()  # before mlflow is imported: it sets its logger's level from the environment then
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up and monitor notes are not ours to show
    _quiet_ray_train_reports()
    cfg, paths = from_dict(config["cfg"]), config["paths"]
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    device = torch.device(f"cuda:{local_rank}") if cfg.cluster.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(cfg.cluster.cpus_per_worker)
    cfg.train.output_dir = paths["output_dir"]
    store = CheckpointStore(paths["checkpoints"])
    registration = preemption.Registration(cfg.tracking.run_name, "worker", rank)  # for the preStop hook
    preemption.watch_board(cfg.tracking.run_name)  # a stop posted by the driver

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(
            cfg.data.shards, batch_size=cfg.data.batch_size, rank=rank, world_size=world, device=device,
            backend=cfg.data.backend, seed=seed, resolution=cfg.model.resolution, random_crop=cfg.data.random_crop,
            flip=cfg.data.flip, num_threads=cfg.data.num_threads, start_epoch=epoch, start_offset=offset,
        )

    start_from = resume.choose(store, rank, world, device)  # rank 0 picks, every rank loads the same one
    run_id = start_from.meta.get("mlflow_run_id") if start_from else None
    tracker = Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name, run_id=run_id,
                      enabled=rank == 0, retries=cfg.tracking.retries, max_wait=cfg.tracking.retry_max_wait_s,
                      state_dir=paths["output_dir"],  # spill and unsent calls in the run's folder
                      launch=config.get("launch"))

    def report(metrics: dict, info, status: str = "running") -> None:
        with tempfile.TemporaryDirectory() as tmp:
            # Ray Train records each committed checkpoint by reference: the data stays in our store
            pointer = {"store": paths["checkpoints"], "step": info.step if info else None, "run_name": cfg.tracking.run_name}
            Path(tmp, "pointer.json").write_text(json.dumps(pointer))
            ray.train.report(
                {**{k: v for k, v in metrics.items() if isinstance(v, int | float)}, "status": status,
                 **({"error": metrics["error"]} if metrics.get("error") else {}),
                 "mlflow_run_id": tracker.run_id or ""},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    from data_prep.shard_format import read_manifest

    trainer = Trainer(
        cfg, make_loader=make_loader, store=store, tracker=tracker, device=device, rank=rank, world_size=world,
        class_names=read_manifest(cfg.data.shards).classes,
        report=report, inject_collapse_at=config.get("inject_collapse_at"),
    )
    if start_from is not None:
        # the newest good one: a corrupt newest is quarantined on every rank and the one before it used
        resumed = trainer.restore()
        if rank == 0 and resumed is not None:
            print(f"[resume] from step {resumed.step} ({resumed.path})", flush=True)
            tracker.set_status("RUNNING")  # a preempted or crashed run was marked KILLED or FAILED
    nodes = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        tracker.set_tags({"worker_nodes": ",".join(nodes), "num_nodes": len(set(nodes))})
    # params, config.json, source tags, dataset input, description; one system-metrics monitor per node
    review = RunReview.begin(tracker, cfg, rank=rank, world_size=world, tags=config["tags"])
    fail_at = int(os.environ.get("BIGGAN_FAIL_ONCE_AT", "0") or 0)
    if fail_at:
        trainer.fail_once_at = (fail_at, Path(paths["output_dir"]) / "failed_once.flag")
    try:
        result = trainer.fit()
    except DataFaultError as err:
        # every rank agreed on it and every retry would meet it again: end the run, do not spend max_failures
        trainer.status = "data-fault"
        result = {"step": trainer.step, "error": str(err)}
        if rank == 0:
            log.error("data fault: %s", err)
    finally:
        review.end(trainer.status, trainer.step)
        if rank == 0:
            tracker.set_status(MLFLOW_STATUS.get(trainer.status, "FAILED"))
            # what is queued goes out (a preempted run's last metrics too); what the server does not take in
            # time stays in the run's folder for its next start. A preempted pod has a grace period to keep.
            flush_s = cfg.tracking.flush_timeout_s
            tracker.close(timeout=min(flush_s, PREEMPTED_FLUSH_S) if trainer.status == "preempted" else flush_s)
        registration.close()
    report(result, store.latest(), status=trainer.status)  # the run's outcome is the last report Ray keeps
    preemption.training_over()  # Ray's SIGTERM to a finished worker is its shutdown, not a preemption
