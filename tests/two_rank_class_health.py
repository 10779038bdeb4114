"""One rank of a two-process group (gloo, file rendezvous on loopback) for tests/test_class_health.py: the class
signals of an untrained trainer's EMA G, each rank generating half of the health batch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(rank: int, root: str, shards: str, num_classes: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)

    from pipeline import process_group

    process_group.join("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer
    from tests.test_class_health import CLASSIFIER
    from tests.trainer_harness import tiny_config

    cfg = tiny_config(Path(root), shards, num_classes, **CLASSIFIER, **{"cluster.num_workers": 2, "data.batch_size": 4})

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(shards, batch_size=4, rank=rank, world_size=2, device="cpu", backend="wds", seed=seed,
                            resolution=cfg.model.resolution, start_epoch=epoch, start_offset=offset)

    trainer = Trainer(cfg, make_loader=make_loader, store=CheckpointStore(f"{root}/ckpt"),
                      tracker=Tracker("", "", "", enabled=False), device=torch.device("cpu"), rank=rank, world_size=2)
    trainer.class_signals.setup()  # rank 0 loads the classifier; rank 1 receives it
    signals = trainer.health_signals({})
    share = trainer.class_signals._share()
    Path(root, f"result{rank}.json").write_text(json.dumps({
        "signals": {k: v for k, v in signals.items() if k.startswith("class_")}, "share": [share.start, share.stop]}))
    process_group.leave()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
