"""Architecture tables and the validated, fully resolved config of one BigGAN / BigGAN-deep network.

Channel tables are multiples of ``ch`` per stage, from ajbrock/BigGAN-PyTorch (BigGAN.py,
BigGANdeep.py) for 32-256 px and from google/compare_gan (the paper's Tables 4-9) for what the
PyTorch reference lacks (512 px discriminators, BigGAN-deep 512 px). A G stage upsamples by 2;
a D stage may downsample by 2.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RESOLUTIONS",
    "OVERRIDE_KEYS",
    "NetworkConfig",
    "Stage",
    "resolve_config",
    "generator_stages",
    "discriminator_stages",
]

RESOLUTIONS = (32, 64, 128, 256, 512)
ARCHS = ("biggan", "biggan-deep")
OVERRIDE_KEYS = ("ch", "dim_z", "shared_dim", "hier", "depth", "attention", "out_channels",
                 "in_channels", "bn_eps", "sn_eps", "num_sv_itrs")

# G: per stage (in, out) multipliers; every stage upsamples. Same for BigGAN and BigGAN-deep.
_G_TABLE = {
    32: ([4, 4, 4], [4, 4, 4]),
    64: ([16, 16, 8, 4], [16, 8, 4, 2]),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1]),
    512: ([16, 16, 8, 8, 4, 2, 1], [16, 8, 8, 4, 2, 1, 1]),
}
# BigGAN D: per block (in, out, downsample); in = None is the image.
_D_TABLE = {
    32: ([None, 4, 4, 4], [4, 4, 4, 4], [True, True, False, False]),
    64: ([None, 1, 2, 4, 8], [1, 2, 4, 8, 16], [True] * 4 + [False]),
    128: ([None, 1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
    256: ([None, 1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False]),
    512: ([None, 1, 1, 2, 4, 8, 8, 16], [1, 1, 2, 4, 8, 8, 16, 16], [True] * 7 + [False]),
}
# BigGAN-deep D: per stage (in, out, downsample) after a 3x3 input conv to in[0] channels.
_DEEP_D_TABLE = {
    32: ([4, 4, 4], [4, 4, 4], [True, True, False]),
    64: ([1, 2, 4, 8], [2, 4, 8, 16], [True] * 4),
    128: ([1, 2, 4, 8, 16], [2, 4, 8, 16, 16], [True] * 5),
    256: ([1, 2, 4, 8, 8, 16], [2, 4, 8, 8, 16, 16], [True] * 6),
    512: ([1, 1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16], [True] * 7),
}

_DEFAULTS = {
    # The paper's ImageNet settings (ajbrock's launch_BigGAN_bs256x8.sh / launch_BigGAN_deep.sh).
    # BigGAN's dim_z default is 20 per z chunk: 120 at 128 px, 140 at 256, 160 at 512.
    # attention defaults to _DEFAULT_ATTENTION where the network has a stage at that resolution.
    "biggan": {"ch": 96, "dim_z": None, "shared_dim": 128, "hier": True, "depth": 1,
               "out_channels": 3, "in_channels": 3, "bn_eps": 1e-5, "sn_eps": 1e-6,
               "num_sv_itrs": 1},
    "biggan-deep": {"ch": 128, "dim_z": 128, "shared_dim": 128, "hier": True, "depth": 2,
                    "out_channels": 3, "in_channels": 3, "bn_eps": 1e-5, "sn_eps": 1e-6,
                    "num_sv_itrs": 1},
}
# Self-attention resolution of the released models (ajbrock's TFHub/converter.py: BigGAN 256 px
# has it at 128, everything else at 64).
_DEFAULT_ATTENTION = {("biggan", 256): 128}
_Z_CHUNK = 20
_NO_ATTENTION = object()


@dataclass(frozen=True)
class Stage:
    """One resolution stage: channels in/out, output resolution, whether attention follows it."""

    in_channels: int
    out_channels: int
    resolution: int
    resample: bool
    attention: bool


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that determines one network's architecture (logged whole with the run)."""

    arch: str
    network: str  # "G" or "D"
    resolution: int
    num_classes: int
    ch: int
    dim_z: int
    shared_dim: int
    hier: bool
    depth: int
    attention: tuple[int, ...]  # resolutions with a self-attention block; () for none
    out_channels: int
    in_channels: int
    bn_eps: float
    sn_eps: float
    num_sv_itrs: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention"] = list(self.attention)
        return d

    def overrides(self) -> dict[str, Any]:
        """The builder keywords that rebuild this network: ``build_generator(arch, resolution,
        num_classes, **cfg.overrides())``."""
        d = {k: getattr(self, k) for k in OVERRIDE_KEYS}
        d["attention"] = list(self.attention) or 0
        return d


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _attention(value: Any, own: list[int], either: list[int], default: int) -> tuple[int, ...]:
    """Attention resolutions placed in this network.

    ``own``: this network's stage resolutions; ``either``: those of G or D. A value valid for
    either network is accepted and placed where this network has it (a shared G/D setting such
    as 64 at 64 px gives G attention and D none, as in the reference implementation).
    """
    if value is _NO_ATTENTION:
        return (default,) if default in own else ()
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if value is None or (is_int and value == 0) or (isinstance(value, list | tuple) and not value):
        return ()
    values = [value] if is_int else value
    try:
        requested = [v for v in values if isinstance(v, numbers.Integral) and not isinstance(v, bool)]
        ok = not isinstance(values, str | bytes) and len(requested) == len(values) > 0
        ok = ok and all(r in either for r in requested)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attention must be 0/None (none) or a resolution (int, or list of ints) among {either}, "
            f"got {value!r}"
        )
    return tuple(sorted({int(r) for r in requested if r in own}))


