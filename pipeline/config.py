"""The run configuration: one typed tree, printed and logged whole with every run.

Presets (pipeline/presets.py) build a `RunConfig`; users change any field with `--set section.field=value`
or a YAML file of the same shape. Every unknown or invalid field is a `ConfigError` naming the field and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration field is unknown or has a value that is not allowed."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: finite, and within the bounds given (None = unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        # NOTE: written so that NaN fails every comparison and so every range
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        lo = (self.ge, "[") if self.ge is not None else (self.gt, "(") if self.gt is not None else None
        hi = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if lo and hi:
            return f"in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
        if lo:
            return f"{'>=' if lo[1] == '[' else '>'} {_num(lo[0])}"
        if hi:
            return f"{'<=' if hi[1] == ']' else '<'} {_num(hi[0])}"
        return "finite"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric config field with its allowed range, e.g. `g_lr: float = bounded(1e-4, gt=0)`.

    `validate` checks every such field (None stays allowed for `X | None` fields); a numeric field without a
    range (or an entry in CHOICES) fails tests/test_config.py, so new fields cannot skip the check."""
    return field(default=default, metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)})


@dataclass
class ModelConfig:
    arch: str = "biggan"  # biggan | biggan-deep | dcgan
    resolution: int = 128  # output side in pixels: 32, 64, 128, 256, 512
    num_classes: int = bounded(0, ge=0)  # 0 = take it from the data manifest
    g_ch: int | None = bounded(None, ge=1)  # G width multiplier; None = the paper's value for the arch
    d_ch: int | None = bounded(None, ge=1)  # D width multiplier; None = the paper's value for the arch
    dim_z: int | None = bounded(None, ge=1)  # latent size; None = 120 (BigGAN) or 128 (BigGAN-deep)
    shared_dim: int = bounded(128, ge=1)  # shared class-embedding size
    hier: bool = True  # skip-z: split z over G's blocks (BigGAN only)
    depth: int = bounded(2, ge=1)  # blocks per resolution (BigGAN-deep only)
    attention: int | None = bounded(None, ge=0)  # resolution of the self-attention block; None = the paper's; 0 = none
    bn_eps: float = bounded(1e-5, gt=0)
    sn_eps: float = bounded(1e-6, gt=0)
    num_sv_itrs: int = bounded(1, ge=1)  # power iterations per training forward
    d_spectral_norm: bool = True  # false: D trains on raw weights (an ablation; sigma0 is still read). BigGAN only
    d_head: str = "projection"  # projection | acgan (auxiliary classifier instead) | projection+acgan (both)
    d_norm: str = "batch"  # dcgan D normalization: batch | layer | none (WGAN-GP needs layer or none)
    d_conditioning: str = "projection"  # dcgan D conditioning: projection | concat
    cross_replica_bn: bool = False  # G's batch statistics over all ranks, per micro-batch (pipeline/cross_replica.py)
    init_from: str = ""  # fine-tune: pytorch-pretrained-biggan folder (config.json + pytorch_model.bin) for G; "" = off
    init_from_new_classes: bool = False  # with init_from: G's class embedding starts fresh (other classes or count)


@dataclass
class DataConfig:
    shards: str = ""  # directory or fsspec URL holding manifest.json and the shards
    backend: str = "auto"  # auto | dali-gpu | dali-cpu | wds
    batch_size: int = bounded(64, ge=1)  # images per worker per micro-step
    random_crop: bool = False
    flip: bool = True
    num_threads: int = bounded(2, ge=1)  # decode threads per worker
    diffaug: str = ""  # DiffAugment policy for D's inputs, e.g. "color,translation,cutout"; "" = off
    max_bad_fraction: float = bounded(0.01, ge=0, le=1)  # share of the set that bad samples and quarantined shards may take, [0, 1]


@dataclass
class OptimConfig:
    g_lr: float = bounded(5e-5, gt=0)  # the paper's (SAGAN's rates halved); BigGAN-PyTorch's scripts: 1e-4 / 4e-4
    d_lr: float = bounded(2e-4, gt=0)
    beta1: float = bounded(0.0, ge=0, lt=1)
    beta2: float = bounded(0.999, ge=0, lt=1)
    eps: float = bounded(1e-6, gt=0)
    zero_stage: int = 1  # DeepSpeed ZeRO stage for both engines: 0 or 1


