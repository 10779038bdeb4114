"""register_best: pyfunc model versions with fid/config/classes tags in an MLflow registry (sqlite straight to
the database), the best alias, and sampling from the registered model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import sample
from pipeline.config import RunConfig, from_dict
from pipeline.metrics import register_best

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

NAMES = ["zero", "one", "two"]


def tiny_checkpoint(path):
    cfg = RunConfig(preset="test")
    m = cfg.model
    m.arch, m.resolution, m.num_classes, m.g_ch, m.dim_z, m.shared_dim, m.attention = "biggan", 32, 3, 4, 32, 8, 0
    torch.manual_seed(0)
    G = sample.build_generator(cfg, 3)
    torch.save({"g_ema_state": G.state_dict(), "config": cfg.to_dict(), "class_names": NAMES, "step": 100}, path)
    return cfg


@pytest.fixture()
def run_with_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("biggan-test", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    cfg = tiny_checkpoint(tmp_path / "g_ema.pt")
    client.log_artifact(run.info.run_id, str(tmp_path / "g_ema.pt"), "checkpoints/best")
    client.set_terminated(run.info.run_id)
    return uri, client, run.info.run_id, cfg


def test_register_best_records_tags_and_moves_the_best_alias_only_on_improvement(run_with_checkpoint):
    uri, client, run_id, cfg = run_with_checkpoint
    v1 = register_best(run_id, "checkpoints/best", "biggan-demo", cfg, NAMES, 31.5, step=100, tracking_uri=uri)
    v2 = register_best(run_id, "checkpoints/best", "biggan-demo", cfg.to_dict(), NAMES, 40.0, tracking_uri=uri)
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    stored = client.get_model_version("biggan-demo", "1")
    assert float(stored.tags["fid"]) == 31.5 and stored.tags["step"] == "100"
    assert json.loads(stored.tags["classes"]) == NAMES
    assert from_dict(json.loads(stored.tags["config"])).to_dict() == cfg.to_dict()
    assert stored.run_id == run_id
    model_dir = Path(client.get_model_version_download_uri("biggan-demo", "1"))
    assert (model_dir / "MLmodel").is_file() and (model_dir / "artifacts" / "g_ema.pt").is_file()
    assert json.loads((model_dir / "artifacts" / "classes.json").read_text()) == NAMES
    assert (model_dir / "code" / "pipeline" / "mlflow_model.py").is_file() and not list(model_dir.rglob("*.pyc"))
    assert str(client.get_model_version_by_alias("biggan-demo", "best").version) == "1"  # 40 is worse
    register_best(run_id, "checkpoints/best", "biggan-demo", cfg, NAMES, 12.25, tracking_uri=uri)
    assert str(client.get_model_version_by_alias("biggan-demo", "best").version) == "3"
    assert len(client.search_model_versions("name='biggan-demo'")) == 3


def test_sample_cli_renders_from_registered_model_and_run_uris(run_with_checkpoint, tmp_path):
    uri, _, run_id, cfg = run_with_checkpoint
    register_best(run_id, "checkpoints/best", "biggan-demo", cfg, NAMES, 20.0, tracking_uri=uri)
    outs = {}
    for source in ("models:/biggan-demo/1", "models:/biggan-demo@best", f"runs:/{run_id}/checkpoints/best",
                   str(tmp_path / "g_ema.pt")):
        out = tmp_path / f"{len(outs)}.png"
        assert sample.main([source, "--tracking-uri", uri, "--classes", "2,0", "--per-class", "3",
                            "--out", str(out), "--device", "cpu"]) == 0
        with Image.open(out) as im:
            outs[source] = np.asarray(im).copy()
    first = next(iter(outs.values()))
    assert first.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert all(np.array_equal(first, img) for img in outs.values())  # the same weights whatever the source
