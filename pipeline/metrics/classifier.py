"""A small CNN trained on the dataset itself: fast features for FID/precision/recall on small data, and CAS.

`train_classifier` fits it on real images (N, C, R, R) in [-1, 1] with integer labels; `save_classifier` /
`load_classifier` keep it as a weights-only file; `ClassifierExtractor` exposes its penultimate layer as
features and its head as logits (so the registry's "classifier" extractor gives FID-like distances and an
Inception-Score-like "classifier score" in seconds on a CPU). Images above 64 px are area-downsampled to
64 px first; the network itself is a few stride-2 conv stages, global average pooling and two linear layers.

Numbers from different classifiers are not comparable: the extractor's `name` carries a digest of the weights,
and reference statistics record it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.metrics.extractors import FeatureExtractor

logger = logging.getLogger(__name__)

MAX_INPUT_SIZE = 64
# the classifier's forward on a CPU in pieces of this many images, whose activations stay in the caches: 125 ms for
# 250 32-px images on one core of the AMX Xeon against 209 ms in one batch of 256, the same features to the bit
# (bench/RESULTS.md, "Session 22")
CPU_FEATURE_CHUNK = 64


@dataclass
class ClassifierConfig:
    in_channels: int
    num_classes: int
    resolution: int  # side of the images it is trained on
    width: int = 32  # channels of the first stage; doubled at each downsampling (at most 4x)
    feature_dim: int = 128  # penultimate layer: the features FID/precision/recall use


class SmallClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        self.input_size = min(cfg.resolution, MAX_INPUT_SIZE)
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1), nn.BatchNorm2d(cfg.width), nn.ReLU()]
        ch, size = cfg.width, self.input_size
        for _ in range(3):
            if size <= 4:
                break
            out = min(ch * 2, cfg.width * 4)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            ch, size = out, (size + 1) // 2
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(ch, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def _fit_input(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.config.in_channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.config.in_channels, -1, -1)
            elif self.config.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"classifier takes {self.config.in_channels} channels, got {x.shape[1]}")
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        return x

    def features(self, x: Tensor) -> Tensor:
        h = self.body(self._fit_input(x.float()))
        return F.relu(self.embed(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to max_shift pixels (edge padding): cheap augmentation for small data."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_classifier(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 8,  # passes over the images
    batch_size: int = 128,
    lr: float = 5e-3,  # AdamW, cosine-decayed to 0
    weight_decay: float = 1e-4,
    max_shift: int | None = None,  # random translation in pixels; None = resolution // 16
    width: int = 32,
    feature_dim: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    bf16: bool = False,  # bf16 autocast and NHWC inputs while training (2.5x on CPUs with AMX-BF16); fp32 weights
) -> SmallClassifier:
    """Train a SmallClassifier on images (N, C, R, R) in [-1, 1] and labels (N,); returns it in eval mode."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    if images.ndim != 4 or images.shape[2] != images.shape[3] or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected images (N, C, R, R) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = ClassifierConfig(images.shape[1], num_classes, images.shape[-1], width, feature_dim)
    model = SmallClassifier(cfg).to(device)
    shift = cfg.resolution // 16 if max_shift is None else max_shift
    steps_per_epoch = max(1, -(-images.shape[0] // batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=gen)
        for start in range(0, images.shape[0], batch_size):
            idx = order[start:start + batch_size]
            if idx.numel() < 2:  # batch norm needs two samples
                continue
            x = _random_shift(images[idx].float().to(device), shift, gen)
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch_size].float().to(device)).float().cpu()
                          for i in range(0, images.shape[0], batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of model on images (N, C, R, R) in [-1, 1]."""
    pred = predict_logits(model, images, batch_size).argmax(dim=1)
    return float((pred == torch.as_tensor(labels).long().cpu()).double().mean())


def classifier_payload(model: SmallClassifier, **extra: float | int | str) -> dict[str, Any]:
    """{kind, config, state_dict (CPU), extra}: what save_classifier writes and classifier_from_payload reads."""
    return {"kind": "small-cnn", "config": dataclasses.asdict(model.config),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": dict(extra)}


def classifier_from_payload(payload: Any, device: str | torch.device = "cpu", source: str = "payload") -> SmallClassifier:
    if not isinstance(payload, dict) or payload.get("kind") != "small-cnn":
        raise ValueError(f"{source}: not a classifier saved by pipeline.metrics.classifier.save_classifier")
    model = SmallClassifier(ClassifierConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()


def save_classifier(model: SmallClassifier, path: str | os.PathLike, **extra: float | int | str) -> Path:
    """Write {config, state_dict, extra} atomically; loadable with torch.load(weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = classifier_payload(model, **extra)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> SmallClassifier:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    return classifier_from_payload(payload, device, source=str(path))


def load_or_train_classifier(
    path: str | os.PathLike,
    data: tuple[Tensor, Tensor] | Callable[[], tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: str | torch.device = "cpu",
    **train_kwargs: Any,
) -> SmallClassifier:
    """The classifier saved at path, or one trained on data = (images, labels) (or a callable returning them,
    called only when needed) and saved there. Keep it next to the data manifest, like reference statistics."""
    if Path(path).is_file():
        return load_classifier(path, device)
    images, labels = data() if callable(data) else data
    model = train_classifier(images, labels, num_classes, device=device, **train_kwargs)
    save_classifier(model, path, train_images=int(images.shape[0]))
    logger.info("trained dataset classifier on %d images -> %s", images.shape[0], path)
    return model


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(value.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()[:10]


class ClassifierExtractor(FeatureExtractor):
    """Penultimate-layer features and logits of a SmallClassifier; name = classifier-<weights digest>."""

    has_logits = True

    def __init__(self, model: SmallClassifier, batch_size: int = 256):
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.feature_dim = model.config.feature_dim
        self.name = f"classifier-{weights_digest(model)}"

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", batch_size: int = 256) -> ClassifierExtractor:
        return cls(load_classifier(path, device), batch_size)

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        device = next(self.model.parameters()).device
        step = min(self.batch_size, CPU_FEATURE_CHUNK) if device.type == "cpu" else self.batch_size
        feats, logits = [], []
        for i in range(0, images.shape[0], step):
            f = self.model.features(images[i:i + step].to(device))
            feats.append(f.float().cpu())
            logits.append(self.model.head(f).float().cpu())
        return torch.cat(feats), torch.cat(logits)
