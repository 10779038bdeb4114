"""Fault drills: drive the embedded default through each fault and print one table.

    python bench/faults.py                 # every row (tens of minutes on 2 CPU cores; starts Ray: use the lock)
    python bench/faults.py --list          # the rows
    python bench/faults.py --only sigterm-driver --only nan-between-log-steps

Each row injects a real fault into a real run of `launch/demo.py` (a tiny BigGAN, 2 Ray workers on an embedded
local Ray on 127.0.0.1, real shards, MLflow) or of an in-process trainer, then judges:
- survived: the run reached its last step (after the same command was run again where a fault ends a process),
  and what the row protects held (no code ran, no good checkpoint deleted, metrics arrived);
- iterations lost: iterations trained before the fault that had to be trained again;
- samples lost: real images the run never saw because of the fault (the `data/skipped` metric where it is
  logged, otherwise what was made unreadable);
- seconds to recover: from the fault to the first training step after it.
Targets (issue #12): every row survived; at most one iteration lost to a signal, at most one checkpoint
interval to a kill; no samples lost beyond the bad ones.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ["--set", "model.g_ch=4", "--set", "model.d_ch=4", "--set", "model.dim_z=16", "--set", "model.shared_dim=8",
        "--set", "data.batch_size=8", "--set", "train.global_batch=16", "--set", "data.backend=wds",
        "--set", "train.log_every=1", "--set", "train.sample_every=1000", "--set", "cluster.max_failures=2",
        "--set", "eval.every=0", "--set", "eval.truncation_sweep=", "--set", "eval.cas_samples=0"]  # the demo's evaluations are not what these runs test
STEP = re.compile(r"\[step (\d+)/(\d+)\]")  # worker lines come prefixed by Ray
EXIT_PREEMPTED = 75


@dataclass
class Row:
    fault: str
    survived: bool
    iterations_lost: int | None = None
    samples_lost: int | None = None
    seconds_to_recover: float | None = None
    note: str = ""


# -- a launch of the demo, watched line by line ----------------------------------------------------------------
class Launch:
    def __init__(self, ctx: Context, steps: int, *args: str, name: str | None = "faults", env: dict | None = None):
        self.ctx = ctx
        cmd = [sys.executable, "launch/demo.py", "--data", ctx.shards, *TINY, "--set", f"train.steps={steps}",
               "--set", f"train.output_dir={ctx.work / 'runs'}", *(["--run-name", name] if name else []), *args]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "MLFLOW_TRACKING_URI": ctx.tracking_uri, "BIGGAN_TRAINER_REGISTRY": str(ctx.work / "registry"),
                    **(env or {})}
        # an in-process row leaves this process's torch.distributed variables behind: not for the launch
        for key in ("RAY_ADDRESS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            full_env.pop(key, None)
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))
            if self.ctx.verbose:
                print(f"    | {line}", end="", flush=True)

    def wait_for(self, pattern: str, timeout: float = 300, after: float = 0.0) -> tuple[float, re.Match]:
        rx, deadline, seen = re.compile(pattern), time.time() + timeout, 0
        while time.time() < deadline:
            for t, line in self.lines[seen:]:
                seen += 1
                m = rx.search(line)
                if m and t >= after:
                    return t, m
            if self.proc.poll() is not None and not self._reader.is_alive() and seen >= len(self.lines):
                break
            time.sleep(0.1)
        raise TimeoutError(f"{pattern!r} not seen; last lines:\n" + "\n".join(s for _, s in self.lines[-15:]))

    def last_step(self, before: float | None = None) -> int:
        steps = [int(m.group(1)) for t, s in self.lines if (m := STEP.search(s)) and (before is None or t <= before)]
        return max(steps) if steps else 0

    def first_step_after(self, t0: float) -> float | None:
        return next((t for t, s in self.lines if t > t0 and STEP.search(s)), None)

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    @property
    def text(self) -> str:
        return "\n".join(s for _, s in self.lines)


@dataclass
class Context:
    work: Path
    shards: str
    tracking_uri: str
    outage_s: float
    verbose: bool

    def fresh(self, row: str) -> Context:
        work = self.work / row
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return Context(work, self.shards, f"sqlite:///{work / 'mlflow.db'}", self.outage_s, self.verbose)

    def store(self, name: str = "faults"):
        from pipeline.checkpoint import CheckpointStore

        return CheckpointStore(str(self.work / "runs" / name / "checkpoints"))

    def workers(self) -> dict[int, int]:
        out = {}
        for f in (self.work / "registry").glob("*.json"):
            try:
                e = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if e["role"] == "worker":
                out[e["rank"]] = e["pid"]
        return out

    def mlflow_runs(self, name: str = "faults"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name("biggan")
        if exp is None:
            return client, []
        return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`biggan.run_name` = '{name}'")

    def metric_steps(self, key: str = "g_loss", name: str = "faults") -> set[int]:
        client, runs = self.mlflow_runs(name)
        return {m.step for r in runs for m in client.get_metric_history(r.info.run_id, key)}


def _wait_workers(ctx: Context, n: int = 2, timeout: float = 60) -> dict[int, int]:
    deadline = time.time() + timeout
    while len(ctx.workers()) < n and time.time() < deadline:
        time.sleep(0.2)
    return ctx.workers()


# -- signals and kills ---------------------------------------------------------------------------------------------
def row_sigterm_driver(ctx: Context) -> Row:
    """SIGTERM to the driver: every rank stops and commits, exit 75; the same command resumes."""
    run = Launch(ctx, 20)
    run.wait_for(r"\[step 4/")
    t0 = time.time()
    os.kill(run.proc.pid, signal.SIGTERM)
    rc = run.wait()
    stopped = ctx.store().latest().step
    lost = max(0, run.last_step() - stopped)
    again = Launch(ctx, 20)
    rc2 = again.wait()
    t1 = again.first_step_after(t0)
    _, runs = ctx.mlflow_runs()
    ok = rc == EXIT_PREEMPTED and rc2 == 0 and f"[resume] from step {stopped}" in again.text and len(runs) == 1
    return Row("SIGTERM to the driver", ok, lost, 0, t1 - t0 if t1 else None,
               f"exit {rc} then {rc2}; stopped at step {stopped}; {len(runs)} MLflow run(s)")


def _signal_worker(ctx: Context, sig: int, label: str, *args: str) -> Row:
    run = Launch(ctx, 20, *args)
    run.wait_for(r"\[step 7/")
    pid = _wait_workers(ctx)[1]
    t0 = time.time()
    os.kill(pid, sig)
    t_resume, m = run.wait_for(r"\[resume\] from step (\d+)", after=t0)
    resumed = int(m.group(1))
    lost = max(0, run.last_step(before=t_resume) - resumed)
    rc = run.wait()
    t1 = run.first_step_after(t_resume)
    _, runs = ctx.mlflow_runs()
    ok = rc == 0 and "[finished] step 20" in run.text and len(runs) == 1
    return Row(label, ok, lost, 0, t1 - t0 if t1 else None,
               f"exit {rc}; resumed at step {resumed}; {len(runs)} MLflow run(s)")


def row_sigterm_worker(ctx: Context) -> Row:
    """SIGTERM to rank 1 (a node drain): all ranks stop and commit, the driver relaunches the group."""
    return _signal_worker(ctx, signal.SIGTERM, "SIGTERM to a worker")


def row_sigkill_worker(ctx: Context) -> Row:
    """SIGKILL of rank 1: Ray restarts the group (max_failures) from the last checkpoint (every 5 steps)."""
    return _signal_worker(ctx, signal.SIGKILL, "SIGKILL of a worker", "--set", "train.checkpoint_every=5")


def row_resubmit_after_driver_died(ctx: Context) -> Row:
    """The driver (and with it the embedded head) dies without a word; the same command, no --run-name."""
    run = Launch(ctx, 20, "--set", "train.checkpoint_every=5", name=None)
    run.wait_for(r"\[step 8/")
    t0 = time.time()
    run.kill()  # SIGKILL to the whole process group: driver, head, workers
    seen = run.last_step()
    again = Launch(ctx, 20, "--set", "train.checkpoint_every=5", name=None)
    rc = again.wait()
    m = re.search(r"\[resume\] from step (\d+)", again.text)
    resumed = int(m.group(1)) if m else 0
    t1 = again.first_step_after(t0)
    ok = rc == 0 and resumed > 0 and "[finished] step 20" in again.text
    # the driver prints worker lines with a lag: the step it had shown may be behind the last checkpoint
    return Row("resubmission after the driver died", ok, max(0, seen - resumed), 0, t1 - t0 if t1 else None,
               f"exit {rc}; resumed at step {resumed} (default run name)")


# -- health ----------------------------------------------------------------------------------------------------
def _in_process_trainer(ctx: Context, **overrides):
    import torch

    from data_prep.shard_format import read_manifest
    from pipeline import config as C
    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.engines import init_single_process_group
    from pipeline.presets import get_preset
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    cfg = get_preset("demo")
    cfg.data.shards, cfg.data.backend = ctx.shards, "wds"
    cfg.model.num_classes = read_manifest(ctx.shards).num_classes
    cfg.model.g_ch, cfg.model.d_ch, cfg.model.dim_z, cfg.model.shared_dim = 4, 4, 16, 8
    cfg.data.batch_size, cfg.train.global_batch, cfg.cluster.num_workers = 8, 8, 1
    cfg.train.output_dir = str(ctx.work / "out")
    cfg.eval = type(cfg.eval)()  # no evaluations
    C.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
    C.validate(cfg)
    init_single_process_group()
    torch.set_num_threads(1)

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(cfg.data.shards, batch_size=cfg.data.batch_size, backend="wds", seed=seed,
                            resolution=cfg.model.resolution, start_epoch=epoch, start_offset=offset, device="cpu")

    return Trainer(cfg, make_loader=make_loader, store=CheckpointStore(str(ctx.work / "ckpt")),
                   tracker=Tracker("", "", "", enabled=False), device=torch.device("cpu"))


def row_nan_between_log_steps(ctx: Context) -> Row:
    """One NaN in D between two log steps (log_every 4, health.every 2), in-process trainer."""
    import torch

    trainer = _in_process_trainer(ctx, **{"train.steps": 16, "train.log_every": 4, "health.every": 2,
                                          "health.min_history": 3, "health.healthy_after": 2,
                                          "train.checkpoint_every": 4, "train.sample_every": 1000})
    marks: dict[str, float] = {}
    step_once = trainer.train_iteration

    def iteration():
        step_once()
        if trainer.step == 9 and "poison" not in marks:
            marks["poison"] = time.time()
            with torch.no_grad():
                next(trainer.D.parameters()).fill_(float("nan"))
        elif "poison" in marks and "back" not in marks and trainer.rollbacks:
            marks["back"] = time.time()

    trainer.train_iteration = iteration
    result = trainer.fit()
    lost = sum(f - t for f, t in trainer.rollback_log if t >= 0)
    ok = result["status"] == "finished" and result["rollbacks"] == 1
    return Row("NaN between log steps", ok, lost, 0, marks["back"] - marks["poison"] if "back" in marks else None,
               f"{result['status']}, {result['rollbacks']} rollback(s): {trainer.rollback_log}")


def row_collapse_before_first_healthy(ctx: Context) -> Row:
    """--inject-collapse-at 6 with checkpoint_every 100: only the initial weights to return to."""
    run = Launch(ctx, 24, "--inject-collapse-at", "6", "--set", "health.every=2", "--set", "health.min_history=2",
                 "--set", "train.checkpoint_every=100")
    rc = run.wait()
    m = re.search(r"rolled back from step (\d+) to (\d+)", run.text)
    t_alarm = next((t for t, s in run.lines if "[health] collapse" in s), None)
    t1 = run.first_step_after(t_alarm) if t_alarm else None
    ok = rc == 0 and m is not None and "[finished] step 24" in run.text
    lost = int(m.group(1)) - int(m.group(2)) if m else None
    return Row("collapse before the first healthy checkpoint", ok, lost, 0,
               t1 - t_alarm if t1 and t_alarm else None, f"exit {rc}; {m.group(0) if m else 'no rollback'}")


# -- the checkpoint store (h2's fixes) ---------------------------------------------------------------------------
def row_corrupt_newest_checkpoint(ctx: Context) -> Row:
    """Bytes overwritten in the newest checkpoint's trainer.pt; the rerun must fall back to the previous one."""
    first = Launch(ctx, 10, "--set", "train.checkpoint_every=5")
    first.wait()
    newest = ctx.store().latest()
    with open(Path(newest.path) / "trainer.pt", "r+b") as f:  # bit rot in the middle of the file
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x00garbage\x00")
    t0 = time.time()
    again = Launch(ctx, 15, "--set", "train.checkpoint_every=5")
    rc = again.wait()
    m = re.search(r"\[resume\] from step (\d+)", again.text)
    resumed = int(m.group(1)) if m else 0
    t1 = again.first_step_after(t0)
    ok = rc == 0 and "[finished] step 15" in again.text and resumed > 0
    return Row("corrupt newest checkpoint", ok, newest.step - resumed if m else None, 0, t1 - t0 if t1 else None,
               f"exit {rc}; resumed at step {resumed if m else '-'} after corrupting step {newest.step}")