@dataclass
class LossConfig:
    kind: str = "hinge"  # hinge | bce | wgan-gp
    d_steps: int = bounded(2, ge=1)  # D steps per G step
    r1_gamma: float = bounded(0.0, ge=0)  # R1 penalty weight on real images; 0 = off
    r1_interval: int = bounded(16, ge=1)  # lazy R1: every N D steps, scaled by N
    gp_lambda: float = bounded(10.0, ge=0)  # WGAN-GP gradient-penalty weight
    ortho_beta: float = bounded(1e-4, ge=0)  # BigGAN orthogonal regularization on G; 0 = off
    label_smoothing: float = bounded(0.0, ge=0, lt=1)  # one-sided: real targets become 1 - this (bce)
    label_flip: float = bounded(0.0, ge=0, lt=1)  # probability of flipping D's labels (bce)
    acgan_weight: float = bounded(1.0, ge=0)  # weight of the auxiliary classification loss (d_head=acgan)
    mode_seeking: float = bounded(0.0, ge=0)  # weight of MSGAN's mode-seeking term in the G step (same-class pairs); 0 = off


@dataclass
class TricksConfig:
    instance_noise: float = bounded(0.0, ge=0)  # initial std of Gaussian noise added to D's inputs; 0 = off
    instance_noise_decay_steps: int = bounded(10_000, ge=1)  # linear decay to 0 over this many steps
    replay_size: int = bounded(0, ge=0)  # images kept from past G outputs; 0 = off
    replay_fraction: float = bounded(0.5, ge=0, lt=1)  # share of D's fake batch drawn from the replay buffer
    z_dist: str = "normal"  # latent distribution: normal | uniform


@dataclass
class EMAConfig:
    decay: float = bounded(0.9999, ge=0, lt=1)
    start_step: int = bounded(20_000, ge=0)  # before this, EMA G copies G
    sn_itrs: int = bounded(8, ge=1)  # power iterations on EMA G's own weights before each use (warm-started from the last)


@dataclass
class TrainConfig:
    steps: int = bounded(250_000, ge=1)  # G steps
    global_batch: int = bounded(2048, ge=1)  # images per D step over all workers (gradient accumulation fills the gap)
    seed: int = bounded(0, ge=0, le=2**31 - 1)
    precision: str = "auto"  # auto (bf16 where it pays: performance.cpu_bf16_choice) | bf16 | fp32
    log_every: int = bounded(20, ge=1)
    sample_every: int = bounded(1000, ge=1)
    checkpoint_every: int = bounded(1000, ge=1)
    checkpoint_every_minutes: float = bounded(0.0, ge=0)  # also commit when this much time passed since the last one; 0 = off
    keep_last: int = bounded(3, ge=0)  # checkpoints kept besides the best and the newest healthy one
    output_dir: str = "runs"  # local checkpoints and samples (per run subfolder)
    channels_last: str = "auto"  # NHWC images into D's convolutions: auto (where bf16 runs) | true | false
    compile: str = "auto"  # torch.compile G and D in place: auto (CPU bf16 runs long enough to repay it) | true | false


