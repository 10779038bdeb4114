"""The run configuration: one typed tree, printed and logged whole with every run.

Presets (pipeline/presets.py) build a `RunConfig`; users change any field with `--set section.field=value`
or a YAML file of the same shape. Every unknown or invalid field is a `ConfigError` naming the field and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration field is unknown or has a value that is not allowed."""


@dataclass
class ModelConfig:
    arch: str = "biggan"  # biggan | biggan-deep | dcgan
    resolution: int = 128  # output side in pixels: 32, 64, 128, 256, 512
    num_classes: int = 0  # 0 = take it from the data manifest
    g_ch: int | None = None  # G width multiplier; None = the paper's value for the arch
    d_ch: int | None = None  # D width multiplier; None = the paper's value for the arch
    dim_z: int | None = None  # latent size; None = 120 (BigGAN) or 128 (BigGAN-deep)
    shared_dim: int = 128  # shared class-embedding size
    hier: bool = True  # skip-z: split z over G's blocks (BigGAN only)
    depth: int = 2  # blocks per resolution (BigGAN-deep only)
    attention: int | None = None  # resolution of the self-attention block; None = the paper's; 0 = none
    bn_eps: float = 1e-5
    sn_eps: float = 1e-6
    num_sv_itrs: int = 1  # power iterations per training forward
    d_head: str = "projection"  # projection | acgan (auxiliary classifier; dcgan)
    d_norm: str = "batch"  # dcgan D normalization: batch | layer | none (WGAN-GP needs layer or none)
    d_conditioning: str = "projection"  # dcgan D conditioning: projection | concat


@dataclass
class DataConfig:
    shards: str = ""  # directory or fsspec URL holding manifest.json and the shards
    backend: str = "auto"  # auto | dali-gpu | dali-cpu | wds
    batch_size: int = 64  # images per worker per micro-step
    random_crop: bool = False
    flip: bool = True
    num_threads: int = 2  # decode threads per worker
    diffaug: str = ""  # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"; "" = off


@dataclass
class OptimConfig:
    g_lr: float = 1e-4
    d_lr: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-6
    zero_stage: int = 1  # DeepSpeed ZeRO stage for both engines: 0 or 1


@dataclass
class LossConfig:
    kind: str = "hinge"  # hinge | bce | wgan-gp
    d_steps: int = 2  # D steps per G step
    r1_gamma: float = 0.0  # R1 penalty weight on real images; 0 = off
    r1_interval: int = 16  # lazy R1: every N D steps, scaled by N
    gp_lambda: float = 10.0  # WGAN-GP gradient-penalty weight
    ortho_beta: float = 1e-4  # BigGAN orthogonal regularization on G; 0 = off
    label_smoothing: float = 0.0  # one-sided: real targets become 1 - this (bce)
    label_flip: float = 0.0  # probability of flipping D's labels (bce)
    acgan_weight: float = 1.0  # weight of the auxiliary classification loss (d_head=acgan)


@dataclass
class TricksConfig:
    instance_noise: float = 0.0  # initial std of Gaussian noise added to D's inputs; 0 = off
    instance_noise_decay_steps: int = 10_000  # linear decay to 0 over this many steps
    replay_size: int = 0  # images kept from past G outputs; 0 = off
    replay_fraction: float = 0.5  # share of D's fake batch drawn from the replay buffer
    z_dist: str = "normal"  # latent distribution: normal | uniform


@dataclass
class EMAConfig:
    decay: float = 0.9999
    start_step: int = 20_000  # before this, EMA G copies G


@dataclass
class TrainConfig:
    steps: int = 250_000  # G steps
    global_batch: int = 2048  # images per D step over all workers (gradient accumulation fills the gap)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 20
    sample_every: int = 1000
    checkpoint_every: int = 1000
    checkpoint_every_minutes: float = 0.0  # also commit when this much time passed since the last one; 0 = off
    keep_last: int = 3  # checkpoints kept besides the best and the newest healthy one
    output_dir: str = "runs"  # local checkpoints and samples (per run subfolder)
    channels_last: bool = False  # NHWC images into D and G's convolutions (DeepSpeed keeps weights NCHW)
    compile: bool = False  # torch.compile G and D in place (GPU; measure with bench/throughput.py)


