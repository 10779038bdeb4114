"""Load the released BigGAN-deep generators (128/256/512 px) saved by ``pytorch-pretrained-biggan``.

A checkpoint directory holds ``config.json`` (that package's BigGANConfig) and ``pytorch_model.bin``
(its BigGAN's state_dict). ``load_biggan_deep(path)`` builds our ``DeepGenerator`` for that config
and copies the weights so that, in eval mode, ``G(z, y, truncation=t)`` equals the package's
``BigGAN(z, one_hot(y), t)``. Layout differences handled here:

- class embedding: theirs is a bias-free Linear on one-hot labels, weight (dim, classes); ours is
  ``G.shared`` (an nn.Embedding), weight (classes, dim): transposed.
- first linear layer: their output is reshaped NHWC (4, 4, 16ch) and permuted to NCHW; ours is
  viewed NCHW directly, so the loader permutes the rows of the weight, the bias and the SN vector
  u from (h, w, c) to (c, h, w) order (u^T W v, hence sigma, is unchanged).
- conditioning vector: both are cat([z, embedding]).
- conv_to_rgb: theirs maps ch -> ch channels, is spectrally normalized as a whole and then only
  the first 3 output channels are kept. Ours maps ch -> 3. The loader keeps the first 3 filters
  (raw weight and bias) and their v, and rescales u so that u^T W[:3] v equals their full layer's
  sigma = u^T W v exactly; our eval-mode SN divides by u^T W v, so it applies their divisor. (u is
  then not a unit vector; the first training-mode forward renormalizes it by power iteration, after
  which the layer is normalized by its own 3-filter top singular value, as any SN layer.)
- batch-norm statistics: each of their BNs holds ``n_stats`` (51) rows of running means and
  variances, one per truncation k / (n_stats - 1). They are attached to our BNs as truncation
  tables (``stat_means`` / ``stat_vars`` buffers, saved in our state_dict) and used in eval mode when
  a truncation is passed: ``G(z, y, truncation=0.4)``. Without one (``truncation=None``) the BNs
  use their running stats, which the loader sets to the truncation = 1.0 row. BN eps and SN eps
  are the config's ``eps`` (1e-4 in the released models).

Fine-tuning: ``init_generator_from_pretrained(G, path)`` copies the weights into a G built for
training (its own config, e.g. from the run's config) after checking that G's architecture is the
file's (``pretrained_mismatches``); the truncation tables are not attached (training uses batch
statistics and running statistics; the loader's truncation = 1.0 rows become the running stats).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .biggan_deep import DeepGBlock, DeepGenerator
from .layers import Attention, StatsBatchNorm
from .registry import build_generator
from .spectral import SpectralNorm

__all__ = [
    "load_biggan_deep",
    "generator_from_pretrained_config",
    "load_pretrained_state_dict",
    "read_pretrained_config",
    "pretrained_mismatches",
    "init_generator_from_pretrained",
    "PretrainedMismatch",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"


def generator_from_pretrained_config(config: Mapping[str, Any]) -> DeepGenerator:
    """Build (randomly initialized) our BigGAN-deep G with the architecture of a BigGANConfig dict."""
    layers = [tuple(layer) for layer in config["layers"]]
    if config["z_dim"] != config["class_embed_dim"]:
        raise ValueError("pretrained config has z_dim != class_embed_dim, which its model cannot build")
    ups = [bool(up) for up, _, _ in layers]
    if True not in ups:
        raise ValueError("pretrained config has no upsampling layer")
    depth = ups.index(True) + 1
    position = int(config["attention_layer_position"])
    attention = 4 * 2 ** sum(ups[:position]) if 0 <= position < len(layers) else 0
    G = build_generator(
        "biggan-deep",
        int(config["output_dim"]),
        int(config["num_classes"]),
        ch=int(config["channel_width"]),
        dim_z=int(config["z_dim"]),
        shared_dim=int(config["class_embed_dim"]),
        hier=True,
        depth=depth,
        attention=attention,
        out_channels=3,
        bn_eps=float(config["eps"]),
        sn_eps=float(config["eps"]),
    )
    # Our block sequence must be theirs, layer for layer.
    ch = int(config["channel_width"])
    ours, attention_at = [], None
    for stage in G.blocks:
        for layer in stage:
            if isinstance(layer, Attention):
                attention_at = len(ours)
            else:
                ours.append((layer.upsample, layer.in_channels // ch, layer.out_channels // ch))
    theirs = [(bool(up), int(i), int(o)) for up, i, o in layers]
    if ours != theirs or attention_at != (position if attention else None):
        raise ValueError(
            f"pretrained config layers {theirs} (attention before layer {position}) do not match "
            f"biggan-deep at {config['output_dim']} px: {ours} (attention before {attention_at})"
        )
    return G  # type: ignore[return-value]


def read_pretrained_config(path: str | os.PathLike) -> dict[str, Any]:
    """The BigGANConfig dict of a pytorch-pretrained-biggan directory; clear errors for anything else."""
    if not os.path.isdir(path):
        raise ValueError(f"pretrained BigGAN-deep weights: {str(path)!r} is not a directory")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise ValueError(f"pretrained BigGAN-deep weights: {str(path)!r} lacks {missing} "
                         f"(pytorch-pretrained-biggan's layout: {CONFIG_NAME} + {WEIGHTS_NAME})")
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        return json.load(f)


def _read_weights(path: str | os.PathLike, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    # NOTE: weights_only: a downloaded file must not run code when loaded
    return torch.load(os.path.join(path, WEIGHTS_NAME), map_location=map_location, weights_only=True)


def load_biggan_deep(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DeepGenerator:
    """Load a pytorch-pretrained-biggan directory (config.json + pytorch_model.bin); returns G in eval mode.

    Generate with ``G(z, y, truncation=t)``, z (N, 128) sampled with truncation t in the released
    models' convention (``pytorch_pretrained_biggan.truncated_noise_sample``: truncnorm(-2, 2) * t).
    """
    config = read_pretrained_config(path)
    state = _read_weights(path, map_location)
    G = generator_from_pretrained_config(config)
    load_pretrained_state_dict(G, state)
    return G.eval()


# NetworkConfig fields that decide whether a file's weights fit a G (num_sv_itrs is a training setting).
_ARCHITECTURE_FIELDS = ("arch", "resolution", "num_classes", "ch", "dim_z", "shared_dim", "hier", "depth",
                        "attention", "out_channels", "bn_eps", "sn_eps")


class PretrainedMismatch(ValueError):
    """G's architecture is not the pretrained file's; ``fields`` maps each differing NetworkConfig field
    to (G's value, the file's value)."""

    def __init__(self, path: str | os.PathLike, fields: dict[str, tuple[Any, Any]]) -> None:
        self.fields = fields
        listed = ", ".join(f"{k}: {ours!r} here, {theirs!r} in the file" for k, (ours, theirs) in fields.items())
        super().__init__(f"pretrained weights at {str(path)!r} do not fit this generator ({listed})")


def pretrained_mismatches(G: nn.Module, config: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (G's value, the file's value)} for every architecture field where G differs from a BigGANConfig."""
    ours = getattr(G, "config", None)
    theirs_arch = "biggan-deep"
    if not isinstance(G, DeepGenerator) or ours is None:
        return {"arch": (getattr(ours, "arch", type(G).__name__), theirs_arch)}
    with torch.device("meta"):  # the file's architecture, without allocating or initializing it
        theirs = generator_from_pretrained_config(config).config
    return {k: (getattr(ours, k), getattr(theirs, k)) for k in _ARCHITECTURE_FIELDS
            if getattr(ours, k) != getattr(theirs, k)}


