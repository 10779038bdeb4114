"""The Kubernetes deployment under k8s/, checked offline: every kustomization renders, built-in kinds pass the
Kubernetes schema in strict mode, RayCluster and RayJob pass KubeRay's CRD schema, every container is
non-root, unprivileged and bounded, nothing is exposed outside the cluster, credentials come only from
Secrets, and each RayJob's entrypoint is a valid command line of the launcher it names."""

from __future__ import annotations

import functools
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import K8S, ROOT, flag_value, mlflow_container, render_kustomization

KUBERNETES_VERSION = "1.32.0"  # one of the schema sets kubernetes-validate ships; matches kubectl 1.32
OVERLAYS = ["dev", "gpu", "gpu-spot"]
DIGEST_OVERLAYS = ["overlays/gpu", "overlays/gpu/job", "overlays/gpu-spot", "overlays/gpu-spot/job"]
# Every directory with a kustomization.yaml that can be built on its own (components cannot).
KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")
    if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == "Kustomization"
)
JOB_OVERLAYS = [k for k in KUSTOMIZATIONS if k.startswith("overlays/") and k.endswith("/job")]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE", re.I)


@functools.cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_kustomization(K8S / kustomization))


def objects_of(kind: str, kustomization: str) -> list[dict[str, Any]]:
    return [o for o in rendered(kustomization) if o["kind"] == kind]


def the(kind: str, kustomization: str) -> dict[str, Any]:
    (obj,) = objects_of(kind, kustomization)
    return obj


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec inside an object, wherever it sits (Deployment, StatefulSet, RayCluster groups,
    RayJob submitter), with a path for messages."""
    found = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.append((path, node))
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(obj.get("spec", {}), f"{obj['kind']}/{obj['metadata']['name']}")
    return found


def all_containers(kustomization: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container and init container of every rendered object."""
    out = []
    for obj in rendered(kustomization):
        for path, spec in pod_specs(obj):
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                out.append((f"{path} container {c['name']}", spec, c))
    return out


# ----------------------------------------------------------------------------------------------------------
# Rendering and schemas.


