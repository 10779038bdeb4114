"""What makes a training run readable in the MLflow UI: flat params, source tags, the dataset, a description and
system metrics per node.

    review = RunReview.begin(tracker, cfg, rank=rank, world_size=world, tags=driver_tags)  # every rank
    trainer.fit()
    review.end(trainer.status, trainer.step)                                                  # every rank

Rank 0 logs, through the Tracker (so nothing here can stall training):
- the config as params, flat and named the same in every run (`preset`, `section.field`; nested dicts become
  dotted keys; strings as they are, everything else as JSON text: `true`, `null`, `0.0001`), and whole as
  `config.json`;
- the standard source tags `mlflow.source.git.commit` (the checkout's HEAD, or $BIGGAN_GIT_COMMIT in an image
  without .git), `mlflow.source.name` (the entry point), `mlflow.source.type` (JOB) and `mlflow.user`;
- the shard set as the run's input dataset (context `training`): digest (the manifest's sha256, first 32 hex
  digits; MLflow keeps at most 36), source (the shards' URL), and a profile with samples, classes and shards;
- a short description (`mlflow.note.content`: preset, data, world size, status), updated at the end.

The lowest rank on each node starts MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where
`pynvml` imports, e.g. from nvidia-ml-py) for the run, every `tracking.system_metrics_every` seconds, named
`system/<node>/...`. A restarted worker group continues the monitors' steps. NOTE: MLflow's monitor ends for
good when it cannot reach the server or the run is no longer RUNNING (its own rule); training goes on.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
NOTE_TAG = "mlflow.note.content"
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value; config.json holds the whole config
DIGEST_CHARS = 32  # MLflow's dataset digest column holds 36
GIT_COMMIT_ENV = "BIGGAN_GIT_COMMIT"
ENTRY_POINT_ENV = "BIGGAN_ENTRY_POINT"


# -- params -------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1, "c": {"d": None}}} -> {"a.b": "1", "a.c.d": "null"}; lists stay whole (as JSON text)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = _text(value)
            out[name] = text if len(text) <= PARAM_VALUE_MAX else text[:PARAM_VALUE_MAX - 1] + "…"
    return out


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """Every field of the config as one param: the same keys whatever the preset or overrides."""
    return flatten(cfg.to_dict())


# -- source ---------------------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """HEAD of the checkout this code runs from; $BIGGAN_GIT_COMMIT where there is no .git (container images,
    a `ray job submit --working-dir` copy, which leaves .git out). None when neither says."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5,
                              cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def entry_point() -> str:
    """How this process was started: `python -m pipeline.cli`, a script path relative to the repository, ..."""
    if os.environ.get(ENTRY_POINT_ENV):
        return os.environ[ENTRY_POINT_ENV]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    if not sys.argv or not sys.argv[0]:
        return "python"
    try:
        script = Path(sys.argv[0]).resolve()
    except OSError:  # the working directory is gone (e.g. a Ray job's): keep the path as given
        return sys.argv[0]
    return str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else str(script)


