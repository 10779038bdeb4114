"""Run the trainer on a Ray cluster with Ray Train: one worker per data-parallel rank.

With RAY_ADDRESS set the job joins that cluster (what `ray job submit` does); without it an embedded local Ray
runs the same code on this machine, on 127.0.0.1 only. A worker that dies makes Ray restart the whole group
(FailureConfig), and every rank resumes from the newest committed checkpoint of this run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, from_dict
from pipeline.ray_local import init_ray
from pipeline.run_metadata import RunReview, source_tags
from pipeline.tracking import default_tracking_uri

log = logging.getLogger(__name__)


def run_paths(cfg: RunConfig) -> dict[str, str]:
    """Where this run keeps things; absolute, because Ray workers run in another working directory."""
    out = Path(cfg.train.output_dir).resolve() / cfg.tracking.run_name
    storage = cfg.cluster.storage_path or str(out / "ray")
    ckpt_root = f"{storage.rstrip('/')}/{cfg.tracking.run_name}/checkpoints" if "://" in storage else str(out / "checkpoints")
    return {"output_dir": str(out), "storage": storage if "://" in storage else str(Path(storage).resolve()),
            "checkpoints": ckpt_root}


def finalize(cfg: RunConfig) -> RunConfig:
    """Fill in what the driver decides once for every worker and retry: run name, tracking URI, class count."""
    if not cfg.tracking.run_name:
        cfg.tracking.run_name = f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
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
    return cfg


def run_training(cfg: RunConfig, inject_collapse_at: int | None = None) -> dict:
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = finalize(cfg)
    paths = run_paths(cfg)
    init_ray(dashboard=True)
    job_id = os.environ.get("RAY_JOB_SUBMISSION_ID") or ray.get_runtime_context().get_job_id()
    print(f"[run] {cfg.tracking.run_name}: checkpoints {paths['checkpoints']}, tracking {cfg.tracking.tracking_uri}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker=worker_main,
        train_loop_config={
            "cfg": cfg.to_dict(), "paths": paths, "inject_collapse_at": inject_collapse_at,
            "tags": {**source_tags(), "ray_job_id": job_id, "world_size": cfg.cluster.num_workers,
                     "preset": cfg.preset},  # the driver's entry point and commit, for every worker's RunReview
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})},
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=cfg.tracking.run_name,
            storage_path=paths["storage"],
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return {
        "status": metrics.get("status", "unknown"),
        "step": metrics.get("step"),
        "rollbacks": metrics.get("rollbacks", 0),
        "mlflow_run_id": metrics.get("mlflow_run_id"),
        "run_name": cfg.tracking.run_name,
        "checkpoints": paths["checkpoints"],
        "tracking_uri": cfg.tracking.tracking_uri,
    }


def worker_main(config: dict) -> None:
    """One data-parallel rank: build loader, engines and trainer, resume, train, report."""
    import ray
    import ray.train
    import torch

    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
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

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(
            cfg.data.shards, batch_size=cfg.data.batch_size, rank=rank, world_size=world, device=device,
            backend=cfg.data.backend, seed=seed, resolution=cfg.model.resolution, random_crop=cfg.data.random_crop,
            flip=cfg.data.flip, num_threads=cfg.data.num_threads, start_epoch=epoch, start_offset=offset,
        )

    resume = store.latest()
    run_id = resume.meta.get("mlflow_run_id") if resume else None
    tracker = Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name, run_id=run_id,
                      enabled=rank == 0, retries=cfg.tracking.retries)

    def report(metrics: dict, info, status: str = "running") -> None:
        with tempfile.TemporaryDirectory() as tmp:
            # Ray Train records each committed checkpoint by reference: the data stays in our store
            pointer = {"store": paths["checkpoints"], "step": info.step if info else None, "run_name": cfg.tracking.run_name}
            Path(tmp, "pointer.json").write_text(json.dumps(pointer))
            ray.train.report(
                {**{k: v for k, v in metrics.items() if isinstance(v, int | float)}, "status": status,
                 "mlflow_run_id": tracker.run_id or ""},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    from data_prep.shard_format import read_manifest

    trainer = Trainer(
        cfg, make_loader=make_loader, store=store, tracker=tracker, device=device, rank=rank, world_size=world,
        class_names=read_manifest(cfg.data.shards).classes,
        report=report, inject_collapse_at=config.get("inject_collapse_at"),
    )
    if resume is not None:
        resume = trainer.restore()  # the newest good one: a corrupt newest is quarantined, the one before used
        if rank == 0 and resume is not None:
            print(f"[resume] from step {resume.step} ({resume.path})", flush=True)
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
    finally:
        review.end(trainer.status, trainer.step)
        if rank == 0:
            tracker.set_status("FINISHED" if trainer.status in ("finished", "collapsed") else "FAILED")
            tracker.close()
    report(result, store.latest(), status=trainer.status)  # the run's outcome is the last report Ray keeps
