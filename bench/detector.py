"""Does the health monitor catch the collapses that happen, and stay quiet on healthy runs? Provoked natural failures.

    python bench/detector.py                               # every recipe, then the healthy runs
    python bench/detector.py --only lr_g_high,no_sn_d --steps 200 --out /tmp/det --json detector.json
    python bench/detector.py --only healthy --healthy-steps 1000 --seeds 1,2,3

Each recipe is a set of real settings (config overrides), never injected tensors, on the embedded default scaled
down to fit 2 shared CPU cores: the demo preset's BigGAN with `model.g_ch=d_ch=8`, batch 16, the precision and
layout `auto` picks for the CPU (bf16 and channels_last where it has bf16 matrix units, fp32 elsewhere), eager,
Fashion-MNIST at 32 px (bench/quality.py's shards), the real `Trainer.fit()` in this process
on one rank (gloo on 127.0.0.1), health checks every 5 G steps (the demo's cadence), with rollback and mitigation
as configured. Most recipes fail *late*, as the paper's collapses do: one healthy run with the base settings
trains to `--late-at` (the warm run, trained once), and each late recipe resumes from its checkpoint with its own
settings (what a user does who resumes with new settings): the run has learned its classes and has something to
lose, and the monitor has the healthy history its relative rules judge against. The others start with theirs.

Independent quality measure, offline: every `--snap-every` G steps the bench saves EMA G's weights to disk
(`<out>/<recipe>/snapshots/`); after training it scores each file with the dataset classifier (the cached one
the health check uses, trained once on 5,000 real images) on `--eval-samples` fresh samples (their own latents,
not the health batch): class fidelity (its accuracy) and FID in its features against the cached real statistics.
D is saved beside it and scored on 500 real images and the same samples: a D whose outputs have
no spread (std < 1e-3 over all 1,000) is dead, whatever G's samples look like (G gets no gradient from it).
The run *failed* at the first snapshot (before the first rollback) where fidelity fell below 1.5 x chance after
having reached 3 x chance, or FID rose above 2 x its best so far, or D was dead, or the weights were not finite.

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
import shutil
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
    "data.backend": "wds", "train.precision": "auto", "train.channels_last": "auto", "train.log_every": 5,
    "train.checkpoint_every": 25, "train.keep_last": 100, "train.sample_every": 100000,
    "optim.g_lr": 8e-4, "optim.d_lr": 8e-4, "train.compile": False, "data.diffaug": "", "loss.mode_seeking": 0.0,
    "model.d_head": "projection", "data.flip": True,
    "health.enabled": True, "health.every": 5, "health.max_rollbacks": 3,
    "eval.reference_images": 5000, "eval.classifier_epochs": 5,
    "eval.every": 0, "eval.truncation_sweep": "",  # the offline measure below judges quality; no FID/CAS runs
}

LATE, START = "late", "start"
# name: (settings, when they apply: from --late-at on the warm run's checkpoint, or from step 0)
RECIPES: dict[str, tuple[dict, str]] = {
    "lr_g_high": ({"optim.g_lr": 2e-2}, LATE),
    "lr_d_high": ({"optim.d_lr": 2e-2}, LATE),
    "lr_both_high": ({"optim.g_lr": 1.6e-2, "optim.d_lr": 1.6e-2}, LATE),  # both x20
    "dg_ratio_high": ({"loss.d_steps": 8, "optim.d_lr": 4e-3}, LATE),
    "no_sn_d": ({"model.d_spectral_norm": False}, LATE),  # D's spectral norm switched off
    "no_sn_d_lr_high": ({"model.d_spectral_norm": False, "optim.d_lr": 8e-3}, LATE),  # ... and D's lr x10
    "dg_ratio_extreme": ({"loss.d_steps": 12, "optim.d_lr": 8e-3}, LATE),  # D:G 12, D's lr x10
    "no_ortho_high_lr": ({"loss.ortho_beta": 0.0, "optim.g_lr": 2e-3, "optim.d_lr": 8e-3}, START),  # issue #17's run
    "tiny_batch": ({"data.batch_size": 2, "train.global_batch": 2, "optim.g_lr": 2e-3, "optim.d_lr": 2e-3}, START),
    "r1_off_strong_d": ({"loss.r1_gamma": 0.0, "model.d_ch": 32, "loss.d_steps": 4, "optim.d_lr": 4e-3}, START),
}
SUSTAIN_STEPS = 25
DEAD_D_SPREAD = 1e-3
INVERTED_D_AUC = 0.2  # D ranks most generated images above most real ones: it pushes G the wrong way


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
    resumed_at: int = 0  # a late recipe: the warm run's step it continued from with its own settings
    verdict_onset_by: str = ""  # which offline criterion dated the onset
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


def bench_trainer(cfg: C.RunConfig, out: Path):
    """The real Trainer on one gloo rank in this process, reading the shards with the wds backend, no tracking."""
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

    return Trainer(cfg, make_loader=make_loader, store=CheckpointStore(str(out / "checkpoints")),
                   tracker=Tracker("", "", "", enabled=False), device=torch.device("cpu"))


def train(cfg: C.RunConfig, run: Run, out: Path, snap_every: int, resume_from: Path | None = None) -> None:
    """Trainer.fit() with timed health checks and EMA-G/D snapshots; resume_from: a run folder whose newest
    checkpoint this run continues from, with its own settings (run.snapshots holds that run's scored history)."""
    snaps = out / "snapshots"
    if resume_from is not None:
        shutil.copytree(resume_from / "checkpoints", out / "checkpoints", dirs_exist_ok=True)
    snaps.mkdir(parents=True, exist_ok=True)
    trainer = bench_trainer(cfg, out)
    if resume_from is not None:
        trainer.load_checkpoint(trainer.store.latest())
        run.resumed_at = trainer.step
    iterate, check = trainer.train_iteration, trainer.check_health

    def iteration() -> None:
        iterate()
        if trainer.step % snap_every == 0:
            state = {"G": trainer.ema.ready().state_dict(), "D": trainer.D.state_dict()}
            torch.save({k: {n: v.detach().clone() for n, v in sd.items()} for k, sd in state.items()},
                       snaps / f"{trainer.step:06d}-{len(trainer.rollback_log)}.pt")

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
    """Offline: class fidelity and FID (classifier features) of every saved EMA G, on latents of their own, and
    the spread of the saved D's outputs over real images and those samples."""
    from pipeline.metrics.frechet import frechet_distance

    sig = trainer.class_signals
    G = copy.deepcopy(trainer.ema.model).eval()
    D = copy.deepcopy(trainer.D).eval()
    gen = torch.Generator().manual_seed(99)
    nc = trainer.cfg.model.num_classes
    y = torch.arange(eval_samples) % nc
    z = torch.randn(eval_samples, G.dim_z, generator=gen)
    real, real_y = real_batch(trainer.cfg, eval_samples)
    scored = {(x["step"], x["segment"]) for x in run.snapshots}
    for path in sorted(snaps.glob("*.pt")):
        step, segment = (int(x) for x in path.stem.split("-"))
        if (step, segment) in scored:
            continue
        state = torch.load(path, weights_only=True)
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        with sig._autocast():  # training's precision: bf16 is emulated, and slow, on CPUs without bf16 units
            images = torch.cat([G(z[i:i + 100], y[i:i + 100]).float() for i in range(0, eval_samples, 100)])
            feats = sig.classifier.features(images).float()
            logits = sig.classifier.head(feats).float()
            d_out = torch.cat([D(x[i:i + 100], c[i:i + 100]).float().flatten()
                               for x, c in ((real, real_y), (images, y)) for i in range(0, eval_samples, 100)])
        f = feats.double().numpy()
        ok = bool(np.isfinite(f).all()) and bool(torch.isfinite(d_out).all())
        fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), sig.mu, sig.sigma) if ok else math.inf
        # D's AUC: the share of (real, generated) pairs it scores in the right order; 0.5 is a D that tells nothing
        on_real, on_fake = d_out[:eval_samples], d_out[eval_samples:]
        auc = float((on_real[:, None] > on_fake[None, :]).float().mean()) if ok else math.nan
        run.snapshots.append({"step": step, "segment": segment, "fidelity": float((logits.argmax(1) == y).float().mean()),
                              "fid": fid, "finite": ok, "d_spread": float(d_out.std()) if ok else math.nan,
                              "d_auc": auc})