def row_unreadable_labels(ctx: Context) -> Row:
    """labels.json unreadable (a directory in its place) for a while; retention must not delete good copies."""
    health = ["--set", "health.every=1", "--set", "health.min_history=2", "--set", "health.healthy_after=1",
              "--set", "train.checkpoint_every=3", "--set", "train.keep_last=1"]
    Launch(ctx, 9, *health).wait()
    store = ctx.store()
    before = store.labels()
    protected = max(before["healthy"]) if before.get("healthy") else None
    present = [c.step for c in store.list()]
    labels = Path(store.root) / "labels.json"
    saved = labels.read_bytes()
    # broken before the run resumes, not when the driver shows some step: its worker lines lag the workers,
    # which may have retired that checkpoint rightly (newer healthy ones) by the time the fault would land
    labels.unlink()
    labels.mkdir()  # reading it now fails with an error that is not "not found"
    again = Launch(ctx, 24, *health)
    again.wait_for(r"\[step 14/", timeout=300)
    # judged while the file is unreadable: once it reads again, newer healthy checkpoints may rightly retire it
    now = [c.step for c in store.list()]
    kept = protected is not None and all(s in now for s in present)
    labels.rmdir()
    tmp = labels.with_suffix(".restore")
    tmp.write_bytes(saved)
    tmp.replace(labels)
    rc = again.wait()
    final = store.labels()
    newest = max(final["healthy"]) if final.get("healthy") else None
    held = newest is not None and newest > 9 and newest in [c.step for c in store.list()]
    return Row("unreadable labels.json", rc == 0 and kept and "[finished] step 24" in again.text and held, 0, 0,
               None, f"exit {rc}; checkpoints {present} (newest healthy {protected}) "
               f"{'all kept' if kept else 'NOT all kept: ' + str(now)} while unreadable (resumed from 9 to 14+); "
               f"at the end newest healthy {newest} {'present' if held else 'MISSING or not newer than 9'}")