def source_tags(entry: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags for this process (git commit only when known)."""
    tags = {"mlflow.source.name": entry or entry_point(), "mlflow.source.type": "JOB"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        pass
    return tags


# -- the dataset ----------------------------------------------------------------------------------------------
def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON: the same shards, classes and counts give the same digest."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_profile(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_samples": int(manifest.get("num_samples") or 0),
        "num_classes": len(manifest.get("classes") or []),
        "classes": list(manifest.get("classes") or []),
        "class_counts": list(manifest.get("class_counts") or []),
        "resolution": manifest.get("resolution"),
        "num_shards": len(manifest.get("shards") or []),
        "skipped": len(manifest.get("skipped") or []),
        "format": manifest.get("format"),
        "written_from": manifest.get("source") or "",
        "manifest_sha256": manifest_sha256(manifest),
    }


def dataset_input(shards: str, manifest: dict[str, Any]):
    """The shard set as an mlflow.entities.DatasetInput (context: training)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    class ShardSet(MetaDataset):
        """Metadata only (the images stay in the shards), with the manifest's numbers as the profile."""

        @property
        def profile(self) -> dict[str, Any]:
            return dataset_profile(manifest)

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    try:
        with warnings.catch_warnings():  # a local folder is both a local-artifact and a file source to MLflow: either will do
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(shards)
    except Exception:  # noqa: BLE001 - a URL scheme MLflow has no source type for: keep it as an HTTP-style URL
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        source = HTTPDatasetSource(shards)
    name = Path(shards.rstrip("/")).name or shards
    schema = Schema([ColSpec("binary", "jpg"), ColSpec("long", "cls")])
    dataset = ShardSet(source, name=name, digest=manifest_sha256(manifest)[:DIGEST_CHARS], schema=schema)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


# -- description ----------------------------------------------------------------------------------------------
def describe(cfg: RunConfig, manifest: dict[str, Any] | None, *, world_size: int, nodes: int, status: str,
             step: int | None = None) -> str:
    """The run's note in the MLflow UI (markdown)."""
    m = cfg.model
    lines = [f"**{cfg.preset}**: {m.arch} at {m.resolution} px, {cfg.train.steps} G steps of {cfg.train.global_batch} images"]
    if manifest is not None:
        lines.append(f"- data: `{cfg.data.shards}` ({int(manifest.get('num_samples') or 0)} images, "
                     f"{len(manifest.get('classes') or [])} classes, digest {manifest_sha256(manifest)[:12]})")
    else:
        lines.append(f"- data: `{cfg.data.shards}`")
    lines.append(f"- world size {world_size} on {nodes} node(s), {'GPU' if cfg.cluster.use_gpu else 'CPU'}")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines.append(f"- status: **{status}**" + (f" at step {step}/{cfg.train.steps}" if step is not None else "")
                 + f" ({when})")
    return "\n".join(lines) + "\n"


# -- the run ------------------------------------------------------------------------------------------------
def _gather(value: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def _node_name(node: str | None) -> str:
    """A metric-name-safe node name (MLflow allows letters, digits, _ - . / and spaces)."""
    raw = node or socket.gethostname() or "node"
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in raw)


class RunReview:
    """The reviewer-facing side of one training run on one rank (see the module docstring)."""

    def __init__(self, tracker: Tracker, cfg: RunConfig, rank: int, world_size: int, nodes: int,
                 manifest: dict[str, Any] | None):
        self.tracker, self.cfg, self.rank, self.world_size, self.nodes = tracker, cfg, rank, world_size, nodes
        self.manifest = manifest
        self.monitor = None  # mlflow's SystemMetricsMonitor on the lowest rank of each node
        self.node: str | None = None

    @classmethod
    def begin(cls, tracker: Tracker, cfg: RunConfig, *, rank: int = 0, world_size: int = 1,
              tags: dict[str, Any] | None = None, node: str | None = None) -> RunReview:
        """Every rank calls this (it gathers node names over the process group); rank 0 logs the metadata."""
        name = _node_name(node)
        names = _gather(name, world_size)
        first_on_node = names.index(name) == rank
        manifest = None
        if rank == 0:
            try:
                from pipeline.data import read_manifest

                manifest = read_manifest(cfg.data.shards)
            except Exception as err:  # noqa: BLE001 - a run without its dataset input still trains
                log.warning("run metadata: cannot read the manifest of %s (%s)", cfg.data.shards, err)
        review = cls(tracker, cfg, rank, world_size, len(set(names)), manifest)
        if rank == 0 and tracker.enabled:
            try:  # NOTE: never raise between the two gathers: the other ranks would wait forever
                review._log_metadata(tags or {})
            except Exception as err:  # noqa: BLE001 - metadata is for reviewers; training goes on without it
                log.warning("run metadata: not logged (%s: %s)", type(err).__name__, err)
        run_id = _gather(tracker.wait_for_run_id() if rank == 0 else None, world_size)[0]
        if first_on_node and run_id and cfg.tracking.system_metrics_every > 0:
            review._start_monitor(run_id, name)
        return review

    def _log_metadata(self, tags: dict[str, Any]) -> None:
        cfg, tracker = self.cfg, self.tracker
        tracker.log_params(flat_params(cfg))
        tracker.log_text(cfg.dumps(), "config.json")
        tracker.set_tags({**source_tags(), "world_size": self.world_size, **tags,
                          NOTE_TAG: self.description("running")})
        if self.manifest is not None:
            tracker.log_inputs([dataset_input(cfg.data.shards, self.manifest)])

    def description(self, status: str, step: int | None = None) -> str:
        return describe(self.cfg, self.manifest, world_size=self.world_size, nodes=self.nodes, status=status,
                        step=step)

    def _start_monitor(self, run_id: str, node: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                run_id, sampling_interval=self.cfg.tracking.system_metrics_every, resume_logging=True,
                node_id=node, tracking_uri=self.tracker.tracking_uri or self.cfg.tracking.tracking_uri,
            )
            self.monitor.start()
            self.node = node
        except Exception as err:  # noqa: BLE001 - no system metrics is no reason to stop training
            log.warning("system metrics: the monitor for node %s did not start (%s)", node, err)
            self.monitor = None

    def end(self, status: str, step: int | None = None) -> None:
        """Stop this node's monitor (its last samples go out); rank 0 writes the final description."""
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as err:  # noqa: BLE001
                log.warning("system metrics: stopping the monitor of node %s failed (%s)", self.node, err)
            self.monitor = None
        if self.rank == 0 and self.tracker.enabled:
            self.tracker.set_tags({NOTE_TAG: self.description(status, step)})
