"""Prove every GPU path of the trainer on one device in one command (at most about five minutes on a GPU).

    python bench/gpu_check.py --out results/                  # CUDA: a reduced BigGAN-128, bf16, channels_last
    python bench/gpu_check.py --device cpu --quick --out /tmp # the same parts, tiny, on CPU (the test runs this)

Parts, each timed and reported pass / fail / skip (a failing part does not stop the others):
  environment   versions, the device, bf16 support
  shards        synthetic JPEG shards written with data_prep (nothing downloaded)
  loader:<b>    each installed loader backend (wds always; dali-cpu and dali-gpu where DALI imports) reads
                batches of the right shape, dtype and device
  train         the Trainer as a user runs it: bf16, channels_last, ZeRO 1, eager; finite losses, every tensor on
                the training device (pipeline.placement), EMA G in fp32 averaging the fp32 masters; checkpoints
  resume        a fresh Trainer loads the middle checkpoint and runs to the end: every weight, buffer, EMA entry
                and optimizer moment equals the straight run's, bit for bit (deterministic kernels on)
  zero0         the same at ZeRO 0 (DeepSpeed's other bf16 optimizer wrapper)
  compile       train.compile=true: compile time, then step time against eager (CPU: --compile to run it)
  rollback      the collapse drill (fp32 masters scaled x25, D lr x100) is detected and rolled back
  evaluation    FID / IS / precision / recall of EMA G with the dataset-classifier features
  sampling      G_ema loaded back from the checkpoint's g_ema.pt (pipeline.sample) renders a class grid

It needs only PyTorch and the project's pure-Python dependencies (DeepSpeed built without ops; no Ray, no
MLflow server). Exit status 0 when no part failed. JSON (--out DIR/gpu_check.json): {"device", "versions",
"parts": [{"name", "status", "seconds", "detail"}], "passed", "total_s"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import build_trainer, init_process_group, make_synthetic_shards  # noqa: E402
from pipeline import config as C  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402

log = logging.getLogger("bench.gpu_check")

# the reduced BigGAN-128 of a GPU check, and the tiny one of --quick
GPU_SIZE = {"resolution": 128, "ch": 32, "batch": 16, "steps": 24, "images": 512, "compile_steps": 6}
QUICK_SIZE = {"resolution": 32, "ch": 4, "batch": 4, "steps": 4, "images": 64, "compile_steps": 2}


class Check:
    """Runs parts, records pass / fail / skip with timings, prints a line per part."""

    def __init__(self, on_part: Callable[[], None] = lambda: None, deadline: float = math.inf) -> None:
        self.parts: list[dict] = []
        self.on_part, self.deadline = on_part, deadline  # on_part: after each part (the JSON so far)

    def run(self, name: str, fn: Callable[[], str | None]) -> bool:
        t0 = time.perf_counter()
        try:
            if t0 > self.deadline:
                raise Skip("out of time (--budget-s)")
            detail, status = fn() or "", "pass"
        except Skip as why:
            detail, status = str(why), "skip"
        except Exception as err:  # noqa: BLE001 - report it and go on to the next part
            detail, status = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}", "fail"
        seconds = time.perf_counter() - t0
        self.parts.append({"name": name, "status": status, "seconds": round(seconds, 2), "detail": detail})
        first = detail.strip().splitlines()[0] if detail.strip() else ""
        print(f"[gpu_check] {status.upper():4s} {name:18s} {seconds:7.1f}s  {first}", flush=True)
        if status == "fail":
            print(detail, flush=True)
        self.on_part()
        return status == "pass"


class Skip(Exception):
    """A part that does not apply here (e.g. DALI not installed)."""


def fingerprint(trainer) -> dict[str, torch.Tensor]:
    from pipeline.snapshot import state_fingerprint

    return state_fingerprint(trainer, ema=trainer.ema.ready())


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[list[str], float]:
    keys = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    worst = max((float((a[k].float() - b[k].float()).abs().max()) for k in keys if k in b), default=0.0)
    return keys, worst


def make_deterministic(device: torch.device) -> None:
    """Exact resume needs kernels that give the same bits twice (cuDNN and cuBLAS choose otherwise). CPU kernels
    already do here, and the deterministic mode triples their time."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


