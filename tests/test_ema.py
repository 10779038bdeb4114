"""G_ema: built on the training device, the average of the fp32 master weights, with its own spectral norms."""

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from models.spectral import SpectralNorm
from pipeline.ema import EMA
from pipeline.placement import check_placement, misplaced
from pipeline.trainer import build_models
from tests.trainer_harness import make_trainer, tiny_config


def test_ema_is_built_from_the_device_resident_module(tmp_path, digits_shards):
    shards, n = digits_shards
    trainer = make_trainer(tiny_config(tmp_path, shards, n), tmp_path)
    assert trainer.ema.source is trainer.g_engine.module and misplaced(trainer) == []

    def engine_hooks(module):
        return [h for m in module.modules() for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
                if h.__module__.startswith("deepspeed")]

    assert engine_hooks(trainer.G) and not engine_hooks(trainer.ema.model)  # the copy runs no engine bookkeeping
    assert {p.device for p in trainer.ema.model.parameters()} == {p.device for p in trainer.G.parameters()}
    trainer.ema.model.to("meta")  # what a GPU run had: the copy on another device than G
    with pytest.raises(RuntimeError, match="EMA G"):
        check_placement(trainer)
    with pytest.raises(RuntimeError, match="after build_engines"):
        trainer.ema.update(1)


def test_ema_built_before_the_model_moves_fails_with_a_clear_error(tmp_path, digits_shards):
    """The old order (EMA(G), then the engines move G) reproduced on CPU, `meta` standing in for cuda."""
    shards, n = digits_shards
    G, _ = build_models(tiny_config(tmp_path, shards, n))
    ema = EMA(G, 0.9, 0)
    G.to("meta")
    with pytest.raises(RuntimeError, match="is on cpu but G's parameter is on meta"):
        ema.update(1)


def fp32_master(engine, p: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's own view of a parameter's fp32 master (the reference, read without pipeline code)."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups"):  # ZeRO 0 + bf16: FP16_UnfusedOptimizer keeps whole fp32 copies
        for lps, hps in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lps, hps):
                if lp is p:
                    return hp.detach().clone()
        raise KeyError("not trained")
    return safe_get_full_fp32_param(p).clone()


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_ema_averages_the_fp32_masters_not_the_bf16_weights(tmp_path, digits_shards, zero_stage):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.precision": "bf16", "optim.zero_stage": zero_stage,
                                              "ema.decay": 0.5, "ema.start_step": 0})
    trainer = make_trainer(cfg, tmp_path)
    names = [name for name, p in trainer.G.named_parameters() if p.requires_grad]
    params = dict(trainer.G.named_parameters())
    master = {k: fp32_master(trainer.g_engine, params[k]) for k in names}
    want = dict(master)  # the EMA starts at the masters
    want_bf16 = {k: params[k].detach().float().clone() for k in names}
    for _ in range(3):
        trainer.train_iteration()
        for k in names:
            m = fp32_master(trainer.g_engine, params[k])
            want[k] = want[k].lerp(m, 0.5)
            want_bf16[k] = want_bf16[k].lerp(params[k].detach().float(), 0.5)
    assert params[names[0]].dtype == torch.bfloat16
    got = dict(trainer.ema.ready().named_parameters())
    for k in names:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    off = max((got[k] - want_bf16[k]).abs().max().item() for k in names)
    assert off > 1e-5, "the EMA followed the bf16 module weights"


def test_ema_spectral_norms_are_estimated_for_its_own_weights(tmp_path, digits_shards):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"ema.decay": 0.5, "ema.start_step": 0, "ema.sn_itrs": 2000})
    trainer = make_trainer(cfg, tmp_path)
    for _ in range(2):
        trainer.train_iteration()
    with torch.no_grad():  # make EMA G's weights unlike G's, as a long average would
        for p in trainer.ema.model.parameters():
            p.mul_(1.0 + 0.5 * torch.rand_like(p))
    trainer.ema._stale = True
    G_ema = trainer.ema.ready()
    layers = {name: m for name, m in G_ema.named_modules() if isinstance(m, SpectralNorm)}
    live = {name: m for name, m in trainer.G.named_modules() if isinstance(m, SpectralNorm)}
    assert layers
    for name, m in layers.items():
        svd = torch.linalg.matrix_norm(m.weight.flatten(1).double(), ord=2).float()
        torch.testing.assert_close(m.sigma0, svd, rtol=1e-3, atol=0.0, msg=name)
        assert not torch.allclose(m.sigma0, live[name].sigma0, rtol=1e-2), f"{name}: G's estimate, not its own"
    # checkpointed EMA state carries those estimates
    state = trainer.ema.state_dict()
    assert all(torch.equal(state[f"{name}.sigma0"], m.sigma0) for name, m in layers.items())