def resolve_config(arch: str, network: str, resolution: int, num_classes: int = 1000,
                   **overrides: Any) -> NetworkConfig:
    """Validate ``overrides`` against ``arch``'s paper defaults and return the resolved config.

    Missing or None overrides take the paper default for ``arch``, except ``attention``, where None
    or 0 means no attention (leave it out for the default: 64 px, 128 px for BigGAN at 256 px, where
    the network has a stage at that resolution, so none for 32 px nor for D at 64 px).
    Both networks accept every key in OVERRIDE_KEYS, so one model config dict can feed both
    builders; keys a network does not use (e.g. dim_z for D, depth for BigGAN) are validated and
    otherwise ignored, and an attention resolution is placed in whichever network has a stage there.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if network not in ("G", "D"):
        raise ValueError(f"network must be 'G' or 'D', got {network!r}")
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {list(OVERRIDE_KEYS)}")
    if isinstance(resolution, bool) or resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {resolution!r}")
    num_classes = _positive_int("num_classes", num_classes)

    defaults = _DEFAULTS[arch]
    given = {k: v for k, v in overrides.items() if v is not None or k == "attention"}
    get = {k: given.get(k, defaults[k]) for k in defaults}

    ch = _positive_int("ch", get["ch"])
    if arch == "biggan-deep" and ch < 4:
        raise ValueError(f"ch must be at least 4 for biggan-deep (bottleneck is 1/4 width), got {ch}")
    hier = get["hier"]
    if not isinstance(hier, bool):
        raise ValueError(f"hier must be a bool, got {hier!r}")
    depth = _positive_int("depth", get["depth"])
    if arch == "biggan":
        depth = 1  # a biggan-deep setting: validated, then ignored like dim_z for D
    num_g_stages = len(_G_TABLE[resolution][0])
    if get["dim_z"] is None:
        dim_z = _Z_CHUNK * (num_g_stages + 1) if hier else 128
    else:
        dim_z = _positive_int("dim_z", get["dim_z"])
    if arch == "biggan" and hier and dim_z % (num_g_stages + 1):
        raise ValueError(
            f"dim_z must be a multiple of {num_g_stages + 1} for hierarchical biggan at {resolution} px "
            f"(one z chunk per stage plus one for the first linear layer), got {dim_z}"
        )

    stages_fn = generator_stages if network == "G" else discriminator_stages
    g_res = {s.resolution for s in generator_stages(arch, resolution, ch, ())}
    d_res = {s.resolution for s in discriminator_stages(arch, resolution, ch, ())}
    own = sorted(g_res if network == "G" else d_res)
    default_attention = _DEFAULT_ATTENTION.get((arch, resolution), 64)
    attention = _attention(given.get("attention", _NO_ATTENTION), own, sorted(g_res | d_res),
                           default_attention)

    cfg = NetworkConfig(
        arch=arch,
        network=network,
        resolution=resolution,
        num_classes=num_classes,
        ch=ch,
        dim_z=dim_z,
        shared_dim=_positive_int("shared_dim", get["shared_dim"]),
        hier=hier,
        depth=depth,
        attention=attention,
        out_channels=_positive_int("out_channels", get["out_channels"]),
        in_channels=_positive_int("in_channels", get["in_channels"]),
        bn_eps=_positive_float("bn_eps", get["bn_eps"]),
        sn_eps=_positive_float("sn_eps", get["sn_eps"]),
        num_sv_itrs=_positive_int("num_sv_itrs", get["num_sv_itrs"]),
    )
    for stage in stages_fn(arch, resolution, ch, attention):
        if stage.attention and stage.out_channels < 8:
            raise ValueError(
                f"ch={ch} is too small for attention at {stage.resolution} px "
                f"({stage.out_channels} channels there, attention needs at least 8)"
            )
    return cfg


def generator_stages(arch: str, resolution: int, ch: int, attention: tuple[int, ...]) -> list[Stage]:
    """G's stages from 4x4 up; each upsamples by 2; attention follows the stage at its resolution."""
    ins, outs = _G_TABLE[resolution]
    stages, res = [], 4
    for i, o in zip(ins, outs):
        res *= 2
        stages.append(Stage(ch * i, ch * o, res, True, res in attention))
    return stages


def discriminator_stages(arch: str, resolution: int, ch: int, attention: tuple[int, ...],
                         in_channels: int = 3) -> list[Stage]:
    """D's stages (one block each for BigGAN, ``depth`` blocks for BigGAN-deep).

    Attention follows the first stage whose output has its resolution. For BigGAN the first
    stage's input is the image; for BigGAN-deep it is the input conv's output (ch * in[0]).
    """
    if arch == "biggan":
        ins, outs, down = _D_TABLE[resolution]
    else:
        ins, outs, down = _DEEP_D_TABLE[resolution]
    stages, res, placed = [], resolution, set()
    for i, o, d in zip(ins, outs, down):
        res = res // 2 if d else res
        att = res in attention and res not in placed
        if att:
            placed.add(res)
        stages.append(Stage(in_channels if i is None else ch * i, ch * o, res, d, att))
    return stages
