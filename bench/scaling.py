"""Multi-node data-parallel scaling estimate: gradient bytes per iteration x all-reduce time vs compute time.

    python bench/scaling.py --throughput-json out.json             # compute time, gradient bytes from throughput.py
    python bench/scaling.py --arch biggan --compute-s 0.6          # paper model's gradients, compute time by hand
    python bench/scaling.py --arch biggan --no-measure --intra-GBps 360 --compute-s 0.6

Method (bench/RESULTS.md has the long form):
- Gradient bytes per iteration = (loss.d_steps x D's parameters + G's parameters) x bytes of the training dtype:
  every D step all-reduces D's gradients and the G step G's (D is frozen then), no gradient accumulation.
  Taken from a throughput.py JSON (its "grad_bytes_per_iter"), or counted on the model built on the meta device.
- All-reduce bandwidth is measured here with torch.distributed on the local backend: --nproc processes (2 on
  CPU, gloo on 127.0.0.1; one per GPU with NCCL where there are several GPUs) all-reduce float32 buffers of
  --sizes-mb; bus bandwidth = size / time x 2(n-1)/n (the nccl-tests convention).
- A ring all-reduce of S bytes over n members whose slowest link moves B bytes/s takes 2(n-1)/n x S / B
  (+ 2(n-1) x latency). Over N nodes x G GPUs, hierarchically: a ring inside each node at the measured bus
  bandwidth (of the size nearest one all-reduce's message) or --intra-GBps, then a ring over the N nodes at
  the node's inter-node bandwidth (--links-gbps x --nics-per-node); each node's NICs carry 2(N-1)/N x S
  whatever the rails' split.
- Efficiency = t_compute / (t_compute + t_allreduce): DeepSpeed ZeRO 0/1 with overlap_comm off (our engines)
  reduces after the backward pass, so nothing overlaps; "overlap" is the upper bound
  t_compute / max(t_compute, t_allreduce). Weak scaling: the per-GPU batch stays fixed as nodes are added.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import process_group  # noqa: E402
from pipeline.loopback import free_port  # noqa: E402

NODES = (1, 2, 4, 8, 16, 32, 64)
LINKS_GBPS = (100.0, 200.0, 400.0)
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp32": 4, "float32": 4}
ARCH_PRESETS = {"biggan": "imagenet128", "biggan-deep": "imagenet128-deep"}


# -- the model -------------------------------------------------------------------------------------------------
def ring_allreduce_s(nbytes: float, n: int, bandwidth: float, latency_s: float = 0.0) -> float:
    """Seconds for a ring all-reduce of `nbytes` over `n` members, `bandwidth` bytes/s per link."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency_s


def cluster_allreduce_s(nbytes: float, nodes: int, gpus_per_node: int, node_bandwidth: float,
                        intra_bandwidth: float, latency_s: float = 0.0) -> float:
    """Hierarchical all-reduce over nodes x gpus_per_node: ring inside the node, then ring over the nodes."""
    return (ring_allreduce_s(nbytes, gpus_per_node, intra_bandwidth)
            + ring_allreduce_s(nbytes, nodes, node_bandwidth, latency_s))


def efficiency(compute_s: float, comm_s: float, overlap: bool = False) -> float:
    """Per-GPU throughput at scale / on one GPU."""
    return compute_s / (max(compute_s, comm_s) if overlap else compute_s + comm_s)


def gbps_to_bytes(gbps: float) -> float:
    return gbps * 1e9 / 8


def scaling_rows(compute_s: float | None, grad_bytes: float, nodes: list[int], links_gbps: list[float], gpus_per_node: int,
                 intra_bandwidth: float, nics_per_node: int = 1, latency_s: float = 0.0,
                 collectives: int = 1) -> list[dict]:
    """One row per (link, nodes). `grad_bytes` go in `collectives` all-reduces per iteration (D, D, G): the
    bandwidth term depends only on their sum, the latency term is paid once per all-reduce."""
    rows = []
    for link in links_gbps:
        node_bw = gbps_to_bytes(link) * nics_per_node
        for n in nodes:
            intra = ring_allreduce_s(grad_bytes, gpus_per_node, intra_bandwidth)
            inter = ring_allreduce_s(grad_bytes, n, node_bw) + collectives * 2 * (n - 1) * latency_s
            comm = intra + inter
            rows.append({"link_gbps": link, "nodes": n, "gpus": n * gpus_per_node, "allreduce_s": comm,
                         "intra_s": intra, "inter_s": inter,
                         "efficiency": efficiency(compute_s, comm) if compute_s else None,
                         "efficiency_overlap": efficiency(compute_s, comm, overlap=True) if compute_s else None,
                         "compute_s_for_90pct": 9 * comm})
    return rows


