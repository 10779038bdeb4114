"""The typed config: presets, overrides, YAML, and errors that name the field."""

import pytest

from pipeline import config as C
from pipeline.cli import build_parser, cluster_plan, resolve
from pipeline.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = C.validate(get_preset(name))
    again = C.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.flat()["model.arch"] in ("biggan", "biggan-deep", "dcgan")


def test_paper_settings_are_the_imagenet128_defaults():
    cfg = get_preset("imagenet128")
    assert (cfg.train.global_batch, cfg.loss.d_steps, cfg.optim.g_lr, cfg.optim.d_lr) == (2048, 2, 5e-5, 2e-4)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.ema.decay, cfg.loss.ortho_beta) == (0.0, 0.999, 0.9999, 1e-4)
    assert cfg.optim.eps == 1e-6 and not cfg.data.random_crop  # center crops
    for name in ("imagenet128-deep", "imagenet256", "imagenet512"):  # the same schedule at every size
        other = get_preset(name)
        assert (other.optim.g_lr, other.optim.d_lr, other.loss.d_steps, other.data.random_crop) == (5e-5, 2e-4, 2, False)
    ref = get_preset("imagenet128-biggan-pytorch")  # BigGAN-PyTorch's launch scripts
    assert (ref.optim.g_lr, ref.optim.d_lr, ref.loss.d_steps, ref.model.arch) == (1e-4, 4e-4, 1, "biggan")
    assert C.grad_accumulation_steps(cfg) == 1
    cfg.cluster.num_workers = 2
    assert C.grad_accumulation_steps(cfg) == 4  # 2048 = 256 x 2 workers x 4 micro-steps


def test_overrides_are_typed():
    cfg = C.apply_overrides(get_preset("demo"), ["train.steps=1_000", "data.flip=true", "optim.g_lr=3e-4",
                                                 "model.g_ch=none", "tracking.run_name=x"])
    assert cfg.train.steps == 1000 and cfg.data.flip is True and cfg.optim.g_lr == 3e-4
    assert cfg.model.g_ch is None and cfg.tracking.run_name == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.widht=3", "unknown config field 'model.widht'; model has: arch"),
        ("modle.arch=biggan", "unknown config field 'modle.arch'; sections are"),
        ("train.steps=ten", "train.steps: 'ten' is not a valid int"),
        ("train.steps=1.5", "train.steps: '1.5' is not a valid int"),
        ("data.flip=maybe", "data.flip: 'maybe' is not a valid bool"),
        ("loss.kind=lsgan", "loss.kind: 'lsgan' is not allowed; choose one of ['hinge', 'bce', 'wgan-gp']"),
        ("train.steps=0", "train.steps: must be >= 1, got 0"),
        ("ema.decay=1.5", "ema.decay: must be in [0, 1)"),
        ("model.attention=48", "model.attention: 48 is not a power-of-two"),
        ("health.mitigation=halve_lr,pray", "health.mitigation: 'pray' is not one of"),
        ("train.global_batch=100", "train.global_batch: 100 is not a multiple of"),
        ("loss.label_smoothing=0.1", "only apply to loss.kind='bce'"),
        ("data.batch_size=1", "loss.mode_seeking: 0.5 needs data.batch_size >= 2"),
    ],
)
def test_bad_fields_are_named(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.validate(C.apply_overrides(get_preset("demo"), [override]))
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("optim.g_lr=-1e-4", "optim.g_lr: must be > 0, got -0.0001"),
    ("optim.d_lr=nan", "optim.d_lr: must be > 0, got nan"),
    ("optim.d_lr=inf", "optim.d_lr: must be > 0, got inf"),
    ("optim.beta2=1.5", "optim.beta2: must be in [0, 1), got 1.5"),
    ("health.d_loss_patience=0", "health.d_loss_patience: must be >= 1, got 0"),
    ("health.variety_ratio=1", "health.variety_ratio: must be in (0, 1), got 1.0"),
    ("model.g_ch=0", "model.g_ch: must be >= 1, got 0"),
    ("train.seed=-3", "train.seed: must be in [0, 2147483647], got -3"),
])
def test_out_of_range_numbers_name_the_field_and_range(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.validate(C.apply_overrides(get_preset("demo"), [override]))
    assert message in str(err.value)


def _numeric(typ) -> bool:
    import types
    import typing

    args = typing.get_args(typ) if typing.get_origin(typ) in (types.UnionType, typing.Union) else (typ,)
    return any(a in (int, float) for a in args)


def test_every_numeric_field_declares_its_range():
    """A new int/float field must come with `bounded(...)` (or a CHOICES entry), so validate checks it."""
    import dataclasses
    import typing

    cfg = C.RunConfig()
    ranges = C.field_ranges(cfg)
    missing = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for name, typ in typing.get_type_hints(type(sub)).items():
            key = f"{section.name}.{name}"
            if _numeric(typ) and key not in ranges and key not in C.CHOICES:
                missing.append(key)
    assert not missing, f"numeric fields without a declared range: {missing}"
    assert len(ranges) > 50
    # and each declared default lies inside its own range
    flat = cfg.flat()
    assert [k for k, r in ranges.items() if flat[k] is not None and not r.contains(flat[k])] == []


def test_yaml_overrides_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  steps: 12\nloss:\n  r1_gamma: 0.5\n")
    cfg = C.load_yaml(get_preset("demo"), good)
    assert cfg.train.steps == 12 and cfg.loss.r1_gamma == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: 3\n")
    with pytest.raises(C.ConfigError, match="section 'train' must be a mapping"):
        C.load_yaml(get_preset("demo"), bad)
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_yaml(get_preset("demo"), tmp_path / "missing.yaml")


def test_cli_resolves_in_order_and_plans(tmp_path):
    y = tmp_path / "o.yaml"
    y.write_text("train:\n  steps: 5\n  seed: 3\n")
    args = build_parser("imagenet128").parse_args(
        ["--data", "s3://b/x", "--config", str(y), "--set", "train.steps=7", "--set", "cluster.num_workers=4"]
    )
    cfg = resolve("imagenet128", args)
    assert (cfg.train.steps, cfg.train.seed, cfg.data.shards) == (7, 3, "s3://b/x")
    plan = cluster_plan(cfg)
    assert plan["workers"] == 4 and plan["grad_accumulation_steps"] == 2 and plan["images_per_d_step"] == 2048
    assert plan["backend"] == "nccl" and plan["per_worker"]["GPU"] == 1