def row_planted_pickle(ctx: Context) -> Row:
    """trainer.pt replaced by a pickle payload (COMMITTED rewritten to match); loading must run no code."""
    import hashlib

    import torch

    Launch(ctx, 6, "--set", "train.checkpoint_every=3").wait()
    newest = ctx.store().latest()
    marker = ctx.work / "payload-ran"
    path = Path(newest.path) / "trainer.pt"
    torch.save({"step": newest.step, "payload": _Payload(str(marker))}, path)
    meta_path = Path(newest.path) / "COMMITTED"
    meta = json.loads(meta_path.read_text())  # whoever can write the prefix can rewrite the record too
    meta["files"]["trainer.pt"] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    meta_path.write_text(json.dumps(meta))
    again = Launch(ctx, 9, "--set", "train.checkpoint_every=3")
    rc = again.wait()
    ran = marker.exists()
    named = "trainer.pt" in again.text
    return Row("planted-pickle checkpoint", not ran and (rc == 0 or named), None, 0, None,
               f"exit {rc}; payload {'RAN' if ran else 'did not run'}; error names the file: {named}")


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# -- tracking (h2's fixes) -----------------------------------------------------------------------------------------
def _server(ctx: Context):
    from tests.conftest import MlflowServer

    return MlflowServer(ctx.work / "mlflow").start()