def model_params(arch: str, resolution: int = 128, ch: int | None = None) -> dict[str, int]:
    """Trainable parameters of the preset's G and D, built on the meta device (no memory, no init cost)."""
    from pipeline.presets import get_preset  # noqa: PLC0415
    from pipeline.trainer import build_models  # noqa: PLC0415

    cfg = get_preset(ARCH_PRESETS[arch])
    cfg.model.resolution = resolution
    if ch is not None:
        cfg.model.g_ch = cfg.model.d_ch = ch
    with torch.device("meta"):
        G, D = build_models(cfg)
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in (("G", G), ("D", D))}


# -- the measurement -------------------------------------------------------------------------------------------


def _allreduce_worker(rank: int, world: int, port: int, backend: str, sizes: list[int], iters: int,
                      out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    process_group.join(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=device if cuda else None)
    try:
        rows = []
        for nbytes in sizes:
            buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
            for _ in range(2):
                dist.all_reduce(buf)
            times = []
            for _ in range(iters):
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            slowest = torch.tensor(times, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # an all-reduce ends when its last member does
            seconds = statistics.median(slowest.tolist())
            algbw = buf.numel() * 4 / seconds
            rows.append({"bytes": buf.numel() * 4, "seconds": seconds, "algbw": algbw,
                         "busbw": algbw * 2 * (world - 1) / world})
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        process_group.leave()


def measure_allreduce(nproc: int = 2, backend: str = "gloo", sizes_mb: tuple[float, ...] = (1, 4, 16, 64, 256),
                      iters: int = 5) -> dict:
    """All-reduce time and bandwidth between `nproc` local processes on 127.0.0.1, one row per size."""
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"NCCL over {nproc} processes needs {nproc} GPUs, found {torch.cuda.device_count()}")
    sizes = [int(mb * 2**20) for mb in sizes_mb]
    with tempfile.TemporaryDirectory(prefix="bench-allreduce-") as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(_allreduce_worker, args=(nproc, free_port(), backend, sizes, iters, out), nprocs=nproc, join=True)
        rows = json.loads(Path(out).read_text())
    return {"backend": backend, "nproc": nproc, "iters": iters, "rows": rows, "busbw": rows[-1]["busbw"]}


def nearest_row(rows: list[dict], message_bytes: float) -> dict:
    """The measured size closest (in ratio) to one all-reduce's message."""
    return min(rows, key=lambda r: abs(math.log(r["bytes"] / max(message_bytes, 1.0))))


# -- main ------------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--throughput-json", default=None, help="a bench/throughput.py --json output")
    p.add_argument("--arch", default=None, help="biggan or biggan-deep (default: the JSON's first run, else biggan)")
    p.add_argument("--resolution", type=int, default=128, help="without a JSON: the model's resolution")
    p.add_argument("--ch", type=int, default=None, help="without a JSON: G and D width (default: the paper's)")
    p.add_argument("--compute-s", type=float, default=None,
                   help="per-GPU seconds per iteration (default: the JSON's (a) median iteration time)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="gradient dtype on the wire (default: the JSON's (a) dtype, else bf16)")
    p.add_argument("--d-steps", type=int, default=2, help="D steps per G step (loss.d_steps)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch, for images/s (default: the JSON's)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", default=",".join(map(str, NODES)))
    p.add_argument("--links-gbps", default=",".join(f"{x:g}" for x in LINKS_GBPS),
                   help="inter-node bandwidth per NIC, Gb/s")
    p.add_argument("--nics-per-node", type=int, default=1, help="NICs a node's all-reduce traffic is spread over")
    p.add_argument("--latency-us", type=float, default=5.0, help="per ring step between nodes")
    p.add_argument("--intra-GBps", dest="intra_gbytes", type=float, default=None,
                   help="intra-node all-reduce bus bandwidth, GB/s (default: the local measurement)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: nccl with 2+ GPUs, else gloo")
    p.add_argument("--nproc", type=int, default=None, help="processes to measure with (default: GPUs, or 2 on CPU)")
    p.add_argument("--sizes-mb", default="1,4,16,64,256", help="all-reduce sizes to measure, MiB")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-measure", action="store_true", help="skip the measurement (needs --intra-GBps)")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> dict:
    """Compute time, gradient bytes and batch, from the throughput JSON and/or the flags."""
    out: dict = {"source": "flags"}
    if args.throughput_json:
        data = json.loads(Path(args.throughput_json).read_text())
        runs = [r for r in data.get("runs", []) if "images_per_s" in r.get("a", {})]
        run = next((r for r in runs if args.arch in (None, r["arch"])), None)
        if run is None:
            raise SystemExit(f"{args.throughput_json}: no finished run for arch {args.arch or 'any'}")
        dtype = args.dtype or ("bf16" if run["a"]["dtype"] == "bfloat16" else "fp32")
        params = run["params"]
        out.update(source=f"{args.throughput_json} ({data.get('device', '?')})", arch=run["arch"],
                   resolution=run["resolution"], ch=run["g_ch"], params=params, dtype=dtype,
                   d_steps=run.get("d_steps", args.d_steps), batch=args.batch or run["batch"],
                   compute_s=args.compute_s or run["a"]["iter_s"])
    else:
        arch = args.arch or "biggan"
        params = model_params(arch, args.resolution, args.ch)
        out.update(arch=arch, resolution=args.resolution, ch=args.ch or "paper", params=params,
                   dtype=args.dtype or "bf16", d_steps=args.d_steps, batch=args.batch, compute_s=args.compute_s)
    out["grad_bytes"] = (out["d_steps"] * params["D"] + params["G"]) * DTYPE_BYTES[out["dtype"]]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = workload(args)
    result: dict = {"workload": work, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    gpus = torch.cuda.device_count()
    backend = args.backend if args.backend != "auto" else ("nccl" if gpus >= 2 else "gloo")
    try:
        if not args.no_measure:
            nproc = args.nproc or (gpus if backend == "nccl" else 2)
            m = measure_allreduce(nproc, backend, tuple(_floats(args.sizes_mb)), args.iters)
            result["measured"] = m
            print(f"local all-reduce ({backend}, {nproc} processes on 127.0.0.1, float32):")
            print(f"  {'MiB':>8} {'ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11}")
            for r in m["rows"]:
                print(f"  {r['bytes'] / 2**20:>8.1f} {r['seconds'] * 1e3:>9.2f} {r['algbw'] / 1e9:>11.2f} "
                      f"{r['busbw'] / 1e9:>11.2f}")
        if args.intra_gbytes:
            intra, intra_src = args.intra_gbytes * 1e9, "--intra-GBps"
        elif "measured" in result:
            row = nearest_row(result["measured"]["rows"], work["grad_bytes"] / (work["d_steps"] + 1))
            intra, intra_src = row["busbw"], f"measured ({backend}, {row['bytes'] / 2**20:g} MiB)"
        else:
            raise SystemExit("--no-measure needs --intra-GBps")
        result["intra_busbw"], result["intra_source"] = intra, intra_src

        p = work["params"]
        print(f"\n{work['arch']} {work['resolution']}px ch {work['ch']}: G {p['G'] / 1e6:.2f}M D {p['D'] / 1e6:.2f}M "
              f"params; {work['d_steps']} D all-reduces + 1 G all-reduce per iteration in {work['dtype']} = "
              f"{work['grad_bytes'] / 1e6:.1f} MB of gradients per iteration  [{work['source']}]")
        print(f"intra-node bus bandwidth {intra / 1e9:.2f} GB/s ({intra_src}); {args.gpus_per_node} GPUs/node, "
              f"{args.nics_per_node} NIC(s)/node, {args.latency_us:g} us per inter-node ring step")
        compute = work["compute_s"]
        nodes = [int(x) for x in _floats(args.nodes)]
        rows = scaling_rows(compute, work["grad_bytes"], nodes, _floats(args.links_gbps),
                            args.gpus_per_node, intra, args.nics_per_node, args.latency_us * 1e-6,
                            collectives=work["d_steps"] + 1)
        result["rows"] = rows
        if compute:
            print(f"per-GPU compute time {compute * 1e3:.1f} ms/iteration; efficiency = compute / (compute + "
                  f"all-reduce), no overlap (DeepSpeed ZeRO-1, overlap_comm off) | with full overlap")
        else:
            print("no compute time given (--compute-s or --throughput-json): all-reduce times only")
        for link in _floats(args.links_gbps):
            print(f"\n  {link:g} Gb/s per NIC")
            print(f"  {'nodes':>5} {'GPUs':>5} {'intra ms':>9} {'inter ms':>9} {'all-reduce ms':>14} {'eff':>7} "
                  f"{'eff overlap':>12} {'cluster img/s':>14} {'compute for 90%':>16}")
            for r in (r for r in rows if r["link_gbps"] == link):
                img = ""
                if compute and work.get("batch"):
                    per_iter = compute + r["allreduce_s"]
                    img = f"{r['gpus'] * work['d_steps'] * work['batch'] / per_iter:,.0f}"
                eff = f"{100 * r['efficiency']:.1f}%" if compute else "-"
                effo = f"{100 * r['efficiency_overlap']:.1f}%" if compute else "-"
                print(f"  {r['nodes']:>5} {r['gpus']:>5} {r['intra_s'] * 1e3:>9.1f} {r['inter_s'] * 1e3:>9.1f} "
                      f"{r['allreduce_s'] * 1e3:>14.1f} {eff:>7} "
                      f"{effo:>12} {img:>14} {r['compute_s_for_90pct'] * 1e3:>13.0f} ms")
        return 0
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