@torch.no_grad()
def init_generator_from_pretrained(G: DeepGenerator, path: str | os.PathLike, *,
                                   new_class_embedding: bool = False) -> DeepGenerator:
    """Copy the pretrained weights at ``path`` into ``G`` (built for training) and return G.

    G must have the file's architecture (else ``PretrainedMismatch``). With ``new_class_embedding`` G
    keeps its own (freshly initialized) class embedding, of any class count, and takes every other
    weight from the file: for classes that are not the file's. No truncation tables are attached to G; its running statistics are the
    file's truncation = 1.0 rows.
    """
    config = read_pretrained_config(path)
    mismatches = pretrained_mismatches(G, config)
    if new_class_embedding:
        mismatches.pop("num_classes", None)
    if mismatches:
        raise PretrainedMismatch(path, mismatches)
    with torch.device("meta"):
        source = generator_from_pretrained_config(config)
    source.to_empty(device="cpu")
    load_pretrained_state_dict(source, _read_weights(path, "cpu"))  # checks that every entry is set
    state = {k: v for k, v in source.state_dict().items() if not k.endswith((".stat_means", ".stat_vars"))}
    if new_class_embedding:
        state["shared.weight"] = G.shared.weight
    G.load_state_dict(state)
    return G


@torch.no_grad()
def load_pretrained_state_dict(G: DeepGenerator, state: Mapping[str, torch.Tensor]) -> DeepGenerator:
    """Copy a pytorch-pretrained-biggan BigGAN state_dict into ``G`` (built for the same config)."""
    src = dict(state)
    assigned: set[str] = set()
    names = {m: n for n, m in G.named_modules()}

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise ValueError(f"pretrained state_dict lacks {key!r}")
        return src.pop(key)

    def put(module: nn.Module, attr: str, value: torch.Tensor) -> None:
        target = getattr(module, attr)
        value = value.reshape(target.shape) if value.numel() == target.numel() else value
        if value.shape != target.shape:
            raise ValueError(f"shape mismatch for {names[module]}.{attr}: {tuple(value.shape)} vs "
                             f"{tuple(target.shape)}")
        target.copy_(value)
        assigned.add(f"{names[module]}.{attr}".lstrip("."))

    def put_sn(layer: SpectralNorm, prefix: str, *, bias: bool = True) -> None:
        put(layer, "weight", take(prefix + ".weight_orig"))
        put(layer, "u", take(prefix + ".weight_u"))
        put(layer, "v", take(prefix + ".weight_v"))
        if bias:
            put(layer, "bias", take(prefix + ".bias"))
        put(layer, "sigma0", _sigma(layer.weight, layer.u, layer.v))

    def put_bn_stats(bn: StatsBatchNorm, prefix: str) -> None:
        bn.set_truncation_stats(take(prefix + ".running_means"), take(prefix + ".running_vars"))
        mean, var = bn.truncation_stats(1.0)
        put(bn, "running_mean", mean)
        put(bn, "running_var", var)
        assigned.update({f"{names[bn]}.stat_means", f"{names[bn]}.stat_vars"})

    # Class embedding: Linear(classes -> dim, no bias) on one-hot == Embedding with weight^T.
    put(G.shared, "weight", take("embeddings.weight").t())

    # First linear layer: reorder outputs from their NHWC (h, w, c) to our NCHW (c, h, w).
    b = G.bottom_width
    c = G.linear.out_features // (b * b)

    def nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, b, c, -1).permute(2, 0, 1, 3).reshape(t.shape)

    put(G.linear, "weight", nhwc_to_nchw(take("generator.gen_z.weight_orig")))
    put(G.linear, "bias", nhwc_to_nchw(take("generator.gen_z.bias").unsqueeze(1)).squeeze(1))
    put(G.linear, "u", nhwc_to_nchw(take("generator.gen_z.weight_u").unsqueeze(1)).squeeze(1))
    put(G.linear, "v", take("generator.gen_z.weight_v"))
    put(G.linear, "sigma0", _sigma(G.linear.weight, G.linear.u, G.linear.v))

    # Residual blocks and attention, in order. Their attention occupies a slot in their list.
    index = 0
    for stage in G.blocks:
        for layer in stage:
            prefix = f"generator.layers.{index}"
            if isinstance(layer, DeepGBlock):
                for k in range(4):
                    bn = getattr(layer, f"bn{k + 1}")
                    put_bn_stats(bn, f"{prefix}.bn_{k}")
                    put_sn(bn.gain, f"{prefix}.bn_{k}.scale", bias=False)
                    put_sn(bn.bias, f"{prefix}.bn_{k}.offset", bias=False)
                    put_sn(getattr(layer, f"conv{k + 1}"), f"{prefix}.conv_{k}")
            elif isinstance(layer, Attention):
                put(layer, "gamma", take(f"{prefix}.gamma"))
                for ours, theirs in (("theta", "theta"), ("phi", "phi"), ("g", "g"), ("o", "o_conv")):
                    put_sn(getattr(layer, ours), f"{prefix}.snconv1x1_{theirs}", bias=False)
            index += 1

    # Output BN (unconditional, with truncation tables) and conv_to_rgb folded to 3 channels.
    put(G.output_bn, "weight", take("generator.bn.weight"))
    put(G.output_bn, "bias", take("generator.bn.bias"))
    put_bn_stats(G.output_bn, "generator.bn")
    _fold_sliced_conv(G, take("generator.conv_to_rgb.weight_orig"), take("generator.conv_to_rgb.bias"),
                      take("generator.conv_to_rgb.weight_u"), take("generator.conv_to_rgb.weight_v"))
    assigned.update(f"output_conv.{n}" for n in ("weight", "bias", "u", "v", "sigma0"))

    if src:
        raise ValueError(f"pretrained state_dict has entries the loader did not use: {sorted(src)}")
    missing = sorted(set(G.state_dict()) - assigned)
    if missing:
        raise ValueError(f"loader left these generator entries unset: {missing}")
    return G


def _sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u^T W v in fp32: the divisor an eval-mode spectral norm applies."""
    return torch.dot(u.float(), torch.mv(weight.flatten(1).float(), v.float()))


def _fold_sliced_conv(G: DeepGenerator, weight: torch.Tensor, bias: torch.Tensor, u: torch.Tensor,
                      v: torch.Tensor) -> None:
    """Load an SN conv whose output is sliced to its first ``out`` channels into our ``out``-channel conv."""
    conv = G.output_conv
    out = conv.out_channels
    sigma_full = _sigma(weight, u, v)
    w_out = weight[:out]
    wv = torch.mv(w_out.flatten(1).float(), v.float())
    norm_sq = torch.dot(wv, wv)
    if not bool(norm_sq > 0):
        raise ValueError("conv_to_rgb: the kept filters are orthogonal to v; cannot fold its sigma")
    conv.weight.copy_(w_out)
    conv.bias.copy_(bias[:out])
    conv.v.copy_(v)
    conv.u.copy_(wv * (sigma_full / norm_sq))  # so that u^T W[:out] v == sigma_full
    conv.sigma0.copy_(sigma_full)
