"""The registered generator is an MLflow pyfunc model: loaded by alias from a real MLflow server on 127.0.0.1,
served over REST by `mlflow models serve --env-manager local`, and still read by `python -m pipeline.sample`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import sample
from pipeline.metrics import register_best
from pipeline.mlflow_model import decode_images, render
from tests.conftest import free_port, wait_http
from tests.test_sample import NAMES, tiny_config, write_tiny_checkpoint

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

ROOT = sample.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """Two versions of one model on the server: v1 (fid 20, the best) and v2 (fid 30, the newest)."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"pyfunc-{uuid.uuid4().hex[:6]}")
    run_id = client.create_run(exp).info.run_id
    for step, seed in ((1, 0), (2, 1)):
        (tmp / f"step-{step}").mkdir()
        write_tiny_checkpoint(tmp / f"step-{step}" / "g_ema.pt", seed=seed)
        client.log_artifact(run_id, str(tmp / f"step-{step}" / "g_ema.pt"), f"checkpoints/step-{step}")
    name = f"biggan-pyfunc-{uuid.uuid4().hex[:6]}"
    cfg = tiny_config()
    register_best(run_id, "checkpoints/step-1", name, cfg, NAMES, 20.0, step=1, tracking_uri=mlflow_server.uri)
    register_best(run_id, "checkpoints/step-2", name, cfg, NAMES, 30.0, step=2, tracking_uri=mlflow_server.uri,
                  checkpoint=tmp / "step-2" / "g_ema.pt")
    return {"uri": mlflow_server.uri, "name": name, "run_id": run_id, "tmp": tmp, "client": client}


@pytest.fixture()
def tracking_uri(registered):
    """mlflow.pyfunc.load_model reads the process's tracking URI: point it at the server for one test."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered["uri"])
    yield registered["uri"]
    mlflow.set_tracking_uri(before)


def expected_images(checkpoint, rows):
    G, _, _ = sample.load_generator(checkpoint)
    return render(G, rows, torch.device("cpu"))


def test_registered_versions_are_pyfunc_models_with_a_signature_and_aliases(registered, tracking_uri):
    client, name = registered["client"], registered["name"]
    best = client.get_model_version_by_alias(name, "best")
    assert best.version == "1" and best.tags["step"] == "1" and float(best.tags["fid"]) == 20.0
    assert json.loads(best.tags["classes"]) == NAMES and best.run_id == registered["run_id"]
    assert best.source.startswith("models:/m-")  # an MLflow 3 LoggedModel of the run
    logged = client.get_logged_model(best.source.removeprefix("models:/"))
    assert logged.source_run_id == registered["run_id"] and str(logged.status) == "READY"
    assert logged.tags["checkpoint"] == f"runs:/{registered['run_id']}/checkpoints/step-1/g_ema.pt"
    info = mlflow.models.get_model_info(best.source)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["class_id", "seed", "truncation"]
    assert {p.name for p in info.signature.params.params} == {"truncation", "seed"}
    assert "python_function" in info.flavors


def test_load_model_by_alias_returns_images_of_the_registered_weights(registered, tracking_uri):
    tmp = registered["tmp"]
    best = mlflow.pyfunc.load_model(f"models:/{registered['name']}@best")
    request = pd.DataFrame({"class_id": [0, 3, 3, 4], "seed": [5, 5, 6, 5]})
    out = best.predict(request, params={"truncation": 0.5})
    assert list(out["class_name"]) == ["tshirt", "dress", "dress", "coat"] and list(out["truncation"]) == [0.5] * 4
    images = decode_images(out)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    rows = [(0, 5, 0.5), (3, 5, 0.5), (3, 6, 0.5), (4, 5, 0.5)]
    np.testing.assert_array_equal(images, expected_images(tmp / "step-1" / "g_ema.pt", rows))
    assert not np.array_equal(images[1], images[2])  # another seed, another image
    # a row renders the same alone as in a batch (eval-mode G: rows don't interact)
    alone = decode_images(best.predict(pd.DataFrame({"class_id": [3], "seed": [6], "truncation": [0.5]})))
    np.testing.assert_array_equal(alone[0], images[2])
    # models:/NAME/latest is the newest version: other weights
    latest = mlflow.pyfunc.load_model(f"models:/{registered['name']}/latest")
    newest = decode_images(latest.predict(request, params={"truncation": 0.5}))
    np.testing.assert_array_equal(newest, expected_images(tmp / "step-2" / "g_ema.pt", rows))
    with pytest.raises(Exception, match="row 1: class_id 9 is not a class index in 0..4"):
        best.predict(pd.DataFrame({"class_id": [0, 9]}))


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    port = free_port()
    # the server runs `uvicorn` from PATH: the venv's bin, as in an activated environment
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PYTHONPATH": str(ROOT), "PATH": path,
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{registered['name']}@best",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path,
    )
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=proc)
        except (RuntimeError, TimeoutError) as err:
            raise AssertionError(f"{err}\n{(tmp_path / 'serve.log').read_text()[-3000:]}") from err

        def invoke(body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read() or b"{}")

        status, answer = invoke({"dataframe_split": {"columns": ["class_id", "seed"], "data": [[2, 0], [1, 7]]},
                                 "params": {"truncation": 1.0}})
        assert status == 200, answer
        images = decode_images(answer)
        assert images.shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(
            images, expected_images(registered["tmp"] / "step-1" / "g_ema.pt", [(2, 0, 1.0), (1, 7, 1.0)]))
        status, answer = invoke({"dataframe_records": [{"class_id": 42}]})
        assert status >= 400 and "class_id 42" in json.dumps(answer)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def test_sample_cli_reads_the_pyfunc_model_and_old_raw_registrations(registered, tmp_path):
    uri, name, client = registered["uri"], registered["name"], registered["client"]
    raw = f"{name}-raw"
    client.create_registered_model(raw)  # what registrations held before: the bare g_ema.pt folder of a run
    client.create_model_version(raw, source=f"runs:/{registered['run_id']}/checkpoints/step-1",
                                run_id=registered["run_id"])
    grids = []
    for source in (f"models:/{name}@best", f"models:/{raw}/1", str(registered["tmp"] / "step-1" / "g_ema.pt")):
        out = tmp_path / f"{len(grids)}.png"
        assert sample.main([source, "--tracking-uri", uri, "--classes", "1,4", "--per-class", "2",
                            "--out", str(out), "--device", "cpu"]) == 0
        with Image.open(out) as im:
            grids.append(np.asarray(im).copy())
    assert grids[0].shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    assert all(np.array_equal(grids[0], g) for g in grids[1:])


def test_writing_the_model_leaves_no_mlflow_notes_on_the_console(tmp_path):
    """The model states its signature, so MLflow's notes about type hints (raised when the model class is defined,
    i.e. on import) and an input example (when it is written), printed in every demo run's console, are not
    raised; other warnings still are. A fresh interpreter, so the import happens here."""
    write_tiny_checkpoint(tmp_path / "g_ema.pt", seed=0)
    code = ("import sys; from pipeline.mlflow_model import save_generator_model; "
            "save_generator_model(sys.argv[1], sys.argv[2]); import warnings; warnings.warn('still shown')")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path / "g_ema.pt"), str(tmp_path / "model")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model" / "MLmodel").is_file()
    assert "still shown" in proc.stderr
    assert "type hints" not in proc.stderr and "input example" not in proc.stderr, proc.stderr[-3000:]
