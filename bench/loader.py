"""Data throughput: make_shards with 1 and N Ray workers, then every available loader backend on those shards.

    python bench/loader.py [--images 1200 --resolution 128 --batch-size 64 --batches 40 --threads 2]

Source images are synthetic 320x240 JPEGs in 10 class folders (made once, not timed). make_shards is timed
from its first task to its last (Ray is started once, before, and warmed up); loaders are timed over
--batches batches after 3 warm-up batches. "img/cpu-s" divides images by the CPU time of this process (all
its threads, DALI's included), i.e. what one core delivers; Ray workers' CPU is not in that column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.make_shards import make_shards  # noqa: E402
from pipeline.data import build_loader  # noqa: E402
from pipeline.data.backends import dali_available  # noqa: E402
from pipeline.ray_local import init_ray  # noqa: E402


def write_source(root: Path, n: int, classes: int = 10, size: tuple[int, int] = (320, 240)) -> None:
    """Photo-like JPEGs: one smooth texture per class, shifted and noised per image."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0 : 2 * h, 0 : 2 * w].astype(np.float32)
    bases = []
    for c in range(classes):
        f = rng.uniform(0.01, 0.08, 3)
        bases.append(np.stack([128 + 90 * np.sin(xx * f[k] + yy * f[(k + 1) % 3] + c) for k in range(3)], -1))
    for i in range(n):
        c = i % classes
        d = root / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        arr = bases[c][y0 : y0 + h, x0 : x0 + w] + rng.integers(-8, 9, (h, w, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)


def bench_make_shards(src: Path, out: Path, resolution: int, workers: int, shard_size: int) -> dict:
    m = make_shards(str(src), str(out), resolution=resolution, shard_size=shard_size, workers=workers,
                    progress=False)
    return {"workers": workers, "images": m.num_samples, "seconds": round(m.stats["elapsed_s"], 2),
            "images_per_s": round(m.stats["images_per_s"], 1)}


def bench_loader(shards: Path, backend: str, batch_size: int, batches: int, threads: int) -> dict:
    device = "cuda" if backend == "dali-gpu" else "cpu"
    with build_loader(str(shards), batch_size=batch_size, backend=backend, num_threads=threads, device=device,
                      random_crop=True, flip=True, seed=0) as loader:
        for _ in range(3):
            next(loader)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            x, _ = next(loader)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = batches * batch_size
    return {"backend": backend, "images": n, "images_per_s": round(n / wall, 1),
            "images_per_cpu_s": round(n / max(cpu, 1e-9), 1), "threads": threads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1200, help="source images")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for make_shards")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="decode threads per loader")
    p.add_argument("--work-dir", default=None, help="keep inputs and shards here (default: a temp dir)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # as in data-loading processes: no thread fight with the decoders
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-loader-"))
    src = work / "src"
    if not src.exists():
        t = time.perf_counter()
        write_source(src, args.images)
        print(f"[bench] wrote {args.images} source JPEGs in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    import ray

    started = init_ray(max(args.workers, 1))
    try:
        make_shards(str(src), str(work / "warmup"), resolution=args.resolution, shard_size=4,
                    workers=args.workers, limit=4 * args.workers, progress=False)  # start and warm the workers
        shard_runs = []
        for workers in sorted({1, args.workers}):
            out = work / f"shards-w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            shard_runs.append(bench_make_shards(src, out, args.resolution, workers, args.shard_size))
    finally:
        if started:
            ray.shutdown()

    backends = ["wds"] + (["dali-cpu"] if dali_available() else [])
    if dali_available() and torch.cuda.is_available():
        backends.append("dali-gpu")
    shards = work / f"shards-w{args.workers}"
    loads = [bench_loader(shards, b, args.batch_size, args.batches, args.threads) for b in backends]

    print(f"\nmake_shards  ({args.images} images 320x240 -> {args.resolution}px JPEG, {os.cpu_count()} CPUs)")
    print(f"{'workers':>8} {'seconds':>8} {'img/s':>8}")
    for r in shard_runs:
        print(f"{r['workers']:>8} {r['seconds']:>8} {r['images_per_s']:>8}")
    print(f"\nloaders  (batch {args.batch_size}, {args.batches} batches, {args.threads} threads, random crop + flip)")
    print(f"{'backend':>9} {'img/s':>8} {'img/cpu-s':>10}")
    for r in loads:
        print(f"{r['backend']:>9} {r['images_per_s']:>8} {r['images_per_cpu_s']:>10}")
    print(json.dumps({"make_shards": shard_runs, "loaders": loads}))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
