"""Preemption: a SIGTERM or SIGINT anywhere becomes one agreed stop, a committed checkpoint and a clean exit.

Three parts:
- `install_handlers()` turns SIGTERM/SIGINT into a flag in this process (`requested()`); call it on the main
  thread of every process that trains or drives training (signal handlers live there). On Ray Train workers
  the training function runs in a thread, so `PreemptibleTorchConfig` installs the handlers through the
  backend, which runs on each worker actor's main thread, replacing Ray's own handler (which exits at once).
- `StopAgreement` makes every rank stop at the same step boundary: at each boundary a rank launches an
  asynchronous all-reduce (MAX) of [stop requested here, time checkpoint due (rank 0's clock)] on a CPU
  (gloo) group of its own and reads the previous boundary's result. So no rank waits on the network or on
  the GPU between steps, and all ranks see the same result at the same step: a stop costs at most one
  iteration.
- A registry of trainer processes on this host (pid files under `$BIGGAN_TRAINER_REGISTRY`, default
  /tmp/biggan-trainers) for `python -m pipeline.preemption signal-local --wait SECONDS`, the command a
  Kubernetes preStop hook runs: it signals every registered trainer and waits until each has committed its
  checkpoint and exited.

Exit codes of the launch scripts (pipeline/cli.py): 0 finished, 1 crashed, 2 bad arguments or config,
3 collapsed, 75 preempted (EX_TEMPFAIL: run the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: a temporary failure, the same command will resume
EXIT_COLLAPSED = 3
EXIT_DATA_FAULT = 65  # EX_DATAERR: more data lost than data.max_bad_fraction; no retry would help
REGISTRY_ENV = "BIGGAN_TRAINER_REGISTRY"
DEFAULT_REGISTRY = "/tmp/biggan-trainers"

_requested = threading.Event()
_reason: list[str] = []
_over = threading.Event()


# -- this process --------------------------------------------------------------------------------------------
def request_stop(reason: str) -> None:
    """Ask this process's training to stop at the next agreed step boundary (signal handlers, watchers)."""
    if not _requested.is_set():
        _reason.append(reason)
        _requested.set()


def requested() -> bool:
    return _requested.is_set()


def reason() -> str:
    return _reason[0] if _reason else ""


def reset() -> None:
    """Forget a stop request (a driver that relaunches the workers after they stopped)."""
    _requested.clear()
    _reason.clear()
    _over.clear()


def training_over() -> None:
    """No step boundary is left in this process: a signal now is its shutdown, with nothing to commit."""
    _over.set()


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _over.is_set() and signum == signal.SIGTERM:
        log.debug("%s after training ended: nothing to stop", name)
        return
    if requested() and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
    if requested():
        log.warning("%s again: already stopping at the next step boundary", name)
        return
    print(f"[preempt] {name} received (pid {os.getpid()}): stopping at the next step boundary", flush=True)
    request_stop(f"{name} to pid {os.getpid()}")


def install_handlers() -> bool:
    """SIGTERM and SIGINT set the stop flag instead of killing the process; False off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("signal handlers not installed: not on the main thread")
        return False
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return True


# -- every rank agrees ---------------------------------------------------------------------------------------
@dataclass
class Boundary:
    stop: bool = False  # every rank stops here (after committing a checkpoint)
    save: bool = False  # train.checkpoint_every_minutes has passed on rank 0's clock


class StopAgreement:
    """Per-step agreement on preemption and the time-based checkpoint cadence, one step late and never blocking."""

    def __init__(self, rank: int, world_size: int, every_minutes: float = 0.0):
        self.rank, self.world_size = rank, world_size
        self.every_s = every_minutes * 60.0
        self.last_save_t = time.monotonic()
        self.saves = 0  # commits so far; a time flag launched before the latest commit is stale
        self._pending: tuple[object, object, int] | None = None
        import torch.distributed as dist  # here, not at the top: the preStop command must start fast

        # a CPU group of its own: the flag never touches the GPU and never queues behind gradient all-reduces
        self.group = dist.new_group(backend="gloo") if world_size > 1 and dist.is_initialized() else None

    def _local_flags(self):
        import torch

        due = self.rank == 0 and self.every_s > 0 and time.monotonic() - self.last_save_t >= self.every_s
        return torch.tensor([1.0 if requested() else 0.0, 1.0 if due else 0.0])

    def check(self) -> Boundary:
        """Call once per step boundary on every rank: the verdict on the previous boundary's flags."""
        out = Boundary()
        if self._pending is not None:
            work, flags, saves_then = self._pending
            if work is not None:
                work.wait()
            out.stop = flags[0].item() > 0
            out.save = flags[1].item() > 0 and saves_then == self.saves
        flags = self._local_flags()
        import torch.distributed as dist

        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True) if self.group else None
        self._pending = (work, flags, self.saves)
        return out

    def saved(self) -> None:
        """Every rank, after each committed checkpoint (step cadence, time cadence, rollback, stop)."""
        self.saves += 1
        self.last_save_t = time.monotonic()

    def close(self) -> None:
        """Finish the collective in flight (every rank issues it, so every rank must wait for it)."""
        if self._pending is not None and self._pending[0] is not None:
            self._pending[0].wait()
        self._pending = None


