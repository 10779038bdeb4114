"""The Evaluator on one rank of a spawned gloo group (tests/test_evaluation.py): a light module, because every
spawned process imports it."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import torch

from pipeline import config as C
from pipeline import evaluation, process_group
from pipeline.tracking import Tracker


class BrokenG(torch.nn.Module):
    """A generator that fails on its first forward (the standing-statistics pass)."""

    dim_z, num_classes = 16, 10

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, z, y):
        raise RuntimeError("this rank's G is broken")


class HalfRealG(torch.nn.Module):
    """A BigGAN G whose output is averaged with a real image picked by z: metrics far from degenerate (the
    untrained G alone gives nearly constant images), while the BigGAN path (batch norms with standing
    statistics, eval mode) still decides every pixel's last bits."""

    def __init__(self, G: torch.nn.Module, real: torch.Tensor):
        super().__init__()
        self.G, self.dim_z, self.num_classes = G, G.dim_z, G.num_classes
        self.register_buffer("real", real)

    def forward(self, z, y):
        pick = (z[:, 0].abs() * 1e4).long() % self.real.shape[0]
        return 0.5 * self.G(z, y) + 0.5 * self.real[pick]


def trainer_stub(cfg: C.RunConfig, rank: int, world_size: int, G: torch.nn.Module, work_dir) -> types.SimpleNamespace:
    """What the Evaluator reads of its Trainer; tracking off (as on ranks > 0), no checkpoint info."""
    return types.SimpleNamespace(
        rank=rank, world_size=world_size, device=torch.device("cpu"), cfg=cfg, tracker=Tracker("", "", "", enabled=False),
        ema=types.SimpleNamespace(model=G), status="finished", step=cfg.train.steps, work_dir=Path(work_dir),
        dtype=torch.float32,  # the precision training ran in: evaluation samples in it
    )


def evaluate(trainer) -> dict:
    """One evaluation at step 2 and the end-of-training sweep, as the trainer calls them."""
    ev = evaluation.Evaluator(trainer)
    fid = ev.after_checkpoint(2, None)
    latest = {k: v for k, v in ev.latest.items() if k != "seconds"}
    return {"fid": fid, "latest": latest, "sweep": ev.finish(), "take": [ev.take_fid(), ev.take_fid()]}


def evaluate_on_two_ranks(rank: int, rendezvous: str, cfg: C.RunConfig, G: torch.nn.Module, out: str) -> None:
    """One of two gloo ranks: the real Evaluator on G, its share of the samples; then rank 1's G fails."""
    torch.set_num_threads(1)  # a spawned process: conftest's session fixture does not reach it
    process_group.join("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    got = evaluate(trainer_stub(cfg, rank, 2, G, f"{out}.work{rank}"))

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("pipeline.evaluation").addHandler(handler)
    ev = evaluation.Evaluator(trainer_stub(cfg, rank, 2, BrokenG() if rank == 1 else G, f"{out}.work{rank}"))
    got["failed"] = [ev.after_checkpoint(2, None), ev.last_fid, ev.failures, warnings]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    process_group.leave()


def train_on_two_ranks(rank: int, rendezvous: str, cfg: C.RunConfig, store_dir: str, out: str) -> None:
    """One of two real training workers (DeepSpeed engines over gloo, disjoint data shares) with evaluation on."""
    import os

    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu"})
    process_group.join("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(cfg.data.shards, batch_size=cfg.data.batch_size, rank=rank, world_size=2, device="cpu",
                            backend=cfg.data.backend, seed=seed, resolution=cfg.model.resolution, flip=cfg.data.flip,
                            start_epoch=epoch, start_offset=offset)

    trainer = Trainer(cfg, make_loader=make_loader, store=CheckpointStore(store_dir),
                      tracker=Tracker("", "", "", enabled=False), device=torch.device("cpu"), rank=rank, world_size=2)
    result = trainer.fit()
    ev = trainer.evaluator
    got = {"status": result["status"], "failures": ev.failures, "fid": ev.last_fid,
           "latest": {k: v for k, v in ev.latest.items() if k != "seconds"}}
    if rank == 0:
        got["best"] = trainer.store.labels().get("best")
        got["checkpoint"] = trainer.store.latest().path
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    process_group.leave()
