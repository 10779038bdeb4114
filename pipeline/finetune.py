"""Fine-tuning from released weights: `model.init_from` starts G from a pytorch-pretrained-biggan folder.

The folder holds `config.json` (a BigGANConfig) and `pytorch_model.bin` (the released BigGAN-deep G at
128, 256 or 512 px, 1000 ImageNet classes). Rules, checked before training starts, each a ConfigError
naming the field to change:

- `model.arch` must be biggan-deep and `model.resolution` the file's; every other architecture field
  (`model.g_ch`, `dim_z`, `shared_dim`, `hier`, `depth`, `attention`, `bn_eps`, `sn_eps`) must equal the
  file's (the released models: 128, 128, 128, true, 2, 64, 1e-4, 1e-4).
- `model.num_classes` must be the file's (1000, in the released models' class order) unless
  `model.init_from_new_classes=true`, which starts G's class embedding fresh (orthogonal init, as a new
  run) for any class count and takes every other weight from the file.

G's truncation tables are dropped (training normalizes with batch statistics; the file's truncation = 1.0
statistics become the running statistics); D starts fresh; EMA G starts as the loaded G. Resuming from a
checkpoint of the run replaces all of it with the checkpoint's weights.
"""

from __future__ import annotations

import logging

from torch import nn

from models.pretrained import PretrainedMismatch, init_generator_from_pretrained, read_pretrained_config
from pipeline.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# NetworkConfig field -> the run config's field
_CONFIG_FIELDS = {"ch": "g_ch"}


def init_generator_from(cfg: RunConfig, G: nn.Module) -> None:
    """Load `model.init_from` into G (built from cfg) if it is set; ConfigError if the file does not fit."""
    m = cfg.model
    if not m.init_from:
        return
    if m.arch != "biggan-deep":
        raise ConfigError(f"model.arch: {m.arch!r}, but model.init_from loads BigGAN-deep weights; "
                          "set model.arch=biggan-deep")
    try:
        file_cfg = read_pretrained_config(m.init_from)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    if int(file_cfg.get("output_dim", 0)) != m.resolution:
        raise ConfigError(f"model.resolution: {m.resolution}, but the weights at {m.init_from!r} are for "
                          f"{file_cfg.get('output_dim')} px; set model.resolution={file_cfg.get('output_dim')}")
    try:
        init_generator_from_pretrained(G, m.init_from, new_class_embedding=m.init_from_new_classes)
    except PretrainedMismatch as e:
        fields = dict(e.fields)
        problems = []
        if "num_classes" in fields:
            ours, theirs = fields.pop("num_classes")
            problems.append(
                f"model.num_classes: {ours}, but the weights at {m.init_from!r} have {theirs} classes; train on "
                f"data with those {theirs} classes in the same order, or set model.init_from_new_classes=true "
                "to start G's class embedding fresh"
            )
        for name, (ours, theirs) in fields.items():
            key = f"model.{_CONFIG_FIELDS.get(name, name)}"
            value = (list(theirs) or [0])[0] if name == "attention" else theirs
            problems.append(f"{key}: {ours!r}, but the weights at {m.init_from!r} have {theirs!r}; set {key}={value}")
        raise ConfigError("; ".join(problems)) from None
    log.info("G initialized from %s%s", m.init_from,
             " (class embedding fresh)" if m.init_from_new_classes else "")
