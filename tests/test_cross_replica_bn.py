"""Cross-replica BatchNorm on two real gloo ranks equals one process normalizing the concatenated batch.

Each rank holds a slice of a global batch; with the reduction installed, outputs, input gradients,
parameter gradients (summed over ranks, as DeepSpeed's averaging sees them) and running statistics
match a single process that runs the same layers on the whole batch.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import models
from models.layers import BatchNorm2d, ConditionalBatchNorm2d, StatsBatchNorm
from pipeline import process_group
from pipeline.cross_replica import CrossReplicaSum, install_cross_replica_bn

WORLD = 2


def _init(rank: int, rendezvous: str) -> None:
    torch.set_num_threads(1)  # a spawned process: conftest's session fixture does not reach it
    os.environ.update({"GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD)})
    process_group.join("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)


# -- single layers: uneven slices, conditional and plain BN, fp32 and bf16 ---------------------------------------
SPLIT = (3, 5)  # rank 0 gets 3 samples, rank 1 gets 5: the count is reduced too


def _layers():
    torch.manual_seed(0)
    cbn, bn = ConditionalBatchNorm2d(6, cond_dim=5), BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return cbn, bn


def _layer_inputs():
    g = torch.Generator().manual_seed(1)
    n = sum(SPLIT)
    x = torch.randn(n, 6, 4, 4, generator=g) * 3 + 1
    cond = torch.randn(n, 5, generator=g)
    w = torch.randn(n, 6, 4, 4, generator=g)  # loss = sum(out * w): a different gradient per element
    return x, cond, w


def _run_layers(cbn, bn, x, cond, w, dtype=torch.float32):
    for p in [*cbn.parameters(), *bn.parameters()]:
        p.data = p.data.to(dtype)  # as DeepSpeed's bf16 mode: parameters cast, buffers kept fp32
    x = x.detach().to(dtype).requires_grad_(True)
    out_c = cbn(x, cond.to(dtype))
    out_b = bn(x)
    ((out_c.float() * w).sum() + (out_b.float() * w * 0.5).sum()).backward()
    return out_c, out_b, x.grad


def _layers_on_rank(rank: int, rendezvous: str, results: str) -> None:
    _init(rank, rendezvous)
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        cbn, bn = _layers()
        for m in (cbn, bn):
            m.batch_stats = CrossReplicaSum()
        x, cond, w = _layer_inputs()
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        out_c, out_b, x_grad = _run_layers(cbn, bn, x[lo:hi], cond[lo:hi], w[lo:hi], dtype)
        grads = {f"{p}.{k}": v.grad.float() for p, m in (("cbn", cbn), ("bn", bn)) for k, v in m.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
        got[str(dtype)] = {
            "out_c": out_c.detach(), "out_b": out_b.detach(), "x_grad": x_grad, "grads": grads,
            "running": {f"{p}.{k}": v.clone() for p, m in (("cbn", cbn), ("bn", bn)) for k, v in m.named_buffers()},
        }
    # traced whole (fullgraph: a graph break at the collective raises), forward and backward through AOTAutograd
    cbn, bn = _layers()
    for m in (cbn, bn):
        m.batch_stats = CrossReplicaSum()
    x, cond, w = _layer_inputs()
    lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
    forward = torch.compile(lambda x, cond: (cbn(x, cond), bn(x)), backend="aot_eager", fullgraph=True)
    x = x[lo:hi].clone().requires_grad_(True)
    out_c, out_b = forward(x, cond[lo:hi])
    ((out_c * w[lo:hi]).sum() + (out_b * w[lo:hi] * 0.5).sum()).backward()
    got["compiled"] = {"out_c": out_c.detach(), "x_grad": x.grad}
    torch.save(got, f"{results}.{rank}")
    process_group.leave()


def test_batch_norm_layers_on_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    results = str(tmp_path / "got")
    mp.spawn(_layers_on_rank, args=(str(tmp_path / "pg"), results), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{results}.{r}", weights_only=False) for r in range(WORLD)]

    cbn, bn = _layers()  # the reference: plain local BN (F.batch_norm) over the concatenated batch
    x, cond, w = _layer_inputs()
    out_c, out_b, x_grad = _run_layers(cbn, bn, x, cond, w)
    grads = {f"{p}.{k}": v.grad for p, m in (("cbn", cbn), ("bn", bn)) for k, v in m.named_parameters()}
    running = {f"{p}.{k}": v for p, m in (("cbn", cbn), ("bn", bn)) for k, v in m.named_buffers()}

    got = [r["torch.float32"] for r in ranks]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([g["out_c"] for g in got]), out_c.detach(), **tol)
    torch.testing.assert_close(torch.cat([g["out_b"] for g in got]), out_b.detach(), **tol)
    torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), x_grad, **tol)
    for rank in got:
        for k, v in grads.items():
            torch.testing.assert_close(rank["grads"][k], v, rtol=1e-4, atol=1e-4, msg=k)
        for k, v in running.items():
            torch.testing.assert_close(rank["running"][k], v, **tol, msg=k)
    # the slices differ (mean 1, std 3): per-rank statistics would be far off, so the test can fail
    local = torch.nn.functional.batch_norm(x[: SPLIT[0]], None, None, training=True)
    assert (local - torch.nn.functional.batch_norm(x, None, None, training=True)[: SPLIT[0]]).abs().max() > 0.05

    compiled = [r["compiled"] for r in ranks]
    torch.testing.assert_close(torch.cat([g["out_c"] for g in compiled]), out_c.detach(), **tol)
    torch.testing.assert_close(torch.cat([g["x_grad"] for g in compiled]), x_grad, **tol)

    # bf16 activations: statistics in fp32 (running stats stay fp32), outputs in bf16 within bf16 rounding
    got = [r["torch.bfloat16"] for r in ranks]
    cbn, bn = _layers()
    out_c, _, x_grad = _run_layers(cbn, bn, x.bfloat16().float(), cond.bfloat16().float(), w)
    assert got[0]["out_c"].dtype == torch.bfloat16 and got[0]["running"]["cbn.running_mean"].dtype == torch.float32
    torch.testing.assert_close(torch.cat([g["out_c"] for g in got]).float(), out_c.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]).float(), x_grad, rtol=2e-2, atol=5e-2)


# -- the real G through DeepSpeed, with gradient accumulation ------------------------------------------------------
MICRO, ACCUM, LR = 2, 2, 0.5  # per rank per micro-step; micro-steps per optimizer step


def _generator(arch: str):
    torch.manual_seed(3)
    return models.build_generator(arch, 32, 5, ch=4, dim_z=16, shared_dim=8, attention=0)


def _g_inputs(dim_z: int):
    """(z, y, w) of micro-step k, rank r: index [k][r]; the reference concatenates over r."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(ACCUM, WORLD, MICRO, dim_z, generator=g)
    y = torch.randint(0, 5, (ACCUM, WORLD, MICRO), generator=g)
    w = torch.randn(ACCUM, WORLD, MICRO, 3, 32, 32, generator=g)
    return z, y, w


