"""Real servers on 127.0.0.1 for tests: PostgreSQL, an S3 endpoint (moto) and the MLflow tracking server
configured exactly as k8s/base/mlflow.yaml deploys it, basic auth included.

The MLflow server's command line is read from the rendered Deployment; only what must differ on a test
machine is swapped (database host and port, listen address and port, one worker), so a manifest change is a
test change. Its ConfigMap volumes (basic-auth's settings) are written to a local directory with only the
database address swapped, and PostgreSQL's init scripts (the auth user store's database) are run against
the local PostgreSQL, as the image's entrypoint runs them on first start. The admin account comes from test
values of the Secret biggan-mlflow-admin; the fixture then creates the trainer's account through the admin,
as docs/kubernetes.md does. Every process listens on 127.0.0.1 on a port picked at start, and is stopped at teardown even
when the test fails. Without PostgreSQL, psycopg2 or moto the fixtures skip with the reason.

tests/conftest.py imports the fixtures, so every module shares one of each per session:

    def test_something(mlflow_pg_s3_server):
        mlflow.set_tracking_uri(mlflow_pg_s3_server.uri)
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from pipeline.loopback import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
MLFLOW_DEPLOYMENT = "biggan-mlflow"

# What the Secrets of k8s/secrets.example.yaml hold, with test values. The MLflow server's environment is
# built from the manifest's secretKeyRef / secretRef entries through this table.
TEST_PG_USER = "mlflow"
TEST_PG_PASSWORD = "test-only-password"
TEST_S3_REGION = "us-east-1"
TEST_MLFLOW_ADMIN = ("admin", "test-only-admin-password")
TEST_MLFLOW_TRAINER = ("biggan-trainer", "test-only-trainer-password")
TEST_FLASK_SECRET_KEY = "test-only-csrf-key"


# ----------------------------------------------------------------------------------------------------------
# Processes and ports.




def http_status(port: int, path: str, host_header: str | None = None, timeout: float = 5.0,
                headers: dict[str, str] | None = None) -> int:
    """GET http://127.0.0.1:port/path and return the status (no proxies, optional Host and other headers)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {**(headers or {}), **({"Host": host_header} if host_header else {})}
        conn.request("GET", path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def wait_until(ready: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready{_tail(log)}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} was not ready after {timeout:.0f}s{_tail(log)}")


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- last lines of " + str(log) + " ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group started with start_new_session, then SIGKILL whatever is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Workers of a server (uvicorn) may outlive their parent: the group goes either way.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _loopback_env(**extra: str) -> dict[str, str]:
    """The current environment without credentials, proxies or MLflow settings, plus `extra`."""
    drop = ("AWS_", "MLFLOW_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = f"{LOOPBACK},localhost"
    if "AWS_CA_BUNDLE" in os.environ:
        env["AWS_CA_BUNDLE"] = os.environ["AWS_CA_BUNDLE"]
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------------------
# PostgreSQL.


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    dbname: str
    datadir: Path
    host: str = LOOPBACK

    @property
    def dsn(self) -> str:
        """libpq / psycopg2 connection string."""
        return f"host={self.host} port={self.port} user={self.user} password={self.password} dbname={self.dbname}"


def _pg_bindir() -> Path | None:
    for name in ("pg_ctl", "initdb"):
        found = shutil.which(name)
        if found:
            return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return candidates[0] if candidates else None


def _as_postgres_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix, uid and gid to run PostgreSQL's tools: they refuse to run as root."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root and `runuser` is missing; cannot start PostgreSQL as its own user")
    return [runuser, "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


@contextlib.contextmanager
def run_postgres(user: str = TEST_PG_USER, password: str = TEST_PG_PASSWORD, dbname: str = "mlflow",
                 ) -> Iterator[Postgres]:
    """initdb into a fresh directory and start PostgreSQL on 127.0.0.1 (password auth over TCP, as in the
    cluster); the database is created empty. Stopped and deleted on exit."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed")
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists() or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL is not installed (no initdb / pg_ctl on PATH or under /usr/lib/postgresql); "
                    "install PostgreSQL 15 to run the MLflow server tests")
    prefix, uid, gid = _as_postgres_user()
    # Not under pytest's tmp_path: its parents are private to the current user, and PostgreSQL runs as
    # its own user.
    root = Path(tempfile.mkdtemp(prefix="biggan-pg-"))
    datadir, sockdir, log = root / "data", root / "sock", root / "postgres.log"
    sockdir.mkdir()
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if uid is not None:
        for p in (root, sockdir, pwfile):
            os.chown(p, uid, gid)
    port = free_port()
    started = False
    try:
        subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(datadir), "--username", user, f"--pwfile={pwfile}",
             "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, text=True, timeout=120,
        )
        # Durability off: a test database, and every fsync costs time on CI disks.
        opts = f"-h {LOOPBACK} -p {port} -k {sockdir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(log), "-o", opts, "-w", "-t", "60",
             "start"],
            check=True, capture_output=True, text=True, timeout=90,
        )
        started = True
        conn = psycopg2.connect(host=LOOPBACK, port=port, user=user, password=password, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{dbname}"')
        finally:
            conn.close()
        yield Postgres(port=port, user=user, password=password, dbname=dbname, datadir=datadir)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{err.cmd[len(prefix)]} failed:\n{err.stdout}\n{err.stderr}{_tail(log)}") from err
    finally:
        if started or (datadir / "postmaster.pid").exists():
            _stop_postgres(prefix, bindir, datadir)
        shutil.rmtree(root, ignore_errors=True)


def _stop_postgres(prefix: list[str], bindir: Path, datadir: Path) -> None:
    stopped = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w",
                              "-t", "30", "stop"], capture_output=True, timeout=60).returncode == 0
    pidfile = datadir / "postmaster.pid"
    if not stopped and pidfile.exists():  # pg_ctl could not do it: kill the postmaster we started
        with contextlib.suppress(ValueError, ProcessLookupError, IndexError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------
# S3 (moto).


@dataclass
class S3Endpoint:
    endpoint: str
    region: str = TEST_S3_REGION
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)


@contextlib.contextmanager
def run_moto_s3(workdir: Path) -> Iterator[S3Endpoint]:
    """`moto_server -H 127.0.0.1 -p PORT`: an in-memory S3 endpoint, stopped on exit."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("boto3", reason="boto3 is not installed")
    exe = Path(sys.executable).with_name("moto_server")
    port = free_port()
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    log = workdir / "moto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*cmd, "-H", LOOPBACK, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=_loopback_env(), start_new_session=True)
    try:
        wait_until(lambda: http_status(port, "/moto-api/") == 200, "moto_server", 60, proc, log)
        yield S3Endpoint(endpoint=f"http://{LOOPBACK}:{port}")
    finally:
        _stop_group(proc)


# ----------------------------------------------------------------------------------------------------------
# The MLflow server of the manifest.


def render_kustomization(path: Path | str) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH` as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; it renders the kustomizations under k8s/")
    res = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{res.stderr}")
    return [doc for doc in yaml.safe_load_all(res.stdout) if doc]


def mlflow_container(objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The MLflow container of the Deployment as rendered from k8s/base (or from `objects`). Without kubectl,
    read from k8s/base/mlflow.yaml itself: kustomize changes only names of images, labels and the namespace
    there, none of which the server's command line or environment depend on."""
    if objects is None:
        if shutil.which("kubectl"):
            objects = render_kustomization(K8S / "base")
        else:
            objects = [d for d in yaml.safe_load_all((K8S / "base" / "mlflow.yaml").read_text()) if d]
    for obj in objects:
        if obj.get("kind") == "Deployment" and obj["metadata"]["name"] == MLFLOW_DEPLOYMENT:
            (container,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
            return container
    raise AssertionError(f"no Deployment {MLFLOW_DEPLOYMENT!r} in the rendered manifests")


def flag_value(args: list[str], flag: str) -> str | None:
    """The value after `flag` (or of `flag=value`) in a click-style argument list."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def localize_server_args(args: list[str], *, backend_store_uri: str, port: int) -> list[str]:
    """The manifest's `mlflow server` arguments for 127.0.0.1: only the database address, the listen address
    and port and the worker count change; every other flag (artifact proxy, allowed hosts, ...) stays."""
    swap = {"--backend-store-uri": backend_store_uri, "--host": LOOPBACK, "--port": str(port), "--workers": "1"}
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name in swap:
            out += [name, swap.pop(name)]
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    for name, value in swap.items():  # never fall back to a default that could bind elsewhere
        out += [name, value]
    return out


def local_backend_uri(manifest_uri: str, pg: Postgres) -> str:
    """The manifest's backend store URI pointed at the local PostgreSQL (same driver and database name)."""
    parts = urlsplit(manifest_uri)
    assert parts.scheme.startswith("postgresql"), f"backend store is not PostgreSQL: {manifest_uri}"
    dbname = parts.path.lstrip("/")
    assert dbname == pg.dbname, f"manifest database {dbname!r} != local {pg.dbname!r}"
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{userinfo}{pg.host}:{pg.port}", parts.path, parts.query, ""))


def rendered_base() -> list[dict[str, Any]]:
    """k8s/base rendered (kubectl), or its YAML files read as they are when kubectl is missing."""
    if shutil.which("kubectl"):
        return render_kustomization(K8S / "base")
    return [d for f in sorted((K8S / "base").glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]


def _object(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj.get("kind") == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name!r} in the rendered manifests")


def localize_db_uri(uri: str, pg: Postgres) -> str:
    """A PostgreSQL URI of the manifests pointed at the local server (same driver, database and query)."""
    parts = urlsplit(uri)
    assert parts.scheme.startswith("postgresql"), f"not a PostgreSQL URI: {uri}"
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{userinfo}{pg.host}:{pg.port}", parts.path, parts.query, ""))


def run_postgres_init_scripts(objects: list[dict[str, Any]], pg: Postgres) -> list[str]:
    """Run the .sql files the PostgreSQL StatefulSet mounts at /docker-entrypoint-initdb.d (the image runs them
    on an empty data directory); returns the script names. A database that exists already is left alone."""
    import psycopg2
    from psycopg2 import errors

    pod = _object(objects, "StatefulSet", "biggan-postgres")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ran = []
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] != "/docker-entrypoint-initdb.d":
            continue
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        data = _object(objects, "ConfigMap", volume["configMap"]["name"])["data"]
        conn = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.dbname)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction, as with psql
            with conn.cursor() as cur:
                for name in sorted(data):
                    assert name.endswith(".sql"), f"only .sql init scripts are supported here: {name}"
                    for statement in (st.strip() for st in data[name].split(";")):
                        if statement:
                            with contextlib.suppress(errors.DuplicateDatabase):
                                cur.execute(statement)
                    ran.append(name)
        finally:
            conn.close()
    return ran


def materialize_config_volumes(objects: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any],
                               root: Path, pg: Postgres) -> dict[str, str]:
    """Write the container's ConfigMap volumes under `root` (PostgreSQL URIs pointed at `pg`); returns
    {mount path: local directory}."""
    mounts = {}
    for mount in container.get("volumeMounts", []):
        (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mount["name"]]
        if "configMap" not in volume:
            continue
        local = root / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        for name, text in _object(objects, "ConfigMap", volume["configMap"]["name"])["data"].items():
            lines = [re.sub(r"(=\s*)(postgresql\S*)", lambda m: m.group(1) + localize_db_uri(m.group(2), pg), line)
                     for line in text.splitlines()]
            (local / name).write_text("\n".join(lines) + "\n")
        mounts[mount["mountPath"].rstrip("/")] = str(local)
    return mounts


def container_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as Kubernetes would build it, with Secret values taken from `secrets`."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
        else:
            raise AssertionError(f"unexpected envFrom source in the MLflow container: {source}")
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif ref := item.get("valueFrom", {}).get("secretKeyRef"):
            secret = secrets[ref["name"]]
            if ref["key"] in secret:
                env[item["name"]] = secret[ref["key"]]
            elif not ref.get("optional"):
                raise AssertionError(f"Secret {ref['name']} has no key {ref['key']}")
        else:
            raise AssertionError(f"unexpected env source in the MLflow container: {item}")
    return env


@dataclass
class MlflowPgS3Server:
    """A running tracking server: PostgreSQL backend store, artifacts proxied to S3."""

    uri: str  # http://127.0.0.1:PORT, what clients set as tracking URI
    port: int
    pg_dsn: str  # psycopg2.connect(pg_dsn) reaches the backend store
    s3_endpoint: str  # boto3 endpoint_url of the artifact store
    bucket: str  # the bucket of --artifacts-destination
    artifacts_prefix: str  # the key prefix of --artifacts-destination inside the bucket
    command: list[str]  # the exact command line that was started
    log: Path
    auth_dsn: str  # psycopg2.connect(auth_dsn) reaches basic-auth's user store
    admin: tuple[str, str]  # the admin account of the Secret biggan-mlflow-admin (test values)
    trainer: tuple[str, str]  # the trainer's account, created through the admin as the runbook does
    s3: S3Endpoint = field(repr=False)

    def s3_client(self) -> Any:
        return self.s3.client()

    def request(self, method: str, path: str, auth: tuple[str, str] | None = None, body: dict | None = None,
                ) -> tuple[int, dict]:
        """One HTTP request to the server (optionally with basic auth); (status, JSON body or {})."""
        import base64
        import json

        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, {}

    def client_env(self, account: tuple[str, str]) -> dict[str, str]:
        """What a client process sets to use `account` (the Ray pods get these from biggan-mlflow-training)."""
        return {"MLFLOW_TRACKING_USERNAME": account[0], "MLFLOW_TRACKING_PASSWORD": account[1]}


@contextlib.contextmanager
def run_mlflow_server(pg: Postgres, s3: S3Endpoint, workdir: Path,
                      container: dict[str, Any] | None = None) -> Iterator[MlflowPgS3Server]:
    """Start `mlflow server` with the manifest's command line, environment and config volumes, on 127.0.0.1;
    create the trainer's account through the admin."""
    objects = rendered_base()
    pod = _object(objects, "Deployment", MLFLOW_DEPLOYMENT)["spec"]["template"]["spec"]
    container = mlflow_container(objects) if container is None else container
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["mlflow", "server"], f"the MLflow container does not run `mlflow server`: {command}"
    args = command[2:]
    manifest_backend = flag_value(args, "--backend-store-uri")
    destination = flag_value(args, "--artifacts-destination")
    assert manifest_backend and destination, "the manifest must set --backend-store-uri and --artifacts-destination"
    dest = urlsplit(destination)
    assert dest.scheme == "s3", f"--artifacts-destination is not on S3: {destination}"
    bucket, prefix = dest.netloc, dest.path.strip("/")
    s3.client().create_bucket(Bucket=bucket)  # in the cluster the bucket exists beforehand

    port = free_port()
    local_args = localize_server_args(args, backend_store_uri=local_backend_uri(manifest_backend, pg), port=port)
    s3_keys = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "AWS_DEFAULT_REGION": s3.region, "AWS_ENDPOINT_URL": s3.endpoint}
    secrets = {
        "biggan-postgres": {"POSTGRES_USER": pg.user, "POSTGRES_PASSWORD": pg.password},
        "biggan-s3-mlflow": s3_keys,
        "biggan-mlflow-admin": {"MLFLOW_AUTH_ADMIN_USERNAME": TEST_MLFLOW_ADMIN[0],
                                "MLFLOW_AUTH_ADMIN_PASSWORD": TEST_MLFLOW_ADMIN[1],
                                "MLFLOW_FLASK_SERVER_SECRET_KEY": TEST_FLASK_SECRET_KEY},
    }
    run_postgres_init_scripts(objects, pg)
    mounts = materialize_config_volumes(objects, pod, container, workdir / "volumes", pg)
    env = container_env(container, secrets)
    for name, value in env.items():  # paths inside a ConfigMap volume -> the local copy
        for mount_path, local in mounts.items():
            if value.startswith(mount_path + "/"):
                env[name] = local + value[len(mount_path):]
    env.pop("HOME", None)  # the pod's HOME volume; here the test user's own
    env = _loopback_env(**{**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    auth_ini = env.get("MLFLOW_AUTH_CONFIG_PATH")
    auth_db = None
    if auth_ini:
        import configparser

        ini = configparser.ConfigParser()
        ini.read(auth_ini)
        auth_db = urlsplit(ini["mlflow"]["database_uri"]).path.strip("/")
    cmd = [sys.executable, "-m", "mlflow", "server", *local_args]
    log = workdir / "mlflow-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_until(lambda: http_status(port, "/health") == 200, "mlflow server", 120, proc, log)
        auth_dsn = pg.dsn.replace(f"dbname={pg.dbname}", f"dbname={auth_db}") if auth_db else ""
        server = MlflowPgS3Server(uri=f"http://{LOOPBACK}:{port}", port=port, pg_dsn=pg.dsn, s3_endpoint=s3.endpoint,
                                  bucket=bucket, artifacts_prefix=prefix, command=cmd, log=log, auth_dsn=auth_dsn,
                                  admin=TEST_MLFLOW_ADMIN, trainer=TEST_MLFLOW_TRAINER, s3=s3)
        # docs/kubernetes.md, "2. Create the Secrets": the admin creates the trainer's account.
        status, body = server.request("POST", "/api/2.0/mlflow/users/create", auth=server.admin,
                                      body={"username": server.trainer[0], "password": server.trainer[1]})
        if status != 200 and "already exists" not in json_message(body):
            raise RuntimeError(f"creating the trainer's MLflow user failed: {status} {body}{_tail(log)}")
        yield server
    finally:
        _stop_group(proc)


def json_message(body: dict) -> str:
    return str(body.get("message", ""))


# ----------------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    with run_postgres() as pg:
        yield pg


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Endpoint]:
    with run_moto_s3(tmp_path_factory.mktemp("moto")) as s3:
        yield s3


@pytest.fixture(scope="session")
def mlflow_pg_s3_server(postgres_server, s3_server, tmp_path_factory) -> Iterator[MlflowPgS3Server]:
    """The manifest's MLflow tracking server on 127.0.0.1, backed by PostgreSQL and S3 (moto).

    Yields an object with `.uri`, `.pg_dsn`, `.s3_endpoint` and `.bucket` (and `.s3_client()`)."""
    with run_mlflow_server(postgres_server, s3_server, tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
