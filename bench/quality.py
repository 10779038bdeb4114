"""Sample quality of a preset trained on CPU for a fixed budget: FID in the dataset classifier's features and
the Classification Accuracy Score (CAS) next to the real-data classifier's accuracy.

    python bench/quality.py --minutes 5 --json quality.json --grid grid.png        # the demo preset
    python bench/quality.py --preset dcgan-fmnist --steps 300 --set loss.kind=bce   # any preset, any override
    flock /tmp/ray-tests.lock python bench/quality.py --as-user --json q.json        # `make demo` itself, timed
    python bench/quality.py --score runs/<run>/checkpoints/step-00001000/g_ema.pt      # a finished run's EMA G

1. Data: Fashion-MNIST at 32 px (MNIST-5k where /usr/share/datasets/fashion-mnist is absent) as shards in
   --data (made once, in this process, no Ray; the default is launch/demo.py's folder, so both share them).
   Held-out real images: Fashion-MNIST's test split (MNIST-5k: images past the first 400 of each class, which
   are the training shards), encoded and decoded exactly as the shards are.
2. Training: the real `Trainer.fit()` in this process on one rank (gloo on 127.0.0.1, file rendezvous),
   `cluster.num_workers=1` with the preset's global batch (gradient accumulation fills the gap), tracking off
   unless --tracking-uri. --steps sets train.steps; --minutes stops at the first step past that wall time
   (train.steps is shortened to it, so fit() ends as at a normal last step: checkpoint, samples).
3. Evaluation of the final EMA G (standing statistics, no truncation): `pipeline.evaluation.score` with
   eval.features=classifier (the small CNN trained once on --reference-images real images, cached next to
   the manifest with the reference statistics): FID, the classifier score (IS in its logits), precision and
   recall; then CAS: the same kind of classifier trained for the same epochs on --cas-samples generated images,
   tested on the held-out images, next to the real classifier's accuracy on them. --raw-g scores the trained G
   itself as well (an EMA whose decay is long for the run's length shows up as EMA G far behind G).
   One torch thread by default: on a shared 2-core machine two threads made the demo step 4x slower.

JSON (--json): {"preset", "overrides", "dataset", "steps", "train_s", "wall_s", "fid", "is_mean", "is_std",
"precision_classifier", "recall_classifier", "cas", "real_accuracy", "raw_g": {...} (--raw-g), "eval": {...}, "config": {...}, ...};
times (*_s) in seconds. FIDs in one classifier's features are comparable only with the same classifier (the
"extractor" field names its weights digest).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipeline import config as C  # noqa: E402
from pipeline.engines import init_single_process_group  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402

log = logging.getLogger("bench.quality")

FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
RESOLUTION = 32
MNIST_TRAIN_PER_CLASS = 400


# -- data -------------------------------------------------------------------------------------------------------
def dataset_name() -> str:
    return "fashion-mnist" if FASHION_MNIST.is_dir() else "mnist-5k"


def prepare_shards(out: str, dataset: str) -> str:
    """Shards of the training images (once; make_shards reuses complete shards)."""
    from data_prep.make_shards import make_shards

    if not (Path(out) / "manifest.json").exists():
        print(f"[data] writing {dataset} shards to {out}", flush=True)
        per_class = MNIST_TRAIN_PER_CLASS if dataset == "mnist-5k" else None
        make_shards(dataset, out, resolution=RESOLUTION, shard_size=5000, workers=0, progress=False,
                    limit_per_class=per_class)
    return out


def held_out(dataset: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real test images (N, 3, 32, 32) in [-1, 1] and labels, through the shards' JPEG encode and PIL decode."""
    from data_prep import sources
    from data_prep.images import process_array
    from pipeline.data.backends import decode_pil

    if dataset == "fashion-mnist":
        src = sources.fashion_mnist("test")
        keep = np.arange(min(count, len(src)))
    else:
        src = sources.mnist_5k()
        rank_in_class = np.zeros(len(src), np.int64)
        seen: dict[int, int] = {}
        for i, y in enumerate(src.labels.tolist()):
            rank_in_class[i] = seen.get(y, 0)
            seen[y] = rank_in_class[i] + 1
        keep = np.flatnonzero(rank_in_class >= MNIST_TRAIN_PER_CLASS)[:count]
    arrays = [decode_pil(process_array(src.pixels[src.refs[i]], RESOLUTION), RESOLUTION, 1.0, 0.5, 0.5, 0)
              for i in keep]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, torch.from_numpy(src.labels[keep])


