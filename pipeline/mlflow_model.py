"""EMA G as an MLflow pyfunc model: what `mlflow.pyfunc.load_model` loads and `mlflow models serve` serves.

    model = mlflow.pyfunc.load_model("models:/biggan-demo@best")
    out = model.predict(pd.DataFrame({"class_id": [3, 3, 7], "seed": [0, 1, 0]}), params={"truncation": 0.5})
    images = decode_images(out)                     # (3, H, W, 3) uint8

Input, one row per image: `class_id` (long, required), `seed` (long, optional: the row's latent is drawn from a
generator seeded with it, so a (class, seed, truncation) triple renders the same image in any batch; missing =
params.seed + the row's index), `truncation` (double, optional: |z| above it is resampled; missing or 0 = the
params' value, whose default 0 means none). Output, one row per image: `class_id`, `class_name`, `seed`,
`truncation` and `image`, a base64 PNG.

NOTE: images leave as base64 PNG, not as uint8 arrays. Over REST every value is JSON: a 128 px RGB image as a
nested list of numbers is about 170 kB of text, as base64 PNG about a third of that, lossless, and usable
directly as a `data:image/png;base64,...` URL. `decode_images` turns the column back into arrays.

The model directory holds the weights-only checkpoint (`artifacts/g_ema.pt`, loaded with weights_only=True),
the run config (`artifacts/config.json`) and class names (`artifacts/classes.json`), and this package's code
(`code/pipeline`, `code/models`), so it loads with nothing but the pinned requirements installed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# MLflow's UserWarning for a model written without an input example (it starts with a colour code)
NO_INPUT_EXAMPLE_NOTE = r"(?s).*An input example was not provided"
CODE_PACKAGES = ("pipeline", "models")  # what the model's code_paths hold (the generator and its loader)
REQUIREMENTS = ("torch", "numpy", "pillow", "pyyaml", "mlflow")  # pinned to the versions installed here
MAX_IMAGES = 256  # per predict call: a request renders at most this many images
BATCH = 32  # images per G forward
DEVICE_ENV = "BIGGAN_MODEL_DEVICE"  # where the served G runs; default cuda when available, else cpu

SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("long", "class_id"),
        ColSpec("long", "seed", required=False),
        ColSpec("double", "truncation", required=False),
    ]),
    outputs=Schema([
        ColSpec("long", "class_id"), ColSpec("string", "class_name"), ColSpec("long", "seed"),
        ColSpec("double", "truncation"), ColSpec("string", "image"),
    ]),
    params=ParamSchema([ParamSpec("truncation", "double", 0.0), ParamSpec("seed", "long", 0)]),
)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Renders images of requested classes from the checkpoint in the model's artifacts."""

    def load_context(self, context) -> None:
        import torch

        from pipeline.sample import load_generator

        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.G, self.cfg, self.class_names = load_generator(context.artifacts["g_ema"], device=device)
        self.device = torch.device(device)

    # NOTE: a DataFrame hint is one MLflow infers no schema from (SIGNATURE stays the schema); without a hint
    # MLflow warns, on every import of this module, that predict has none
    def predict(self, context, model_input: pd.DataFrame, params=None):
        rows = _requests(model_input, params or {}, len(self.class_names))
        images = render(self.G, rows, self.device)
        return pd.DataFrame({
            "class_id": [r[0] for r in rows],
            "class_name": [self.class_names[r[0]] for r in rows],
            "seed": [r[1] for r in rows],
            "truncation": [r[2] for r in rows],
            "image": [encode_png(img) for img in images],
        })