@dataclass
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    storage_path: str = ""  # Ray Train storage (local path or s3://); "" = <output_dir>/ray
    max_failures: int = 3  # restarts of the worker group from the last checkpoint (crashes, kills)
    max_preemptions: int = 100  # relaunches after workers were preempted (SIGTERM); these use no max_failures
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (one worker per node)


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "biggan"
    run_name: str = ""  # the run's identity (resume key); "" = <preset>-<digest of what is trained> (pipeline/resume.py)
    retries: int = 3  # attempts per tracking call before warning and moving on


@dataclass
class HealthConfig:
    enabled: bool = True
    every: int = 10  # G steps between health checks
    window: int = 50  # trailing checks forming each signal's history
    min_history: int = 10  # checks needed before relative rules fire
    warmup_steps: int = 0  # G steps during which only non-finite values raise alarms (relative rules quiet)
    sigma_ratio: float = 3.0  # alarm when G's first-layer sigma0 exceeds k x its trailing median
    d_sigma_ratio: float = 3.0  # alarm when D's max sigma0 exceeds k x its trailing median
    d_loss_floor: float = 0.02  # alarm when D's real+fake loss stays below this ...
    d_loss_patience: int = 5  # ... for this many consecutive checks
    variety_ratio: float = 0.25  # alarm when EMA-G sample variety falls below k x its trailing median
    fid_ratio: float = 1.5  # alarm when FID exceeds k x its trailing median (when evaluation runs)
    healthy_after: int = 3  # alarm-free checks after a checkpoint before it counts as healthy
    max_rollbacks: int = 3
    mitigation: str = "halve_lr,double_r1,reset_d_opt,reseed_data"


@dataclass
class EvalConfig:
    every: int = 0  # G steps between evaluations (a multiple of train.checkpoint_every; also the last step); 0 = off
    num_samples: int = 10_000  # generated images per evaluation
    features: str = "inception"  # inception | classifier (a small CNN trained once on the shards)
    inception_weights: str = ""  # path; "" = $BIGGAN_INCEPTION_WEIGHTS
    standing_stats_passes: int = 16  # G forwards that set EMA G's batch-norm statistics before sampling; 0 = off
    truncation: float = 0.0  # |z| threshold for evaluation samples; 0 = no truncation
    batch_size: int = 64  # images per G forward and per feature-extractor batch
    reference_images: int = 0  # real images for the reference statistics and the classifier; 0 = num_samples
    pr_samples: int = 10_000  # feature rows per side compared for precision/recall
    classifier_epochs: int = 8  # training passes of the dataset classifier (features=classifier)
    truncation_sweep: str = ""  # thresholds evaluated at the end of training, e.g. "0.25,0.5,1.0,0" (0 = none); "" = off
    register_model: str = "biggan-{preset}"  # MLflow registered-model name for best checkpoints; "" = off