@dataclass
class ClusterConfig:
    num_workers: int = bounded(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = bounded(1, ge=1)
    storage_path: str = ""  # Ray Train storage (local path or s3://); "" = <output_dir>/ray
    max_failures: int = bounded(3, ge=0)  # restarts of the worker group from the last checkpoint
    max_preemptions: int = bounded(100, ge=0)  # relaunches after workers were preempted (SIGTERM); these use no max_failures
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (one worker per node)


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "biggan"
    run_name: str = ""  # the run's identity (resume key); "" = <preset>-<digest of what is trained> (pipeline/resume.py)
    retries: int = bounded(3, ge=1)  # attempts for a call the server answers 5xx/429 before it is dropped (counted)
    retry_max_wait_s: float = bounded(30.0, gt=0)  # longest back-off between tries while the server is unreachable
    flush_timeout_s: float = bounded(300.0, ge=0)  # the end of a run waits this long for queued calls; the rest is kept in the run's folder and sent by its next start
    system_metrics_every: float = bounded(10.0, ge=0)  # seconds between MLflow system-metrics samples per node; 0 = off


@dataclass
class HealthConfig:
    enabled: bool = True
    every: int = bounded(10, ge=1)  # G steps between health checks
    window: int = bounded(50, ge=1)  # trailing checks forming each signal's history
    min_history: int = bounded(10, ge=1)  # checks needed before relative rules fire
    warmup_steps: int = bounded(0, ge=0)  # G steps during which only non-finite values raise alarms (relative rules quiet)
    sigma_ratio: float = bounded(3.0, gt=1)  # alarm when G's first-layer sigma0 exceeds k x its trailing median
    d_sigma_ratio: float = bounded(3.0, gt=1)  # alarm when D's max sigma0 exceeds k x its trailing median
    d_sigma_quality_ratio: float = bounded(1.25, ge=0)  # ... and the class FID is above k x its best in the trailing window (0 = sigma0 alone)
    d_loss_floor: float = bounded(0.02, ge=0)  # alarm when D's real+fake loss stays below this ...
    d_loss_patience: int = bounded(5, ge=1)  # ... for this many consecutive checks
    d_frozen_checks: int = bounded(3, ge=0)  # alarm when D's real and fake losses stay put for this many checks (0 = off) ...
    d_frozen_tol: float = bounded(1e-3, ge=0)  # ... each within this (relative, at least absolute) of the previous check's
    g_grad_zero_checks: int = bounded(2, ge=0)  # alarm when G's gradient norm has vanished at this many checks in a row (0 = off): ...
    g_grad_vanish_ratio: float = bounded(0.01, ge=0, lt=1)  # ... exactly 0, or below k x its trailing median (0 = exact zeros only)
    variety_ratio: float = bounded(0.25, gt=0, lt=1)  # alarm when EMA-G sample variety falls below k x its trailing median
    fid_ratio: float = bounded(1.5, gt=1)  # alarm when FID exceeds k x its trailing median (when evaluation runs)
    sigma_trend_checks: int = bounded(40, ge=3)  # last checks the sigma0 trend rule looks at (quiet until that many)
    sigma_trend_factor: float = bounded(1.6, gt=1)  # alarm when G's first-layer sigma0 rose by this factor over them ...
    sigma_trend_r2: float = bounded(0.8, ge=0, le=1)  # ... along a steady climb: R^2 of a log-linear fit at least this
    sigma_trend_quality_ratio: float = bounded(1.25, ge=0)  # ... and the class FID above k x its best in the window (0 = sigma0 alone)
    class_signals: bool = True  # class fidelity, intra-class diversity and class FID of EMA G (pipeline/class_health.py)
    classes: int = bounded(10, ge=2)  # classes in the fixed health batch, evenly spaced over the data's
    samples_per_class: int = bounded(10, ge=2)  # EMA-G samples of each of them per check
    real_images: int = bounded(2000, ge=2)  # real images whose per-class feature spread diversity is relative to
    fidelity_floor: float = bounded(2.0, ge=1)  # alarm when class fidelity falls below k x chance, once it has been above 2k x chance ...
    fidelity_by_step: int = bounded(0, ge=0)  # ... or is still below it at this G step (0 = never)
    fidelity_ratio: float = bounded(0.5, gt=0, lt=1)  # alarm when class fidelity falls below k x its trailing median (above the floor)
    diversity_floor: float = bounded(0.3, gt=0, lt=1)  # alarm when intra-class diversity (1 = real data's) falls below this, once it has been above 2x it
    diversity_ratio: float = bounded(0.3, gt=0, lt=1)  # alarm when intra-class diversity falls below k x its trailing median
    class_fid_ratio: float = bounded(3.0, gt=1)  # alarm when the health batch's FID exceeds k x its trailing median ...
    class_fid_ceiling: float = bounded(0.9, gt=0)  # ... or k x its value at the first check (an untrained G), once it has halved
    healthy_after: int = bounded(3, ge=0)  # alarm-free checks after a checkpoint before it counts as healthy
    max_rollbacks: int = bounded(3, ge=0)
    mitigation: str = "halve_lr,double_r1,reset_d_opt,reseed_data"


@dataclass
class EvalConfig:
    every: int = bounded(0, ge=0)  # G steps between evaluations (a multiple of train.checkpoint_every; also the last step); 0 = off
    num_samples: int = bounded(10_000, ge=1)  # generated images per evaluation
    features: str = "inception"  # inception | classifier (a small CNN trained once on the shards)
    inception_weights: str = ""  # path; "" = $BIGGAN_INCEPTION_WEIGHTS
    vgg16_weights: str = ""  # NVIDIA's TorchScript vgg16.pt: adds eval/precision_vgg16, recall_vgg16; "" = $BIGGAN_VGG16_WEIGHTS or off
    standing_stats_passes: int = bounded(16, ge=0)  # G forwards that set EMA G's batch-norm statistics before sampling; 0 = off
    truncation: float = bounded(0.0, ge=0)  # |z| threshold for evaluation samples; 0 = no truncation
    batch_size: int = bounded(64, ge=1)  # images per G forward and per feature-extractor batch
    reference_images: int = bounded(0, ge=0)  # real images for the reference statistics and the classifier; 0 = num_samples
    pr_samples: int = bounded(10_000, ge=1)  # feature rows per side compared for precision/recall
    classifier_epochs: int = bounded(8, ge=1)  # training passes of the dataset classifier (features=classifier)
    classifier_precision: str = "auto"  # training the dataset and CAS classifiers: auto (bf16 where train.precision=auto picks it) | bf16 | fp32
    truncation_sweep: str = ""  # thresholds evaluated at the end of training, e.g. "0.25,0.5,1.0,0" (0 = none); "" = off
    register_model: str = "biggan-{preset}"  # MLflow registered-model name for best checkpoints; "" = off
    cas_samples: int = bounded(0, ge=0)  # class-balanced samples a classifier trains on for eval/cas (classifier_epochs); 0 = off
    cas_test_images: int = bounded(2000, ge=1)  # real images after the reference ones, held out to test CAS and the real classifier


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
    "model.d_head": ("projection", "acgan", "projection+acgan"),
    "model.d_norm": ("batch", "layer", "none"),
    "model.d_conditioning": ("projection", "concat"),
    "tricks.z_dist": ("normal", "uniform"),
    "data.backend": ("auto", "dali-gpu", "dali-cpu", "wds"),
    "optim.zero_stage": (0, 1),
    "loss.kind": ("hinge", "bce", "wgan-gp"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.channels_last": ("auto", "true", "false"),
    "train.compile": ("auto", "true", "false"),
    "eval.classifier_precision": ("auto", "bf16", "fp32"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}
# auto | true | false fields: booleans and their spellings (on/off, yes/no, 1/0) are accepted and stored as words
SWITCHES = ("train.channels_last", "train.compile")
MITIGATIONS = ("halve_lr", "double_r1", "reset_d_opt", "reseed_data")


def switch_value(value: Any) -> Any:
    """`auto`, `true` or `false` for a SWITCHES field; anything else is returned as is (validate names it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    word = str(value).strip().lower()
    if word in ("true", "1", "yes", "on"):
        return "true"
    if word in ("false", "0", "no", "off"):
        return "false"
    return word if word == "auto" else value


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
    if key in SWITCHES:
        value = switch_value(value)
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
    for key in SWITCHES:  # a preset or a caller may have assigned a bool
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, switch_value(getattr(getattr(cfg, section), name)))
    flat = cfg.flat()
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not allowed; choose one of {list(allowed)}")
    check_ranges(cfg)
    per_step = cfg.data.batch_size * cfg.cluster.num_workers
    if cfg.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch: {cfg.train.global_batch} is not a multiple of data.batch_size x "
            f"cluster.num_workers = {per_step}; gradient accumulation needs a whole number of micro-steps"
        )
    if cfg.loss.mode_seeking > 0 and cfg.data.batch_size < 2:
        raise ConfigError(
            f"loss.mode_seeking: {cfg.loss.mode_seeking} needs data.batch_size >= 2 (it compares pairs of one micro-batch); "
            f"data.batch_size is {cfg.data.batch_size}. Set loss.mode_seeking=0 or a larger batch"
        )
    if cfg.model.attention is not None and cfg.model.attention not in (0, 8, 16, 32, 64, 128, 256, 512):
        raise ConfigError(f"model.attention: {cfg.model.attention} is not a power-of-two resolution or 0")
    if (cfg.model.attention or 0) > cfg.model.resolution:
        raise ConfigError(
            f"model.attention: {cfg.model.attention} is above model.resolution {cfg.model.resolution}; use 0 for none"
        )
    if not cfg.model.d_spectral_norm and cfg.model.arch == "dcgan":
        raise ConfigError("model.d_spectral_norm: false needs model.arch biggan or biggan-deep; dcgan's D has no "
                          "spectral norm to switch off (see model.d_norm)")
    if cfg.eval.every > 0 and cfg.eval.every % cfg.train.checkpoint_every:
        raise ConfigError(
            f"eval.every: {cfg.eval.every} is not a multiple of train.checkpoint_every {cfg.train.checkpoint_every}; "
            "evaluations judge (and mark best) the checkpoint of their step"
        )
    if cfg.eval.features not in ("inception", "classifier"):
        raise ConfigError(f"eval.features: {cfg.eval.features!r} is not allowed; choose one of ['inception', 'classifier']")
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


def field_ranges(cfg: RunConfig) -> dict[str, Range]:
    """`section.field -> Range` for every field declared with `bounded`."""
    out = {}
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if dataclasses.is_dataclass(sub):
            for f in dataclasses.fields(sub):
                if "range" in f.metadata:
                    out[f"{section.name}.{f.name}"] = f.metadata["range"]
    return out


def check_ranges(cfg: RunConfig) -> None:
    flat = cfg.flat()
    for key, allowed in field_ranges(cfg).items():
        value = flat[key]
        if value is not None and not allowed.contains(value):
            raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


def parse_thresholds(text: str) -> list[float]:
    """eval.truncation_sweep "0.25,0.5,0" -> [0.25, 0.5, 0.0]; "" -> []."""
    return [float(item) for item in text.replace(" ", "").split(",") if item]


def grad_accumulation_steps(cfg: RunConfig) -> int:
    return cfg.train.global_batch // (cfg.data.batch_size * cfg.cluster.num_workers)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (checkpoints, MLflow)."""
    return apply_mapping(RunConfig(), data, source="saved config")
