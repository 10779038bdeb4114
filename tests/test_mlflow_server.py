"""The MLflow tracking server of k8s/base/mlflow.yaml, run for real: PostgreSQL backend store, artifacts proxied
to S3 (moto), basic auth with its user store in PostgreSQL, the manifest's own flags (tests/servers.py swaps
only addresses, ports and the worker count)."""

from __future__ import annotations

import base64
import io

import pytest

from tests.servers import flag_value, http_status, mlflow_container

pytestmark = pytest.mark.slow
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def _basic(account: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{account[0]}:{account[1]}".encode()).decode()


@pytest.fixture
def as_trainer(mlflow_pg_s3_server, monkeypatch):
    """This process as the trainer in a Ray pod: its MLflow account in the environment, no S3 keys."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in mlflow_pg_s3_server.client_env(mlflow_pg_s3_server.trainer).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    return mlflow_pg_s3_server


def test_server_flags_come_from_the_manifest(mlflow_pg_s3_server):
    manifest = mlflow_container()
    started = mlflow_pg_s3_server.command
    manifest_args = [*manifest["command"], *manifest["args"]][2:]
    # Every flag of the manifest is on the started command line, with the manifest's value unless it is an
    # address, a port or the worker count.
    local_only = {"--backend-store-uri", "--host", "--port", "--workers"}
    for arg in manifest_args:
        if arg.startswith("--") and arg not in local_only:
            assert arg in started, f"{arg} of the manifest was not passed to the test server"
            assert flag_value(started, arg) == flag_value(manifest_args, arg)
    assert "--serve-artifacts" in started
    assert flag_value(started, "--app-name") == "basic-auth"
    assert flag_value(started, "--host") == "127.0.0.1"
    assert flag_value(started, "--workers") == "1"
    assert mlflow_pg_s3_server.uri.startswith("http://127.0.0.1:")


def test_health_endpoint_answers_probes_with_any_host_header(mlflow_pg_s3_server):
    # Kubelet probes send the pod IP as Host; /health must answer whatever it is.
    assert http_status(mlflow_pg_s3_server.port, "/health", host_header="10.42.0.17:5000") == 200


def test_in_cluster_service_name_is_an_allowed_host_and_others_are_not(mlflow_pg_s3_server):
    path = "/ajax-api/2.0/mlflow/experiments/search?max_results=1"
    port = mlflow_pg_s3_server.port
    auth = {"Authorization": _basic(mlflow_pg_s3_server.trainer)}
    # Ray pods reach the server as http://biggan-mlflow:5000 (MLFLOW_TRACKING_URI in the Ray ConfigMap).
    assert http_status(port, path, host_header="biggan-mlflow:5000", headers=auth) == 200
    assert http_status(port, path, host_header="biggan-mlflow.biggan.svc.cluster.local:5000", headers=auth) == 200
    assert http_status(port, path, host_header="localhost:5000", headers=auth) == 200  # kubectl port-forward
    assert http_status(port, path, host_header="attacker.example.com", headers=auth) == 403


def test_requests_without_valid_credentials_are_refused(mlflow_pg_s3_server):
    server = mlflow_pg_s3_server
    # Anyone who reaches the server (a pod, a port-forward) without an account: 401, for reads and writes.
    assert server.request("GET", SEARCH)[0] == 401
    assert server.request("POST", "/api/2.0/mlflow/experiments/create", body={"name": "intruder"})[0] == 401
    assert server.request("GET", SEARCH, auth=(server.trainer[0], "wrong-password"))[0] == 401
    assert server.request("GET", SEARCH, auth=("nobody", server.trainer[1]))[0] == 401
    status, _ = server.request("POST", "/api/2.0/mlflow/registered-models/alias", auth=None,
                               body={"name": "biggan", "alias": "best", "version": "1"})
    assert status == 401, "moving the registry's alias without credentials"
    # With them, the same request goes through.
    assert server.request("GET", SEARCH, auth=server.trainer)[0] == 200
    assert server.request("GET", SEARCH, auth=server.admin)[0] == 200


def test_only_the_admin_manages_users_and_the_user_store_is_in_postgres(mlflow_pg_s3_server):
    import psycopg2

    server = mlflow_pg_s3_server
    status, _ = server.request("POST", "/api/2.0/mlflow/users/create", auth=server.trainer,
                               body={"username": "mallory", "password": "mallory-password-1"})
    assert status == 403, "the trainer's account must not create users"
    status, _ = server.request("PATCH", "/api/2.0/mlflow/users/update-admin", auth=server.trainer,
                               body={"username": server.trainer[0], "is_admin": True})
    assert status == 403
    # basic-auth's users live in their own PostgreSQL database (k8s/base/mlflow.yaml's ConfigMap), with
    # password hashes, not passwords.
    with psycopg2.connect(server.auth_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT username, password_hash, is_admin FROM users ORDER BY username")
        users = cur.fetchall()
    assert [(u, a) for u, _, a in users] == [(server.admin[0], True), (server.trainer[0], False)]
    assert all(server.trainer[1] not in h and server.admin[1] not in h for _, h, _ in users)


def test_metrics_land_in_postgres_and_artifacts_in_s3(as_trainer):
    import mlflow
    import psycopg2
    from mlflow.tracking import MlflowClient
    from PIL import Image

    server = as_trainer
    # The client holds no S3 credentials: artifacts must go through the server's proxy.
    client = MlflowClient(tracking_uri=server.uri)

    experiment_id = client.create_experiment("k8s-manifest-check")
    run = client.create_run(experiment_id, run_name="pg-s3")
    run_id = run.info.run_id
    client.log_param(run_id, "model.arch", "biggan")
    for step, (d_loss, g_loss) in enumerate([(1.5, 0.9), (1.2, 1.1), (0.8, 1.4)]):
        client.log_metric(run_id, "loss/d", d_loss, step=step)
        client.log_metric(run_id, "loss/g", g_loss, step=step)
    grid = Image.new("RGB", (64, 32), (200, 30, 30))
    grid.paste((20, 20, 220), (32, 0, 64, 32))
    client.log_image(run_id, grid, artifact_file="samples/grid_000002.png")
    client.set_terminated(run_id)
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:/")

    # The backend store is PostgreSQL: the metrics and the param are rows there.
    with psycopg2.connect(server.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT key, step, value FROM metrics WHERE run_uuid = %s ORDER BY key, step", (run_id,))
        rows = cur.fetchall()
        cur.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))
        params = cur.fetchall()
    assert rows == [("loss/d", 0, 1.5), ("loss/d", 1, 1.2), ("loss/d", 2, 0.8),
                    ("loss/g", 0, 0.9), ("loss/g", 1, 1.1), ("loss/g", 2, 1.4)]
    assert params == [("model.arch", "biggan")]

    # The artifact store is the bucket of --artifacts-destination: the PNG is an object there.
    s3 = server.s3_client()
    listing = s3.list_objects_v2(Bucket=server.bucket, Prefix=server.artifacts_prefix)
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    (key,) = [k for k in keys if k.endswith(f"{run_id}/artifacts/samples/grid_000002.png")]
    assert key.startswith(f"{server.artifacts_prefix}/{experiment_id}/")
    stored = Image.open(io.BytesIO(s3.get_object(Bucket=server.bucket, Key=key)["Body"].read()))
    assert stored.size == (64, 32) and stored.convert("RGB").getpixel((40, 10)) == (20, 20, 220)

    # And it reads back through the tracking server, as the UI does.
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/grid_000002.png",
                                                tracking_uri=server.uri)
    assert Image.open(local).size == (64, 32)


def test_a_short_training_run_logs_to_postgres_and_s3(as_trainer, digits_shards, tmp_path):
    """The trainer, pointed at the manifest's server with the training account of its Secret: its metrics are
    PostgreSQL rows, its sample grid an S3 object."""
    import psycopg2

    from pipeline.tracking import Tracker
    from tests.trainer_harness import make_trainer, tiny_config

    server = as_trainer
    shards, n = digits_shards
    cfg = tiny_config(tmp_path, shards, n, **{"train.steps": 4, "train.log_every": 2, "train.sample_every": 4})
    tracker = Tracker(server.uri, "k8s-training", "short-run", retry_wait=0.5)
    trainer = make_trainer(cfg, tmp_path, tracker=tracker)
    assert trainer.fit()["status"] == "finished"
    assert tracker.flush(60)
    tracker.close()

    with psycopg2.connect(server.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = %s", (tracker.run_id,))
        keys = {k for (k,) in cur.fetchall()}
        cur.execute("SELECT step FROM metrics WHERE run_uuid = %s AND key = 'g_loss' ORDER BY step", (tracker.run_id,))
        steps = [s for (s,) in cur.fetchall()]
    assert {"d_loss_real", "d_loss_fake", "g_loss", "images_per_s"} <= keys and steps == [2, 4]
    listing = server.s3_client().list_objects_v2(Bucket=server.bucket, Prefix=server.artifacts_prefix)
    grids = [o["Key"] for o in listing.get("Contents", []) if f"{tracker.run_id}/artifacts/samples/" in o["Key"]]
    assert len(grids) == 1 and grids[0].endswith("samples_00000004.png")
    # The run is the trainer's: basic-auth made it the manager of the experiment it created.
    with psycopg2.connect(server.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT experiment_id FROM runs WHERE run_uuid = %s", (tracker.run_id,))
        (experiment_id,) = cur.fetchone()
    status, body = server.request(
        "GET", f"/api/3.0/mlflow/users/permissions/get?username={server.trainer[0]}&resource_type=experiment"
               f"&resource_id={experiment_id}", auth=server.admin)
    assert status == 200 and body.get("permission") == "MANAGE", (status, body)
