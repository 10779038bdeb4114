"""Where a trainer's tensors live: everything that touches G or D's computation must be on the training device.

CPU tests cannot see a tensor left on the CPU in a CUDA run (everything is on the CPU there), so the trainer
checks the placement itself once it is built: a GPU run then fails at construction with the name of what is
misplaced, instead of with a device error at its first step.
"""

from __future__ import annotations

import torch


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 (the current device) are the same place; cpu is cpu whatever its index."""
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index or a.type == "cpu"


def misplaced(trainer) -> list[str]:
    """The names of the trainer's device-side state that is not on `trainer.device`."""
    device = trainer.device
    found: list[str] = []
    modules = {"G": trainer.G, "D": trainer.D, "EMA G": trainer.ema.model}
    for label, module in modules.items():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not same_device(t.device, device):
                found.append(f"{label} {name} on {t.device}")
                break  # one per module says enough
    tensors = {"fixed sample z": trainer._sample_z, "fixed sample y": trainer._sample_y}
    generators = {"latent generator": trainer.noise, "DiffAugment generator": trainer.augment_rng}
    for label, t in {**tensors, **generators}.items():
        if not same_device(t.device, device):
            found.append(f"{label} on {t.device}")
    return found


def check_placement(trainer) -> None:
    bad = misplaced(trainer)
    if bad:
        raise RuntimeError(f"training device is {trainer.device}, but: " + "; ".join(bad))