def row_tracking_down(ctx: Context) -> Row:
    """The MLflow server stopped for --outage-s mid-run, then started again; every metric must arrive."""
    (ctx.work / "mlflow").mkdir()
    server = _server(ctx)
    ctx.tracking_uri = server.uri
    steps = 30
    try:
        run = Launch(ctx, steps, "--set", "tracking.retries=2")
        run.wait_for(r"\[step 3/")
        server.stop()
        t0 = time.time()
        deadline = t0 + ctx.outage_s
        while time.time() < deadline and run.proc.poll() is None:
            time.sleep(1)
        ended_during = run.proc.poll() is not None or "[finished]" in run.text
        server.start()
        t_back = time.time()
        rc = run.wait(timeout=900)
        t_sent = time.time()  # the run's close returns once its backlog is sent
        got = ctx.metric_steps()
    finally:
        server.stop()
    missing = sorted(set(range(1, steps + 1)) - got)
    ok = rc == 0 and not missing
    when = "after training ended (its close waited)" if ended_during else "while training went on"
    return Row(f"tracking server down for {ctx.outage_s:.0f} s", ok, 0, 0, None,
               f"exit {rc}; {len(missing)} of {steps} logged steps missing in MLflow; the server came back "
               f"{when}, backlog sent {t_sent - t_back:.0f} s after")


