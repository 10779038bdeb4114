"""What `train.precision`, `train.channels_last` and `train.compile` set to "auto" become on this machine, and why.

Measured with bench/vs_biggan_pytorch.py on three 2-core CPUs (numbers in bench/RESULTS.md): bf16 pays on a Xeon
with AMX-BF16 and on AMD EPYCs with AVX512-BF16, and costs time on a Xeon whose AMX the hypervisor hides, where
only AVX512-BF16 is left; channels_last and torch.compile are judged by the same bench.
Every resolved choice carries its reason; the trainer prints them once and logs them to MLflow as `speed.*` tags.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import RunConfig, switch_value

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix / dot-product units
# torch.compile on CPU, measured for the demo's model: about this many seconds of compilation per process with an
# empty inductor cache (the demo's 2 workers compiling at once on 2 cores: 192 s; a warm cache takes about half) ...
CPU_COMPILE_SECONDS = 190.0
# ... and this share of an eager iteration saved per step after it: bf16 on the AMX Xeon, fp32 on the Xeon without
# AMX (0.81 s against 1.13 s; bench/RESULTS.md, "CPU speed by default" and "Session 16")
CPU_COMPILE_SAVING = {True: 0.45, False: 0.28}


@dataclass(frozen=True)
class Choice:
    on: bool
    reason: str


@dataclass(frozen=True)
class SpeedPlan:
    bf16: Choice
    channels_last: Choice
    compile: Choice

    def items(self) -> list[tuple[str, Choice]]:
        return [("precision", self.bf16), ("channels_last", self.channels_last), ("compile", self.compile)]

    def describe(self) -> str:
        """One line per knob: `precision bf16 (reason)`."""
        def value(name: str, c: Choice) -> str:
            return ("bf16" if c.on else "fp32") if name == "precision" else ("on" if c.on else "off")
        return "\n".join(f"  {name:<13} {value(name, c):<4} ({c.reason})" for name, c in self.items())

    def tags(self) -> dict[str, str]:
        """MLflow tags: `speed.precision` = bf16 | fp32, `speed.channels_last` = on | off, and `.reason` for each."""
        out = {}
        for name, c in self.items():
            out[f"speed.{name}"] = ("bf16" if c.on else "fp32") if name == "precision" else ("on" if c.on else "off")
            out[f"speed.{name}.reason"] = c.reason
        return out


def _cpuinfo_field(cpuinfo: str, key: str) -> str:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """Which of CPU_BF16_FLAGS this CPU advertises (empty where /proc/cpuinfo is missing: not Linux)."""
    flags = set(_cpuinfo_field(cpuinfo, "flags").split())
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


@functools.cache
def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """/proc/cpuinfo's vendor_id: GenuineIntel, AuthenticAMD, ... (empty where it is missing)."""
    return _cpuinfo_field(cpuinfo, "vendor_id")


def cpu_bf16_choice(flags: tuple[str, ...], vendor: str) -> Choice:
    """Whether bf16 beats fp32 on a CPU with these bf16 flags and this vendor, as measured for the demo's model
    (one eager trainer iteration, bench/vs_biggan_pytorch.py and bench/throughput.py, bench/RESULTS.md)."""
    if "amx_bf16" in flags:
        return Choice(True, "auto: the CPU has AMX-BF16 tiles (bf16 measured at 0.59x of fp32's time)")
    if "avx512_bf16" in flags and vendor == "AuthenticAMD":
        return Choice(True, "auto: an AMD CPU with avx512_bf16 (bf16 measured at 0.62x of fp32's time)")
    if "avx512_bf16" in flags:
        # AVX512-BF16 without the tiles: the dot products are native, but the casts and bf16 elementwise work around
        # them cost more than they save at the demo's sizes
        return Choice(False, f"auto: avx512_bf16 without AMX on this {vendor or 'unknown'} CPU "
                             "(bf16 measured at 1.38x of fp32's time)")
    return Choice(False, f"auto: no native bf16 units on this cpu (none of {', '.join(CPU_BF16_FLAGS)})")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is the faster precision on `device`: a GPU that supports it, or a CPU where it was measured to
    beat fp32 (cpu_bf16_choice)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_choice(cpu_bf16_flags(), cpu_vendor()).on


