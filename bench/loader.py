"""Data throughput: make_shards with 1 and N Ray workers, then every available loader backend on those shards.

    python bench/loader.py [--images 1200 --resolution 128 --batch-size 64 --batches 40 --threads 2]
    python bench/loader.py --no-ray --faults 8 --webdataset-lib   # + the cost of skipping bad samples and the
                                                                  #   webdataset library's own reader

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


def bench_loader(shards: Path, backend: str, batch_size: int, batches: int, threads: int, aug: bool = True) -> dict:
    device = "cuda" if backend == "dali-gpu" else "cpu"
    with build_loader(str(shards), batch_size=batch_size, backend=backend, num_threads=threads, device=device,
                      random_crop=aug, flip=aug, seed=0) as loader:
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
    return {"backend": backend + ("" if aug else " (center)"), "images": n, "images_per_s": round(n / wall, 1),
            "images_per_cpu_s": round(n / max(cpu, 1e-9), 1), "threads": threads}


def corrupt_copy(shards: Path, out: Path, n_bad: int) -> list[str]:
    """A copy of the shard set with `n_bad` JPEGs spread over it overwritten in place by corrupt ones of the
    same length (markers intact, undefined Huffman table, garbage scan: PIL and DALI both fail on them)."""
    from data_prep.shard_format import parse_index, read_manifest  # noqa: PLC0415

    shutil.copytree(shards, out)
    manifest = read_manifest(str(out))
    entries = [(s, e) for s in manifest.shards for e in parse_index((out / s.index).read_text())]
    picks = np.linspace(0, len(entries) - 1, n_bad).astype(int) if n_bad else []
    keys = []
    for k in picks:
        shard, e = entries[k]
        off, size = e.components["jpg"]
        with open(out / shard.name, "r+b") as f:
            f.seek(off)
            jpg = bytearray(f.read(size))
            sos = jpg.index(b"\xff\xda")
            start = sos + 2 + int.from_bytes(jpg[sos + 2 : sos + 4], "big")
            jpg[start:-2] = np.random.default_rng(int(k)).integers(0, 256, size - 2 - start, dtype=np.uint8).tobytes()
            jpg[sos + 6] = 0xFF
            f.seek(off)
            f.write(bytes(jpg))
        keys.append(f"{shard.name}/{e.key}")
    return keys


def bench_faults(shards: Path, work: Path, backend: str, batch_size: int, threads: int, n_bad: int) -> dict:
    """One epoch clean, then one with n_bad corrupt samples: what skipping them costs, per bad sample."""
    bad = work / f"corrupt-{n_bad}"
    shutil.rmtree(bad, ignore_errors=True)
    corrupt_copy(shards, bad, n_bad)
    times = {}
    for name, root in (("clean", shards), ("corrupt", bad)):
        with build_loader(str(root), batch_size=batch_size, backend=backend, num_threads=threads,
                          random_crop=True, seed=0) as loader:
            next(loader)  # warm: pipeline built, first window read
            t = time.perf_counter()
            for _ in range(loader.batches_per_epoch - 1):
                next(loader)
            times[name] = time.perf_counter() - t
            skipped = loader.skipped
            fallbacks, fault_s = loader.fault_time  # DALI: batches decoded again on the CPU, seconds spent
    n = loader.batches_per_epoch * batch_size
    return {"backend": backend, "bad": n_bad, "skipped": skipped, "dali_fallbacks": fallbacks,
            "clean_img_s": round(n / times["clean"], 1), "corrupt_img_s": round(n / times["corrupt"], 1),
            "ms_per_failed_batch": round(1000 * fault_s / max(fallbacks, 1), 1)}


def bench_webdataset_lib(shards: Path, batch_size: int, batches: int) -> dict:
    """The webdataset library's own streaming reader on the same tars, decoding with the same function as
    our "wds" backend (one thread, center crop): what its tar iteration would give instead of ours."""
    import webdataset as wds  # noqa: PLC0415

    from data_prep.shard_format import read_manifest  # noqa: PLC0415
    from pipeline.data.backends import decode_pil  # noqa: PLC0415

    m = read_manifest(str(shards))
    urls = [str(shards / s.name) for s in m.shards]
    res = m.resolution

    def decode(sample):
        return decode_pil(sample["jpg"], res, 1.0, 0.5, 0.5, 0), int(sample["cls"])

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().map(decode).batched(
        batch_size, collation_fn=lambda b: (torch.from_numpy(np.stack([x for x, _ in b])), [y for _, y in b]))
    it = iter(ds)
    for _ in range(3):
        next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = batches * batch_size
    return {"backend": "webdataset lib (1 thread)", "images": n, "images_per_s": round(n / wall, 1),
            "images_per_cpu_s": round(n / max(cpu, 1e-9), 1), "threads": 1}


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
    p.add_argument("--no-ray", action="store_true", help="write the shards in this process; no make_shards timing")
    p.add_argument("--faults", type=int, default=0, help="also time an epoch with this many corrupt JPEGs")
    p.add_argument("--webdataset-lib", action="store_true", help="also time the webdataset library's own reader")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # as in data-loading processes: no thread fight with the decoders
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-loader-"))
    src = work / "src"
    if not src.exists():
        t = time.perf_counter()
        write_source(src, args.images)
        print(f"[bench] wrote {args.images} source JPEGs in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    shard_runs = []
    if args.no_ray:
        args.workers = 0
        out = work / "shards-w0"
        if not out.exists():
            make_shards(str(src), str(out), resolution=args.resolution, shard_size=args.shard_size, workers=0,
                        progress=False)
    else:
        shard_runs = run_make_shards(src, work, args)

    backends = ["wds"] + (["dali-cpu"] if dali_available() else [])
    if dali_available() and torch.cuda.is_available():
        backends.append("dali-gpu")
    shards = work / f"shards-w{args.workers}"
    loads = [bench_loader(shards, b, args.batch_size, args.batches, args.threads) for b in backends]
    if args.webdataset_lib:
        for _ in range(2):  # interleaved, the better of two: the machine is shared
            loads.append(bench_loader(shards, "wds", args.batch_size, args.batches, 1, aug=False))
            loads.append(bench_webdataset_lib(shards, args.batch_size, args.batches))
    fault_runs = [bench_faults(shards, work, b, args.batch_size, args.threads, args.faults)
                  for b in backends if args.faults and b != "dali-gpu"]

    if shard_runs:
        print(f"\nmake_shards  ({args.images} images 320x240 -> {args.resolution}px JPEG, {os.cpu_count()} CPUs)")
        print(f"{'workers':>8} {'seconds':>8} {'img/s':>8}")
        for r in shard_runs:
            print(f"{r['workers']:>8} {r['seconds']:>8} {r['images_per_s']:>8}")
    print(f"\nloaders  (batch {args.batch_size}, {args.batches} batches, random crop + flip; webdataset lib: center)")
    print(f"{'backend':>26} {'threads':>7} {'img/s':>8} {'img/cpu-s':>10}")
    for r in loads:
        print(f"{r['backend']:>26} {r['threads']:>7} {r['images_per_s']:>8} {r['images_per_cpu_s']:>10}")
    if fault_runs:
        print(f"\nskipping corrupt JPEGs  (one epoch, {args.faults} bad samples)")
        print(f"{'backend':>9} {'clean img/s':>12} {'corrupt img/s':>14} {'skipped':>8} {'CPU redo':>9} {'ms/redo':>8}")
        for r in fault_runs:
            print(f"{r['backend']:>9} {r['clean_img_s']:>12} {r['corrupt_img_s']:>14} {r['skipped']:>8} "
                  f"{r['dali_fallbacks']:>9} {r['ms_per_failed_batch']:>8}")
    print(json.dumps({"make_shards": shard_runs, "loaders": loads, "faults": fault_runs}))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run_make_shards(src: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    import ray  # noqa: PLC0415

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

    return shard_runs


if __name__ == "__main__":
    sys.exit(main())
