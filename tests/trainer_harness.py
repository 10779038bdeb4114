"""Build a real Trainer in this process (world size 1, gloo on 127.0.0.1) on small real shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline import config as C
from pipeline.checkpoint import CheckpointStore
from pipeline.data import build_loader
from pipeline.engines import init_single_process_group
from pipeline.presets import get_preset
from pipeline.snapshot import state_fingerprint  # noqa: F401 - the tests' one name for it
from pipeline.tracking import Tracker
from pipeline.trainer import Trainer


def tiny_config(tmp_path, shards: str, num_classes: int, **overrides) -> C.RunConfig:
    cfg = get_preset("demo")
    cfg.data.shards = shards
    cfg.model.num_classes = num_classes
    cfg.model.g_ch, cfg.model.d_ch, cfg.model.dim_z, cfg.model.shared_dim = 4, 4, 16, 8
    cfg.data.batch_size, cfg.train.global_batch, cfg.cluster.num_workers = 8, 8, 1
    cfg.data.backend = "wds"
    # the demo's recipe before session 8: the trajectories the tests' thresholds were set on
    cfg.optim.g_lr, cfg.optim.d_lr, cfg.data.diffaug, cfg.loss.mode_seeking = 2e-4, 2e-4, "", 0.0
    cfg.model.d_head, cfg.data.flip = "projection", True
    cfg.train.output_dir = str(tmp_path / "out")
    cfg.train.log_every, cfg.train.sample_every, cfg.train.checkpoint_every = 2, 1000, 1000
    cfg.health.enabled = False
    cfg.eval = C.EvalConfig()  # the demo's evaluations off: tests that evaluate set their own
    # fp32 unless a test asks for bf16: what a test expects must not depend on whether its CPU has bf16 units
    cfg.train.precision, cfg.eval.classifier_precision = "fp32", "fp32"
    C.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    return C.validate(cfg)


def make_trainer(cfg: C.RunConfig, tmp_path, tracker: Tracker | None = None, **kwargs) -> Trainer:
    init_single_process_group()

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(cfg.data.shards, batch_size=cfg.data.batch_size, backend=cfg.data.backend, seed=seed,
                            resolution=cfg.model.resolution, start_epoch=epoch, start_offset=offset, device="cpu",
                            flip=cfg.data.flip)

    return Trainer(
        cfg, make_loader=make_loader, store=CheckpointStore(str(tmp_path / "ckpt")),
        tracker=tracker or Tracker("", "", "", enabled=False), device=torch.device("cpu"), **kwargs,
    )


def run_two_rank_script(module: str, tmp_path, shards: str, num_classes: int, timeout: float = 300) -> list[dict]:
    """Run `python -m module RANK TMP SHARDS N` as ranks 0 and 1 (each writes TMP/result<rank>.json); their results."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-m", module, str(rank), str(tmp_path), shards, str(num_classes)],
                              env=env, cwd=root) for rank in (0, 1)]
    try:
        assert [p.wait(timeout=timeout) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads((Path(tmp_path) / f"result{rank}.json").read_text()) for rank in (0, 1)]
