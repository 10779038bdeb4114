"""What lives inside the DeepSpeed engines: Adam's state (reset by a mitigation) and the fp32 master weights."""

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from pipeline.health import apply_mitigation
from tests.test_ema import fp32_master
from tests.trainer_harness import make_trainer, tiny_config


def d_weights(trainer) -> list[torch.Tensor]:
    if trainer.d_engine.bfloat16_enabled():
        return [fp32_master(trainer.d_engine, p) for p in trainer.D.parameters()]
    return [p.detach().clone() for p in trainer.D.parameters()]


@pytest.mark.parametrize("precision, zero_stage", [("fp32", 0), ("bf16", 1)])
def test_reset_d_opt_makes_the_next_update_a_first_adam_step(tmp_path, digits_shards, precision, zero_stage):
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.precision": precision, "optim.zero_stage": zero_stage,
                                              "loss.d_steps": 1})
    trainer = make_trainer(cfg, tmp_path)
    for _ in range(6):
        trainer.train_iteration()
    assert "reset" in apply_mitigation(trainer, "reset_d_opt", 1)[0]
    opt = getattr(trainer.d_engine.optimizer, "optimizer", trainer.d_engine.optimizer)
    assert all(float(s["step"]) == 0 and s["exp_avg"].abs().sum() == 0 for s in opt.state.values())
    lr = trainer.d_engine.optimizer.param_groups[0]["lr"]
    before = d_weights(trainer)
    trainer.d_step()
    update = torch.cat([(a - b).flatten() for a, b in zip(d_weights(trainer), before)]).abs()
    # beta1 = 0: a first Adam step moves each weight by lr * |g| / (|g| + eps), i.e. lr where g is not tiny;
    # zeroing only the moments would have moved them by lr * sqrt((1 - beta2^7) / (1 - beta2)) = 2.6 lr
    assert update.max() <= lr * 1.001
    assert update.median() > 0.9 * lr
    assert all(float(s["step"]) == 1 for s in opt.state.values())


def test_collapse_drill_survives_the_bf16_master_copy(tmp_path, digits_shards):
    """The drill scales the fp32 master too: DeepSpeed's master-to-module copy at the next step keeps it."""
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.precision": "bf16", "optim.zero_stage": 1})
    trainer = make_trainer(cfg, tmp_path)
    trainer.train_iteration()
    w = trainer.G.linear.weight
    before = safe_get_full_fp32_param(w).norm()
    d_lr = trainer.d_engine.optimizer.param_groups[0]["lr"]
    trainer.inject_collapse()
    trainer.train_iteration()
    assert safe_get_full_fp32_param(w).norm() / before > 20  # one G step cannot undo a x25
    assert w.float().norm() / before > 20  # and the module's bf16 copy agrees
    assert trainer.d_engine.optimizer.param_groups[0]["lr"] == pytest.approx(100 * d_lr)


def test_a_compiled_d_takes_the_r1_penalty_a_mitigation_switches_on_mid_run(tmp_path, digits_shards):
    """R1 needs D's compiled backward twice (create_graph): a mitigation that turns it on must not end the run."""
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.compile": "true", "loss.d_steps": 1, "loss.r1_gamma": 0.0,
                                              "loss.r1_interval": 1})
    trainer = make_trainer(cfg, tmp_path)
    assert trainer.speed.compile.on
    trainer.train_iteration()  # compiled without R1 first, as a run that starts without it
    assert "r1_gamma = 0.2" in apply_mitigation(trainer, "double_r1", 1)
    trainer.clear_metrics()
    before = d_weights(trainer)
    trainer.train_iteration()
    r1 = trainer.take_metrics()["r1"]
    assert r1 > 0 and torch.isfinite(torch.tensor(r1))
    assert any(not torch.equal(a, b) for a, b in zip(d_weights(trainer), before))


def test_a_compiled_run_compiles_one_graph_of_g(tmp_path, digits_shards):
    """The D step's fakes come from G's training graph, detached: a no_grad call would compile a second, inference
    graph of G (dynamo guards on grad mode), ~25 s more per process for the demo's model. G once, D twice (its
    parameters train in the D step and are frozen in the G step): three graphs."""
    import torch._dynamo

    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.compile": "true", "loss.d_steps": 1, "loss.r1_gamma": 0.0})
    trainer = make_trainer(cfg, tmp_path)
    torch._dynamo.reset()  # earlier tests' compiled code and counts (other graphs, other guards) do not count here
    torch._dynamo.utils.counters.clear()
    graphs = torch._dynamo.utils.counters["stats"]
    for _ in range(2):
        trainer.train_iteration()
    assert graphs["unique_graphs"] == 3, dict(graphs)
    fresh = trainer.fresh_fakes(*trainer.sample_latents(cfg.data.batch_size))
    assert not fresh.requires_grad and fresh.grad_fn is None  # outside G's graph: D's loss cannot reach G
    assert graphs["unique_graphs"] == 3, dict(graphs)


def test_building_the_engines_prints_no_deepspeed_banner_and_keeps_other_output(tmp_path, digits_shards, capsys):
    """DeepSpeed prints "DeepSpeed ... built successfully" once per process, when its comm backend first loads its
    shared-memory op: a fresh interpreter, or this test could not fail."""
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.engines import _without_ds_banner

    shards, n = digits_shards
    script = (
        "import sys; from tests.trainer_harness import make_trainer, tiny_config; from pathlib import Path\n"
        f"tmp = Path({str(tmp_path)!r}); cfg = tiny_config(tmp, {shards!r}, {n})\n"
        "make_trainer(cfg, tmp); print('engines built')\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "engines built" in out.stdout and "built successfully" not in out.stdout + out.stderr
    with _without_ds_banner():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else a user must see")
    assert capsys.readouterr().out == "something else a user must see\n"
