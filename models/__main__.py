"""Command line: ``python -m models summary --arch biggan --resolution 128 [--num-classes N] [--ch C]``.

Prints one JSON object: the architecture, parameter counts of G and D (all parameters, G's shared
embedding included) and both resolved configs. Models are built on the meta device (no memory,
no init), so even 512 px answers in about a second.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .config import OVERRIDE_KEYS
from .registry import available_archs, build_discriminator, build_generator


def summary(arch: str, resolution: int, num_classes: int = 1000, **overrides) -> dict:
    with torch.device("meta"):
        G = build_generator(arch, resolution, num_classes, **overrides)
        D = build_discriminator(arch, resolution, num_classes, **overrides)
    shared = getattr(G, "shared", None)
    out = {
        "arch": arch,
        "resolution": resolution,
        "num_classes": num_classes,
        "G_params": sum(p.numel() for p in G.parameters()),
        "D_params": sum(p.numel() for p in D.parameters()),
        "G_shared_embedding_params": sum(p.numel() for p in shared.parameters()) if shared is not None else 0,
    }
    for name, net in (("G_config", G), ("D_config", D)):
        cfg = getattr(net, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            out[name] = cfg.to_dict()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="print parameter counts and configs as JSON")
    p.add_argument("--arch", required=True, choices=available_archs())
    p.add_argument("--resolution", required=True, type=int)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--ch", type=int, default=None, help="width multiplier (default: the paper's)")
    args = parser.parse_args(argv)
    try:
        result = summary(args.arch, args.resolution, args.num_classes, ch=args.ch)
    except ValueError as e:
        parser.error(str(e))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


__all__ = ["summary", "main", "OVERRIDE_KEYS"]

if __name__ == "__main__":
    raise SystemExit(main())