class GpuCheck:
    def __init__(self, args: argparse.Namespace, device: torch.device, work: Path, out: Path):
        self.args, self.device, self.work, self.out = args, device, work, out
        self.size = dict(QUICK_SIZE if args.quick else GPU_SIZE)
        if args.steps:
            self.size["steps"] = args.steps
        self.shards, self.num_classes = "", 0
        self.ckpt_root: Path | None = None
        self.train_step_s: float | None = None
        self.check = Check(on_part=self.write_report, deadline=time.perf_counter() + args.budget_s)
        self.versions: dict = {}
        self.t0 = time.perf_counter()

    def write_report(self) -> dict:
        """gpu_check.json with the parts so far: a run killed at its time limit still leaves them."""
        failed = [p["name"] for p in self.check.parts if p["status"] == "fail"]
        report = {"device": self.versions.get("gpu", str(self.device)), "versions": self.versions,
                  "size": self.size, "parts": self.check.parts, "passed": not failed,
                  "total_s": round(time.perf_counter() - self.t0, 1)}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        return report

    # -- configs -----------------------------------------------------------------------------------------------
    def config(self, name: str, **overrides) -> C.RunConfig:
        """The imagenet128 preset (the paper's BigGAN-128) shrunk to one device and a few dozen steps."""
        s = self.size
        cfg = get_preset("imagenet128")
        cfg.model.resolution, cfg.model.num_classes = s["resolution"], self.num_classes
        cfg.model.g_ch = cfg.model.d_ch = s["ch"]
        if s["resolution"] < 64:
            cfg.model.attention = 0
        if self.args.quick:
            cfg.model.dim_z, cfg.model.shared_dim = 16, 8
        cfg.data.shards, cfg.data.batch_size, cfg.data.num_threads = self.shards, s["batch"], self.args.threads
        cfg.train.global_batch, cfg.cluster.num_workers = s["batch"], 1
        cfg.train.precision, cfg.train.channels_last, cfg.optim.zero_stage = "bf16", True, 1
        cfg.train.steps = s["steps"]
        cfg.train.log_every, cfg.train.sample_every = max(1, s["steps"] // 4), 10**9
        cfg.train.checkpoint_every = max(1, s["steps"] // 2)
        cfg.train.output_dir = str(self.work / name / "out")
        cfg.ema.start_step, cfg.ema.decay = 1, 0.9
        cfg.health.enabled, cfg.eval.every = False, 0
        C.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
        return C.validate(cfg)

    def trainer(self, cfg: C.RunConfig, name: str, **kwargs):
        from pipeline.checkpoint import CheckpointStore  # noqa: PLC0415
        from pipeline.tracking import Tracker  # noqa: PLC0415
        from pipeline.trainer import Trainer  # noqa: PLC0415

        if not kwargs:
            return build_trainer(cfg, self.device, self.work / name)
        from bench.throughput import make_loader_fn  # noqa: PLC0415

        return Trainer(cfg, make_loader=make_loader_fn(cfg, self.device), store=CheckpointStore(str(self.work / name / "ckpt")),
                       tracker=Tracker("", "", "", enabled=False), device=self.device, **kwargs)

    def timed_fit(self, trainer) -> tuple[dict, list[float]]:
        """fit(), with the wall time of every iteration (synchronized, so GPU work is counted where it runs)."""
        times: list[float] = []
        inner = trainer.train_iteration

        def iteration() -> None:
            t0 = time.perf_counter()
            inner()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)

        trainer.train_iteration = iteration
        take = trainer.take_metrics
        self.last_metrics: dict[str, float] = {}

        def take_metrics() -> dict[str, float]:
            self.last_metrics = take()
            return self.last_metrics

        trainer.take_metrics = take_metrics
        return trainer.fit(), times

    # -- parts -------------------------------------------------------------------------------------------------
    def environment(self) -> str:
        info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(self.device)}
        import deepspeed  # noqa: PLC0415

        info["deepspeed"] = deepspeed.__version__
        if self.device.type == "cuda":
            info |= {"gpu": torch.cuda.get_device_name(self.device), "cuda": torch.version.cuda,
                     "bf16": torch.cuda.is_bf16_supported(), "capability": list(torch.cuda.get_device_capability())}
            if not info["bf16"]:
                raise RuntimeError(f"{info['gpu']} does not support bf16")
        self.versions.update(info)
        return ", ".join(f"{k} {v}" for k, v in info.items())

    def make_shards(self) -> str:
        from data_prep.shard_format import read_manifest  # noqa: PLC0415

        self.shards = make_synthetic_shards(self.work, self.size["images"], self.size["resolution"])
        self.num_classes = len(read_manifest(self.shards).classes)
        return f"{self.size['images']} images at {self.size['resolution']} px, {self.num_classes} classes"

    def loader(self, backend: str) -> str:
        from pipeline.data import build_loader  # noqa: PLC0415

        if backend.startswith("dali"):
            try:
                import nvidia.dali  # noqa: F401, PLC0415
            except ImportError as err:
                raise Skip(f"DALI not installed ({err})") from None
            if backend == "dali-gpu" and self.device.type != "cuda":
                raise Skip("dali-gpu needs a CUDA device")
        device = self.device if backend == "dali-gpu" else torch.device("cpu")
        loader = build_loader(self.shards, batch_size=self.size["batch"], backend=backend, seed=0,
                              resolution=self.size["resolution"], device=device, num_threads=self.args.threads)
        try:
            t0, n = time.perf_counter(), 0
            for i, (x, y) in enumerate(loader):
                want = (self.size["batch"], 3, self.size["resolution"], self.size["resolution"])
                if tuple(x.shape) != want or y.shape[0] != want[0]:
                    raise RuntimeError(f"batch shape {tuple(x.shape)} / {tuple(y.shape)}, want {want}")
                if x.device.type != device.type:
                    raise RuntimeError(f"{backend} delivered images on {x.device}, want {device}")
                if not torch.isfinite(x.float()).all() or x.float().abs().max() > 1.0 + 1e-3:
                    raise RuntimeError("images not finite or outside [-1, 1]")
                n += x.shape[0]
                if i == 7:
                    break
            dt = time.perf_counter() - t0
        finally:
            if hasattr(loader, "close"):
                loader.close()
        return f"{n} images, {n / dt:.0f} images/s (first batches, {self.args.threads} threads), on {device}"

    def train(self) -> str:
        from pipeline.placement import misplaced  # noqa: PLC0415

        cfg = self.config("train")
        trainer = self.trainer(cfg, "train")
        result, times = self.timed_fit(trainer)
        if result["status"] != "finished" or trainer.step != cfg.train.steps:
            raise RuntimeError(f"fit ended {result}")
        metrics = self.last_metrics
        if not all(math.isfinite(metrics.get(k, math.nan)) for k in ("d_loss", "g_loss")):
            raise RuntimeError(f"losses not finite (or not logged): {metrics}")
        bad = misplaced(trainer)
        if bad:
            raise RuntimeError("misplaced: " + "; ".join(bad))
        dtypes = {p.dtype for p in trainer.G.parameters()}, {p.dtype for p in trainer.ema.model.parameters()}
        if dtypes != ({torch.bfloat16}, {torch.float32}):
            raise RuntimeError(f"G / EMA G dtypes {dtypes}, want bf16 / fp32")
        for p in [*trainer.G.parameters(), *trainer.D.parameters(), *trainer.ema.model.parameters()]:
            if not torch.isfinite(p.float()).all():
                raise RuntimeError("non-finite weights after training")
        if not trainer.G.linear.weight.is_contiguous() and not self.args.quick:
            raise RuntimeError("G weights left non-contiguous")
        self.straight = fingerprint(trainer)
        self.store = trainer.store
        self.train_step_s = sorted(times)[len(times) // 2]
        self.ckpt_root = trainer.store.fetch(trainer.store.latest(), self.work / "train" / "export")
        steps = [c.step for c in trainer.store.list()]
        mem = f", peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB" if self.device.type == "cuda" else ""
        losses = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("d_loss", "g_loss"))
        return (f"{trainer.step} steps, median {self.train_step_s * 1e3:.0f} ms/iteration (first "
                f"{times[0]:.1f}s){mem}; checkpoints {steps}; {losses}")

    def resume(self) -> str:
        if self.ckpt_root is None:
            raise Skip("train failed")
        cfg = self.config("train")  # same output dir and store: a restarted worker
        trainer = self.trainer(cfg, "train")
        middle = cfg.train.checkpoint_every
        trainer.load_checkpoint(self.store.get(middle))
        if trainer.step != middle:
            raise RuntimeError(f"restored step {trainer.step}, want {middle}")
        trainer.fit()
        keys, worst = differences(self.straight, fingerprint(trainer))
        if keys:
            raise RuntimeError(f"{len(keys)} of {len(self.straight)} tensors differ after resume (max |diff| "
                               f"{worst:.3g}), e.g. {keys[:4]}")
        return f"resumed at step {middle}, {len(self.straight)} tensors equal bit for bit at step {trainer.step}"

    def zero0(self) -> str:
        cfg = self.config("zero0", **{"optim.zero_stage": 0, "train.steps": max(2, self.size["steps"] // 4),
                                      "train.checkpoint_every": 10**6})
        trainer = self.trainer(cfg, "zero0")
        result, times = self.timed_fit(trainer)
        if result["status"] != "finished":
            raise RuntimeError(f"fit ended {result}")
        return f"{trainer.step} steps, median {sorted(times)[len(times) // 2] * 1e3:.0f} ms/iteration, " \
               f"{type(trainer.g_engine.optimizer).__name__}"

    def compile(self) -> str:
        if self.device.type != "cuda" and not self.args.compile:
            raise Skip("compile on CPU takes minutes: --compile to run it")
        steps = self.size["compile_steps"]
        cfg = self.config("compile", **{"train.compile": True, "train.steps": steps, "train.checkpoint_every": 10**6})
        trainer = self.trainer(cfg, "compile")
        result, times = self.timed_fit(trainer)
        if result["status"] != "finished":
            raise RuntimeError(f"fit ended {result}")
        steady = min(times[1:]) if len(times) > 1 else times[0]
        vs = f", eager {self.train_step_s * 1e3:.0f} ms (x{self.train_step_s / steady:.2f})" if self.train_step_s else ""
        return f"first iteration (compiling) {times[0]:.1f}s, then {steady * 1e3:.0f} ms/iteration{vs}"

    def rollback(self) -> str:
        quick = self.args.quick
        steps, inject = (14, 8) if quick else (30, 20)
        cfg = self.config("rollback", **{
            "health.enabled": True, "health.every": 1 if quick else 2, "health.min_history": 3,
            "health.healthy_after": 1 if quick else 2, "train.checkpoint_every": 2 if quick else 4,
            "train.keep_last": 1, "train.steps": steps, "train.log_every": 2,
        })
        trainer = self.trainer(cfg, "rollback", inject_collapse_at=inject)
        result = trainer.fit()
        if not trainer.injected or result["rollbacks"] < 1 or result["status"] != "finished":
            raise RuntimeError(f"drill at step {inject} not rolled back: {result}, log {trainer.rollback_log}")
        return f"collapse injected at {inject}: rolled back {trainer.rollback_log}, finished at step {trainer.step}"

    def evaluation(self) -> str:
        if self.ckpt_root is None:
            raise Skip("train failed")
        from pipeline.evaluation import ReferenceSet, score  # noqa: PLC0415
        from pipeline.sample import load_generator  # noqa: PLC0415

        n = 64 if self.args.quick else 512
        ecfg = C.EvalConfig(features="classifier", num_samples=n, reference_images=n, pr_samples=min(n, 256),
                            batch_size=32, classifier_epochs=1, standing_stats_passes=2)
        G, _, _ = load_generator(self.ckpt_root, device=self.device)
        ref = ReferenceSet(ecfg, self.shards, resolution=self.size["resolution"], num_classes=self.num_classes,
                           output_dir=self.work / "eval", device=self.device)
        result = score(G, ref, num_classes=self.num_classes, device=self.device)
        if not all(math.isfinite(result[k]) for k in ("fid", "is_mean")):
            raise RuntimeError(f"non-finite metrics {result}")
        return ", ".join(f"{k} {v:.4g}" for k, v in result.items())

    def sampling(self) -> str:
        if self.ckpt_root is None:
            raise Skip("train failed")
        from pipeline.sample import class_grid, load_generator, save_grid  # noqa: PLC0415

        G, cfg, names = load_generator(self.ckpt_root, device=self.device)
        if next(G.parameters()).device.type != self.device.type:
            raise RuntimeError("generator not on the device")
        images = class_grid(G, list(range(min(4, len(names)))), 4, dim_z=G.dim_z, truncation=0.5, device=self.device)
        if not torch.isfinite(images).all() or images.std() == 0:
            raise RuntimeError("samples not finite or constant")
        path = self.out / "gpu_check_samples.png"
        save_grid(images, path, nrow=4)
        return f"{images.shape[0]} samples at {images.shape[-1]} px -> {path.name}"

    def all(self) -> list[dict]:
        parts: list[tuple[str, Callable[[], str | None]]] = [
            *[(f"loader:{b}", lambda b=b: self.loader(b)) for b in ("wds", "dali-cpu", "dali-gpu")],
            ("train", self.train), ("resume", self.resume), ("zero0", self.zero0), ("rollback", self.rollback),
            ("evaluation", self.evaluation), ("sampling", self.sampling),
            ("compile", self.compile),  # last: its compile time is the least predictable
        ]
        chosen = set(self.args.parts.split(",")) if self.args.parts else None
        unknown = (chosen or set()) - {name.split(":")[0] for name, _ in parts} - {name for name, _ in parts}
        if unknown:
            raise SystemExit(f"--parts: unknown {sorted(unknown)}; known: {[name for name, _ in parts]}")
        c = self.check
        c.run("environment", self.environment)
        if c.run("shards", self.make_shards):
            for name, fn in parts:
                if chosen is None or name in chosen or name.split(":")[0] in chosen:
                    c.run(name, fn)
        return c.parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default where available) or cpu")
    p.add_argument("--out", default=None, help="folder for gpu_check.json and the sample grid")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU tests): 32 px, ch 4, batch 4, 4 steps")
    p.add_argument("--steps", type=int, default=None, help="training steps of the train/resume parts")
    p.add_argument("--compile", action="store_true", help="run the compile part on CPU too")
    p.add_argument("--parts", default="", help="comma-separated parts to run (default all), e.g. train,resume,loader")
    p.add_argument("--budget-s", type=float, default=285.0,
                   help="parts not started by then are skipped (the whole check should end inside 5 minutes)")
    p.add_argument("--threads", type=int, default=None, help="loader threads (default min(8, CPUs))")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("[gpu_check] FAIL: --device cuda but torch sees no CUDA device", flush=True)
            return 2
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    args.threads = args.threads or min(8, os.cpu_count() or 1)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    make_deterministic(device)
    init_process_group(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as tmp:
        check = GpuCheck(args, device, Path(tmp), out)
        parts = check.all()
        report = check.write_report()
    total = report["total_s"]
    failed = [p["name"] for p in parts if p["status"] == "fail"]
    verdict = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
    print(f"[gpu_check] {verdict}: {sum(p['status'] == 'pass' for p in parts)} passed, {len(failed)} failed, "
          f"{sum(p['status'] == 'skip' for p in parts)} skipped in {total:.0f}s -> {out / 'gpu_check.json'}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