# -- training ---------------------------------------------------------------------------------------------------


def build_config(args: argparse.Namespace, shards: str, out: Path) -> C.RunConfig:
    from data_prep.shard_format import read_manifest

    cfg = get_preset(args.preset)
    cfg.data.shards = shards
    cfg.model.num_classes = read_manifest(shards).num_classes
    cfg.cluster.num_workers, cfg.cluster.use_gpu = 1, False
    cfg.data.backend = "wds"
    cfg.train.output_dir = str(out)
    if args.steps:
        cfg.train.steps = args.steps
    C.apply_overrides(cfg, args.overrides)
    if cfg.train.global_batch % cfg.data.batch_size:
        cfg.data.batch_size = cfg.train.global_batch
    return C.validate(cfg)


def train(cfg: C.RunConfig, minutes: float | None, tracking_uri: str):
    from pipeline.checkpoint import CheckpointStore
    from pipeline.data import build_loader, read_manifest
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer

    init_single_process_group()

    def make_loader(epoch: int, offset: int, seed: int):
        return build_loader(cfg.data.shards, batch_size=cfg.data.batch_size, backend=cfg.data.backend, seed=seed,
                            resolution=cfg.model.resolution, random_crop=cfg.data.random_crop, flip=cfg.data.flip,
                            num_threads=cfg.data.num_threads, start_epoch=epoch, start_offset=offset)

    run_name = f"quality-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = Tracker(tracking_uri, "biggan-quality", run_name, enabled=bool(tracking_uri))
    if tracking_uri:
        tracker.log_params(cfg.flat())
    out = Path(cfg.train.output_dir)
    trainer = Trainer(cfg, make_loader=make_loader, store=CheckpointStore(str(out / "checkpoints")), tracker=tracker,
                      device=torch.device("cpu"), class_names=read_manifest(cfg.data.shards)["classes"])
    if minutes:
        deadline = time.monotonic() + 60.0 * minutes
        iterate = trainer.train_iteration

        def budgeted() -> None:
            iterate()
            if time.monotonic() > deadline and trainer.step < cfg.train.steps:
                cfg.train.steps = trainer.step  # fit() treats this step as the last one

        trainer.train_iteration = budgeted
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    tracker.close()
    if trainer.loader is not None:
        trainer.loader.close()
    return trainer, result, seconds


# -- evaluation -------------------------------------------------------------------------------------------------
def quality(G, ref, classifier, test: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
            grid: str | None) -> dict:
    """FID / classifier score / precision / recall, then CAS, of one generator (a standing-statistics copy)."""
    from pipeline import evaluation
    from pipeline.metrics import classification_accuracy_score
    from pipeline.sample import class_grid, save_grid

    t0 = time.perf_counter()
    scores = evaluation.score(G, ref, num_classes=ref.num_classes)
    fid_s = time.perf_counter() - t0
    G = evaluation.evaluation_copy(G, passes=ref.ecfg.standing_stats_passes, batch_size=ref.ecfg.batch_size)
    t0 = time.perf_counter()
    cas = classification_accuracy_score(
        G, num_classes=ref.num_classes, dim_z=G.dim_z, test_images=test[0], test_labels=test[1],
        num_samples=args.cas_samples, real_classifier=classifier, train_kwargs=ref.classifier_train_kwargs(),
    )
    cas_s = time.perf_counter() - t0
    if grid:
        n = ref.num_classes
        save_grid(class_grid(G, list(range(n)), args.grid_per_class, dim_z=G.dim_z, seed=0), grid,
                  nrow=args.grid_per_class)
        print(f"[grid] {grid}: one row per class ({n} x {args.grid_per_class})", flush=True)
    return {**scores, **cas, "fid_s": fid_s, "cas_s": cas_s}