def test_the_expected_kustomizations_exist():
    for overlay in OVERLAYS:
        assert overlay in [k.split("/")[1] for k in KUSTOMIZATIONS if k.startswith("overlays/")]
        assert f"overlays/{overlay}/job" in JOB_OVERLAYS


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders(kustomization):
    objs = rendered(kustomization)
    assert objs, f"{kustomization} rendered nothing"
    for obj in objs:
        assert obj["metadata"].get("namespace") or obj["kind"] == "Namespace", f"{obj['kind']} has no namespace"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_kinds_pass_strict_kubernetes_schema(kustomization):
    import kubernetes_validate

    builtin = [o for o in rendered(kustomization) if not o["apiVersion"].startswith("ray.io/")]
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(str(p) for p in err.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {err.message}")


def _crd_dir() -> Path | None:
    for candidate in (os.environ.get("KUBERAY_CRD_DIR"), ROOT.parent / "shared" / "kuberay-crds"):
        if candidate and (Path(candidate) / "ray.io_rayclusters.yaml").exists():
            return Path(candidate)
    return None


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation: unknown fields are errors
    (except where the schema preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str, api_version: str):
    import jsonschema

    crd_dir = _crd_dir()
    if crd_dir is None:
        pytest.skip("KubeRay CRDs not found (../shared/kuberay-crds or $KUBERAY_CRD_DIR); "
                    "RayCluster/RayJob schema check skipped")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load((crd_dir / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_resources_pass_the_kuberay_crd_schema(kustomization):
    ray_objs = [o for o in rendered(kustomization) if o["apiVersion"].startswith("ray.io/")]
    if not ray_objs:
        pytest.skip(f"{kustomization} has no KubeRay resources")
    for obj in ray_objs:
        errors = sorted(crd_validator(obj["kind"], obj["apiVersion"]).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{obj['kind']}/{obj['metadata']['name']} at {'/'.join(map(str, e.path))}: {e.message}" for e in errors)


# ----------------------------------------------------------------------------------------------------------
# Security.


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_is_non_root_unprivileged_bounded_and_pinned(kustomization):
    containers = all_containers(kustomization)
    if not containers:
        pytest.skip(f"{kustomization} has no pods")
    problems = []
    for where, spec, c in containers:
        pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot is not true")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if not isinstance(uid, int) or uid == 0:
            problems.append(f"{where}: runAsUser must be a non-zero uid, got {uid!r}")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: capabilities must drop ALL and add none")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: shares a host namespace")
        for volume in spec.get("volumes", []):
            if "hostPath" in volume:
                problems.append(f"{where}: hostPath volume {volume['name']}")
        resources = c.get("resources", {})
        for bound in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(bound, {}):
                    problems.append(f"{where}: no {res} {bound}")
        image = c.get("image", "")
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        if "@sha256:" not in image and (not tag or tag == "latest"):
            problems.append(f"{where}: image {image!r} has no pinned tag")
        for port in c.get("ports", []):
            if "hostPort" in port:
                problems.append(f"{where}: hostPort {port['hostPort']}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_nothing_is_exposed_beyond_the_cluster(kustomization):
    for obj in rendered(kustomization):
        kind, name = obj["kind"], obj["metadata"]["name"]
        assert kind not in ("Ingress", "Gateway", "HTTPRoute", "Route"), f"{kind}/{name} exposes a service"
        if kind == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service/{name} is {obj['spec']['type']}"
            assert not obj["spec"].get("externalIPs"), f"Service/{name} has external IPs"
        if kind == "RayCluster":
            head = obj["spec"]["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", "Ray head service is not ClusterIP"
            assert not head.get("enableIngress"), "Ray head has an Ingress"


def _secret_examples() -> dict[str, set[str]]:
    docs = yaml.safe_load_all((K8S / "secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in docs if d}


def test_secrets_example_is_never_applied_by_kustomize():
    assert _secret_examples(), "k8s/secrets.example.yaml documents no Secret"
    for path in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(path.read_text())
        assert "secretGenerator" not in spec, f"{path} generates Secrets"
        listed = [*spec.get("resources", []), *spec.get("components", [])]
        assert not [r for r in listed if "secret" in r], f"{path} applies a Secret file: {listed}"
    assert "secrets.local.yaml" in (K8S / ".gitignore").read_text()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_credentials_come_only_from_secrets(kustomization):
    examples = _secret_examples()
    problems = []
    for obj in rendered(kustomization):
        if obj["kind"] == "Secret":
            problems.append(f"Secret/{obj['metadata']['name']} is rendered; Secrets are created out of band")
        if obj["kind"] == "ConfigMap":
            problems += [f"ConfigMap/{obj['metadata']['name']}: {k} looks like a credential"
                         for k in obj.get("data", {}) if SECRET_NAME.search(k)]
    for where, _, c in all_containers(kustomization):
        for item in c.get("env", []):
            if SECRET_NAME.search(item["name"]) and "secretKeyRef" not in item.get("valueFrom", {}):
                problems.append(f"{where}: {item['name']} is not from a Secret")
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] not in examples.get(ref["name"], set()):
                problems.append(f"{where}: {ref['name']}/{ref['key']} is not in k8s/secrets.example.yaml")
        for source in c.get("envFrom", []):
            if "secretRef" in source and source["secretRef"]["name"] not in examples:
                problems.append(f"{where}: Secret {source['secretRef']['name']} is not in secrets.example.yaml")
        for arg in [*c.get("command", []), *c.get("args", [])]:
            if re.search(r"://[^/\s]*:[^/\s]*@", arg):
                problems.append(f"{where}: a URL with credentials in the command line: {arg}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------------------
# Ray: the cluster each overlay builds, and the job that runs on it.


def _worker_totals(cluster: dict[str, Any]) -> dict[str, float]:
    totals = {"cpu": 0.0, "gpu": 0.0}
    for group in cluster["spec"].get("workerGroupSpecs", []):
        (c,) = group["template"]["spec"]["containers"]
        limits = c["resources"]["limits"]
        cpus = float(group.get("rayStartParams", {}).get("num-cpus", _cpu(limits["cpu"])))
        totals["cpu"] += group["replicas"] * cpus
        totals["gpu"] += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
    return totals


def _cpu(quantity: str | int) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _parse_entrypoint(entrypoint: str):
    from launch.imagenet128 import PRESET, build_parser
    from pipeline.cli import resolve
    from pipeline.config import ConfigError

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "launch/imagenet128.py"], f"entrypoint must start with the launcher: {argv[:2]}"
    assert (ROOT / argv[1]).is_file()
    try:
        args = build_parser().parse_args(argv[2:])
    except SystemExit as exit_:  # argparse reports on stderr and exits
        pytest.fail(f"launch/imagenet128.py rejects the entrypoint's arguments (exit {exit_.code}): {argv[2:]}")
    assert not args.dry_run and not args.print_config, "the RayJob would only print its config"
    try:
        cfg = resolve(PRESET, args)
    except ConfigError as err:
        pytest.fail(f"the entrypoint's configuration is invalid: {err}")
    return args, cfg


@pytest.mark.parametrize("job", JOB_OVERLAYS)
def test_rayjob_entrypoint_is_a_valid_launcher_command_line(job):
    rayjob = the("RayJob", job)
    args, cfg = _parse_entrypoint(rayjob["spec"]["entrypoint"])
    assert args.data and cfg.data.shards.startswith("s3://"), "training data comes from S3"
    assert cfg.cluster.storage_path.startswith("s3://"), "Ray Train checkpoints go to S3, shared by all nodes"
    assert cfg.train.output_dir.startswith("/scratch/"), "local outputs go to the writable scratch volume"
    assert not cfg.tracking.tracking_uri, "the tracking URI comes from MLFLOW_TRACKING_URI in the Ray pods"


@pytest.mark.parametrize("job", JOB_OVERLAYS)
def test_rayjob_fits_the_raycluster_of_its_overlay(job):
    overlay = job.rsplit("/", 1)[0]
    rayjob, cluster = the("RayJob", job), the("RayCluster", overlay)
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert rayjob["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert not rayjob["spec"].get("shutdownAfterJobFinishes"), "the job must not delete the shared cluster"
    _, cfg = _parse_entrypoint(rayjob["spec"]["entrypoint"])
    totals = _worker_totals(cluster)
    need_cpu = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    assert need_cpu <= totals["cpu"], f"{need_cpu} CPUs requested by the job, workers offer {totals['cpu']}"
    if cfg.cluster.use_gpu:
        assert cfg.cluster.num_workers <= totals["gpu"], (
            f"{cfg.cluster.num_workers} GPU workers, the cluster has {totals['gpu']} GPUs")
    else:
        assert totals["gpu"] == 0, "a CPU job on a cluster holding GPUs"


def test_gpu_overlay_has_gpu_workers_with_shm_nccl_and_tolerations():
    cluster = the("RayCluster", "overlays/gpu")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    (c,) = spec["containers"]
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert group["replicas"] >= 2, "the gpu overlay is multi-node"
    assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in spec["tolerations"])
    assert _bytes(_shm_volume(spec)["emptyDir"]["sizeLimit"]) >= 16 * 2**30, "NCCL and DALI want a large /dev/shm"
    # NCCL settings reach the workers through the ConfigMap they load.
    env = _ray_env(cluster, c, "overlays/gpu")
    assert env["NCCL_SOCKET_IFNAME"] and env["NCCL_IB_DISABLE"] in ("0", "1")
    assert env["MLFLOW_TRACKING_URI"] == "http://biggan-mlflow:5000"
    # The head runs the driver only.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def _shm_volume(spec: dict[str, Any]) -> dict[str, Any]:
    (c,) = spec["containers"]
    (mount,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_has_a_memory_backed_dev_shm_that_holds_its_object_store(overlay):
    cluster = the("RayCluster", f"overlays/{overlay}")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        shm = _shm_volume(group["template"]["spec"])
        assert shm["emptyDir"]["medium"] == "Memory"
        # Ray puts its object store in /dev/shm only if it fits; otherwise it silently falls back to disk.
        assert int(group["rayStartParams"]["object-store-memory"]) < _bytes(shm["emptyDir"]["sizeLimit"])


def test_dev_overlay_is_cpu_only():
    for kustomization in ("overlays/dev", "overlays/dev/job"):
        for where, _, c in all_containers(kustomization):
            for bound in ("requests", "limits"):
                assert "nvidia.com/gpu" not in c["resources"].get(bound, {}), f"{where} asks for a GPU"
            assert not c.get("securityContext", {}).get("privileged")
    _, cfg = _parse_entrypoint(the("RayJob", "overlays/dev/job")["spec"]["entrypoint"])
    assert cfg.cluster.use_gpu is False
    assert _ray_env(the("RayCluster", "overlays/dev"), None, "overlays/dev")["DS_ACCELERATOR"] == "cpu"


def _ray_env(cluster: dict[str, Any], container: dict[str, Any] | None, overlay: str) -> dict[str, str]:
    container = container or cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            (cm,) = [o for o in objects_of("ConfigMap", overlay) if o["metadata"]["name"] == source["configMapRef"]["name"]]
            env.update(cm["data"])
    env.update({e["name"]: e.get("value") for e in container.get("env", [])})
    return env


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_ray_version_matches_the_project_pin():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [d for d in deps if d.startswith("ray[")]
    for overlay in OVERLAYS:
        assert the("RayCluster", f"overlays/{overlay}")["spec"]["rayVersion"] == ray_pin.split("==")[1]


# ----------------------------------------------------------------------------------------------------------
# MLflow, PostgreSQL, images.


def test_mlflow_server_is_the_same_in_every_overlay_and_private():
    base = mlflow_container()
    for overlay in OVERLAYS:
        objs = list(rendered(f"overlays/{overlay}"))
        # the image differs (by digest in the gpu overlays); the server's command line and environment do not
        assert ({**mlflow_container(objs), "image": None} == {**base, "image": None}), (
            f"overlay {overlay} changes the MLflow container")
    args = base["args"]
    assert flag_value(args, "--backend-store-uri").startswith("postgresql+psycopg2://biggan-postgres:5432/")
    assert flag_value(args, "--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in args
    for probe in ("readinessProbe", "livenessProbe"):
        assert base[probe]["httpGet"]["path"] == "/health"
    service = [o for o in rendered("base") if o["kind"] == "Service" and o["metadata"]["name"] == "biggan-mlflow"]
    assert service and service[0]["spec"]["type"] == "ClusterIP"


def test_postgres_keeps_its_data_on_a_volume_claim():
    sts = [o for o in rendered("base") if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "biggan-postgres"]
    (sts,) = sts
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    pgdata = {e["name"]: e.get("value") for e in c["env"]}["PGDATA"]
    assert pgdata.startswith(mount["mountPath"] + "/"), "PGDATA must live on the claim, below its root"
    assert any(o["kind"] == "Service" and o["metadata"]["name"] == sts["spec"]["serviceName"] for o in rendered("base"))


def _from_lines(dockerfile: Path) -> list[str]:
    return [line.split()[1] for line in dockerfile.read_text().splitlines() if line.upper().startswith("FROM ")]


def test_training_image_pins_its_cuda_base_and_builds_deepspeed_ops():
    dockerfile = K8S / "Dockerfile"
    text = dockerfile.read_text()
    (base,) = _from_lines(dockerfile)
    assert base.startswith("nvidia/cuda:") and "latest" not in base and base.count(":") == 1
    assert "devel" in base, "DeepSpeed's ops are compiled at build time: the base needs nvcc"
    assert "download.pytorch.org/whl/cu130" in text, "torch must be the CUDA 13.0 build DALI's cuda130 wheel expects"
    assert "DS_BUILD_FUSED_ADAM=1" in text and "--no-build-isolation" in text and "installed_ops" in text
    # DALI and the rest come from the lock of pyproject.toml's dependencies, which the Dockerfile installs.
    assert "COPY k8s/requirements.lock" in text
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("nvidia-dali-cuda130") for d in deps)
    assert "nvidia-dali-cuda130==" in (K8S / "requirements.lock").read_text()
    assert re.search(r"^USER 1000(:\d+)?$", text, re.M), "the image runs as uid 1000, as the manifests do"


def test_mlflow_image_runs_the_tested_mlflow_version():
    import mlflow

    dockerfile = K8S / "mlflow" / "Dockerfile"
    (base,) = _from_lines(dockerfile)
    assert ":" in base and "latest" not in base
    assert f"mlflow=={mlflow.__version__}" in dockerfile.read_text(), "the image must run the version the tests run"
    # basic-auth (--app-name basic-auth) needs Flask-WTF: the version the tests run the server with
    from importlib.metadata import version

    assert f'"flask-wtf=={version("flask-wtf")}"' in dockerfile.read_text()
    assert re.search(r"^USER 1000(:\d+)?$", dockerfile.read_text(), re.M)