def _precision(cfg: RunConfig, device: torch.device, cpu_flags: tuple[str, ...], vendor: str) -> Choice:
    if cfg.train.precision != "auto":
        return Choice(cfg.train.precision == "bf16", f"train.precision={cfg.train.precision}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice(True, "auto: the GPU supports bf16")
        return Choice(False, "auto: this GPU has no bf16")
    if device.type == "cpu":
        return cpu_bf16_choice(cpu_flags, vendor)
    return Choice(False, f"auto: bf16 not measured on {device.type}")


def _channels_last(cfg: RunConfig, device: torch.device, bf16: bool) -> Choice:
    value = switch_value(cfg.train.channels_last)  # a caller may have assigned a bool
    if value != "auto":
        return Choice(value == "true", f"train.channels_last={value}")
    if device.type == "cuda" or (device.type == "cpu" and bf16):
        # bf16 convolutions (oneDNN on CPU, cuDNN tensor cores) want NHWC; fp32 CPU convolutions gain little
        return Choice(True, f"auto: bf16 convolutions on {device.type} run faster in NHWC")
    return Choice(False, "auto: fp32 on CPU, where NHWC did not pay")


def _compile(cfg: RunConfig, device: torch.device, bf16: bool) -> Choice:
    value = switch_value(cfg.train.compile)
    if value != "auto":
        return Choice(value == "true", f"train.compile={value}")
    if device.type != "cpu":
        return Choice(False, "auto: not measured on this device type; set train.compile=true to try it")
    steps = cfg.train.steps
    need = compile_break_even_steps(cfg, bf16)
    if steps < need:
        return Choice(False, f"auto: {steps} steps do not repay ~{CPU_COMPILE_SECONDS:.0f}s of compilation "
                             f"(break-even ~{need} steps)")
    return Choice(True, f"auto: {steps} steps repay ~{CPU_COMPILE_SECONDS:.0f}s of compilation "
                        f"(break-even ~{need} steps)")


def compile_break_even_steps(cfg: RunConfig, bf16: bool = True) -> int:
    """G steps after which compiling has paid for itself on CPU, from the measured compile time and saving and
    an eager step estimated from the work per step (images through D and G per iteration, relative to the demo)."""
    eager_step = eager_cpu_step_seconds(cfg)
    return int(CPU_COMPILE_SECONDS / max(CPU_COMPILE_SAVING[bf16] * eager_step, 1e-6)) + 1


def eager_cpu_step_seconds(cfg: RunConfig) -> float:
    """A rough eager bf16 CPU iteration time: the demo's measured 1.0 s per iteration (per worker on one core,
    micro-batch 32, ch 16, 32 px; 1.15-1.22 s in `make demo` with its health checks, 0.97 s in
    bench/vs_biggan_pytorch.py), scaled by the micro-batch, the width squared, the pixels and the D steps."""
    m, d = cfg.model, cfg.data
    width = ((m.g_ch or 64) / 16) ** 2
    pixels = (m.resolution / 32) ** 2
    return 1.0 * (d.batch_size / 32) * width * pixels * (cfg.loss.d_steps / 2) * max(cfg.train.global_batch // (
        d.batch_size * cfg.cluster.num_workers), 1)


def resolve(cfg: RunConfig, device: torch.device, cpu_flags: tuple[str, ...] | None = None,
            cpu_vendor_id: str | None = None) -> SpeedPlan:
    """The plan for this run on `device`; explicit settings win over "auto". `cpu_flags`, `cpu_vendor_id`: the CPU's
    bf16 flags and vendor (default: read from /proc/cpuinfo)."""
    flags = (cpu_bf16_flags() if cpu_flags is None else cpu_flags) if device.type == "cpu" else ()
    vendor = cpu_vendor() if cpu_vendor_id is None else cpu_vendor_id
    bf16 = _precision(cfg, device, flags, vendor)
    return SpeedPlan(bf16, _channels_last(cfg, device, bf16.on), _compile(cfg, device, bf16.on))