def row_tracking_4xx(ctx: Context) -> Row:
    """The MLflow run deleted mid-run (every later call answers 400); tracking must go on."""
    (ctx.work / "mlflow").mkdir()
    server = _server(ctx)
    ctx.tracking_uri = server.uri
    try:
        run = Launch(ctx, 20)
        run.wait_for(r"\[step 5/")
        client, runs = ctx.mlflow_runs()
        client.delete_run(runs[0].info.run_id)  # every later call for that run answers 400
        rc = run.wait()
        from mlflow.tracking import MlflowClient

        c = MlflowClient(server.uri)
        exp = c.get_experiment_by_name("biggan")
        alive = c.search_runs([exp.experiment_id], filter_string="tags.`biggan.run_name` = 'faults'")
        late = any(m.step >= 15 for r in alive for m in c.get_metric_history(r.info.run_id, "g_loss"))
    finally:
        server.stop()
    return Row("tracking 4xx (run deleted)", rc == 0 and late, 0, 0, None,
               f"exit {rc}; metrics after the fault reached a live run: {late}")


# -- data (h7's fixes) ---------------------------------------------------------------------------------------------
def _copy_shards(ctx: Context) -> Path:
    dst = ctx.work / "shards"
    shutil.copytree(ctx.shards, dst)
    return dst


def _corrupt_one_jpeg(shards: Path) -> int:
    """Rewrite one shard as a foreign writer would: one sample's JPEG cut to garbage, a fresh index, the manifest's
    digest updated (a writer that checks nothing). Returns the number of bad samples (1)."""
    from data_prep.shard_format import sha256_file, write_index_file

    shard = sorted(shards.glob("*.tar"))[1]
    tmp = shard.with_suffix(".tmp")
    with tarfile.open(shard) as src, tarfile.open(tmp, "w") as dst:
        done = False
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if not done and member.name.endswith(".jpg"):
                data, done = data[:40] + b"\x00not a jpeg\x00" * 4, True
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    tmp.replace(shard)
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard.name:
            if entry.get("index"):
                write_index_file(str(shard), str(shards / entry["index"]))
            entry["sha256"], entry["bytes"] = sha256_file(str(shard)), shard.stat().st_size
    path.write_text(json.dumps(manifest, indent=1))
    return 1


def _corrupt_jpeg_row(ctx: Context, backend: str) -> Row:
    shards = _copy_shards(ctx)
    bad = _corrupt_one_jpeg(shards)
    ctx.shards = str(shards)
    run = Launch(ctx, 40, "--set", f"data.backend={backend}")
    rc = run.wait()
    _, runs = ctx.mlflow_runs()
    skipped = int(runs[0].data.metrics.get("data/skipped", -1)) if runs else None
    ok = rc == 0 and "[finished] step 40" in run.text
    return Row(f"corrupt JPEG in a foreign shard ({backend})", ok, 0, skipped if skipped is not None and skipped >= 0
               else None, None, f"exit {rc}; {bad} bad sample; data/skipped = {skipped}")


def row_corrupt_jpeg_dali(ctx: Context) -> Row:
    """One corrupt JPEG in a shard make_shards did not write, data.backend=dali-cpu."""
    return _corrupt_jpeg_row(ctx, "dali-cpu")


def row_corrupt_jpeg_wds(ctx: Context) -> Row:
    """One corrupt JPEG in a shard make_shards did not write, data.backend=wds."""
    return _corrupt_jpeg_row(ctx, "wds")


