"""One training iteration of the demo's model, ours against ajbrock/BigGAN-PyTorch's own, alternated in one process.

    python bench/vs_biggan_pytorch.py --biggan-pytorch /tmp/biggan-pytorch              # defaults vs theirs
    python bench/vs_biggan_pytorch.py --biggan-pytorch /tmp/biggan-pytorch \\
        --ours fp32:train.precision=fp32,train.channels_last=false,train.compile=false \\
        --ours bf16:train.precision=bf16,train.channels_last=false,train.compile=false --ours defaults:

Get their code with `git --git-dir=<mirror of ajbrock/BigGAN-PyTorch> archive HEAD | tar -x -C /tmp/biggan-pytorch`
(it is never copied into this repository). Their BigGAN.py, layers.py, losses.py, utils.py and train_fns.py are
imported from that path unchanged. Shims, at import time only: `torchvision` and their `datasets` module
(imported by utils.py for data loading, which this bench does not use) are replaced by empty modules, because
torchvision does not import with the CPU torch here (STACK-NOTES).

Theirs: `train_fns.GAN_training_function` with its G and D (their Adam inside the models, hinge loss, modified
ortho reg 1e-4 on G, EMA update every iteration through `utils.ema`), fp32, inplace ReLU (their launch scripts),
sizes from our demo preset (ch, dim_z, shared_dim, hier, no attention, 32 px, the demo's per-worker batch), real
images already in memory. Ours: `Trainer.train_iteration` (2 D steps, 1 G step, EMA) through DeepSpeed on one
gloo rank with the real loader reading synthetic shards, per variant `--ours NAME:section.field=value,...`
(empty = the preset's defaults, i.e. what `make demo` runs per worker).

Each round times one iteration of every contender in turn; the median over rounds is reported with the ratio
to theirs. A variant's first iterations (warm-up, where torch.compile compiles) are timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import build_trainer, init_process_group, make_synthetic_shards  # noqa: E402
from pipeline import config as C  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402


def import_theirs(path: Path) -> dict[str, types.ModuleType]:
    """BigGAN, utils, train_fns from their checkout, with torchvision and their datasets module stubbed."""
    if not (path / "train_fns.py").is_file():
        raise SystemExit(f"--biggan-pytorch: {path} has no train_fns.py (a checkout of ajbrock/BigGAN-PyTorch?)")
    for name in ("torchvision", "torchvision.transforms", "datasets"):
        stub = types.ModuleType(name)
        stub.__getattr__ = _stub_attribute  # utils.py names their classes at import time
        sys.modules.setdefault(name, stub)
    sys.path.insert(0, str(path))
    import BigGAN  # noqa: PLC0415
    import train_fns  # noqa: PLC0415
    import utils  # noqa: PLC0415

    return {"BigGAN": BigGAN, "utils": utils, "train_fns": train_fns}


def _stub_attribute(attr: str) -> type:
    if attr.startswith("__"):  # inspect and torch.compile probe modules for __file__ and friends
        raise AttributeError(attr)
    return type(attr, (), {})


class Theirs:
    """Their training function, set up as their train.py does, at our demo's sizes."""

    def __init__(self, mods: dict[str, types.ModuleType], cfg: C.RunConfig, batch: int):
        BigGAN, utils, train_fns = mods["BigGAN"], mods["utils"], mods["train_fns"]
        m, o = cfg.model, cfg.optim
        relu = torch.nn.ReLU(inplace=True)
        kw = dict(G_ch=m.g_ch, D_ch=m.d_ch, dim_z=m.dim_z, shared_dim=m.shared_dim, hier=m.hier, resolution=m.resolution,
                  n_classes=m.num_classes, G_attn="0", D_attn="0", G_activation=relu, D_activation=relu,
                  G_lr=o.g_lr, D_lr=o.d_lr, G_B1=o.beta1, G_B2=o.beta2, D_B1=o.beta1, D_B2=o.beta2, adam_eps=o.eps,
                  BN_eps=m.bn_eps, SN_eps=m.sn_eps, num_G_SV_itrs=m.num_sv_itrs, num_D_SV_itrs=m.num_sv_itrs)
        torch.manual_seed(cfg.train.seed)
        self.G, self.D = BigGAN.Generator(**kw), BigGAN.Discriminator(**kw)
        self.G_ema = BigGAN.Generator(**{**kw, "skip_init": True, "no_optim": True})
        ema = utils.ema(self.G, self.G_ema, cfg.ema.decay, cfg.ema.start_step)
        GD = BigGAN.G_D(self.G, self.D)
        z_, y_ = utils.prepare_z_y(batch, self.G.dim_z, m.num_classes, device="cpu")
        config = {"batch_size": batch, "num_D_steps": cfg.loss.d_steps, "num_D_accumulations": 1,
                  "num_G_accumulations": 1, "toggle_grads": True, "split_D": False, "D_ortho": 0.0,
                  "G_ortho": cfg.loss.ortho_beta, "ema": True}
        self.state = {"itr": 0}
        self.train = train_fns.GAN_training_function(self.G, self.D, GD, z_, y_, ema, self.state, config)
        n = batch * cfg.loss.d_steps
        self.x = torch.rand(n, 3, m.resolution, m.resolution) * 2 - 1
        self.y = torch.randint(0, m.num_classes, (n,))
        self.G.train(), self.D.train()

    def params(self) -> dict[str, int]:
        return {"G": sum(p.numel() for p in self.G.parameters()), "D": sum(p.numel() for p in self.D.parameters())}

    def iteration(self) -> None:
        self.state["itr"] += 1
        with open(os.devnull, "w") as quiet:  # their G_ortho prints a debug line every iteration
            stdout, sys.stdout = sys.stdout, quiet
            try:
                self.train(self.x, self.y)
            finally:
                sys.stdout = stdout