def _requests(frame, params: dict[str, Any], num_classes: int) -> list[tuple[int, int, float]]:
    """(class_id, seed, truncation) per row, checked: a bad row is a ValueError naming the row and the field."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "class_id" not in frame.columns:
        raise ValueError(f"input needs a class_id column (got columns {list(frame.columns)})")
    if len(frame) > MAX_IMAGES:
        raise ValueError(f"{len(frame)} rows requested; at most {MAX_IMAGES} images per request")
    base_seed = int(params.get("seed") or 0)
    default_t = float(params.get("truncation") or 0.0)
    rows = []
    for i, row in enumerate(frame.to_dict("records")):
        cls = row["class_id"]
        if not _is_index(cls, num_classes):
            raise ValueError(f"row {i}: class_id {cls!r} is not a class index in 0..{num_classes - 1}")
        seed = row.get("seed")
        seed = base_seed + i if seed is None or pd.isna(seed) else int(seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"row {i}: seed {seed} is outside 0..2**63-1")
        t = row.get("truncation")
        t = default_t if t is None or pd.isna(t) or float(t) == 0 else float(t)
        if t < 0:
            raise ValueError(f"row {i}: truncation {t} must be >= 0 (0 = none)")
        rows.append((int(cls), seed, t))
    return rows


def _is_index(value: Any, size: int) -> bool:
    try:
        return float(value) == int(value) and 0 <= int(value) < size
    except (TypeError, ValueError, OverflowError):
        return False


def render(G, rows: list[tuple[int, int, float]], device) -> np.ndarray:
    """(N, H, W, C) uint8 images for (class_id, seed, truncation) rows; G in eval mode, so rows don't interact."""
    import torch

    from pipeline.metrics.evaluate import truncated_normal

    if not rows:
        return np.zeros((0, 1, 1, 3), np.uint8)
    dim_z = int(G.dim_z)
    z = torch.cat([truncated_normal(1, dim_z, t, torch.Generator().manual_seed(s)) for _, s, t in rows])
    y = torch.tensor([c for c, _, _ in rows], dtype=torch.long)
    dtype = next(G.parameters()).dtype
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            x = G(z[i:i + BATCH].to(device, dtype), y[i:i + BATCH].to(device)).float().clamp(-1, 1)
            out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()


def encode_png(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images(predictions) -> np.ndarray:
    """The `image` column of a prediction (DataFrame, records or REST `predictions`) as (N, H, W, C) uint8."""
    from PIL import Image

    if isinstance(predictions, dict) and "predictions" in predictions:
        predictions = predictions["predictions"]
    column = predictions["image"] if hasattr(predictions, "columns") else [r["image"] for r in predictions]
    arrays = []
    for text in column:
        with Image.open(io.BytesIO(base64.b64decode(text))) as im:
            a = np.asarray(im)
        arrays.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(arrays)


# -- writing the model -----------------------------------------------------------------------------------------
def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            # a local label (torch 2.13.0+cu130) names no package on an index: pin the release
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def save_generator_model(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the pyfunc model directory for a g_ema.pt at `path` (which must not exist or be empty)."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    missing = {"g_ema_state", "config"} - set(ckpt)
    if missing:
        raise ValueError(f"{checkpoint}: not a generator checkpoint, missing {sorted(missing)}")
    with tempfile.TemporaryDirectory(prefix="biggan-model-") as tmp:
        staging = Path(tmp)
        (staging / "config.json").write_text(json.dumps(ckpt["config"], indent=1))
        (staging / "classes.json").write_text(json.dumps([str(c) for c in ckpt.get("class_names") or []]))
        code = []
        for package in CODE_PACKAGES:  # without caches and tests: only what imports
            shutil.copytree(ROOT / package, staging / "code" / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code.append(str(staging / "code" / package))
        with warnings.catch_warnings():
            # NOTE: MLflow asks for an input example to infer a signature; this model states its own (SIGNATURE),
            # and the note would land in every run's console. Other warnings pass
            warnings.filterwarnings("ignore", message=NO_INPUT_EXAMPLE_NOTE, category=UserWarning)
            mlflow.pyfunc.save_model(
                str(path), python_model=str(Path(__file__).with_name("mlflow_model_code.py")), signature=SIGNATURE,
                code_paths=code,
                artifacts={"g_ema": str(checkpoint), "config": str(staging / "config.json"),
                           "class_names": str(staging / "classes.json")},
                pip_requirements=requirements(),
            )
    return Path(path)