def row_shard_deleted(ctx: Context) -> Row:
    """One shard file deleted while the run reads them (shards of 16: one is within data.max_bad_fraction)."""
    from data_prep.make_shards import make_shards
    from data_prep.shard_format import read_manifest

    # the default budget (1% of the set) must hold one lost shard: the 300-sample shards of the other rows
    # are 17% of digits each, and past the budget the run rightly stops with an error naming the shard
    shards = ctx.work / "shards16"
    make_shards("digits", str(shards), resolution=32, shard_size=16, workers=0, progress=False)
    ctx.shards = str(shards)
    manifest = read_manifest(str(shards))
    entry = manifest.shards[len(manifest.shards) // 2]
    victim, total = shards / entry.name, manifest.num_samples
    run = Launch(ctx, 60)
    run.wait_for(r"\[step 3/")
    victim.unlink()
    t0 = time.time()
    rc = run.wait(timeout=900)
    _, runs = ctx.mlflow_runs()
    m = runs[0].data.metrics if runs else {}
    bad, bad_samples = m.get("data/bad_shards"), m.get("data/bad_samples")
    t_q = next((t for t, s in run.lines if "quarantined from epoch" in s), None)
    ok = (rc == 0 and "[finished] step 60" in run.text and bad == 1 and bad_samples == 0 and t_q is not None
          and "[resume]" not in run.text)
    # training never stops for it: no time to recover; the note says when the ranks agreed on the quarantine
    when = f"{t_q - t0:.0f} s after the deletion (when next read)" if t_q else "NOT"
    return Row("a shard deleted mid-run", ok, 0, entry.count, None,
               f"exit {rc}; data/bad_shards = {bad}, data/bad_samples = {bad_samples}; {entry.name} "
               f"({entry.count} of {total} samples) quarantined {when}; no restart: {'[resume]' not in run.text}")


ROWS: dict[str, Callable[[Context], Row]] = {
    "sigterm-driver": row_sigterm_driver,
    "sigterm-worker": row_sigterm_worker,
    "sigkill-worker": row_sigkill_worker,
    "nan-between-log-steps": row_nan_between_log_steps,
    "collapse-before-healthy": row_collapse_before_first_healthy,
    "corrupt-newest-checkpoint": row_corrupt_newest_checkpoint,
    "unreadable-labels": row_unreadable_labels,
    "tracking-down": row_tracking_down,
    "tracking-4xx": row_tracking_4xx,
    "corrupt-jpeg-dali-cpu": row_corrupt_jpeg_dali,
    "corrupt-jpeg-wds": row_corrupt_jpeg_wds,
    "shard-deleted": row_shard_deleted,
    "planted-pickle": row_planted_pickle,
    "resubmit-after-driver-died": row_resubmit_after_driver_died,
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def table(rows: list[Row]) -> str:
    head = "| fault | survived | iterations lost | samples lost | seconds to recover | note |\n|---|---|---|---|---|---|"
    body = [f"| {r.fault} | {_fmt(r.survived)} | {_fmt(r.iterations_lost)} | {_fmt(r.samples_lost)} | "
            f"{_fmt(r.seconds_to_recover)} | {r.note} |" for r in rows]
    return "\n".join([head, *body])


def _digits_shards(work: Path) -> str:
    out = work / "digits-shards"
    if not (out / "manifest.json").exists():
        from data_prep.make_shards import make_shards

        make_shards("digits", str(out), resolution=32, shard_size=300, workers=0, progress=False)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], metavar="ROW", help="run only this row (repeatable)")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--data", help="shards to train on (default: scikit-learn digits at 32 px, made once)")
    p.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--outage-s", type=float, default=120.0, help="how long the tracking server is down")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="echo every line the runs print")
    args = p.parse_args(argv)
    if args.list:
        for name, fn in ROWS.items():
            print(f"{name:28s} {(fn.__doc__ or fn.__name__).splitlines()[0]}")
        return 0
    unknown = [r for r in args.only if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; --list shows them")
    work = Path(args.work or tempfile.mkdtemp(prefix="faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = Context(work, args.data or _digits_shards(work), "", args.outage_s, args.verbose)
    rows = []
    for name in args.only or list(ROWS):
        ctx = base.fresh(name)
        print(f"[faults] {name} ...", flush=True)
        t0 = time.time()
        try:
            row = ROWS[name](ctx)
        except Exception as err:  # noqa: BLE001 - a row that breaks is a row that did not survive
            print(f"[faults] {name} broke: {type(err).__name__}: {err}", flush=True)
            row = Row(name, False, note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        print(f"[faults] {name}: survived {_fmt(row.survived)} ({time.time() - t0:.0f}s) {row.note}", flush=True)
        rows.append(row)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.survived for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
