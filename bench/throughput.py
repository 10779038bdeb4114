"""Training throughput on one device: our Trainer as a user runs it (a) vs the bare fp32 model step (b).

    python bench/throughput.py --json out.json                   # GPU: BigGAN-128 and BigGAN-deep-128, paper configs
    python bench/throughput.py --device cpu --json out.json      # CPU: shrunk (--ch 16 --resolution 32 --batch 16)
    python bench/throughput.py --loader-only --resolution 128    # the input pipeline alone

One iteration is what `Trainer.train_iteration` does: 2 D steps, 1 G step (and the EMA update).
(a) the real `Trainer`: DeepSpeed engines (train.precision/channels_last/compile=auto as pipeline/performance.py
    resolves them: bf16 on GPUs and on CPUs with AMX-BF16/AVX512-BF16), the real loader
    (`build_loader`, backend auto: DALI on GPU) on shards written from synthetic 128 px-ish JPEGs, or on
    --shards; the knobs train.precision, train.channels_last, train.compile are flags, anything else --set.
(b) the bare step as ajbrock/BigGAN-PyTorch trains by default: G and D from `models`, torch Adam, hinge loss,
    2 D steps + 1 G step, the same orthogonal penalty and EMA copy as (a), fp32, no DeepSpeed, no AMP, no
    channels_last, real images already on the device (no loader).
images/s counts real images per second (loss.d_steps x batch per iteration), as `Trainer.fit` logs it, from
the median iteration time (the mean and the minimum are in the JSON too; the median survives a shared
machine's stalls).
FLOPs: `FlopCounterMode` over one whole iteration (forward + backward of every step; the optimizer's
elementwise math is not counted). MFU = FLOPs / iteration time / --peak-tflops (H100/H200 bf16 dense by
default on those GPUs; n/a on CPU unless given). Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU
the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs before each measurement; falls
back to getrusage's ru_maxrss, which is the process's whole-life peak). Warm-up iterations are not timed; on
GPU per-iteration times come from CUDA events between iterations (no sync inside the loop) and
torch.cuda.synchronize brackets the timed loop.

JSON (--json): {"device", "versions", "runs": [{"arch", "batch", ..., "flops_per_iter", "ratio",
"a": {"images_per_s", "iter_s", "data_wait", "peak_mem", "mfu", ...}, "b": {...}, "loader": {...}}], ...};
units: images/s, seconds (data_wait: seconds per iteration spent waiting for the loader), bytes, FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loader import write_source  # noqa: E402
from models.regularization import orthogonal_penalty  # noqa: E402
from pipeline import config as C  # noqa: E402
from pipeline import process_group  # noqa: E402
from pipeline.loopback import free_port  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402
from pipeline.trainer import build_models  # noqa: E402

log = logging.getLogger("bench.throughput")

ARCH_PRESETS = {"biggan": "imagenet128", "biggan-deep": "imagenet128-deep"}
# Dense bf16 tensor-core peaks (NVIDIA data sheets), matched against torch.cuda.get_device_name, first hit wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4))
GPU_DEFAULTS = {"resolution": 128, "ch": None, "batch": None, "warmup": 5, "iters": 20}
CPU_DEFAULTS = {"resolution": 32, "ch": 16, "batch": 16, "warmup": 3, "iters": 20}
LOADER_BATCHES = 20


# -- device helpers --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_mem(device: torch.device) -> int:
    """Bytes: CUDA max_memory_allocated, else the RSS high-water mark since the last reset_peak_mem."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything `fn` runs (matmuls, convolutions, their backward), as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_iterations(step: Callable[[], object], warmup: int, iters: int, device: torch.device,
                    after_warmup: Callable[[], object] | None = None) -> dict[str, float]:
    """Seconds per call of `step` over `iters` calls after `warmup` untimed ones: mean (total / iters), median
    and min of the per-call times. On GPU the per-call times come from CUDA events between calls (no sync
    inside the loop, so the host may run ahead as in training); on CPU from the wall clock."""
    for _ in range(warmup):
        step()
    sync(device)
    if after_warmup is not None:
        after_warmup()
    cuda = device.type == "cuda"
    marks: list = []
    t0 = time.perf_counter()
    for _ in range(iters):
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())
        step()
    if cuda:
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
    else:
        marks.append(time.perf_counter())
    sync(device)
    total = time.perf_counter() - t0
    if cuda:
        per = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    else:
        per = [b - a for a, b in zip(marks, marks[1:])]
    return {"mean": total / iters, "median": float(np.median(per)), "min": min(per)}