class Ours:
    def __init__(self, cfg: C.RunConfig, work: Path):
        self.trainer = build_trainer(cfg, torch.device("cpu"), work)

    def params(self) -> dict[str, int]:
        t = self.trainer
        return {"G": sum(p.numel() for p in t.G.parameters()), "D": sum(p.numel() for p in t.D.parameters())}

    def iteration(self) -> None:
        self.trainer.train_iteration()

    def describe(self) -> dict[str, str]:
        return self.trainer.speed.tags()


def demo_config(shards: str, work: Path, overrides: list[str]) -> C.RunConfig:
    """The demo preset as one worker of `make demo` runs it: its micro-batch, one rank, no accumulation."""
    cfg = get_preset("demo")
    cfg.data.shards, cfg.data.backend, cfg.model.num_classes = shards, "wds", 10
    cfg.cluster.num_workers, cfg.train.global_batch = 1, cfg.data.batch_size
    cfg.train.output_dir = str(work / f"out-{len(list(work.iterdir()))}")
    cfg.health.enabled = False
    C.apply_overrides(cfg, overrides)
    return C.validate(cfg)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    return name or "defaults", [s for s in sets.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--biggan-pytorch", required=True, type=Path, help="a checkout of ajbrock/BigGAN-PyTorch")
    p.add_argument("--ours", action="append", default=[], metavar="NAME:section.field=value,...",
                   help="a variant of our trainer (repeatable); default: 'defaults:' (the demo preset as is)")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="applied to every variant of ours and to the sizes theirs is built at (e.g. model.g_ch=32)")
    p.add_argument("--rounds", type=int, default=15, help="timed iterations of each contender, alternated")
    p.add_argument("--warmup", type=int, default=3, help="untimed first iterations of each contender")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mods = import_theirs(args.biggan_pytorch.resolve())
    work = Path(tempfile.mkdtemp(prefix="bench-vs-bgp-"))
    shards = make_synthetic_shards(work, 512, 32)
    init_process_group(torch.device("cpu"))

    base = demo_config(shards, work, args.common)
    contenders: dict[str, object] = {"biggan-pytorch": Theirs(mods, base, base.data.batch_size)}
    for text in args.ours or ["defaults:"]:
        name, sets = parse_variant(text)
        contenders[name] = Ours(demo_config(shards, work, [*args.common, *sets]), work)
    warmup_s = {}
    for name, c in contenders.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            c.iteration()
        warmup_s[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, c in contenders.items():
            t0 = time.perf_counter()
            c.iteration()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["biggan-pytorch"])
    out = {"command": " ".join(["bench/vs_biggan_pytorch.py", *(argv if argv is not None else sys.argv[1:])]),
           "threads": args.threads, "loadavg": os.getloadavg(), "rounds": args.rounds, "results": {}}
    print(f"\n{'contender':<16} {'s/iter median':>13} {'min':>7} {'x theirs':>9} {'warm-up s':>10}  params G / D")
    for name, c in contenders.items():
        med = statistics.median(times[name])
        row = {"median_s": med, "min_s": min(times[name]), "time_vs_theirs": med / ref, "warmup_s": warmup_s[name],
               "params": c.params(), "speed": c.describe() if isinstance(c, Ours) else {}}
        out["results"][name] = row
        pr = row["params"]
        print(f"{name:<16} {med:13.3f} {row['min_s']:7.3f} {med / ref:8.2f}x {warmup_s[name]:10.1f}  "
              f"{pr['G'] / 1e6:.3f}M / {pr['D'] / 1e6:.3f}M")
        if row["speed"]:
            print("    " + ", ".join(f"{k.removeprefix('speed.')}={v}" for k, v in row["speed"].items()
                                     if not k.endswith(".reason")))
    print(f"load average {out['loadavg'][0]:.2f}, {args.threads} torch thread(s), {args.rounds} rounds")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
