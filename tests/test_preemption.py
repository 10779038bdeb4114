"""Preemption for real: signals to a process that trains, agreement across two gloo ranks, the preStop command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch.multiprocessing as mp

from pipeline import preemption, process_group
from pipeline.checkpoint import CheckpointStore
from tests.conftest import ROOT, free_port

SCRIPT = str(ROOT / "tests" / "train_in_process.py")


def _start(tmp_path, shards, n, *overrides, registry=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    if registry:
        env[preemption.REGISTRY_ENV] = str(registry)
    sets = [a for o in ("train.log_every=1", "train.steps=30", "train.checkpoint_every=1000", *overrides)
            for a in ("--set", o)]
    return subprocess.Popen([sys.executable, SCRIPT, str(tmp_path), shards, str(n), *sets], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc, marker: str, timeout: float = 240) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} not seen:\n{''.join(lines[-30:])}")


def test_sigterm_stops_at_a_step_boundary_commits_and_the_rerun_resumes(tmp_path, digits_shards):
    shards, n = digits_shards
    registry = tmp_path / "registry"
    proc = _start(tmp_path, shards, n, registry=registry)
    _read_until(proc, "[step 3/30]")
    # what a Kubernetes preStop hook runs: signal every registered trainer on this host, wait for the commit
    hook = subprocess.run([sys.executable, "-m", "pipeline.preemption", "signal-local", "--wait", "120"],
                          env={**os.environ, "PYTHONPATH": str(ROOT), preemption.REGISTRY_ENV: str(registry)},
                          capture_output=True, text=True, timeout=180)
    assert hook.returncode == 0, hook.stdout + hook.stderr
    assert "SIGTERM -> pid" in hook.stdout and "committed and exited" in hook.stdout
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == preemption.EXIT_PREEMPTED, rest
    seen = max(int(line.split("/")[0].split()[-1]) for line in rest.splitlines() if line.startswith("[step "))
    stopped = CheckpointStore(str(tmp_path / "ckpt")).latest().step
    assert stopped == seen, "the stop checkpoint is the last step trained: nothing done is lost"
    assert stopped < 30 and "[preempted]" in rest and "SIGTERM" in rest
    assert not list(registry.glob("*.json")), "the trainer unregisters when it has exited"

    again = _start(tmp_path, shards, n)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"[resume] from step {stopped}" in out and "[result] finished 30" in out


def test_sigint_then_time_cadence(tmp_path, digits_shards):
    """Ctrl-C is a preemption too; train.checkpoint_every_minutes commits on time, not only on steps."""
    shards, n = digits_shards
    proc = _start(tmp_path, shards, n, "train.checkpoint_every_minutes=0.0001")
    _read_until(proc, "[step 4/30]")
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == preemption.EXIT_PREEMPTED, out
    steps = [c.step for c in CheckpointStore(str(tmp_path / "ckpt")).list()]
    assert len(steps) >= 3, f"time cadence: expected a checkpoint nearly every step, got {steps}"


def _rank(rank: int, port: int, out, stop_rank: int, stop_at: int):
    os_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}
    os.environ.update(os_env)
    process_group.join("gloo", rank=rank, world_size=2)
    agree = preemption.StopAgreement(rank, 2, every_minutes=0.0 if rank else 1e-9)
    saves, stop = [], None
    for step in range(1, 30):
        time.sleep(0.01 * (rank + 1))  # the ranks run at different speeds
        if rank == stop_rank and step == stop_at:
            preemption.request_stop("test")
        b = agree.check()
        if b.save:
            saves.append(step)
            agree.saved()
        if b.stop:
            stop = step
            break
    agree.close()
    out.put((rank, stop, saves))
    process_group.leave()


def test_ranks_agree_on_the_stop_step_and_the_time_cadence():
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out, 1, 5)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (_, stop0, saves0), (_, stop1, saves1) = results
    assert stop0 == stop1 == 6, results  # flagged at boundary 5 on rank 1 only, agreed one boundary later
    assert saves0 == saves1 and saves0, results  # rank 0's clock, the same steps everywhere


def test_a_sigterm_after_training_ended_is_the_shutdown_not_a_preemption(capsys):
    # Ray terminates a finished worker with SIGTERM: there is no step boundary left to stop at
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert preemption.install_handlers()
        preemption.training_over()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert not preemption.requested() and "[preempt]" not in capsys.readouterr().out
        preemption.reset()  # a relaunched trainer in this process is preemptible again
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.requested() and "[preempt] SIGTERM received" in capsys.readouterr().out
    finally:
        preemption.reset()
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