def evaluate(G_ema, cfg: C.RunConfig, args: argparse.Namespace, dataset: str, raw_G=None) -> dict:
    """The final EMA G (and with --raw-g the trained G itself, under "raw_g")."""
    from pipeline import evaluation

    ecfg = C.EvalConfig(
        features="classifier", num_samples=args.eval_samples, batch_size=250, reference_images=args.reference_images,
        classifier_epochs=args.classifier_epochs, pr_samples=args.eval_samples,
        standing_stats_passes=cfg.eval.standing_stats_passes,
    )
    ref = evaluation.ReferenceSet(ecfg, cfg.data.shards, resolution=cfg.model.resolution,
                                  num_classes=cfg.model.num_classes, output_dir=cfg.train.output_dir)
    t0 = time.perf_counter()
    classifier = ref.classifier()
    clf_s = time.perf_counter() - t0
    test = held_out(dataset, args.test_images)
    out = quality(G_ema, ref, classifier, test, args, args.grid)
    if raw_G is not None:
        grid = str(Path(args.grid).with_name(Path(args.grid).stem + "_raw_g.png")) if args.grid else None
        out["raw_g"] = quality(raw_G, ref, classifier, test, args, grid)
    return {**out, "extractor": ref.extractor().name, "reference_count": ref.count,
            "test_images": int(test[0].shape[0]), "classifier_s": clf_s}


