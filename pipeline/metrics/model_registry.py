"""Register the best generator checkpoint in the MLflow Model Registry.

The registered version points at the run artifact that holds the weights-only checkpoint (`g_ema.pt`:
g_ema_state, config, class_names), so `python -m pipeline.sample models:/NAME/VERSION` (or `models:/NAME@best`)
renders from it. Tags: fid, config (JSON), classes (JSON list), step when given. The alias `best` follows the
version with the lowest fid.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

BEST_ALIAS = "best"


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
    tracking_uri: str | None = None,  # None = mlflow's current tracking URI
    registry_uri: str | None = None,  # None = the tracking URI
):
    """Register runs:/<run_id>/<artifact_path> as a new version of model `name`; returns the ModelVersion.

    Moves the `best` alias to this version unless an existing best has a lower fid.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    try:
        client.create_registered_model(name, description="BigGAN generator checkpoints (g_ema.pt) by FID")
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
    source = f"runs:/{run_id}/{artifact_path.strip('/')}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                          description=f"fid {float(fid):.4g}" + (f" at step {step}" if step is not None else ""))
    current_best = math.inf
    try:
        best = client.get_model_version_by_alias(name, BEST_ALIAS)
        current_best = float(best.tags.get("fid", "inf"))
    except MlflowException:
        pass
    if float(fid) <= current_best:
        client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    logger.info("registered %s version %s (fid %.4g) from %s", name, version.version, fid, source)
    return version