ARCHS = ("biggan", "biggan-deep")


def _g_on_rank(rank: int, rendezvous: str, results: str) -> None:
    _init(rank, rendezvous)
    import deepspeed

    got = {}
    for arch in ARCHS:  # one spawn for both: starting processes and importing DeepSpeed is most of the cost
        G = _generator(arch)
        engine, *_ = deepspeed.initialize(
            model=G, optimizer=torch.optim.SGD(G.parameters(), lr=LR), dist_init_required=False,
            config={"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
                    "train_batch_size": MICRO * ACCUM * WORLD, "zero_optimization": {"stage": 1},
                    "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30},
        )
        install_cross_replica_bn(engine.module)
        z, y, w = _g_inputs(G.dim_z)
        outs, z_grads = [], []
        for k in range(ACCUM):
            zk = z[k, rank].clone().requires_grad_(True)
            out = engine(zk, y[k, rank])
            engine.backward((out * w[k, rank]).mean())
            engine.step()
            outs.append(out.detach())
            z_grads.append(zk.grad)
        got[arch] = {"outs": outs, "z_grads": z_grads, "state": engine.module.state_dict()}
    torch.save(got, f"{results}.{rank}")
    process_group.leave()


def test_generator_on_two_deepspeed_ranks_normalizes_each_global_micro_batch(tmp_path):
    """Statistics cover one micro-batch on every rank (MICRO x WORLD samples), each micro-step its own;
    gradients accumulate over micro-steps and average over ranks, as one process would compute them."""
    results = str(tmp_path / "got")
    mp.spawn(_g_on_rank, args=(str(tmp_path / "pg"), results), nprocs=WORLD, join=True)
    saved = [torch.load(f"{results}.{r}", weights_only=False) for r in range(WORLD)]
    for arch in ARCHS:
        ranks = [s[arch] for s in saved]
        G = _generator(arch)
        init = copy.deepcopy(G.state_dict())
        z, y, w = _g_inputs(G.dim_z)
        for k in range(ACCUM):
            zk = z[k].reshape(WORLD * MICRO, -1).clone().requires_grad_(True)
            out = G(zk, y[k].reshape(-1))
            # DeepSpeed: mean over ranks of each rank's loss, divided by the accumulation steps
            per_rank = (out.reshape(WORLD, MICRO, 3, 32, 32) * w[k]).mean(dim=(1, 2, 3, 4))
            (per_rank.sum() / (WORLD * ACCUM)).backward()
            for r in range(WORLD):
                rows = slice(r * MICRO, (r + 1) * MICRO)
                torch.testing.assert_close(ranks[r]["outs"][k], out.detach()[rows], rtol=1e-4, atol=1e-5)
                # each rank's input gradient is its share of the summed objective (before DeepSpeed's averaging)
                torch.testing.assert_close(ranks[r]["z_grads"][k] / WORLD, zk.grad[rows], rtol=1e-3, atol=1e-7)
        with torch.no_grad():
            for p in G.parameters():
                p -= LR * p.grad
        expected = G.state_dict()
        moved = 0.0
        for rank in ranks:
            for key, value in expected.items():
                torch.testing.assert_close(rank["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {key}")
                moved = max(moved, (value - init[key]).abs().max().item())
        assert moved > 1e-3, arch  # the step did something


def test_install_reaches_every_batch_norm_and_copies_stay_local(tmp_path):
    from pipeline.engines import init_single_process_group

    init_single_process_group()
    G = _generator("biggan-deep")
    n = install_cross_replica_bn(G)
    norms = [m for m in G.modules() if isinstance(m, StatsBatchNorm)]
    assert n == len(norms) > 0 and all(isinstance(m.batch_stats, CrossReplicaSum) for m in norms)
    copied = copy.deepcopy(G)  # EMA G and evaluation copies: their standing statistics may run on rank 0 alone
    assert all(m.batch_stats is None for m in copied.modules() if isinstance(m, StatsBatchNorm))
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="model.cross_replica_bn"):
        install_cross_replica_bn(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_trainer_with_cross_replica_bn_on_one_rank_trains_as_local_bn(tmp_path):
    """Through the real trainer and DeepSpeed engines (with gradient accumulation): on one rank the global
    statistics are the local ones, so G's outputs and the losses match model.cross_replica_bn=false."""
    from tests.data_helpers import write_id_shards
    from tests.trainer_harness import make_trainer, tiny_config

    n = 5
    shards = str(tmp_path / "shards")  # written directly: no Ray
    write_id_shards(tmp_path / "shards", [48], num_classes=n, resolution=32)
    runs = {}
    for on in (True, False):
        cfg = tiny_config(tmp_path / str(on), shards, n, **{"model.cross_replica_bn": on, "train.global_batch": 16})
        trainer = make_trainer(cfg, tmp_path / str(on))
        norms = [m for m in trainer.G.modules() if isinstance(m, StatsBatchNorm)]
        assert all(isinstance(m.batch_stats, CrossReplicaSum) == on for m in norms) and norms
        assert all(m.batch_stats is None for m in trainer.ema.model.modules() if isinstance(m, StatsBatchNorm))
        z, y = trainer.sample_latents(8)
        out = trainer.g_engine(z, y).detach()  # training mode: batch statistics
        for _ in range(2):
            trainer.train_iteration()
        trainer.log_samples()  # EMA G samples on its own
        runs[on] = out, trainer.take_metrics()
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    # NOTE: weights are not compared: Adam turns 1e-7 gradient differences on near-zero gradients into ~lr steps
    assert "g_loss" in runs[False][1] and "d_loss" in runs[False][1]
    for key, value in runs[False][1].items():
        if not key.startswith("grad_norm"):
            assert runs[True][1][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def test_bf16_trainer_with_cross_replica_bn_keeps_fp32_statistics(tmp_path):
    from tests.data_helpers import write_id_shards
    from tests.trainer_harness import make_trainer, tiny_config

    write_id_shards(tmp_path / "shards", [16], num_classes=5, resolution=32)
    cfg = tiny_config(tmp_path, str(tmp_path / "shards"), 5,
                      **{"model.cross_replica_bn": True, "train.precision": "bf16", "model.attention": 16,
                         "model.g_ch": 8})
    trainer = make_trainer(cfg, tmp_path)
    before = trainer.G.output_bn.running_mean.clone()
    trainer.train_iteration()
    metrics = trainer.take_metrics()
    assert all(v == v and abs(v) < 1e4 for v in metrics.values()), metrics  # finite
    assert trainer.G.linear.weight.dtype == torch.bfloat16  # DeepSpeed's bf16 module weights
    bn = trainer.G.output_bn
    assert bn.running_mean.dtype == torch.float32 and not torch.equal(bn.running_mean, before)


def test_imagenet_presets_use_cross_replica_bn():
    from pipeline.presets import PRESETS, get_preset

    for name in PRESETS:
        assert get_preset(name).model.cross_replica_bn == name.startswith("imagenet"), name


@pytest.mark.parametrize("arch", ARCHS)
def test_generator_with_cross_replica_bn_traces_as_one_graph(arch):
    """torch.compile keeps the collective in G's graph: an eager all-reduce in the block loop broke G's forward
    into one graph per batch norm (17 breaks for biggan, 29 for biggan-deep at this size) on the H200 check."""
    from pipeline.engines import init_single_process_group

    init_single_process_group()
    G = _generator(arch)
    assert install_cross_replica_bn(G) > 0
    z, y, _ = _g_inputs(G.dim_z)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(G)(z[0, 0], y[0, 0])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