@dataclass
class RunConfig:
    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tricks: TricksConfig = field(default_factory=TricksConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.field -> value`, the shape MLflow params take."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() if isinstance(sub, dict) for k, v in sub.items()}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


CHOICES: dict[str, tuple] = {
    "model.arch": ("biggan", "biggan-deep", "dcgan"),
    "model.resolution": (32, 64, 128, 256, 512),
    "model.d_head": ("projection", "acgan"),
    "model.d_norm": ("batch", "layer", "none"),
    "model.d_conditioning": ("projection", "concat"),
    "tricks.z_dist": ("normal", "uniform"),
    "data.backend": ("auto", "dali-gpu", "dali-cpu", "wds"),
    "optim.zero_stage": (0, 1),
    "loss.kind": ("hinge", "bce", "wgan-gp"),
    "train.precision": ("auto", "bf16", "fp32"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}
MITIGATIONS = ("halve_lr", "double_r1", "reset_d_opt", "reseed_data")


def _field_type(section: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(section))
    return hints[name]


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a string or YAML value into the field's declared type, or raise naming the field."""
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, args[0])
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{key}: unsupported field type {typ}")
    raise ConfigError(f"{key}: {value!r} is not a valid {getattr(typ, '__name__', typ)}")


def set_field(cfg: RunConfig, key: str, value: Any) -> None:
    """Set `section.field` on cfg, converting value to the field's type."""
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections:
        if len(parts) == 1 and parts[0] == "preset":
            cfg.preset = str(value)
            return
        raise ConfigError(f"unknown config field {key!r}; sections are: {', '.join(sorted(sections))}")
    section = getattr(cfg, parts[0])
    names = [f.name for f in dataclasses.fields(section)]
    if parts[1] not in names:
        raise ConfigError(f"unknown config field {key!r}; {parts[0]} has: {', '.join(names)}")
    setattr(section, parts[1], _coerce(key, value, _field_type(section, parts[1])))


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.field=value` strings in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        set_field(cfg, key.strip(), value.strip())
    return cfg


def apply_mapping(cfg: RunConfig, data: dict[str, Any], source: str = "mapping") -> RunConfig:
    """Apply a nested {section: {field: value}} mapping, as read from YAML."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section == "preset":
            cfg.preset = str(values)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of fields")
        for name, value in values.items():
            set_field(cfg, f"{section}.{name}", value)
    return cfg


def load_yaml(cfg: RunConfig, path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return apply_mapping(cfg, yaml.safe_load(path.read_text()) or {}, source=str(path))


def validate(cfg: RunConfig) -> RunConfig:
    """Check every constrained field; raise ConfigError naming the first bad one."""
    flat = cfg.flat()
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not allowed; choose one of {list(allowed)}")
    positive = [
        "data.batch_size", "loss.d_steps", "loss.r1_interval", "train.steps",
        "train.global_batch", "train.log_every", "train.sample_every", "train.checkpoint_every",
        "cluster.num_workers", "cluster.cpus_per_worker", "health.every", "health.window",
        "model.num_sv_itrs", "data.num_threads",
    ]
    for key in positive:
        if flat[key] is None or flat[key] <= 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    non_negative = [
        "loss.r1_gamma", "loss.ortho_beta", "loss.gp_lambda", "tricks.instance_noise", "tricks.replay_size",
        "model.num_classes", "train.keep_last", "cluster.max_failures", "health.max_rollbacks", "eval.every",
        "train.checkpoint_every_minutes", "cluster.max_preemptions", "health.warmup_steps",
    ]
    for key in non_negative:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")
    for key in ("loss.label_smoothing", "loss.label_flip", "tricks.replay_fraction"):
        if not 0.0 <= flat[key] < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {flat[key]!r}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay: must be in [0, 1), got {cfg.ema.decay!r}")
    per_step = cfg.data.batch_size * cfg.cluster.num_workers
    if cfg.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch: {cfg.train.global_batch} is not a multiple of data.batch_size x "
            f"cluster.num_workers = {per_step}; gradient accumulation needs a whole number of micro-steps"
        )
    if cfg.model.attention is not None and cfg.model.attention not in (0, 8, 16, 32, 64, 128, 256, 512):
        raise ConfigError(f"model.attention: {cfg.model.attention} is not a power-of-two resolution or 0")
    if (cfg.model.attention or 0) > cfg.model.resolution:
        raise ConfigError(
            f"model.attention: {cfg.model.attention} is above model.resolution {cfg.model.resolution}; use 0 for none"
        )
    if cfg.eval.every > 0 and cfg.eval.every % cfg.train.checkpoint_every:
        raise ConfigError(
            f"eval.every: {cfg.eval.every} is not a multiple of train.checkpoint_every {cfg.train.checkpoint_every}; "
            "evaluations judge (and mark best) the checkpoint of their step"
        )
    for key in ("eval.num_samples", "eval.batch_size", "eval.pr_samples", "eval.classifier_epochs"):
        if flat[key] <= 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    if cfg.eval.features not in ("inception", "classifier"):
        raise ConfigError(f"eval.features: {cfg.eval.features!r} is not allowed; choose one of ['inception', 'classifier']")
    for key in ("eval.standing_stats_passes", "eval.reference_images", "eval.truncation"):
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")
    try:
        sweep = parse_thresholds(cfg.eval.truncation_sweep)
    except ValueError:
        sweep = [-1.0]
    if any(t < 0 for t in sweep):
        raise ConfigError(
            f"eval.truncation_sweep: {cfg.eval.truncation_sweep!r} must be comma-separated thresholds >= 0 (0 = none)"
        )
    for item in filter(None, cfg.health.mitigation.split(",")):
        if item.strip() not in MITIGATIONS:
            raise ConfigError(f"health.mitigation: {item.strip()!r} is not one of {list(MITIGATIONS)}")
    from pipeline.losses import check_combination

    check_combination(cfg)
    return cfg


def parse_thresholds(text: str) -> list[float]:
    """eval.truncation_sweep "0.25,0.5,0" -> [0.25, 0.5, 0.0]; "" -> []."""
    return [float(item) for item in text.replace(" ", "").split(",") if item]


def grad_accumulation_steps(cfg: RunConfig) -> int:
    return cfg.train.global_batch // (cfg.data.batch_size * cfg.cluster.num_workers)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (checkpoints, MLflow)."""
    return apply_mapping(RunConfig(), data, source="saved config")