def speeds(times: dict[str, float], images_per_iter: int) -> dict[str, float]:
    """images/s from the median iteration (robust to a loaded machine's stalls) and from the mean."""
    return {"iter_s": times["median"], "iter_s_mean": times["mean"], "iter_s_min": times["min"],
            "images_per_s": images_per_iter / times["median"], "images_per_s_mean": images_per_iter / times["mean"]}


# -- configuration ---------------------------------------------------------------------------------------------
def run_config(arch: str, resolution: int, batch: int, ch: int | None, work: Path, shards: str,
               precision: str = "auto", channels_last: str = "auto", compile: str = "auto",
               overrides: list[str] | None = None) -> C.RunConfig:
    """The arch's paper preset on one worker, at `batch` per step and no gradient accumulation."""
    cfg = get_preset(ARCH_PRESETS[arch])
    cfg.model.resolution = resolution
    if ch is not None:
        cfg.model.g_ch = cfg.model.d_ch = ch
    cfg.data.shards, cfg.data.batch_size = shards, batch
    cfg.train.global_batch, cfg.cluster.num_workers = batch, 1
    cfg.train.precision, cfg.train.channels_last, cfg.train.compile = precision, channels_last, compile
    cfg.train.output_dir = str(work / "out")
    cfg.health.enabled = False
    C.apply_overrides(cfg, overrides or [])
    return C.validate(cfg)


def param_counts(G: torch.nn.Module, D: torch.nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in (("G", G), ("D", D))}


def grad_bytes_per_iter(params: dict[str, int], d_steps: int, dtype_bytes: int) -> int:
    """Gradient bytes all-reduced per iteration: D's grads after each D step, G's after the G step."""
    return (d_steps * params["D"] + params["G"]) * dtype_bytes



# -- synthetic shards ------------------------------------------------------------------------------------------


