"""Training tricks from the pre-BigGAN literature, each off by default: instance noise on D's inputs, a replay
buffer of past generator outputs, and uniform latents. The AC-GAN head (models.acgan) and its loss
(pipeline.losses) are re-exported here.

Use in a D step (fakes already detached):

    std = instance_noise_std(step, cfg.tricks.instance_noise, cfg.tricks.instance_noise_decay_steps)
    fake_d, y_fake_d = replay.mix(fake, y_fake)   # before push, so this batch is not replayed to itself
    replay.push(fake, y_fake)                     # the fresh G output, not the mixed batch
    real_logits = D(add_instance_noise(x, std, rng), y)
    fake_logits = D(add_instance_noise(fake_d, std, rng), y_fake_d)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.acgan import ACGANDiscriminator
from pipeline.losses import acgan_loss

__all__ = [
    "ACGANDiscriminator",
    "ReplayBuffer",
    "acgan_loss",
    "add_instance_noise",
    "instance_noise_std",
    "sample_z",
]

Z_DISTRIBUTIONS = ("normal", "uniform")


def sample_z(
    n: int,
    dim_z: int,
    dist: str = "normal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """n latents of size dim_z: standard normal (default) or uniform on [-1, 1).

    Drawn in float32 on the generator's device, then moved to `device` (default: the generator's device, else
    CPU) and `dtype` (default float32).
    """
    if dist not in Z_DISTRIBUTIONS:
        raise ValueError(f"z distribution {dist!r} is not one of {list(Z_DISTRIBUTIONS)}")
    gen_device = generator.device if generator is not None else (device or "cpu")
    if dist == "normal":
        z = torch.randn((n, dim_z), generator=generator, device=gen_device)
    else:
        z = torch.rand((n, dim_z), generator=generator, device=gen_device) * 2.0 - 1.0
    return z.to(device=device or z.device, dtype=dtype or z.dtype)


def instance_noise_std(step: int, initial: float, decay_steps: int) -> float:
    """Std of the instance noise at `step`: `initial` at step 0, falling linearly to 0 at `decay_steps` and
    staying 0 after (Sonderby et al. 2017; Arjovsky & Bottou 2017). initial = 0 means off."""
    if initial <= 0:
        return 0.0
    if decay_steps <= 0:
        raise ValueError(f"tricks.instance_noise_decay_steps: must be > 0 when instance noise is on, got {decay_steps}")
    return float(initial) * max(0.0, 1.0 - step / decay_steps)


def add_instance_noise(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """x + N(0, std^2) noise, drawn from `generator` (on its own device); x itself when std is 0.

    Apply it to both D inputs (real and fake) with the same std, or D learns to tell them apart by the noise.
    """
    if std <= 0:
        return x
    device = generator.device if generator is not None else x.device
    noise = torch.randn(tuple(x.shape), generator=generator, device=device)
    return x + std * noise.to(device=x.device, dtype=x.dtype)


class ReplayBuffer:
    """Past generator outputs shown to D again (Shrivastava et al. 2017), kept by reservoir sampling so the
    buffer is a uniform sample of every image ever pushed.

    `mix` replaces `round(fraction * N)` images of a fake batch (at random positions) with stored ones, drawn
    uniformly without replacement, once the buffer holds at least N images (or is full, if capacity < N).
    Images are stored detached on CPU. All randomness comes from the buffer's own generator, saved in
    `state_dict`, so a resumed run mixes exactly as the uninterrupted one would. With several workers give each
    its own seed (e.g. seed + rank). capacity = 0 turns it off: `mix` returns its input and `push` does nothing.
    """

    def __init__(self, capacity: int, fraction: float = 0.5, seed: int = 0):
        if capacity < 0:
            raise ValueError(f"tricks.replay_size: must be >= 0, got {capacity}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"tricks.replay_fraction: must be in [0, 1], got {fraction}")
        self.capacity = int(capacity)
        self.fraction = float(fraction)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._images: Tensor | None = None  # (capacity, C, H, W), filled up to self._size
        self._labels: Tensor | None = None  # (capacity,)
        self._size = 0
        self.seen = 0  # images ever pushed
        self.last_replayed = 0  # images replaced by the last mix(), for logging

    def __len__(self) -> int:
        return self._size

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.fraction > 0

    def push(self, images: Tensor, labels: Tensor) -> None:
        """Offer a batch to the reservoir (Vitter's algorithm R: the i-th image ever pushed is kept with
        probability capacity / i, replacing a uniformly chosen stored one)."""
        if self.capacity == 0:
            return
        images = images.detach().to("cpu")
        labels = labels.detach().to("cpu").reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"push: {images.shape[0]} images but {labels.shape[0]} labels")
        if self._images is None:
            self._images = torch.empty((self.capacity, *images.shape[1:]), dtype=images.dtype)
            self._labels = torch.empty((self.capacity,), dtype=labels.dtype)
        elif images.shape[1:] != self._images.shape[1:]:
            raise ValueError(f"push: image shape {tuple(images.shape[1:])} != stored {tuple(self._images.shape[1:])}")
        assert self._labels is not None
        for i in range(images.shape[0]):
            self.seen += 1
            if self._size < self.capacity:
                slot = self._size
                self._size += 1
            else:
                slot = int(torch.randint(self.seen, (1,), generator=self._gen))
                if slot >= self.capacity:
                    continue
            self._images[slot] = images[i]
            self._labels[slot] = labels[i]

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The fake batch with a `fraction` of it replaced by stored images and their labels (new tensors,
        on the inputs' device and dtype); the inputs themselves when off or not yet filled enough."""
        n = images.shape[0]
        k = int(round(self.fraction * n))
        self.last_replayed = 0
        if not self.enabled or k == 0 or self._size < min(n, self.capacity):
            return images, labels
        k = min(k, self._size)
        assert self._images is not None and self._labels is not None
        src = torch.randperm(self._size, generator=self._gen)[:k]
        dst = torch.randperm(n, generator=self._gen)[:k].to(images.device)
        images = images.clone()
        labels = labels.clone()
        images[dst] = self._images[src].to(device=images.device, dtype=images.dtype)
        labels[dst] = self._labels[src].to(device=labels.device, dtype=labels.dtype)
        self.last_replayed = k
        return images, labels

    def stats(self) -> dict[str, float]:
        """Scalars for the run log."""
        return {"replay_size": float(self._size), "replay_seen": float(self.seen), "replay_mixed": float(self.last_replayed)}

    def state_dict(self) -> dict[str, Any]:
        size = self._size
        return {
            "capacity": self.capacity,
            "fraction": self.fraction,
            "seed": self.seed,
            "size": size,
            "seen": self.seen,
            "images": None if self._images is None else self._images[:size].clone(),
            "labels": None if self._labels is None else self._labels[:size].clone(),
            "image_shape": None if self._images is None else tuple(self._images.shape[1:]),
            "image_dtype": None if self._images is None else str(self._images.dtype).removeprefix("torch."),
            "label_dtype": None if self._labels is None else str(self._labels.dtype).removeprefix("torch."),
            "rng": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"replay buffer checkpoint has capacity {state['capacity']}, this run has tricks.replay_size="
                f"{self.capacity}; resume with the same size"
            )
        self.fraction = float(state["fraction"])
        self.seed = int(state["seed"])
        self._size = int(state["size"])
        self.seen = int(state["seen"])
        self.last_replayed = 0
        self._gen.set_state(state["rng"])
        if state["image_shape"] is None:
            self._images = self._labels = None
            return
        self._images = torch.empty((self.capacity, *state["image_shape"]), dtype=getattr(torch, state["image_dtype"]))
        self._labels = torch.empty((self.capacity,), dtype=getattr(torch, state["label_dtype"]))
        self._images[: self._size] = state["images"]
        self._labels[: self._size] = state["labels"]
