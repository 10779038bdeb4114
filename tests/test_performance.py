"""train.precision / channels_last / compile = auto: what they become on a CPU with or without bf16 units, and why."""

import pytest
import torch

from pipeline import config as C
from pipeline.performance import cpu_bf16_flags, resolve
from pipeline.presets import get_preset

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = ("amx_bf16", "avx512_bf16")


def demo(**overrides) -> C.RunConfig:
    cfg = get_preset("demo")
    cfg.model.num_classes = 10
    C.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    return C.validate(cfg)


def test_bf16_flags_are_read_from_the_cpuinfo_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon amx_bf16 in the name\n"
                    "flags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_bf16_flags(str(info)) == ("amx_bf16", "avx512_bf16")
    older = tmp_path / "cpuinfo-older"
    older.write_text("model name\t: Xeon amx_bf16\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_bf16_flags(str(older)) == ()  # the model name does not count, only the flags
    assert cpu_bf16_flags(str(tmp_path / "missing")) == ()


def test_auto_picks_bf16_and_channels_last_on_a_cpu_with_bf16_units_and_says_why():
    plan = resolve(demo(), CPU, cpu_flags=SAPPHIRE_RAPIDS)
    assert plan.bf16.on and plan.channels_last.on
    assert "amx_bf16" in plan.bf16.reason and plan.bf16.reason.startswith("auto")
    tags = plan.tags()
    assert tags["speed.precision"] == "bf16" and tags["speed.channels_last"] == "on"
    assert set(tags) == {f"speed.{k}{r}" for k in ("precision", "channels_last", "compile") for r in ("", ".reason")}
    assert "precision     bf16 (auto: the CPU has native bf16 units (amx_bf16, avx512_bf16))" in plan.describe()


def test_auto_stays_fp32_without_bf16_units_and_explicit_settings_win():
    plan = resolve(demo(), CPU, cpu_flags=())
    assert not plan.bf16.on and not plan.channels_last.on and not plan.compile.on
    assert "no native bf16" in plan.bf16.reason
    forced = resolve(demo(**{"train.precision": "bf16", "train.channels_last": "false", "train.compile": "false"}),
                     CPU, cpu_flags=())
    assert forced.bf16.on and not forced.channels_last.on and not forced.compile.on
    assert forced.bf16.reason == "train.precision=bf16" and forced.compile.reason == "train.compile=false"
    assert not resolve(demo(**{"train.precision": "fp32"}), CPU, cpu_flags=SAPPHIRE_RAPIDS).bf16.on


def test_auto_compiles_only_runs_long_enough_to_repay_the_compile_time():
    short = resolve(demo(**{"train.steps": 50}), CPU, cpu_flags=SAPPHIRE_RAPIDS).compile
    long = resolve(demo(**{"train.steps": 100_000}), CPU, cpu_flags=SAPPHIRE_RAPIDS).compile
    assert not short.on and "do not repay" in short.reason and "break-even" in short.reason
    assert long.on and "repay" in long.reason
    # fp32 on CPU was not measured to gain from compiling: auto leaves it eager at any length
    assert not resolve(demo(**{"train.steps": 100_000}), CPU, cpu_flags=()).compile.on


@pytest.mark.parametrize("given, stored", [("true", "true"), ("True", "true"), ("on", "true"), ("0", "false"),
                                           ("no", "false"), ("AUTO", "auto")])
def test_switch_fields_take_booleans_and_their_spellings(given, stored):
    assert demo(**{"train.compile": given}).train.compile == stored
    cfg = get_preset("demo")
    cfg.train.channels_last = True  # a caller assigning a bool directly
    assert C.validate(cfg).train.channels_last == "true"


def test_a_bad_switch_value_names_the_field_and_the_choices():
    with pytest.raises(C.ConfigError, match=r"train.channels_last: 'maybe' is not allowed; choose one of \['auto', 'true', 'false'\]"):
        demo(**{"train.channels_last": "maybe"})
