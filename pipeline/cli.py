"""The command line shared by every launch script: preset + YAML + --set overrides, --dry-run, then train."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline import config as C
from pipeline import preemption, resume
from pipeline.preemption import EXIT_COLLAPSED, EXIT_DATA_FAULT, EXIT_PREEMPTED
from pipeline.presets import PRESETS, get_preset
from pipeline.tracking import default_tracking_uri

EPILOG = """\
Configuration is resolved in this order: the preset, then --config YAML files (same nested shape as the
printed config), then --data, then each --set section.field=value. Every field is printed at start and logged
to MLflow. Examples:
  ray job submit --working-dir . -- python launch/imagenet128.py --data s3://bucket/imagenet128 \\
      --set cluster.num_workers=64 --set train.steps=300000
  python launch/demo.py --dry-run
Run identity: a run is its name (--run-name; default <preset>-<digest of what is trained>). Running the same
command again resumes that run from its newest committed checkpoint, in the same MLflow run (--resume auto).
Stopping: SIGTERM or Ctrl-C (SIGINT) makes every worker stop at the same step and commit a checkpoint; a
second Ctrl-C aborts at once. `ray job stop` waits only RAY_JOB_STOP_WAIT_TIME_S (default 3 s) before SIGKILL:
set it above the time of one checkpoint save.
Exit codes: 0 finished, 1 crashed, 2 bad arguments/config/resume policy, 3 collapsed (health rollbacks spent),
75 preempted (run the same command again to resume).
Environment: RAY_ADDRESS (a Ray cluster; unset = embedded local Ray), MLFLOW_TRACKING_URI (unset = a local
sqlite store, sqlite:///<cwd>/mlflow.db), AWS_* / AWS_ENDPOINT_URL for s3:// data and storage.
"""


def build_parser(preset: str) -> argparse.ArgumentParser:
    if preset not in PRESETS:
        raise C.ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = argparse.ArgumentParser(
        prog=f"launch/{preset.replace('-', '_')}.py",
        description=f"Train the {preset!r} preset: {PRESETS[preset].__doc__ or ''}".strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", metavar="SHARDS", help="shard directory or URL with manifest.json (sets data.shards)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config field, e.g. --set train.steps=1000 (repeatable)",
    )
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="YAML file of overrides (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and cluster plan, then exit")
    p.add_argument(
        "--run-name", metavar="NAME", default=None,
        help="the run's identity (sets tracking.run_name): its checkpoints, Ray Train run and MLflow run; "
             "default <preset>-<8-digit digest of model/data/optim/loss/tricks/ema/seed/batch>",
    )
    p.add_argument(
        "--resume", choices=resume.POLICIES, default="auto",
        help="auto (default): continue the named run if it has a committed checkpoint, else start it; "
             "never: start fresh, refusing a name that already has checkpoints or an MLflow run; "
             "must: fail unless there is a checkpoint to continue from",
    )
    p.add_argument(
        "--inject-collapse-at", type=int, default=None, metavar="STEP",
        help="deterministically provoke a collapse at this G step (drills detection and rollback)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON only, then exit")
    return p


def resolve(preset: str, args: argparse.Namespace) -> C.RunConfig:
    cfg = get_preset(preset)
    for path in args.config:
        C.load_yaml(cfg, path)
    if args.data:
        cfg.data.shards = args.data
    C.apply_overrides(cfg, args.overrides)
    if getattr(args, "run_name", None):
        cfg.tracking.run_name = args.run_name
    return C.validate(cfg)


def cluster_plan(cfg: C.RunConfig) -> dict:
    accum = C.grad_accumulation_steps(cfg)
    name = cfg.tracking.run_name or resume.default_run_name(cfg)
    return {
        "ray": os.environ.get("RAY_ADDRESS") or "embedded local Ray (no RAY_ADDRESS)",
        "workers": cfg.cluster.num_workers,
        "per_worker": {"CPU": cfg.cluster.cpus_per_worker, "GPU": 1 if cfg.cluster.use_gpu else 0},
        "backend": "nccl" if cfg.cluster.use_gpu else "gloo",
        "micro_batch_per_worker": cfg.data.batch_size,
        "grad_accumulation_steps": accum,
        "images_per_d_step": cfg.train.global_batch,
        "images_per_iteration": cfg.train.global_batch * (cfg.loss.d_steps + 1),
        "storage": cfg.cluster.storage_path or os.path.join(cfg.train.output_dir, name, "ray"),
        "run_name": name,
        "max_failures": cfg.cluster.max_failures,
        "tracking_uri": cfg.tracking.tracking_uri or default_tracking_uri(),
    }


def main(preset: str, argv: list[str] | None = None) -> int:
    return run(preset, argv)[0]


def run(preset: str, argv: list[str] | None = None) -> tuple[int, dict | None]:
    """(exit code, run_training's result; None for --dry-run and --print-config)."""
    parser = build_parser(preset)
    args = parser.parse_args(argv)
    try:
        cfg = resolve(preset, args)
    except C.ConfigError as err:
        parser.error(str(err))
    if args.print_config:
        print(cfg.dumps())
        return 0, None
    if not args.dry_run:  # from here a SIGTERM or Ctrl-C is a preemption (exit 75), not a crash
        preemption.install_handlers()
    print(f"[config] resolved configuration for preset {preset!r}:\n{cfg.dumps()}", flush=True)
    plan = cluster_plan(cfg)
    print(f"[plan] {json.dumps(plan, indent=2)}", flush=True)
    if args.dry_run:
        return 0, None
    if not cfg.data.shards:
        parser.error("no data: pass --data SHARDS (a folder or URL made by `python -m data_prep.make_shards`)")
    from pipeline.orchestrate import run_training

    try:
        result = run_training(cfg, inject_collapse_at=args.inject_collapse_at, resume_policy=args.resume)
    except (resume.ResumeError, C.ConfigError) as err:
        parser.error(str(err))
    print(f"[done] {json.dumps(result, indent=2, default=str)}", flush=True)
    if result.get("error"):
        print(f"[error] {result['error']}", flush=True)
    return exit_code(result.get("status")), result


def exit_code(status: str | None) -> int:
    """0 finished, 3 collapsed, 65 data fault, 75 preempted (resume by running the same command), 1 anything else."""
    codes = {"finished": 0, "collapsed": EXIT_COLLAPSED, "data-fault": EXIT_DATA_FAULT, "preempted": EXIT_PREEMPTED}
    return codes.get(status or "", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demo", sys.argv[2:]))
