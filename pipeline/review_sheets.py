"""The sheets a reviewer opens first, made once at the end of training from EMA G (rank 0):

- `review/final_grid.png`: one row per class (up to MAX_CLASSES), each labelled with its class name;
- `review/interpolation.png`: per class, a slerp between two latents with the class held fixed.

Both come from a standing-statistics copy of EMA G (the one evaluation scores), at fixed seeds, and are logged
to MLflow under `review/` and kept under the worker's `work/rank0/review/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.evaluation import evaluation_copy
from pipeline.sample import class_grid, interpolation_sheet, save_labelled_grid

if TYPE_CHECKING:
    from pipeline.trainer import Trainer

MAX_CLASSES = 20
PER_CLASS = 10
INTERP_STEPS = 10


def write_review_sheets(trainer: Trainer) -> dict[str, Path]:
    """{'final_grid': path, 'interpolation': path}, logged to the trainer's MLflow run."""
    cfg = trainer.cfg
    G = evaluation_copy(trainer.ema.ready(), passes=cfg.eval.standing_stats_passes, batch_size=cfg.eval.batch_size,
                        device=trainer.device)
    classes = list(range(min(MAX_CLASSES, cfg.model.num_classes)))
    names = [f"{k} {trainer.class_names[k]}" for k in classes]
    folder = trainer.work_dir / "review"
    grid = class_grid(G, classes, PER_CLASS, dim_z=G.dim_z, seed=0, device=trainer.device)
    sheet = interpolation_sheet(G, classes, INTERP_STEPS, dim_z=G.dim_z, seed=1, device=trainer.device)
    paths = {"final_grid": save_labelled_grid(grid, folder / "final_grid.png", names, nrow=PER_CLASS),
             "interpolation": save_labelled_grid(sheet, folder / "interpolation.png", names, nrow=INTERP_STEPS)}
    for path in paths.values():
        trainer.tracker.log_artifact(path, "review")
    return paths
