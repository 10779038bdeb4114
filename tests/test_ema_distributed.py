"""EMA over two gloo ranks under bf16 ZeRO 1: each rank averages the fp32 master slice it holds, `ready()`
assembles the whole average, equal to the average of DeepSpeed's full fp32 masters."""

import os

import torch
import torch.multiprocessing as mp

from pipeline import process_group


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"})
    torch.set_num_threads(1)
    process_group.join("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.ema import EMA
    from pipeline.engines import build_engines, fp32_master_slices
    from pipeline.presets import get_preset
    from pipeline.trainer import build_models

    cfg = get_preset("demo")
    cfg.model.num_classes, cfg.model.g_ch, cfg.model.d_ch, cfg.model.dim_z, cfg.model.shared_dim = 4, 4, 4, 16, 8
    cfg.data.batch_size, cfg.train.global_batch, cfg.cluster.num_workers = 2, 4, world
    cfg.train.precision, cfg.optim.zero_stage = "bf16", 1
    torch.manual_seed(0)
    G, D = build_models(cfg)
    g_engine, _ = build_engines(cfg, G, D, torch.device("cpu"), world)
    params = {n: p for n, p in g_engine.module.named_parameters() if p.requires_grad}
    ema = EMA(g_engine.module, 0.5, 0, masters=lambda: fp32_master_slices(g_engine))
    want = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(rank)
    for step in range(1, 4):
        z, y = torch.randn(2, 16, generator=gen), torch.randint(0, 4, (2,), generator=gen)
        loss = g_engine(z.to(torch.bfloat16), y).float().pow(2).mean()
        g_engine.backward(loss)
        g_engine.step()
        ema.update(step)
        for n, p in params.items():
            want[n] = want[n].lerp(safe_get_full_fp32_param(p), 0.5)
    split = ema._split
    got = dict(ema.ready().named_parameters())
    worst = max(float((got[n] - want[n]).abs().max()) for n in params)
    torch.save({"split": split, "worst": worst, "ema": {n: got[n].clone() for n in params}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    process_group.leave()


def test_bf16_zero1_ema_over_two_ranks_equals_the_average_of_full_fp32_masters(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["split"] and r1["split"]  # each rank held only part of the masters
    assert r0["worst"] < 1e-6 and r1["worst"] < 1e-6
    assert all(torch.equal(r0["ema"][n], r1["ema"][n]) for n in r0["ema"])  # every rank has the same G_ema