def real_batch(cfg: C.RunConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n real images and labels from the shards, in the order the loader's seed 12345 gives (the same every run)."""
    from pipeline.data import build_loader

    loader = build_loader(cfg.data.shards, batch_size=100, backend="wds", seed=12345, resolution=cfg.model.resolution,
                          flip=False, num_threads=1)
    xs, ys = [], []
    for x, c in loader:
        xs.append(x.float())
        ys.append(c)
        if sum(len(b) for b in xs) >= n:
            break
    loader.close()
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _failure(s: dict, best_fid: float, peak: float, chance: float) -> str:
    """Why a snapshot counts as failed ("" when it does not). Older records have no D measures."""
    if not s["finite"]:
        return "weights not finite"
    if peak >= 3 * chance and s["fidelity"] < 1.5 * chance:
        return "fidelity lost"
    if s["fid"] > 2 * best_fid:
        return "FID doubled"
    if s.get("d_spread", 1.0) < DEAD_D_SPREAD:
        return "D dead"
    if s.get("d_auc", 0.5) < INVERTED_D_AUC:
        return "D inverted"
    return ""


def _failed(s: dict, best_fid: float, peak: float, chance: float) -> bool:
    return bool(_failure(s, best_fid, peak, chance))


def judge(run: Run, nc: int, every: int, sustain: int = SUSTAIN_STEPS) -> None:
    """Onset by the offline measure, then detection delay, restore point and recovery.

    A failure must last: the onset is the first snapshot (of the run before any rollback, after step 25 and after
    the warm run's part of a late recipe, which only sets the bests) that is
    failed against the best FID and fidelity before it, and so is every snapshot of the next `sustain` steps
    (a tiny GAN's FID swings; one bad snapshot is not a collapse), or up to the first rollback if that came sooner."""
    chance = 1.0 / nc
    first = sorted((s for s in run.snapshots if s["segment"] == 0), key=lambda s: s["step"])
    best_fid, peak, run.onset, run.verdict_onset_by = math.inf, 0.0, None, ""
    for i, s in enumerate(first):
        if s["step"] > max(25, run.resumed_at) and _failed(s, best_fid, peak, chance):
            later = [x for x in first[i:] if x["step"] <= s["step"] + sustain]
            # a rollback cuts the run short: then every snapshot it left after this one must have failed
            lasted = first[-1]["step"] >= s["step"] + sustain or bool(run.rollbacks)
            if all(_failed(x, best_fid, peak, chance) for x in later) and lasted:
                run.onset = s["step"]
                run.verdict_onset_by = _failure(s, best_fid, peak, chance)
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


def replay(run: Run, overrides: dict[str, str], before: list[dict] | None = None) -> dict | None:
    """The first alarm the current rules raise on the run's recorded signals, up to its first recorded alarm
    (after a rollback the run went elsewhere, so later signals say nothing about other rules). None if quiet."""
    from pipeline.health import HealthMonitor

    cfg = C.apply_overrides(get_preset("demo"), [f"{k}={v}" for k, v in overrides.items()]).health
    monitor = HealthMonitor(cfg, num_classes=10)
    for check in before or []:  # a late recipe: the warm run's checks its monitor resumed with
        monitor.observe(int(check["step"]), {k: float(v) for k, v in check.items() if k not in ("step", "alarm")})
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
        warm = next((w for w in runs if w.recipe == "warm" and w.seed == r.seed), None) if r.resumed_at else None
        now = replay(r, overrides, [c for c in warm.signals if c["step"] <= r.resumed_at] if warm else None)
        shown = [f"{a['step']}: {a['reason']}" if a else "none" for a in (was, now)]
        rows.append(f"| {r.recipe} | {r.seed} | {len(r.signals)} | {shown[0]} | {shown[1]} |")
    return "\n".join(rows)


def table(runs: list[Run]) -> str:
    rows = ["| recipe | seed | steps (late: from the warm run's) | status | onset (offline) | first alarm | rule | false alarm | delay (checks) | "
            "restored | before onset | recovered | final fid / fidelity | health cost |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        v = r.verdict
        a = r.alarms[0] if r.alarms else None
        final = v.get("final") or {}
        restored = ", ".join(f"{f}->{t}" for f, t in r.rollbacks) or "-"
        rule = a["reason"].split(" is ")[0].split(" rose")[0][:40] if a else "-"
        rows.append(
            f"| {r.recipe} | {r.seed} | {f'{r.resumed_at}->' if r.resumed_at else ''}{r.steps} | {r.status} | "
            f"{f'{r.onset} ({r.verdict_onset_by})' if r.onset is not None else 'none'} | "
            f"{a['step'] if a else '-'} | {rule} | {v['false_alarm']} | {v.get('delay_checks', '-')} | {restored} | "
            f"{v.get('restored_before_onset', '-')} | {v.get('recovered', '-')} | "
            f"{final.get('fid', math.nan):.1f} / {final.get('fidelity', math.nan):.2f} | {100 * v['cost']:.1f}% |")
    return "\n".join(rows)


def rescore(out: Path, shards: str, only: list[str]) -> list[Run]:
    """Score the snapshots of every run under out again, or of the recipes in only (the others are judged on their
    records); the warm run first: late runs start from its records."""
    folders = sorted((f for f in out.iterdir() if (f / "run.json").is_file()), key=lambda f: not f.name.startswith("warm-"))
    runs: list[Run] = []
    warm: Run | None = None
    for folder in folders:
        run = Run(**json.loads((folder / "run.json").read_text()))
        run.rollbacks = [tuple(x) for x in run.rollbacks]
        if only and run.recipe not in only:
            judge(run, 10, 5)
            warm = run if run.recipe == "warm" else warm
            runs.append(run)
            continue
        overrides = RECIPES[run.recipe][0] if run.recipe in RECIPES else {}
        trainer = bench_trainer(build_config(shards, folder, overrides, run.steps, run.seed), folder)
        trainer.class_signals.setup()
        run.snapshots = copy.deepcopy(warm.snapshots) if run.resumed_at and warm else []
        print(f"[detector] scoring {folder} again", flush=True)
        score_snapshots(trainer, run, folder / "snapshots")
        trainer.loader.close()
        judge(run, trainer.cfg.model.num_classes, trainer.cfg.health.every)
        (folder / "run.json").write_text(json.dumps(run.__dict__, indent=1, default=str))
        warm = run if run.recipe == "warm" else warm
        runs.append(run)
    return runs


def measure_cost(shards: str, out: Path, rounds: int, extra: dict) -> dict:
    """The health check's share of training time at the demo preset's own scale and cadence (ch 16, global batch
    64, every 5 G steps), on one rank (so the check does the whole health batch: two ranks split it), in `auto` precision.
    Training and checks alternate in one process, so machine load hits both alike."""
    from data_prep.shard_format import read_manifest

    cfg = get_preset("demo")
    cfg.data.shards, cfg.model.num_classes, cfg.train.output_dir = shards, read_manifest(shards).num_classes, str(out)
    keep = ("data.backend", "train.precision", "train.channels_last", "eval.reference_images", "eval.classifier_epochs")
    C.apply_overrides(cfg, [f"{k}={BASE[k]}" for k in keep] + ["cluster.num_workers=1", "health.enabled=true"]
                      + [f"{k}={v}" for k, v in extra.items()])
    C.validate(cfg)
    t = bench_trainer(cfg, out)
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
    p.add_argument("--steps", type=int, default=300, help="G steps of each failure recipe (a late one: after --late-at)")
    p.add_argument("--healthy-steps", type=int, default=1000, help="G steps of each healthy run")
    p.add_argument("--seeds", default="1,2,3", help="seeds of the healthy runs")
    p.add_argument("--late-at", type=int, default=500,
                   help="G steps of the healthy warm run that late recipes resume from with their settings")
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
    p.add_argument("--rescore", action="store_true",
                   help="with --out: score every run's saved snapshots again with today's offline measure and rewrite "
                        "its run.json (no training), then print the table")
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
    if args.rescore:
        if not args.out:
            p.error("--rescore needs --out, the folder of the runs to score again")
        print(table(rescore(Path(args.out), shards, [x for x in args.only.split(",") if x])))
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="detector-"))
    wanted = [x for x in args.only.split(",") if x] or [*RECIPES, "healthy"]
    unknown = [x for x in wanted if x not in RECIPES and x != "healthy"]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {[*RECIPES, 'healthy']}")
    extra = dict(item.split("=", 1) for item in args.overrides)
    runs: list[Run] = []

    def run_one(name: str, overrides: dict, steps: int, seed: int, warm: Run | None = None) -> Run:
        folder = out / f"{name}-{seed}"
        if (folder / "run.json").is_file():  # done by an earlier invocation with this --out
            run = Run(**json.loads((folder / "run.json").read_text()))
            run.rollbacks = [tuple(x) for x in run.rollbacks]
            print(f"[detector] {name} seed {seed}: reusing {folder}", flush=True)
        else:
            cfg = build_config(shards, folder, {**overrides, **extra}, steps, seed)
            run = Run(name, seed, steps, snapshots=copy.deepcopy(warm.snapshots) if warm else [])
            print(f"[detector] {name} seed {seed}: {steps} steps ({overrides or 'base settings'}"
                  f"{f', from the warm run at step {args.late_at}' if warm else ''})", flush=True)
            t0 = time.perf_counter()
            train(cfg, run, folder, args.snap_every, out / f"{warm.recipe}-{warm.seed}" if warm else None)
            judge(run, cfg.model.num_classes, cfg.health.every)
            (folder / "run.json").write_text(json.dumps(run.__dict__, indent=1, default=str))
            print(f"[detector] {name}: {time.perf_counter() - t0:.0f} s, status {run.status}, onset {run.onset}, "
                  f"alarms {run.alarms[:2]}, rollbacks {run.rollbacks}, verdict {run.verdict}", flush=True)
        runs.append(run)
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
        return run

    late = [name for name in wanted if name in RECIPES and RECIPES[name][1] == LATE]
    warm = run_one("warm", {}, args.late_at, 0) if late else None  # the healthy phase late recipes resume from
    for name in wanted:
        if name in RECIPES:
            overrides, when = RECIPES[name]
            if when == LATE:
                run_one(name, overrides, args.late_at + args.steps, 0, warm)
            else:
                run_one(name, overrides, args.steps, 0)
    if "healthy" in wanted:
        for seed in args.seeds.split(","):
            run_one("healthy", {}, args.healthy_steps, int(seed))
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
