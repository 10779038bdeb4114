"""Does the health monitor catch the collapses that happen, and stay quiet on healthy runs? Provoked natural failures.

    python bench/detector.py                               # every recipe, then the healthy runs
    python bench/detector.py --only lr_g_high,late_lr --steps 300 --json detector.json
    python bench/detector.py --only healthy --healthy-steps 1000 --seeds 1,2,3

Each recipe is a set of real settings (config overrides), never injected tensors, on the embedded default scaled
down to fit 2 shared CPU cores: the demo preset's BigGAN with `model.g_ch=d_ch=8`, batch 16, `train.precision=bf16`
and channels_last, Fashion-MNIST at 32 px (bench/quality.py's shards), the real `Trainer.fit()` in this process
on one rank (gloo on 127.0.0.1), health checks every 5 G steps (the demo's cadence), with rollback and mitigation
as configured. `late_lr` trains with the base settings, then raises both learning rates 20x at `--late-at` (what a
user does who resumes with a new learning rate): a failure after a healthy phase.

Independent quality measure, offline: every `--snap-every` G steps the bench saves EMA G's weights to disk
(`<out>/<recipe>/snapshots/`); after training it scores each file with the dataset classifier (the cached one
the health check uses, trained once on 5,000 real images) on `--eval-samples` fresh samples (their own latents,
not the health batch): class fidelity (its accuracy) and FID in its features against the cached real statistics.
The run *failed* at the first snapshot (before the first rollback) where fidelity fell below 1.5 x chance after
having reached 3 x chance, or FID rose above 2 x its best so far, or the weights were not finite.

Per recipe the table gives: that onset step; the first alarm (step and rule); the delay in health checks
(target <= 2); what was restored (target: a step before the onset); whether the run recovered (finished, and
its last snapshot within 1.5 x the best pre-onset FID and 0.7 x the best pre-onset fidelity). Healthy runs
count false alarms (target 0). The cost row is the health checks' share of the training wall time (target
< 5%), measured on every run by timing `Trainer.check_health`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.quality import dataset_name, prepare_shards  # noqa: E402
from pipeline import config as C  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402

BASE = {
    "model.g_ch": 8, "model.d_ch": 8, "data.batch_size": 16, "train.global_batch": 16, "cluster.num_workers": 1,
    "data.backend": "wds", "train.precision": "bf16", "train.channels_last": True, "train.log_every": 5,
    "train.checkpoint_every": 25, "train.keep_last": 100, "train.sample_every": 100000,
    "optim.g_lr": 8e-4, "optim.d_lr": 8e-4,
    "health.enabled": True, "health.every": 5, "health.max_rollbacks": 3,
    "eval.reference_images": 5000, "eval.classifier_epochs": 5,
}

RECIPES: dict[str, dict] = {
    "lr_g_high": {"optim.g_lr": 2e-2},
    "lr_d_high": {"optim.d_lr": 2e-2},
    "lr_both_high": {"optim.g_lr": 1e-2, "optim.d_lr": 1e-2},
    "dg_ratio_high": {"loss.d_steps": 8, "optim.d_lr": 4e-3},
    "no_ortho_high_lr": {"loss.ortho_beta": 0.0, "optim.g_lr": 2e-3, "optim.d_lr": 8e-3},  # issue #17's run
    "tiny_batch": {"data.batch_size": 2, "train.global_batch": 2, "optim.g_lr": 2e-3, "optim.d_lr": 2e-3},
    "r1_off_strong_d": {"loss.r1_gamma": 0.0, "model.d_ch": 32, "loss.d_steps": 4, "optim.d_lr": 4e-3},
    "late_lr": {},  # base settings, both learning rates x LATE_LR_SCALE at --late-at
}
LATE_LR_SCALE = 20.0
SUSTAIN_STEPS = 25
NOT_RUN = {"no_sn_d": "BigGAN's D has spectral norm built into its layers and the config has no switch for it"}


@dataclass
class Run:
    recipe: str
    seed: int
    steps: int
    status: str = ""
    train_s: float = 0.0
    health_s: float = 0.0
    checks: int = 0
    alarms: list[dict] = field(default_factory=list)
    rollbacks: list[tuple[int, int]] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)  # step, segment, fidelity, fid
    signals: list[dict] = field(default_factory=list)  # every health check's signals (step, alarm and the values)
    onset: int | None = None
    verdict: dict = field(default_factory=dict)


def build_config(shards: str, out: Path, overrides: dict, steps: int, seed: int) -> C.RunConfig:
    from data_prep.shard_format import read_manifest

    cfg = get_preset("demo")
    cfg.data.shards = shards
    cfg.model.num_classes = read_manifest(shards).num_classes
    cfg.train.output_dir = str(out)
    cfg.train.steps, cfg.train.seed = steps, seed
    C.apply_overrides(cfg, [f"{k}={v}" for k, v in {**BASE, **overrides}.items()])
    return C.validate(cfg)


def train(cfg: C.RunConfig, run: Run, out: Path, snap_every: int, late_at: int | None) -> None:
    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.engines import init_single_process_group
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    init_single_process_group()

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(cfg.data.shards, batch_size=cfg.data.batch_size, backend="wds", seed=seed,
                            resolution=cfg.model.resolution, flip=cfg.data.flip, num_threads=1,
                            start_epoch=epoch, start_offset=offset)

    trainer = Trainer(cfg, make_loader=make_loader, store=CheckpointStore(str(out / "checkpoints")),
                      tracker=Tracker("", "", "", enabled=False), device=torch.device("cpu"))
    snaps = out / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    iterate, check = trainer.train_iteration, trainer.check_health

    def iteration() -> None:
        iterate()
        if late_at is not None and trainer.step == late_at and not trainer.rollback_log:  # once: not on a replay
            cfg.optim.g_lr *= LATE_LR_SCALE  # the base the recovery's lr scale multiplies, as a resumed run's config
            cfg.optim.d_lr *= LATE_LR_SCALE
            trainer.recovery.apply_lr_scale()
        if trainer.step % snap_every == 0:
            state = {k: v.detach().clone() for k, v in trainer.ema.ready().state_dict().items()}
            torch.save(state, snaps / f"{trainer.step:06d}-{len(trainer.rollback_log)}.pt")

    def timed_check(losses):
        t0 = time.perf_counter()
        decision = check(losses)
        run.health_s += time.perf_counter() - t0
        run.checks += 1
        if decision.alarm:
            run.alarms.append({"step": decision.step, "reason": decision.reason, "onset": decision.onset_step})
        # what the rules saw, so a change of rules can be replayed on this run up to its first alarm (--replay)
        run.signals.append({"step": decision.step, "alarm": decision.alarm, **decision.evidence.get("signals", {})})
        return decision

    trainer.train_iteration, trainer.check_health = iteration, timed_check
    t0 = time.perf_counter()
    result = trainer.fit()
    run.train_s = time.perf_counter() - t0
    run.status, run.rollbacks = result["status"], list(trainer.rollback_log)
    score_snapshots(trainer, run, snaps)
    trainer.loader.close()


@torch.no_grad()
def score_snapshots(trainer, run: Run, snaps: Path, eval_samples: int = 500) -> None:
    """Offline: class fidelity and FID (classifier features) of every saved EMA G, on latents of their own."""
    from pipeline.metrics.frechet import frechet_distance

    sig = trainer.class_signals
    G = copy.deepcopy(trainer.ema.model).eval()
    gen = torch.Generator().manual_seed(99)
    nc = trainer.cfg.model.num_classes
    y = torch.arange(eval_samples) % nc
    z = torch.randn(eval_samples, G.dim_z, generator=gen)
    for path in sorted(snaps.glob("*.pt")):
        step, segment = (int(x) for x in path.stem.split("-"))
        G.load_state_dict(torch.load(path, weights_only=True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            images = torch.cat([G(z[i:i + 100], y[i:i + 100]).float() for i in range(0, eval_samples, 100)])
            feats = sig.classifier.features(images).float()
            logits = sig.classifier.head(feats).float()
        f = feats.double().numpy()
        ok = bool(np.isfinite(f).all())
        fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), sig.mu, sig.sigma) if ok else math.inf
        run.snapshots.append({"step": step, "segment": segment, "fidelity": float((logits.argmax(1) == y).float().mean()),
                              "fid": fid, "finite": ok})


def _failed(s: dict, best_fid: float, peak: float, chance: float) -> bool:
    return (not s["finite"]) or (peak >= 3 * chance and s["fidelity"] < 1.5 * chance) or s["fid"] > 2 * best_fid


def judge(run: Run, nc: int, every: int, sustain: int = SUSTAIN_STEPS) -> None:
    """Onset by the offline measure, then detection delay, restore point and recovery.

    A failure must last: the onset is the first snapshot (of the run before any rollback, after step 25) that is
    failed against the best FID and fidelity before it, and so is every snapshot of the next `sustain` steps
    (a tiny GAN's FID swings; one bad snapshot is not a collapse), or up to the first rollback if that came sooner."""
    chance = 1.0 / nc
    first = sorted((s for s in run.snapshots if s["segment"] == 0), key=lambda s: s["step"])
    best_fid, peak, run.onset = math.inf, 0.0, None
    for i, s in enumerate(first):
        if s["step"] > 25 and _failed(s, best_fid, peak, chance):
            later = [x for x in first[i:] if x["step"] <= s["step"] + sustain]
            # a rollback cuts the run short: then every snapshot it left after this one must have failed
            lasted = first[-1]["step"] >= s["step"] + sustain or bool(run.rollbacks)
            if all(_failed(x, best_fid, peak, chance) for x in later) and lasted:
                run.onset = s["step"]
                break
        best_fid, peak = min(best_fid, s["fid"]), max(peak, s["fidelity"])
    v = run.verdict = {}
    v["false_alarm"] = bool(run.alarms) and (run.onset is None or run.alarms[0]["step"] < run.onset)
    if run.alarms and run.onset is not None:
        v["delay_checks"] = max(0, math.ceil((run.alarms[0]["step"] - run.onset) / every))
    if run.rollbacks and run.onset is not None:
        v["restored_before_onset"] = run.rollbacks[0][1] < run.onset
    last = max(run.snapshots, key=lambda s: (s["segment"], s["step"])) if run.snapshots else None
    if run.onset is not None and last is not None:
        v["recovered"] = run.status == "finished" and not _failed(last, 1.5 * best_fid / 2, 0.0, chance) and \
            last["fidelity"] >= 0.7 * peak
    v["final"] = last
    v["cost"] = run.health_s / max(run.train_s, 1e-9)


def replay(run: Run, overrides: dict[str, str]) -> dict | None:
    """The first alarm the current rules raise on the run's recorded signals, up to its first recorded alarm
    (after a rollback the run went elsewhere, so later signals say nothing about other rules). None if quiet."""
    from pipeline.health import HealthMonitor

    cfg = C.apply_overrides(get_preset("demo"), [f"{k}={v}" for k, v in overrides.items()]).health
    monitor = HealthMonitor(cfg, num_classes=10)
    for check in run.signals:
        signals = {k: float(v) for k, v in check.items() if k not in ("step", "alarm")}
        decision = monitor.observe(int(check["step"]), signals)
        if decision.alarm:
            return {"step": decision.step, "reason": decision.reason, "onset": decision.onset_step}
        if check["alarm"]:
            return None
    return None


def replay_table(runs: list[Run], overrides: dict[str, str]) -> str:
    rows = ["| recipe | seed | checks recorded | first alarm recorded | first alarm of today's rules |", "|---|---|---|---|---|"]
    for r in runs:
        if not r.signals:
            rows.append(f"| {r.recipe} | {r.seed} | 0 | - | (recorded before signals were kept) |")
            continue
        was = r.alarms[0] if r.alarms else None
        now = replay(r, overrides)
        shown = [f"{a['step']}: {a['reason']}" if a else "none" for a in (was, now)]
        rows.append(f"| {r.recipe} | {r.seed} | {len(r.signals)} | {shown[0]} | {shown[1]} |")
    return "\n".join(rows)


def table(runs: list[Run]) -> str:
    rows = ["| recipe | seed | steps | status | onset (offline) | first alarm | rule | false alarm | delay (checks) | "
            "restored | before onset | recovered | final fid / fidelity | health cost |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        v = r.verdict
        a = r.alarms[0] if r.alarms else None
        final = v.get("final") or {}
        restored = ", ".join(f"{f}->{t}" for f, t in r.rollbacks) or "-"
        rule = a["reason"].split(" is ")[0].split(" rose")[0][:40] if a else "-"
        rows.append(
            f"| {r.recipe} | {r.seed} | {r.steps} | {r.status} | {r.onset if r.onset is not None else 'none'} | "
            f"{a['step'] if a else '-'} | {rule} | {v['false_alarm']} | {v.get('delay_checks', '-')} | {restored} | "
            f"{v.get('restored_before_onset', '-')} | {v.get('recovered', '-')} | "
            f"{final.get('fid', math.nan):.1f} / {final.get('fidelity', math.nan):.2f} | {100 * v['cost']:.1f}% |")
    for name, why in NOT_RUN.items():
        rows.append(f"| {name} | - | - | not run: {why} | | | | | | | | | | |")
    return "\n".join(rows)


def measure_cost(shards: str, out: Path, rounds: int, extra: dict) -> dict:
    """The health check's share of training time at the demo preset's own scale and cadence (ch 16, global batch
    64, every 5 G steps), on one rank (so the check does the whole health batch: two ranks split it), bf16.
    Training and checks alternate in one process, so machine load hits both alike."""
    from data_prep.shard_format import read_manifest
    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader
    from pipeline.engines import init_single_process_group
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    cfg = get_preset("demo")
    cfg.data.shards, cfg.model.num_classes, cfg.train.output_dir = shards, read_manifest(shards).num_classes, str(out)
    keep = ("data.backend", "train.precision", "train.channels_last", "eval.reference_images", "eval.classifier_epochs")
    C.apply_overrides(cfg, [f"{k}={BASE[k]}" for k in keep] + ["cluster.num_workers=1", "health.enabled=true"]
                      + [f"{k}={v}" for k, v in extra.items()])
    C.validate(cfg)
    init_single_process_group()

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(shards, batch_size=cfg.data.batch_size, backend="wds", seed=seed, resolution=32,
                            num_threads=1, start_epoch=epoch, start_offset=offset)

    t = Trainer(cfg, make_loader=make_loader, store=CheckpointStore(str(out / "checkpoints")),
                tracker=Tracker("", "", "", enabled=False), device=torch.device("cpu"))
    t.class_signals.setup()
    for _ in range(2):
        t.train_iteration()
    t.check_health(t.take_metrics_peek())
    train_s = check_s = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(cfg.health.every):
            t.train_iteration()
        t1 = time.perf_counter()
        t.check_health(t.take_metrics_peek())
        train_s, check_s = train_s + t1 - t0, check_s + time.perf_counter() - t1
    t.loader.close()
    return {"every": cfg.health.every, "rounds": rounds, "step_s": train_s / (rounds * cfg.health.every),
            "check_s": check_s / rounds, "cost": check_s / train_s, "class_signals": t.class_signals.on,
            "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated recipes and/or 'healthy' (default all: {', '.join(RECIPES)}, healthy)")
    p.add_argument("--steps", type=int, default=300, help="G steps of each failure recipe")
    p.add_argument("--healthy-steps", type=int, default=1000, help="G steps of each healthy run")
    p.add_argument("--seeds", default="1,2,3", help="seeds of the healthy runs")
    p.add_argument("--late-at", type=int, default=150, help="late_lr: the step at which the learning rates jump")
    p.add_argument("--snap-every", type=int, default=5, help="G steps between EMA-G snapshots for the offline measure")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="on every run")
    p.add_argument("--data", default=str(ROOT / "data" / "demo-shards"), help="shard folder (made if missing)")
    p.add_argument("--out", default=None, help="run folders (default: a temporary one)")
    p.add_argument("--json", default=None, help="write every run's record here")
    p.add_argument("--rejudge", nargs="+", default=None, metavar="JSON",
                   help="judge the runs recorded in these --json files again (no training) and print the table")
    p.add_argument("--replay", nargs="+", default=None, metavar="JSON",
                   help="feed the health signals recorded in these --json files to today's rules (with --set health.*) "
                        "up to each run's first recorded alarm, and print what they say (no training)")
    p.add_argument("--cost", type=int, default=0, metavar="ROUNDS",
                   help="only measure the health check's cost at the demo preset's scale over ROUNDS x health.every steps")
    args = p.parse_args(argv)
    if args.cost:
        torch.set_num_threads(1)
        shards = prepare_shards(args.data, dataset_name())
        extra = dict(item.split("=", 1) for item in args.overrides)
        res = measure_cost(shards, Path(args.out or tempfile.mkdtemp(prefix="detector-cost-")), args.cost, extra)
        print(f"[cost] demo preset, 1 rank: {res['step_s']:.3f} s per G step, {res['check_s']:.3f} s per health check "
              f"every {res['every']} steps: {100 * res['cost']:.1f}% (class signals {res['class_signals']}, "
              f"load {res['load']:.1f})", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    if args.rejudge or args.replay:
        runs = [Run(**{**r, "rollbacks": [tuple(x) for x in r["rollbacks"]]})
                for path in args.rejudge or args.replay for r in json.loads(Path(path).read_text())]
        if args.replay:
            print(replay_table(runs, dict(item.split("=", 1) for item in args.overrides)))
            return 0
        for run in runs:
            judge(run, 10, 5)
        print(table(runs))
        return 0
    torch.set_num_threads(1)
    shards = prepare_shards(args.data, dataset_name())
    out = Path(args.out or tempfile.mkdtemp(prefix="detector-"))
    wanted = [x for x in args.only.split(",") if x] or [*RECIPES, "healthy"]
    unknown = [x for x in wanted if x not in RECIPES and x != "healthy"]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {[*RECIPES, 'healthy']}")
    extra = dict(item.split("=", 1) for item in args.overrides)
    plan = [(name, RECIPES[name], args.steps, 0) for name in wanted if name != "healthy"]
    if "healthy" in wanted:
        plan += [("healthy", {}, args.healthy_steps, int(s)) for s in args.seeds.split(",")]
    runs: list[Run] = []
    for name, overrides, steps, seed in plan:
        folder = out / f"{name}-{seed}"
        cfg = build_config(shards, folder, {**overrides, **extra}, steps, seed)
        run = Run(name, seed, steps)
        print(f"[detector] {name} seed {seed}: {steps} steps ({overrides or 'base settings'})", flush=True)
        train(cfg, run, folder, args.snap_every, args.late_at if name == "late_lr" else None)
        judge(run, cfg.model.num_classes, cfg.health.every)
        print(f"[detector] {name}: status {run.status}, onset {run.onset}, alarms {run.alarms[:2]}, "
              f"rollbacks {run.rollbacks}, verdict {run.verdict}", flush=True)
        runs.append(run)
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
