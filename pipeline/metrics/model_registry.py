"""Register a generator checkpoint in the MLflow Model Registry as a servable pyfunc model.

Each registration turns the run's weights-only checkpoint (`g_ema.pt`: g_ema_state, config, class_names) into
a pyfunc model (`pipeline.mlflow_model`: signature, weights, config, class names, code), logs it as an MLflow
LoggedModel of the run and registers it as a new version of model `name`. So

    mlflow.pyfunc.load_model("models:/NAME@best")                 # predict(class ids, seeds) -> PNG images
    mlflow models serve -m models:/NAME@best --env-manager local   # the same over REST
    python -m pipeline.sample models:/NAME@best                   # class grids from the same weights

all read one version. Version tags: fid, config (JSON), classes (JSON list), step when given. The alias `best`
follows the version with the lowest fid; `latest` is MLflow's own (a reserved alias name: `models:/NAME/latest`
always resolves to the newest version, so there is nothing to move).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

BEST_ALIAS = "best"
LATEST = "latest"  # NOTE: MLflow reserves this alias name; models:/NAME/latest is its own pointer to the newest version
CHECKPOINT_FILE = "g_ema.pt"
MODEL_TYPE = "biggan-generator"


def _config_dict(config: Any) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return config
    raise TypeError(f"config must be a RunConfig or a dict, got {type(config).__name__}")


def register_best(
    run_id: str,
    artifact_path: str,
    name: str,
    config: Any,
    class_names: list[str],
    fid: float,
    *,
    step: int | None = None,
    checkpoint: str | Path | None = None,  # a local copy of the g_ema.pt; None = download it from the run
    tracking_uri: str | None = None,  # None = mlflow's current tracking URI
    registry_uri: str | None = None,  # None = the tracking URI
):
    """Register runs:/<run_id>/<artifact_path>/g_ema.pt as a pyfunc model, a new version of `name`.

    Returns the ModelVersion (the newest, so models:/NAME/latest); `best` moves to it unless an existing best
    has a lower fid.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.mlflow_model import save_generator_model

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        client.create_registered_model(name, description="BigGAN EMA generators (pyfunc: class ids and seeds in, "
                                                          "PNG images out), by FID")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        "fid": repr(float(fid)),
        "config": json.dumps(_config_dict(config), sort_keys=True, separators=(",", ":")),
        "classes": json.dumps(list(class_names)),
    }
    if step is not None:
        tags["step"] = str(int(step))
    artifact_path = artifact_path.strip("/")
    file_path = artifact_path if artifact_path.endswith(".pt") else f"{artifact_path}/{CHECKPOINT_FILE}"
    with tempfile.TemporaryDirectory(prefix="biggan-register-") as tmp:
        local = Path(checkpoint) if checkpoint else Path(client.download_artifacts(run_id, file_path, tmp))
        model_dir = save_generator_model(local, Path(tmp) / "model")
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(
            experiment_id, name=f"g_ema-step-{int(step)}" if step is not None else "g_ema", source_run_id=run_id,
            tags={"fid": tags["fid"], "checkpoint": f"runs:/{run_id}/{file_path}", **({"step": tags["step"]} if step is not None else {})},
            model_type=MODEL_TYPE,
        )
        try:
            client.log_model_artifacts(logged.model_id, str(model_dir))
        except Exception:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
    # NOTE: a database registry store resolves a models:/<model_id> source through the process-global tracking
    # URI, not this client's; direct to a database, the version points at the model's artifact location instead
    direct_db = urlparse(tracking_uri or mlflow.get_tracking_uri()).scheme not in ("http", "https")
    version = client.create_model_version(
        name, source=logged.artifact_location if direct_db else f"models:/{logged.model_id}", run_id=run_id,
        tags=tags, model_id=logged.model_id,
        description=f"fid {float(fid):.4g}" + (f" at step {step}" if step is not None else ""),
    )
    current_best = math.inf
    try:
        best = client.get_model_version_by_alias(name, BEST_ALIAS)
        current_best = float(best.tags.get("fid", "inf"))
    except MlflowException:
        pass
    if float(fid) <= current_best:
        client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    logger.info("registered %s version %s (fid %.4g) from runs:/%s/%s", name, version.version, fid, run_id, file_path)
    return version
