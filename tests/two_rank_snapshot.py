"""One rank of a two-process training group (gloo, file rendezvous on loopback) for tests/test_snapshot.py."""

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
    import torch.distributed as dist

    from pipeline import process_group

    process_group.join("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    from pipeline import config as C
    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.presets import get_preset
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    cfg = get_preset("demo")
    cfg.data.shards, cfg.model.num_classes, cfg.data.backend = shards, num_classes, "wds"
    cfg.model.g_ch, cfg.model.d_ch, cfg.model.dim_z, cfg.model.shared_dim = 4, 4, 16, 8
    cfg.data.batch_size, cfg.train.global_batch, cfg.cluster.num_workers = 4, 8, 2
    cfg.train.output_dir, cfg.health.enabled, cfg.optim.zero_stage = f"{root}/out", False, 1
    cfg.eval = type(cfg.eval)()  # no evaluations
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every, cfg.train.sample_every = 2, 1, 2, 1000
    C.validate(cfg)

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(shards, batch_size=4, rank=rank, world_size=2, device="cpu", backend="wds", seed=seed,
                            resolution=cfg.model.resolution, start_epoch=epoch, start_offset=offset)

    def trainer() -> Trainer:
        return Trainer(cfg, make_loader=make_loader, store=CheckpointStore(f"{root}/ckpt"),
                       tracker=Tracker("", "", "", enabled=False), device=torch.device("cpu"), rank=rank,
                       world_size=2)

    trainer().fit()
    dist.barrier()
    files = CheckpointStore(f"{root}/ckpt").get(2).meta["files"]
    if rank == 0:  # rot one byte of rank 1's ZeRO partition: only rank 1 reads (and verifies) that file
        # DeepSpeed names it bf16_zero_pp_rank_1_... under bf16, zero_pp_rank_1_... otherwise
        (path,) = [Path(root, "ckpt", "step-00000002", rel) for rel in files
                   if rel.startswith("d/") and "zero_pp_rank_1_" in rel]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    resumed = trainer()
    info = resumed.restore()
    Path(root, f"result{rank}.json").write_text(json.dumps({
        "restored": info.step, "step": resumed.step, "files": sorted(files),
        "restore_dir_left": (resumed.work_dir / "restore").exists(),
    }))
    process_group.leave()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