def run_demo_as_user(args: argparse.Namespace, shards: str) -> tuple[dict, float, str]:
    """`python launch/demo.py --data SHARDS [--set ...]` in a subprocess (2 Ray workers, as `make demo` runs it):
    (its [done] result, wall seconds, its console output). Run the bench under flock /tmp/ray-tests.lock."""
    import subprocess

    cmd = [sys.executable, str(ROOT / "launch" / "demo.py"), "--data", shards]
    for item in args.overrides:
        cmd += ["--set", item]
    if args.steps:
        cmd += ["--set", f"train.steps={args.steps}"]
    print(f"[quality] running {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.out or ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"launch/demo.py failed with exit code {proc.returncode}:\n{output[-4000:]}")
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[done] "))
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    result = json.loads("\n".join([lines[start].removeprefix("[done] "), *lines[start + 1:end + 1]]))
    return result, seconds, output


def newest_g_ema(checkpoints: str) -> Path:
    from pipeline.checkpoint import CheckpointStore

    info = CheckpointStore(checkpoints).latest()
    if info is None:
        raise SystemExit(f"no committed checkpoint under {checkpoints}")
    return Path(info.path) / "g_ema.pt"


def report_checkpoint(args: argparse.Namespace, dataset: str, path: Path, extra: dict, wall0: float) -> dict:
    """Scores the EMA G in `path` on the test split, prints the gap and writes --json: what --as-user and --score
    share."""
    from pipeline.sample import load_generator

    G, cfg, _ = load_generator(path)
    scores = evaluate(G, cfg, args, dataset)
    gap = scores["real_accuracy"] - scores["cas"]
    report = {**extra, "wall_s": time.perf_counter() - wall0, "checkpoint": str(path),
              "loadavg_end": os.getloadavg(), **scores, "cas_gap": gap}
    print(f"  EMA G ({path}): FID (classifier features) {scores['fid']:.3f}; CAS {scores['cas']:.3f} vs real-data "
          f"classifier {scores['real_accuracy']:.3f}: gap {100 * gap:.1f} points (on {scores['test_images']} test "
          f"images)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


def main_as_user(args: argparse.Namespace, dataset: str, shards: str, wall0: float) -> int:
    """--as-user: time launch/demo.py end to end, then score the EMA G of its last checkpoint on the test split."""
    result, demo_s, output = run_demo_as_user(args, shards)
    print(f"[quality] demo as a user runs it: {demo_s / 60:.1f} min wall ({result.get('step')} steps, "
          f"{result.get('status')}), load average now {os.getloadavg()[0]:.1f}", flush=True)
    extra = {"mode": "as-user", "command": f"launch/demo.py --data {shards} " + " ".join(
                 f"--set {o}" for o in args.overrides), "demo_wall_s": demo_s,
             "steps": result.get("step"), "status": result.get("status"), "console_lines": len(output.splitlines())}
    report_checkpoint(args, dataset, newest_g_ema(result["checkpoints"]), extra, wall0)
    if args.json:
        Path(args.json).with_suffix(".console.txt").write_text(output)  # what the user saw
    return 0


# -- main -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="preset to train (default demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for the launch scripts (repeatable)")
    p.add_argument("--steps", type=int, default=0, help="G steps (default: the preset's train.steps)")
    p.add_argument("--minutes", type=float, default=None, help="training wall-time budget; stops at the first step past it")
    p.add_argument("--data", default=str(ROOT / "data" / "demo-shards"), help="shard folder (made if missing)")
    p.add_argument("--out", default=None, help="run folder for checkpoints and caches (default: a temporary one)")
    p.add_argument("--reference-images", type=int, default=5000, help="real images for the classifier and FID reference")
    p.add_argument("--eval-samples", type=int, default=5000, help="generated images for FID / precision / recall")
    p.add_argument("--cas-samples", type=int, default=5000, help="generated images the CAS classifier trains on")
    p.add_argument("--test-images", type=int, default=2000, help="held-out real images CAS is tested on")
    p.add_argument("--classifier-epochs", type=int, default=5, help="epochs of both classifiers (real and CAS)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core machine two threads ran the demo 4x slower)")
    p.add_argument("--tracking-uri", default="", help="log the training run to this MLflow URI (default: off)")
    p.add_argument("--grid", default=None, help="write a class grid PNG of the final EMA G here")
    p.add_argument("--grid-per-class", type=int, default=10)
    p.add_argument("--raw-g", action="store_true",
                   help="also score the trained G itself (not its EMA) and draw its grid (<grid>_raw_g.png)")
    p.add_argument("--as-user", action="store_true",
                   help="run launch/demo.py as a user does (2 Ray workers; under flock /tmp/ray-tests.lock), time it, "
                        "then score its last checkpoint (--set and --steps go to the demo)")
    p.add_argument("--score", default=None, metavar="G_EMA_PT",
                   help="train nothing: score this checkpoint's EMA G (a g_ema.pt, e.g. from a `make demo` run)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    dataset = dataset_name()
    shards = prepare_shards(args.data, dataset)
    if args.as_user:
        return main_as_user(args, dataset, str(Path(shards).resolve()), wall0)
    if args.score:
        report_checkpoint(args, dataset, Path(args.score), {"mode": "score"}, wall0)
        return 0
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="quality-"))
    cfg = build_config(args, shards, out)
    print(f"[quality] preset {cfg.preset} on {dataset} ({shards}); steps <= {cfg.train.steps}"
          + (f", budget {args.minutes:g} min" if args.minutes else "") + f"; overrides {args.overrides}", flush=True)
    trainer, result, train_s = train(cfg, args.minutes, args.tracking_uri)
    scores = evaluate(trainer.ema.ready(), trainer.cfg, args, dataset, raw_G=trainer.G if args.raw_g else None)
    wall_s = time.perf_counter() - wall0
    report = {
        "preset": cfg.preset, "overrides": args.overrides, "dataset": dataset, "status": result["status"],
        "steps": trainer.step, "train_s": train_s, "wall_s": wall_s,
        "images_seen": trainer.step * cfg.train.global_batch * cfg.loss.d_steps,
        **scores,
        "eval": {"reference_images": args.reference_images, "eval_samples": args.eval_samples,
                 "cas_samples": args.cas_samples, "classifier_epochs": args.classifier_epochs,
                 "standing_stats_passes": cfg.eval.standing_stats_passes, "truncation": 0.0},
        "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": cfg.to_dict(),
    }
    buf = io.StringIO()
    buf.write(f"preset {cfg.preset}: {trainer.step} steps in {train_s / 60:.1f} min ({result['status']}), "
              f"wall {wall_s / 60:.1f} min\n")
    for label, sc in (("EMA G", scores), ("raw G", scores.get("raw_g"))):
        if sc is None:
            continue
        nan = float("nan")
        buf.write(f"  {label}: FID (classifier features, {args.eval_samples} vs {scores['reference_count']} real) "
                  f"{sc['fid']:.3f}; classifier score (IS) {sc.get('is_mean', nan):.3f} +- {sc.get('is_std', nan):.3f}; "
                  f"precision {sc.get('precision_classifier', nan):.3f} recall {sc.get('recall_classifier', nan):.3f}\n")
        buf.write(f"  {label}: CAS {sc['cas']:.3f} vs real-data classifier {sc['real_accuracy']:.3f} "
                  f"(on {scores['test_images']} held-out images)\n")
    print(buf.getvalue(), end="", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
