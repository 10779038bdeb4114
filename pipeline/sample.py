"""Render class grids and latent interpolation sheets from a trained generator.

    python -m pipeline.sample runs/demo/best/g_ema.pt --classes 0,3,7 --per-class 8 --truncation 1.0 \\
        --seed 0 --interp 8 --out samples.png
    python -m pipeline.sample models:/biggan-demo/3 --out best.png          # or models:/biggan-demo@best
    python -m pipeline.sample runs:/<run_id>/checkpoints/best --out run.png  # an MLflow run artifact

The checkpoint is the trainer's weights-only file: a dict with g_ema_state (state_dict), config (the
RunConfig dict) and class_names, loaded with torch.load(weights_only=True). MLflow URIs are downloaded
first (set MLFLOW_TRACKING_URI or --tracking-uri); a downloaded folder must hold one .pt file (g_ema.pt
preferred): a registered pyfunc model (pipeline.mlflow_model) keeps it in artifacts/, and versions
registered before that format are the bare checkpoint folder. The grid has one row per class; the interpolation sheet has one row per class, slerping
between two latents in --interp steps. `save_grid` is the PNG writer the trainer reuses for sample grids.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline import networks
from pipeline.config import RunConfig, from_dict
from pipeline.metrics.evaluate import truncated_normal
from pipeline.snapshot import safe_load

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "g_ema.pt"


def save_grid(images: Tensor | np.ndarray, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
              pad_value: float = 1.0) -> Path:
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG, nrow images per row; returns the path.

    Grayscale stays grayscale. Padding pixels take pad_value (in [-1, 1]; 1 = white).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow, padding, pad_value).save(out, format="PNG")
    return out


def save_labelled_grid(images: Tensor | np.ndarray, path: str | os.PathLike, row_labels: list[str], nrow: int,
                       scale: int = 3, padding: int = 2) -> Path:
    """`save_grid` enlarged `scale` times (nearest neighbour: small images stay crisp), each row's label
    written in a white margin on its left; RGB PNG."""
    from PIL import ImageDraw, ImageFont  # noqa: PLC0415

    grid = grid_image(images, nrow, padding, 1.0).convert("RGB")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    margin = 8 + max((int(draw.textlength(t, font=font)) for t in row_labels), default=0)
    sheet = Image.new("RGB", (grid.width + margin, grid.height), "white")
    sheet.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(sheet)
    row_h = (grid.height - padding * scale) / max(len(row_labels), 1)
    for r, text in enumerate(row_labels):
        draw.text((4, padding * scale + r * row_h + row_h / 2), text, fill="black", font=font, anchor="lm")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def grid_image(images: Tensor | np.ndarray, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Image.Image:
    """The PIL image `save_grid` writes."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), float(pad_value))
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    pixels = ((torch.nan_to_num(grid, nan=0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))  # (H, W) -> L, (H, W, 3) -> RGB


def slerp(z0: Tensor, z1: Tensor, t: Tensor | float) -> Tensor:
    """Spherical interpolation between rows of z0 and z1 at fraction t (falls back to lerp when parallel)."""
    t = torch.as_tensor(t, dtype=z0.dtype)
    if t.ndim == 1:
        t = t[:, None]
    u0, u1 = z0 / z0.norm(dim=-1, keepdim=True), z1 / z1.norm(dim=-1, keepdim=True)
    omega = torch.arccos((u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    near = so.abs() < 1e-6
    safe = torch.where(near, torch.ones_like(so), so)
    out = (torch.sin((1 - t) * omega) / safe) * z0 + (torch.sin(t * omega) / safe) * z1
    return torch.where(near, (1 - t) * z0 + t * z1, out)


# -- loading -----------------------------------------------------------------------------------------------
def _is_mlflow_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/"))


def _resolve_model_uri(uri: str, tracking_uri: str | None) -> str:
    """models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest -> the version's artifact location.

    NOTE: resolved here with an explicit client because mlflow's models:/ download ignores a registry URI
    passed per call and reads the process-global one.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    ref, _, subpath = uri.removeprefix("models:/").partition("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, (version, _, subpath) = ref, subpath.partition("/")
        if version == "latest":
            version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        elif not version.isdigit():
            raise ValueError(f"{uri}: give models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest")
    location = client.get_model_version_download_uri(name, str(version))
    return f"{location.rstrip('/')}/{subpath}" if subpath else location


def _download(uri: str, dst: Path, tracking_uri: str | None) -> Path:
    import mlflow.artifacts

    if uri.startswith("models:/"):
        uri = _resolve_model_uri(uri, tracking_uri)
    # NOTE: the URIs are passed per call, so sampling never changes the process's global MLflow state
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))


def _checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        preferred = sorted(path.rglob(CHECKPOINT_NAME))
        candidates = preferred or sorted(path.rglob("*.pt"))
        if len(candidates) == 1:
            return candidates[0]
        raise FileNotFoundError(f"{path}: expected one {CHECKPOINT_NAME} (or one .pt file), found {[str(c) for c in candidates]}")
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def read_checkpoint(source: str | os.PathLike, *, tracking_uri: str | None = None) -> dict:
    """The checkpoint dict {g_ema_state, config, class_names, ...} from a path or an MLflow URI."""
    source = str(source)
    if _is_mlflow_uri(source):
        with tempfile.TemporaryDirectory(prefix="biggan-sample-") as tmp:
            return safe_load(_checkpoint_file(_download(source, Path(tmp), tracking_uri)))
    return safe_load(_checkpoint_file(Path(source)))  # weights only; a refusal names the file


def build_generator(cfg: RunConfig, num_classes: int) -> nn.Module:
    """G as the trainer builds it from config.model."""
    return networks.generator(cfg, num_classes)


def load_generator(source: str | os.PathLike, *, device: str | torch.device = "cpu",
                   tracking_uri: str | None = None) -> tuple[nn.Module, RunConfig, list[str]]:
    """(G in eval mode, its RunConfig, class names) from a checkpoint path or a models:/ or runs:/ URI."""
    ckpt = read_checkpoint(source, tracking_uri=tracking_uri)
    missing = {"g_ema_state", "config"} - set(ckpt)
    if missing:
        raise ValueError(f"{source}: not a generator checkpoint, missing {sorted(missing)}")
    cfg = from_dict(ckpt["config"])
    class_names = [str(c) for c in ckpt.get("class_names") or []]
    num_classes = cfg.model.num_classes or len(class_names)
    if not num_classes:
        num_classes = int(ckpt["g_ema_state"]["shared.weight"].shape[0])
    if not class_names:
        class_names = [str(i) for i in range(num_classes)]
    G = build_generator(cfg, num_classes)
    G.load_state_dict(ckpt["g_ema_state"])
    return G.to(device).eval(), cfg, class_names


# -- rendering ---------------------------------------------------------------------------------------------
@torch.no_grad()
def class_grid(G: nn.Module, classes: list[int], per_class: int, *, dim_z: int, truncation: float = 0.0,
               seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
    """(len(classes) * per_class, C, H, W) images; row r holds per_class samples of classes[r]."""
    gen = torch.Generator().manual_seed(seed)
    z = truncated_normal(len(classes) * per_class, dim_z, truncation, gen)
    y = torch.tensor(classes).repeat_interleave(per_class)
    return _run(G, z, y, device)


@torch.no_grad()
def interpolation_sheet(G: nn.Module, classes: list[int], steps: int, *, dim_z: int, truncation: float = 0.0,
                        seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
    """(len(classes) * steps, C, H, W): per class, a slerp in z between two draws, class held fixed."""
    if steps < 2:
        raise ValueError(f"interpolation needs at least 2 steps, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    ends = truncated_normal(2 * len(classes), dim_z, truncation, gen).view(len(classes), 2, dim_z)
    t = torch.linspace(0, 1, steps)
    z = torch.cat([slerp(e[0].expand(steps, -1), e[1].expand(steps, -1), t) for e in ends])
    y = torch.tensor(classes).repeat_interleave(steps)
    return _run(G, z, y, device)


def _run(G: nn.Module, z: Tensor, y: Tensor, device: str | torch.device, batch_size: int = 64) -> Tensor:
    param = next(G.parameters())
    was_training = G.training
    G.eval()
    try:
        return torch.cat([
            G(z[i:i + batch_size].to(device, param.dtype), y[i:i + batch_size].to(device)).float().clamp(-1, 1).cpu()
            for i in range(0, z.shape[0], batch_size)
        ])
    finally:
        G.train(was_training)


def parse_classes(text: str, class_names: list[str]) -> list[int]:
    """'0,3,7' or class names ('cat,dog') -> indices; '' = the first min(10, K) classes."""
    if not text:
        return list(range(min(10, len(class_names))))
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item.lstrip("-").isdigit():
            idx = int(item)
        elif item in class_names:
            idx = class_names.index(item)
        else:
            raise ValueError(f"unknown class {item!r}; give indices 0..{len(class_names) - 1} or names")
        if not 0 <= idx < len(class_names):
            raise ValueError(f"class {idx} out of range 0..{len(class_names) - 1}")
        out.append(idx)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.sample",
        description="Render class grids and slerp interpolation sheets from a BigGAN checkpoint or MLflow model.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", nargs="?", help="g_ema.pt path, a folder holding it, models:/NAME/VERSION, "
                   "models:/NAME@ALIAS or runs:/RUN/PATH")
    p.add_argument("--checkpoint", dest="checkpoint", default=None, help="the same as SOURCE")
    p.add_argument("--classes", default="", help="comma-separated class indices or names (default: first 10)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class in the grid")
    p.add_argument("--truncation", type=float, default=0.0, help="resample |z| above this; 0 = no truncation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interp", type=int, default=0, metavar="STEPS",
                   help="also write <out>_interp.png with STEPS slerp steps per class (0 = off)")
    p.add_argument("--standing-stats", type=int, default=0, metavar="PASSES",
                   help="recompute batch-norm statistics over PASSES batches first (0 = use the stored ones)")
    p.add_argument("--out", default="samples.png", help="output PNG for the class grid")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ sources")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    source = args.checkpoint or args.source
    if not source:
        parser.error("give a checkpoint: SOURCE or --checkpoint")
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    G, cfg, class_names = load_generator(source, device=args.device, tracking_uri=args.tracking_uri)
    try:
        classes = parse_classes(args.classes, class_names)
    except ValueError as err:
        parser.error(str(err))
    dim_z = int(G.dim_z)
    if args.standing_stats > 0:
        from models.sampling import standing_stats

        threshold = args.truncation if args.truncation > 0 else None
        standing_stats(G, args.standing_stats, truncation=threshold,
                       generator=torch.Generator(device=args.device).manual_seed(args.seed))
    out = Path(args.out)
    grid = class_grid(G, classes, args.per_class, dim_z=dim_z, truncation=args.truncation, seed=args.seed, device=args.device)
    save_grid(grid, out, nrow=args.per_class)
    print(f"wrote {out}: rows = {', '.join(f'{i}:{class_names[i]}' for i in classes)}")
    if args.interp:
        sheet = interpolation_sheet(G, classes, args.interp, dim_z=dim_z, truncation=args.truncation, seed=args.seed,
                                    device=args.device)
        interp_path = out.with_name(f"{out.stem}_interp{out.suffix or '.png'}")
        save_grid(sheet, interp_path, nrow=args.interp)
        print(f"wrote {interp_path}: {args.interp} slerp steps per class")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