# -- Ray Train workers ---------------------------------------------------------------------------------------
def preemptible_torch_config(backend: str):
    """Ray Train's TorchConfig, plus the stop-flag signal handlers on every worker's main thread."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            # first: the process group's rendezvous takes seconds, and until then Ray's handler exits at once
            # (signals before this point cannot be caught: README, "Signals that come early")
            worker_group.execute(install_handlers)
            super().on_start(worker_group, backend_config)

    class PreemptibleTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _Backend

    return PreemptibleTorchConfig(backend=backend)


class StopBoard:
    """A named Ray actor: the driver posts a stop there and every worker's watcher thread sees it.

    An actor rather than a file: workers on other nodes share no filesystem with the driver, and polling an
    object store every second from every worker costs requests; an actor call is one RPC in the cluster."""

    def __init__(self):
        self.why = ""

    def post(self, why: str) -> None:
        self.why = self.why or why

    def read(self) -> str:
        return self.why

    def clear(self) -> None:
        self.why = ""


def board_name(run_name: str) -> str:
    return f"biggan-stop-{run_name}"


def open_board(run_name: str):
    """The driver: create (or reuse) the run's stop board."""
    import ray

    return ray.remote(num_cpus=0)(StopBoard).options(name=board_name(run_name), get_if_exists=True).remote()


def forward_to_board(board, poll_s: float = 0.2) -> threading.Thread:
    """The driver: post this process's stop request (from its signal handler) to the board, off the handler."""
    import ray

    def run():
        while not _requested.wait(poll_s):
            pass
        ray.get(board.post.remote(reason() or "driver stop"))
        log.info("stop request posted to the workers: %s", reason())

    t = threading.Thread(target=run, name="stop-forwarder", daemon=True)
    t.start()
    return t


def watch_board(run_name: str, poll_s: float = 1.0) -> threading.Thread | None:
    """A worker: poll the run's stop board and raise this process's stop flag when the driver posts."""
    import ray

    try:
        board = ray.get_actor(board_name(run_name))
    except ValueError:
        log.warning("no stop board for run %s: only signals to this worker stop it", run_name)
        return None

    def run():
        while not requested():
            try:
                why = ray.get(board.read.remote(), timeout=30)
            except Exception as err:  # noqa: BLE001 - the driver is gone; the job ends anyway
                log.warning("stop board unreachable: %s", err)
                return
            if why:
                request_stop(f"driver: {why}")
                return
            time.sleep(poll_s)

    t = threading.Thread(target=run, name="stop-watcher", daemon=True)
    t.start()
    return t


# -- the trainers on this host (Kubernetes preStop) ----------------------------------------------------------
def registry_dir() -> Path:
    return Path(os.environ.get(REGISTRY_ENV, DEFAULT_REGISTRY))


class Registration:
    """While alive, `<registry>/<pid>.json` says a trainer process runs here; removed when it has exited."""

    def __init__(self, run_name: str, role: str, rank: int = 0):
        self.path = registry_dir() / f"{os.getpid()}.json"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"pid": os.getpid(), "run_name": run_name, "role": role, "rank": rank,
                                             "started": time.time()}))
        except OSError as err:
            log.warning("could not register trainer pid in %s: %s", self.path.parent, err)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def registered() -> list[dict]:
    """Live registered trainer processes on this host; stale files (a killed process) are removed."""
    out = []
    root = registry_dir()
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _alive(int(entry["pid"])):
            out.append(entry)
        else:
            path.unlink(missing_ok=True)
    return out


def signal_local(wait_s: float = 0.0, sig: int = signal.SIGTERM) -> int:
    """Signal every registered trainer on this host; wait up to wait_s for them to commit and exit.

    Returns the number still running when the wait ended (0 = all committed and gone)."""
    entries = registered()
    for e in entries:
        try:
            os.kill(int(e["pid"]), sig)
            print(f"[preempt] {signal.Signals(sig).name} -> pid {e['pid']} ({e['role']} rank {e['rank']}, "
                  f"run {e['run_name']})", flush=True)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    left = [e for e in entries if _alive(int(e["pid"])) and (registry_dir() / f"{e['pid']}.json").exists()]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [e for e in left if _alive(int(e["pid"])) and (registry_dir() / f"{e['pid']}.json").exists()]
    if not entries:
        print(f"[preempt] no trainer registered in {registry_dir()}", flush=True)
    elif left:
        print(f"[preempt] {len(left)} trainer(s) still running after {wait_s:.0f}s", flush=True)
    else:
        print(f"[preempt] all {len(entries)} trainer(s) committed and exited", flush=True)
    return len(left)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.preemption",
        description="Preemption tools. `signal-local` is what a Kubernetes preStop hook runs: it sends SIGTERM "
                    "to every trainer process registered on this host (driver and Ray Train workers), which stop "
                    "at the same step, commit a checkpoint and exit; rerunning the job resumes there.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("signal-local", help="signal every trainer on this host and wait for their checkpoint")
    s.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for them to commit and exit (keep it under the pod's grace period)")
    s.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGINT"])
    sub.add_parser("list", help="print the trainer processes registered on this host")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for e in registered():
            print(json.dumps(e))
        return 0
    left = signal_local(args.wait, getattr(signal, args.signal))
    return 1 if left else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