def make_synthetic_shards(work: Path, n: int, resolution: int) -> str:
    from data_prep.make_shards import make_shards  # noqa: PLC0415

    src, out = work / "images", work / f"shards-{resolution}"
    write_source(src, n, size=(resolution * 5 // 4, resolution * 5 // 4))  # a bit larger than the crop
    make_shards(str(src), str(out), resolution=resolution, shard_size=256, workers=0, progress=False)
    return str(out)


# -- (b) the bare step -----------------------------------------------------------------------------------------
class BareStep:
    """The reference way: fp32 G and D, torch Adam, hinge loss, D twice then G, no DeepSpeed/AMP/channels_last."""

    def __init__(self, cfg: C.RunConfig, device: torch.device):
        torch.manual_seed(cfg.train.seed)
        G, D = build_models(cfg)
        self.G, self.D = G.to(device), D.to(device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        o = cfg.optim
        self.opt_G = torch.optim.Adam(self.G.parameters(), o.g_lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.opt_D = torch.optim.Adam(self.D.parameters(), o.d_lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.batch, self.d_steps = cfg.data.batch_size, cfg.loss.d_steps
        self.ortho_beta, self.num_classes, self.device = cfg.loss.ortho_beta, cfg.model.num_classes, device
        r = cfg.model.resolution
        self.x_real = torch.rand(self.batch, 3, r, r, device=device) * 2 - 1
        self.y_real = torch.randint(0, self.num_classes, (self.batch,), device=device)

    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(self.batch, self.G.dim_z, device=self.device)
        return z, torch.randint(0, self.num_classes, (self.batch,), device=self.device)

    def d_logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.D(x, y)
        return out[0] if isinstance(out, tuple) else out

    def d_step(self) -> None:
        with torch.no_grad():
            z, y_fake = self.latents()
            x_fake = self.G(z, y_fake)
        logits = self.d_logits(torch.cat([self.x_real, x_fake]), torch.cat([self.y_real, y_fake]))
        real, fake = logits.split([self.batch, self.batch])
        loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        self.opt_D.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_D.step()

    def g_step(self) -> None:
        self.D.requires_grad_(False)
        z, y = self.latents()
        loss = -self.d_logits(self.G(z, y), y).mean()
        if self.ortho_beta > 0:
            loss = loss + orthogonal_penalty(self.G, beta=self.ortho_beta)
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_G.step()
        self.D.requires_grad_(True)

    @torch.no_grad()
    def ema_copy(self) -> None:
        """Before ema.start_step the reference's EMA copies G's state (decay 0), as ours does."""
        for dst, src in zip(self.G_ema.state_dict().values(), self.G.state_dict().values()):
            dst.copy_(src)

    def iteration(self) -> None:
        for _ in range(self.d_steps):
            self.d_step()
        self.g_step()
        self.ema_copy()


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,) if torch.cuda.is_available() else ()


def fit_batch(make_cfg: Callable[[int], C.RunConfig], start: int, device: torch.device) -> int:
    """The largest of start, start/2, ... at which one bare fp32 iteration fits in GPU memory."""
    batch = start
    while True:
        try:
            step = BareStep(make_cfg(batch), device)
            step.iteration()
            sync(device)
            return batch
        except _oom_errors():
            log.warning("batch %d does not fit in fp32: trying %d", batch, batch // 2)
            if batch == 1:
                raise
            batch //= 2
        finally:
            step = None  # noqa: F841 - drop the models before the next try
            free_memory(device)


def bench_bare(cfg: C.RunConfig, device: torch.device, warmup: int, iters: int) -> dict:
    reset_peak_mem(device)
    step = BareStep(cfg, device)
    flops = count_flops(step.iteration)  # also the first warm-up iteration
    times = time_iterations(step.iteration, warmup, iters, device)
    out = {**speeds(times, cfg.loss.d_steps * cfg.data.batch_size), "peak_mem": peak_mem(device),
           "flops_per_iter": flops, "params": param_counts(step.G, step.D)}
    del step
    free_memory(device)
    return out


# -- (a) the trainer -------------------------------------------------------------------------------------------


def init_process_group(device: torch.device) -> bool:
    """World size 1 on 127.0.0.1 (what DeepSpeed needs); True if this call created it."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("bench/throughput.py measures one device: run it as a single process")
        return False
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if device.type == "cuda":  # device_id: NCCL binds the GPU now instead of guessing it at the first collective
        process_group.join("nccl", rank=0, world_size=1, device_id=torch.device("cuda", device.index or 0))
    else:
        process_group.join("gloo", rank=0, world_size=1)
    return True


def make_loader_fn(cfg: C.RunConfig, device: torch.device) -> Callable[..., object]:
    """The loader a training worker builds (pipeline.orchestrate.worker_main), for rank 0 of 1."""
    from pipeline.data import build_loader  # noqa: PLC0415

    def make_loader(epoch: int = 0, offset: int = 0, seed: int = 0):
        return build_loader(
            cfg.data.shards, batch_size=cfg.data.batch_size, rank=0, world_size=1, device=device,
            backend=cfg.data.backend, seed=seed, resolution=cfg.model.resolution, random_crop=cfg.data.random_crop,
            flip=cfg.data.flip, num_threads=cfg.data.num_threads, start_epoch=epoch, start_offset=offset,
        )

    return make_loader


def build_trainer(cfg: C.RunConfig, device: torch.device, work: Path):
    from pipeline.checkpoint import CheckpointStore  # noqa: PLC0415
    from pipeline.tracking import Tracker  # noqa: PLC0415
    from pipeline.trainer import Trainer  # noqa: PLC0415

    return Trainer(cfg, make_loader=make_loader_fn(cfg, device), store=CheckpointStore(str(work / "ckpt")),
                   tracker=Tracker("", "", "", enabled=False), device=device)


def is_compiled(trainer) -> bool:
    """Whether the trainer compiled G or D: torch.compile(m) wraps (_orig_mod), m.compile() works in place
    (_compiled_call_impl), DeepSpeed's engine.compile() sets is_compiled."""
    modules = (trainer.G, trainer.D, trainer.g_engine.module, trainer.d_engine.module)
    wrapped = any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None for m in modules)
    return wrapped or any(bool(getattr(e, "is_compiled", False)) for e in (trainer.g_engine, trainer.d_engine))


def bench_trainer(cfg: C.RunConfig, device: torch.device, work: Path, warmup: int, iters: int) -> dict:
    reset_peak_mem(device)
    trainer = build_trainer(cfg, device, work)
    try:
        try:  # also the first warm-up iteration; a cross-check that (a) does (b)'s math
            flops = count_flops(trainer.train_iteration)
        except Exception as e:  # noqa: BLE001 - FlopCounterMode decomposes some ops, which can fail where eager works
            log.warning("(a): counting FLOPs failed (%s: %s); using (b)'s count", type(e).__name__, e)
            flops = None
            trainer.D.requires_grad_(True)  # in case it failed inside the G step

        def reset_wait() -> None:
            trainer.data_wait = 0.0

        times = time_iterations(trainer.train_iteration, warmup, iters, device, after_warmup=reset_wait)
        return {
            **speeds(times, cfg.loss.d_steps * cfg.data.batch_size),
            "data_wait": trainer.data_wait / iters, "data_wait_frac": trainer.data_wait / times["mean"] / iters,
            "peak_mem": peak_mem(device), "flops_per_iter": flops, "dtype": str(trainer.dtype).replace("torch.", ""),
            "precision": cfg.train.precision, "channels_last": trainer.speed.channels_last.on,
            "compile": trainer.speed.compile.on, "compile_applied": is_compiled(trainer),
            "speed": trainer.speed.tags(),
            "loader_backend": trainer.loader.backend, "zero_stage": cfg.optim.zero_stage,
        }
    finally:
        trainer.loader.close()
        trainer = None  # drop engines and models before the next measurement
        free_memory(device)


# -- the input pipeline ----------------------------------------------------------------------------------------
def bench_loader(cfg: C.RunConfig, device: torch.device, batches: int = LOADER_BATCHES) -> dict:
    """Images/s of the loader alone, built as the trainer builds it (same backend, threads, crop, flip)."""
    with make_loader_fn(cfg, device)() as loader:
        for _ in range(3):
            next(loader)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(loader)
        sync(device)
        seconds = time.perf_counter() - t0
        return {"images_per_s": batches * cfg.data.batch_size / seconds, "backend": loader.backend,
                "resolution": cfg.model.resolution, "batch": cfg.data.batch_size, "batches": batches,
                "num_threads": cfg.data.num_threads}


def bench_arch(cfg: C.RunConfig, device: torch.device, work: Path, args: argparse.Namespace,
               peak_tflops: float | None) -> dict:
    """(b), then (a), then the loader, for one arch at one batch. A failure of (a) is recorded, not raised."""
    arch, batch = cfg.model.arch, cfg.data.batch_size
    print(f"[bench] {arch}: (b) bare step, batch {batch}", file=sys.stderr)
    b = bench_bare(cfg, device, args.warmup, args.iters)
    flops, params = b.pop("flops_per_iter"), b.pop("params")
    b["tflops"], b["mfu"] = flops / b["iter_s"] / 1e12, mfu(flops, b["iter_s"], peak_tflops)
    print(f"[bench] {arch}: (a) trainer", file=sys.stderr)
    try:
        a = bench_trainer(cfg, device, work, args.warmup, args.iters)
        a["tflops"], a["mfu"] = flops / a["iter_s"] / 1e12, mfu(flops, a["iter_s"], peak_tflops)
    except Exception as e:  # noqa: BLE001 - keep (b)'s figures and say what broke
        log.exception("(a) failed for %s", arch)
        free_memory(device)
        a = {"error": f"{type(e).__name__}: {e}"}
    from pipeline.engines import use_bf16  # noqa: PLC0415

    run = {"arch": arch, "resolution": cfg.model.resolution, "batch": batch, "g_ch": cfg.model.g_ch or "paper",
           "d_ch": cfg.model.d_ch or "paper", "d_steps": cfg.loss.d_steps, "params": params,
           "flops_per_iter": flops, "flops_per_iter_a": a.pop("flops_per_iter", None),
           "grad_bytes_per_iter": grad_bytes_per_iter(params, cfg.loss.d_steps, 2 if use_bf16(cfg, device) else 4),
           "a": a, "b": b, "ratio": a["images_per_s"] / b["images_per_s"] if "error" not in a else None}
    if not args.no_loader:
        lo = bench_loader(cfg, device)
        lo["ratio_to_a"] = lo["images_per_s"] / a["images_per_s"] if "error" not in a else None
        run["loader"] = lo
    return run


# -- reporting -------------------------------------------------------------------------------------------------
def versions(device: torch.device) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name, mod in (("deepspeed", "deepspeed"), ("dali", "nvidia.dali")):
        with contextlib.suppress(Exception):
            out[name] = __import__(mod, fromlist=["__version__"]).__version__
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} CPUs)"


def mfu(flops: int, iter_s: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops else flops / iter_s / (peak_tflops * 1e12)


def fmt_mfu(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_run(r: dict) -> None:
    a, b = r["a"], r["b"]
    print(f"\n{r['arch']} {r['resolution']}px  batch {r['batch']}  ch G/D {r['g_ch']}/{r['d_ch']}  "
          f"params G {r['params']['G'] / 1e6:.2f}M D {r['params']['D'] / 1e6:.2f}M  "
          f"{r['flops_per_iter'] / 1e12:.3f} TFLOP/iter")
    print(f"  {'':<34} {'img/s':>9} {'s/iter':>8} {'(mean)':>8} {'TFLOP/s':>8} {'MFU':>7} {'peak mem':>10} "
          f"{'data wait/iter':>15}")
    if "error" in a:
        print(f"  (a) trainer FAILED: {a['error']}")
        print(f"  {'(b) bare fp32 step':<34} {b['images_per_s']:>9.1f} {b['iter_s']:>8.3f} {b['iter_s_mean']:>8.3f} "
              f"{b['tflops']:>8.3f} {fmt_mfu(b['mfu']):>7} {fmt_bytes(b['peak_mem']):>10}")
        if "loader" in r:
            print(f"  loader ({r['loader']['backend']}, {r['loader']['resolution']} px): "
                  f"{r['loader']['images_per_s']:.1f} img/s")
        return
    wait = f"{a['data_wait'] * 1e3:.1f} ms ({100 * a['data_wait_frac']:.0f}%)"
    label_a = f"(a) trainer {a['dtype']}{' cl' if a['channels_last'] else ''}{' compile' if a['compile'] else ''}"
    print(f"  {label_a:<34} {a['images_per_s']:>9.1f} {a['iter_s']:>8.3f} {a['iter_s_mean']:>8.3f} "
          f"{a['tflops']:>8.3f} {fmt_mfu(a['mfu']):>7} "
          f"{fmt_bytes(a['peak_mem']):>10} {wait:>15}")
    print(f"  {'(b) bare fp32 step':<34} {b['images_per_s']:>9.1f} {b['iter_s']:>8.3f} {b['iter_s_mean']:>8.3f} "
          f"{b['tflops']:>8.3f} {fmt_mfu(b['mfu']):>7} "
          f"{fmt_bytes(b['peak_mem']):>10} {'-':>15}")
    print(f"  ratio (a)/(b): {r['ratio']:.2f}")
    if a["compile"] and not a["compile_applied"]:
        print("  note: the plan says compile, but the trainer did not compile G or D")
    if "loader" in r:
        lo = r["loader"]
        print(f"  loader ({lo['backend']}, {lo['resolution']} px): {lo['images_per_s']:.1f} img/s = "
              f"{lo['ratio_to_a']:.2f}x what (a) consumes (target >= 3x on GPU)")


# -- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="biggan,biggan-deep", help="comma-separated: biggan, biggan-deep")
    p.add_argument("--device", default=None, help="cuda (default where available) or cpu")
    p.add_argument("--resolution", type=int, default=None, help="128 on GPU, 32 on CPU")
    p.add_argument("--batch", type=int, default=None,
                   help="per-device batch; GPU default: the preset's 256, halved until the fp32 step fits")
    p.add_argument("--ch", type=int, default=None, help="G and D width; GPU default: the paper's, CPU: 16")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (GPU 5, CPU 3)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (GPU 20, CPU 20)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="(a): train.precision")
    p.add_argument("--channels-last", nargs="?", const="true", default="auto", choices=("auto", "true", "false"),
                   help="(a): train.channels_last (default auto; the bare flag means true)")
    p.add_argument("--compile", nargs="?", const="true", default="auto", choices=("auto", "true", "false"),
                   help="(a): train.compile (default auto; the bare flag means true)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other config override for (a) and (b), e.g. data.num_threads=4")
    p.add_argument("--shards", default=None, help="real shard set to read (default: synthetic shards in a temp dir)")
    p.add_argument("--images", type=int, default=None, help="synthetic images to write (default max(512, 4 x batch))")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: H100/H200 bf16 dense)")
    p.add_argument("--loader-only", action="store_true", help="measure only the input pipeline (default 128 px)")
    p.add_argument("--no-loader", action="store_true", help="skip the loader section of a full run")
    p.add_argument("--trainer-json", default=None, help="--loader-only: a throughput JSON whose (a) to compare with")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, 128 if key == "resolution" and args.loader_only else value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as the training worker and the reference both do
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCH_PRESETS]
    if unknown:
        raise SystemExit(f"--arch: {unknown} not in {sorted(ARCH_PRESETS)}")
    peak_tflops = args.peak_tflops or default_peak_tflops(device)

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    created_group = False
    result = {"device": device_name(device), "device_type": device.type, "versions": versions(device),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "loadavg_start": os.getloadavg(), "peak_tflops": peak_tflops,
              "peak_mem_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "rss_high_water_mark",
              "units": {"images_per_s": "real images/s (d_steps x batch per iteration)", "iter_s": "s",
                        "data_wait": "s per iteration", "peak_mem": "bytes", "flops_per_iter": "FLOPs"},
              "runs": []}
    try:
        batch0 = args.batch or get_preset(ARCH_PRESETS[archs[0]]).data.batch_size
        shards = args.shards or None
        if shards is None:
            t = time.perf_counter()
            shards = make_synthetic_shards(work, args.images or max(512, 4 * batch0), args.resolution)
            print(f"[bench] synthetic shards at {args.resolution} px in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr)
        result["shards"] = args.shards or "synthetic"

        def make_cfg(arch: str, batch: int) -> C.RunConfig:
            return run_config(arch, args.resolution, batch, args.ch, work, shards, args.precision,
                              args.channels_last, args.compile, args.overrides)

        if args.loader_only:
            result["loader"] = loader_only(make_cfg(archs[0], batch0), device, args.trainer_json)
            return 0

        created_group = init_process_group(device)
        for arch in archs:
            batch = args.batch
            if batch is None:  # GPU: the preset's per-GPU batch, halved until the fp32 reference step fits
                batch = fit_batch(lambda b, arch=arch: make_cfg(arch, b), get_preset(ARCH_PRESETS[arch]).data.batch_size,
                                  device)
            run = bench_arch(make_cfg(arch, batch), device, work, args, peak_tflops)
            result["runs"].append(run)
            print_run(run)
        failed = [r["arch"] for r in result["runs"] if "error" in r["a"]]
        if failed:
            print(f"\n(a) failed for {', '.join(failed)}: see runs[].a.error in the JSON", file=sys.stderr)
        return 1 if failed else 0
    finally:
        result["loadavg_end"] = os.getloadavg()
        result["process_max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        if created_group:
            process_group.leave()
        shutil.rmtree(work, ignore_errors=True)


def loader_only(cfg: C.RunConfig, device: torch.device, trainer_json: str | None) -> dict:
    lo = bench_loader(cfg, device, batches=2 * LOADER_BATCHES)
    print(f"\nloader ({lo['backend']}, {lo['resolution']} px, batch {lo['batch']}, {lo['num_threads']} threads): "
          f"{lo['images_per_s']:.1f} img/s")
    if trainer_json:
        lo["vs_trainer"] = {}
        for run in json.loads(Path(trainer_json).read_text()).get("runs", []):
            if "images_per_s" not in run.get("a", {}):
                continue
            ratio = lo["images_per_s"] / run["a"]["images_per_s"]
            lo["vs_trainer"][run["arch"]] = {"trainer_images_per_s": run["a"]["images_per_s"], "ratio": ratio}
            print(f"  {run['arch']} (a) consumes {run['a']['images_per_s']:.1f} img/s at {run['resolution']} px: "
                  f"loader/consumption = {ratio:.2f}x (target >= 3x on GPU)")
    return lo


if __name__ == "__main__":
    sys.exit(main())
