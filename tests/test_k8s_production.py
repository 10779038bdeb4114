"""The production rules of k8s/, checked offline on every rendered kustomization: Ray behind token auth and
NetworkPolicies, MLflow behind basic auth, a head that may die (GCS fault tolerance on Redis, named runs),
workers that may be reclaimed (preStop commit, grace period, PodDisruptionBudgets, spot overlay, sized
scratch), and hardening (read-only root filesystems, digests, a pinned lock, separate S3 keys, Pod Security
"restricted"). The rules live in the manifests; these tests read the rendered objects the way the API server
and the kubelet would."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tomllib
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.servers import K8S, ROOT
from tests.test_k8s import (
    JOB_OVERLAYS,
    KUSTOMIZATIONS,
    OVERLAYS,
    _bytes,
    _parse_entrypoint,
    _secret_examples,
    all_containers,
    objects_of,
    pod_specs,
    rendered,
    the,
)

STACKS = [f"overlays/{o}" for o in OVERLAYS]
DIGEST_OVERLAYS = ["overlays/gpu", "overlays/gpu/job", "overlays/gpu-spot", "overlays/gpu-spot/job"]
NAMESPACE = "biggan"


def _named(kind: str, name: str, kustomization: str) -> dict[str, Any]:
    (obj,) = [o for o in objects_of(kind, kustomization) if o["metadata"]["name"] == name]
    return obj


def _ray_groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"]),
            *((f"worker group {g['groupName']}", g) for g in spec.get("workerGroupSpecs", []))]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def _submitter(job: str) -> tuple[dict[str, Any], dict[str, Any]]:
    template = the("RayJob", job)["spec"]["submitterPodTemplate"]
    return template, template["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(container: dict[str, Any], name: str) -> tuple[str, str] | None:
    ref = _env(container).get(name, {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def _secret_sources(container: dict[str, Any]) -> set[str]:
    names = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
              if "secretKeyRef" in e.get("valueFrom", {})}
    return names


# ----------------------------------------------------------------------------------------------------------
# 1. Authenticated Ray.


@pytest.mark.parametrize("stack", STACKS)
def test_every_raycluster_uses_token_auth_with_the_token_from_a_secret(stack):
    examples = _secret_examples()
    cluster = the("RayCluster", stack)
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token" and not auth.get("enableK8sTokenAuth")
    secret = auth["secretName"]
    # KubeRay reads the token from the key auth_token of that Secret (and generates none of its own).
    assert "auth_token" in examples.get(secret, set()), f"{secret}/auth_token is not in secrets.example.yaml"
    for where, group in _ray_groups(cluster):
        c = _ray_container(group)
        assert _env(c)["RAY_AUTH_MODE"]["value"] == "token", f"{where}: RAY_AUTH_MODE is not token"
        assert _secret_ref(c, "RAY_AUTH_TOKEN") == (secret, "auth_token"), f"{where}: token not from {secret}"


@pytest.mark.parametrize("stack", STACKS)
def test_every_ray_container_keeps_the_console_as_the_embedded_ray_does(stack):
    """Ray Train's print patch (every worker line twice), MLflow's INFO notes and artifact progress bars: the pods
    set what pipeline.ray_local sets for the embedded Ray's workers, to the same values."""
    from pipeline.ray_local import WORKER_ENV

    for where, group in _ray_groups(the("RayCluster", stack)):
        env = _env(_ray_container(group))
        for name, value in WORKER_ENV.items():
            assert env.get(name, {}).get("value") == value, f"{where}: {name} is not {value!r}"


@pytest.mark.parametrize("job", JOB_OVERLAYS)
def test_the_rayjob_submitter_authenticates_with_the_clusters_token(job):
    stack = job.rsplit("/", 1)[0]
    secret = the("RayCluster", stack)["spec"]["authOptions"]["secretName"]
    _, c = _submitter(job)
    assert _env(c)["RAY_AUTH_MODE"]["value"] == "token"
    assert _secret_ref(c, "RAY_AUTH_TOKEN") == (secret, "auth_token")
    # It holds the token and nothing else: no S3 key, no MLflow account.
    assert _secret_sources(c) == {secret}, f"the submitter reads more Secrets than the token: {_secret_sources(c)}"


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def admitted(policies: list[dict[str, Any]], target: dict[str, str], port: int, source: dict[str, str],
             source_namespace: dict[str, str]) -> bool:
    """Would the NetworkPolicies of the namespace let `source` (pod labels, namespace labels) open a TCP
    connection to `target` (pod labels, same namespace as the policies) on `port`? Kubernetes semantics:
    unselected pods admit everything; a selected pod admits the union of its policies' ingress rules."""
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    same_namespace = source_namespace.get("kubernetes.io/metadata.name") == NAMESPACE
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                ns_ok = (_matches(peer["namespaceSelector"], source_namespace) if "namespaceSelector" in peer
                         else same_namespace)
                pod_ok = _matches(peer["podSelector"], source) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


def _pod_labels(stack: str) -> dict[str, dict[str, str]]:
    cluster = the("RayCluster", stack)
    labels = {"head": cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"],
              "worker": cluster["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]}
    for kind, name, role in (("Deployment", "biggan-mlflow", "mlflow"), ("StatefulSet", "biggan-postgres", "postgres"),
                             ("StatefulSet", "biggan-redis", "redis")):
        labels[role] = _named(kind, name, stack)["spec"]["template"]["metadata"]["labels"]
    labels["submitter"] = _submitter(f"{stack}/job")[0]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("stack", STACKS)
def test_network_policies_admit_ray_ports_only_from_ray_pods_and_the_named_submitter(stack):
    policies = objects_of("NetworkPolicy", stack)
    pods = _pod_labels(stack)
    here = {"kubernetes.io/metadata.name": NAMESPACE}
    elsewhere = {"kubernetes.io/metadata.name": "someone-else"}
    stranger = {"app": "curl"}

    def ok(target: str, port: int, source: dict[str, str], ns: dict[str, str] = here) -> bool:
        return admitted(policies, pods[target], port, source, ns)

    # a default deny: a pod no rule names is refused everywhere
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)
    ray_ports = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "raylet/worker": 10002}
    for name, port in ray_ports.items():
        for target in ("head", "worker"):
            assert ok(target, port, pods["head"]) and ok(target, port, pods["worker"]), (
                f"Ray pods cannot reach the {target}'s {name} port {port}")
            for who, labels, ns in (("a stranger pod", stranger, here), ("MLflow", pods["mlflow"], here),
                                    ("PostgreSQL", pods["postgres"], here),
                                    ("a pod of another namespace with Ray's labels", pods["worker"], elsewhere)):
                assert not ok(target, port, labels, ns), f"{who} reaches the {target}'s {name} port {port}"
    # The submitter: the head's dashboard (job submission) and client port, nothing else.
    assert ok("head", 8265, pods["submitter"]) and ok("head", 10001, pods["submitter"])
    assert not ok("head", 6379, pods["submitter"]) and not ok("worker", 8265, pods["submitter"])
    assert not ok("mlflow", 5000, pods["submitter"]), "the submitter has no business with MLflow"
    # The label is what admits it: the same pod without it is a stranger.
    unlabelled = {k: v for k, v in pods["submitter"].items() if k != "biggan.io/ray-submitter"}
    assert not ok("head", 8265, unlabelled)


@pytest.mark.parametrize("stack", STACKS)
def test_mlflow_redis_and_postgres_admit_only_their_clients(stack):
    policies = objects_of("NetworkPolicy", stack)
    pods = _pod_labels(stack)
    here = {"kubernetes.io/metadata.name": NAMESPACE}
    ingress_ns = {"kubernetes.io/metadata.name": "ingress-nginx"}
    ingress_pod = {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"}

    def ok(target: str, port: int, source: dict[str, str], ns: dict[str, str] = here) -> bool:
        return admitted(policies, pods[target], port, source, ns)

    assert ok("mlflow", 5000, pods["head"]) and ok("mlflow", 5000, pods["worker"])
    assert ok("mlflow", 5000, ingress_pod, ingress_ns), "the reviewer's ingress controller cannot reach MLflow"
    assert not ok("mlflow", 5000, {"app": "curl"}) and not ok("mlflow", 5000, ingress_pod, here)
    assert ok("redis", 6379, pods["head"])
    assert not ok("redis", 6379, pods["worker"]) and not ok("redis", 6379, pods["mlflow"])
    assert ok("postgres", 5432, pods["mlflow"])
    assert not ok("postgres", 5432, pods["head"]) and not ok("postgres", 5432, pods["worker"])


def test_readme_and_runbook_submission_commands_carry_the_token():
    for doc in (ROOT / "README.md", ROOT / "docs" / "kubernetes.md"):
        text = doc.read_text()
        commands = re.findall(r"^[^\n]*ray job submit [^\n]*$", text, re.M)
        assert commands, f"{doc.name} shows no `ray job submit` command"
        for line in commands:
            # on the line itself, or exported in the same code block just before
            block = text[: text.index(line)].rsplit("```", 1)[-1] + line
            assert "RAY_AUTH_MODE=token" in block and "RAY_AUTH_TOKEN" in block, (
                f"{doc.name}: `{line.strip()}` does not say how the client gets the Ray token")


# ----------------------------------------------------------------------------------------------------------
# 2. MLflow behind auth.


def _mount_file(spec: dict[str, Any], container: dict[str, Any], path: str, stack: str) -> str:
    """The text of the file at `path` in the container, when it comes from a ConfigMap volume."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            cm = _named("ConfigMap", volume["configMap"]["name"], stack)
            return cm["data"][path[len(prefix):]]
    raise AssertionError(f"{path} is on no ConfigMap volume of the container")


@pytest.mark.parametrize("stack", STACKS)
def test_mlflow_runs_basic_auth_with_its_admin_and_user_store_out_of_the_command_line(stack):
    deployment = _named("Deployment", "biggan-mlflow", stack)
    spec = deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    args = c["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    env = _env(c)
    assert _secret_ref(c, "MLFLOW_AUTH_ADMIN_PASSWORD") and _secret_ref(c, "MLFLOW_AUTH_ADMIN_USERNAME")
    assert _secret_ref(c, "MLFLOW_FLASK_SERVER_SECRET_KEY"), "basic-auth needs a static CSRF key, from a Secret"
    ini = configparser.ConfigParser()
    ini.read_string(_mount_file(spec, c, env["MLFLOW_AUTH_CONFIG_PATH"]["value"], stack))
    auth = ini["mlflow"]
    db = urlsplit(auth["database_uri"])
    assert db.scheme == "postgresql+psycopg2" and "@" not in db.netloc, "the user store: PostgreSQL, no credentials"
    assert db.path.strip("/") != "mlflow", "the user store has a database of its own"
    assert "admin_password" not in auth, "the admin password comes from the Secret, not the ConfigMap"
    assert auth["default_permission"] in ("READ", "NO_PERMISSIONS")
    # The database the user store needs is created by PostgreSQL's init script.
    postgres = _named("StatefulSet", "biggan-postgres", stack)["spec"]["template"]["spec"]
    (pg,) = postgres["containers"]
    script = _mount_file(postgres, pg, "/docker-entrypoint-initdb.d/10-mlflow-auth.sql", stack)
    assert f"CREATE DATABASE {db.path.strip('/')};" in script


@pytest.mark.parametrize("stack", STACKS)
def test_the_trainer_logs_to_mlflow_with_its_own_account_from_a_secret(stack):
    examples = _secret_examples()
    for where, group in _ray_groups(the("RayCluster", stack)):
        c = _ray_container(group)
        user, password = _secret_ref(c, "MLFLOW_TRACKING_USERNAME"), _secret_ref(c, "MLFLOW_TRACKING_PASSWORD")
        assert user and password and user[0] == password[0], f"{where}: no MLflow account from one Secret"
        assert {user[1], password[1]} <= examples[user[0]]
        admin = _secret_ref(_named("Deployment", "biggan-mlflow", stack)["spec"]["template"]["spec"]["containers"][0],
                            "MLFLOW_AUTH_ADMIN_PASSWORD")
        assert user[0] != admin[0], f"{where}: the trainer must not hold the MLflow admin's Secret"


# ----------------------------------------------------------------------------------------------------------
# 3. A head that may die.


@pytest.mark.parametrize("stack", STACKS)
def test_gcs_fault_tolerance_uses_the_in_cluster_redis_with_its_password(stack):
    cluster = the("RayCluster", stack)
    ft = cluster["spec"]["gcsFaultToleranceOptions"]
    assert ft.get("backend", "redis") == "redis"
    address = urlsplit(ft["redisAddress"])
    service = _named("Service", address.hostname, stack)
    assert address.port in [p["port"] for p in service["spec"]["ports"]]
    redis = _named("StatefulSet", "biggan-redis", stack)
    assert _matches({"matchLabels": service["spec"]["selector"]}, redis["spec"]["template"]["metadata"]["labels"])
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert _secret_ref(c, "REDIS_PASSWORD") == (ref["name"], ref["key"]), "Ray and Redis read different passwords"
    command = " ".join([*c.get("command", []), *c.get("args", [])])
    assert "requirepass" in command and '"$REDIS_PASSWORD"' in command and "--appendonly yes" in command
    assert "redis-server /tmp/redis.conf" in command, "the password goes through a config file, not argv"
    # The append-only file is on a claim, so a Redis restart keeps the GCS state.
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data" for m in c["volumeMounts"])
    # KubeRay refuses these next to gcsFaultToleranceOptions.
    head = cluster["spec"]["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"]
    assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & set(_env(_ray_container(head)))


@pytest.mark.parametrize("job", JOB_OVERLAYS)
def test_the_rayjob_names_its_run_and_fits_weeks_of_training(job):
    rayjob = the("RayJob", job)["spec"]
    _, cfg = _parse_entrypoint(rayjob["entrypoint"])
    assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", cfg.tracking.run_name), (
        "the entrypoint must name its run (--set tracking.run_name=...) so a resubmission resumes it")
    assert rayjob["activeDeadlineSeconds"] >= 28 * 86400, "a BigGAN run takes weeks: the deadline is a guard"
    assert rayjob["activeDeadlineSeconds"] < 2**31
    # KubeRay's validation: backoffLimit > 0 is refused with clusterSelector (each retry would be a new cluster).
    if rayjob.get("clusterSelector"):
        assert rayjob.get("backoffLimit", 0) == 0
        assert not rayjob.get("shutdownAfterJobFinishes") and not rayjob.get("ttlSecondsAfterFinished")
    assert rayjob["submitterConfig"]["backoffLimit"] >= 1, "a lost submitter pod must be retried"
    assert not rayjob.get("jobId"), "a fixed submission id would make a resubmission follow the old job's logs"


def test_the_spot_job_resumes_the_same_run_as_the_on_demand_job():
    runs = {job: _parse_entrypoint(the("RayJob", job)["spec"]["entrypoint"])[1].tracking.run_name
            for job in ("overlays/gpu/job", "overlays/gpu-spot/job")}
    assert len(set(runs.values())) == 1, runs


# ----------------------------------------------------------------------------------------------------------
# 4. Workers that may be reclaimed.

# What a BigGAN-128 checkpoint holds, per parameter: fp32 weights, Adam's two moments (fp32), and for G the
# EMA copy; DeepSpeed's bf16 runs add an fp32 master copy. Written to S3 from the node at 100 MB/s (a
# conservative single-stream figure); the preStop wait must cover twice that.
S3_BYTES_PER_S = 100e6


def biggan128_checkpoint_bytes() -> int:
    from models.__main__ import summary

    counts = summary("biggan", 128)
    g, d = counts["G_params"], counts["D_params"]
    assert 60e6 < g < 80e6 and 80e6 < d < 96e6, f"BigGAN-128 is G 70.4M, D 88.0M parameters; got {g}, {d}"
    weights, adam, master = 4 * (g + d), 8 * (g + d), 4 * (g + d)
    return weights + adam + master + 4 * g  # + G's EMA


def _prestop_wait(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:4] == ["python", "-m", "pipeline.preemption", "signal-local"], (
        f"preStop must let the trainers commit (pipeline.preemption signal-local), got {command}")
    assert "--wait" in command
    return int(command[command.index("--wait") + 1])


@pytest.mark.parametrize("stack", STACKS)
def test_ray_pods_commit_a_checkpoint_before_they_stop(stack):
    checkpoint = biggan128_checkpoint_bytes()
    upload_s = checkpoint / S3_BYTES_PER_S
    for where, group in _ray_groups(the("RayCluster", stack)):
        spec = group["template"]["spec"]
        c = _ray_container(group)
        wait = _prestop_wait(c)
        grace = spec["terminationGracePeriodSeconds"]
        assert wait >= 2 * upload_s, f"{where}: {wait}s to commit, a {checkpoint / 1e9:.1f} GB save takes ~{upload_s:.0f}s"
        assert grace >= wait + 20, f"{where}: grace {grace}s leaves Ray no time to stop after the {wait}s commit"
        assert "ray stop" not in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])


def test_the_prestop_command_is_one_the_preemption_module_accepts():
    try:
        import pipeline.preemption  # noqa: F401
    except ImportError:
        pytest.skip("pipeline.preemption (the survival issue's module) is not in this checkout yet")
    command = _ray_container(the("RayCluster", "overlays/gpu")["spec"]["headGroupSpec"])["lifecycle"]["preStop"]
    argv = command["exec"]["command"]
    res = subprocess.run([sys.executable, *argv[1:4], "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and "--wait" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("stack", STACKS)
def test_disruption_budgets_cover_the_head_and_the_workers(stack):
    budgets = objects_of("PodDisruptionBudget", stack)
    pods = _pod_labels(stack)
    by_role = {role: [b for b in budgets if _matches(b["spec"]["selector"], pods[role])] for role in ("head", "worker")}
    (head,) = by_role["head"]
    (worker,) = by_role["worker"]
    assert head["spec"]["maxUnavailable"] == 0, "the head (driver, GCS) is never evicted voluntarily"
    assert worker["spec"]["maxUnavailable"] == 1, "workers are drained one at a time"
    for b in budgets:
        assert not _matches(b["spec"]["selector"], pods["submitter"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_emptydir_is_sized(kustomization):
    for obj in rendered(kustomization):
        for where, spec in pod_specs(obj):
            for volume in spec.get("volumes", []):
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), f"{where}: emptyDir {volume['name']} has no sizeLimit"


@pytest.mark.parametrize("stack", STACKS)
def test_scratch_holds_several_checkpoints(stack):
    checkpoint = biggan128_checkpoint_bytes()
    for where, group in _ray_groups(the("RayCluster", stack)):
        spec = group["template"]["spec"]
        (mount,) = [m for m in _ray_container(group)["volumeMounts"] if m["mountPath"] == "/scratch"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        if "worker" in where and "gpu" in stack:
            assert _bytes(volume["emptyDir"]["sizeLimit"]) >= 10 * checkpoint, f"{where}: /scratch too small"


def test_spot_overlay_puts_workers_on_spot_nodes_and_keeps_the_head_off_them():
    cluster = the("RayCluster", "overlays/gpu-spot")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    spot_node = {"cloud.google.com/gke-spot": "true"}
    on_demand = {"cloud.google.com/gke-provisioning": "standard"}
    assert any(_matches({"matchExpressions": t["matchExpressions"]}, spot_node) for t in terms)
    assert not any(_matches({"matchExpressions": t["matchExpressions"]}, on_demand) for t in terms)
    for labels in ({"eks.amazonaws.com/capacityType": "SPOT"}, {"kubernetes.azure.com/scalesetpriority": "spot"}):
        assert any(_matches({"matchExpressions": t["matchExpressions"]}, labels) for t in terms), labels
    assert any(t["key"] == "cloud.google.com/gke-spot" for t in spec["tolerations"])
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), "still GPU nodes"
    head_terms = cluster["spec"]["headGroupSpec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert not any(_matches({"matchExpressions": t["matchExpressions"]}, spot_node) for t in head_terms)
    assert any(_matches({"matchExpressions": t["matchExpressions"]}, on_demand) for t in head_terms)
    # The on-demand gpu overlay has no spot placement.
    assert "affinity" not in the("RayCluster", "overlays/gpu")["spec"]["workerGroupSpecs"][0]["template"]["spec"]


# ----------------------------------------------------------------------------------------------------------
# 5. Hardening.

# Where each kind of container must be able to write (everything else is read-only).
WRITABLE = {
    "ray-head": {"/tmp", "/tmp/ray", "/dev/shm", "/scratch", "/home/ray"},
    "ray-worker": {"/tmp", "/tmp/ray", "/dev/shm", "/scratch", "/home/ray"},
    "ray-job-submitter": {"/tmp", "/home/ray"},
    "mlflow": {"/tmp", "/home/mlflow"},
    "postgres": {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp", "/dev/shm"},
    "redis": {"/data", "/tmp"},
}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_root_filesystem_is_read_only_with_writable_volumes_where_each_container_writes(kustomization):
    containers = all_containers(kustomization)
    if not containers:
        pytest.skip(f"{kustomization} has no pods")
    for where, _, c in containers:
        assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, f"{where}: root filesystem writable"
        writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        needed = WRITABLE[c["name"]]
        assert needed <= writable, f"{where}: no writable volume at {sorted(needed - writable)}"
        home = _env(c).get("HOME", {}).get("value")
        if home:
            assert home in writable, f"{where}: HOME={home} is not writable"


@pytest.mark.parametrize("kustomization", DIGEST_OVERLAYS)
def test_gpu_overlays_pin_every_image_by_digest(kustomization):
    for where, _, c in all_containers(kustomization):
        assert re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", c["image"]), f"{where}: {c['image']} is not by digest"


def test_each_digest_has_its_tag_beside_it():
    tags = {i["name"]: i["newTag"] for i in yaml.safe_load((K8S / "components/images/kustomization.yaml").read_text())["images"]}
    names = {i["name"]: i.get("newName", i["name"]) for i in
             yaml.safe_load((K8S / "components/images/kustomization.yaml").read_text())["images"]}
    text = (K8S / "components/digests/kustomization.yaml").read_text()
    entries = re.findall(r"- name: (\S+)\n\s+digest: (sha256:[0-9a-f]{64})\s+# (\S+)", text)
    assert len(entries) == len(tags), "one digest per image of components/images"
    for name, _, tag in entries:
        (short,) = [k for k, v in names.items() if v == name]
        assert tag == tags[short], f"{name}: the comment says {tag}, components/images pins {tags[short]}"
    assert "PLACEHOLDER" in text and "docs/kubernetes.md" in text


def test_the_image_installs_its_python_packages_from_a_pinned_lock():
    lock = (K8S / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lock if line and not line.startswith("#"))
    assert all(re.fullmatch(r"[a-z0-9._-]+", n) and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for n, v in pins.items())
    for name in ("numpy", "pillow", "fsspec", "s3fs", "ray", "mlflow", "deepspeed", "webdataset", "nvidia-dali-cuda130"):
        assert name in pins, f"{name} is not pinned in k8s/requirements.lock"
    assert "torch" not in pins, "torch comes from PyTorch's CUDA index, not the lock"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[\[<>=!~ ;]", dep, maxsplit=1)[0].lower()
        if name != "torch":
            assert name in pins, f"pyproject dependency {name} is missing from the lock"
        if "==" in dep:
            assert pins[name] == dep.split("==")[1].split(";")[0].strip(), f"{name}: lock and pyproject disagree"
    dockerfile = (K8S / "Dockerfile").read_text()
    assert "COPY k8s/requirements.lock" in dockerfile and re.search(r"pip install .*-r /app/requirements.lock", dockerfile)
    assert "!k8s/requirements.lock" in (K8S / "Dockerfile.dockerignore").read_text()
    # the lock is what this checkout's tests run with
    res = subprocess.run([sys.executable, str(K8S / "lock_requirements.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_s3_credentials_are_separate_per_component_and_absent_elsewhere(kustomization):
    s3 = {"ray-head": {"biggan-s3-training"}, "ray-worker": {"biggan-s3-training"}, "mlflow": {"biggan-s3-mlflow"}}
    examples = _secret_examples()
    for where, _, c in all_containers(kustomization):
        held = {name for name in _secret_sources(c) if "AWS_ACCESS_KEY_ID" in examples.get(name, set())}
        assert held == s3.get(c["name"], set()), f"{where} holds the S3 keys {sorted(held)}"


# Pod Security Standards, "restricted" (Kubernetes 1.32): what the admission controller checks per pod.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    out = []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(key)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)}")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile {seccomp}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities {caps}")
        if any("hostPort" in p for p in c.get("ports", [])):
            out.append(f"{c['name']}: hostPort")
    return out


def test_the_namespace_enforces_pod_security_restricted():
    (ns,) = objects_of("Namespace", "base")
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for overlay in STACKS:
        (ns,) = objects_of("Namespace", overlay)
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted", overlay


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_meets_pod_security_restricted(kustomization):
    problems = [f"{where}: {v}" for obj in rendered(kustomization) for where, spec in pod_specs(obj)
                for v in restricted_violations(spec)]
    assert not problems, "\n".join(problems)


def test_restricted_check_catches_what_the_admission_controller_refuses():
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_violations(good) == []
    ipc_lock = yaml.safe_load(yaml.safe_dump(good))
    ipc_lock["containers"][0]["securityContext"]["capabilities"]["add"] = ["IPC_LOCK"]  # what RDMA needs
    host = {**yaml.safe_load(yaml.safe_dump(good)), "volumes": [{"name": "nvme", "hostPath": {"path": "/mnt"}}]}
    no_seccomp = yaml.safe_load(yaml.safe_dump(good))
    del no_seccomp["securityContext"]["seccompProfile"]
    for bad in (ipc_lock, host, no_seccomp):
        assert restricted_violations(bad)


# ----------------------------------------------------------------------------------------------------------
# 6. The runbook.


def test_the_runbook_covers_the_operations():
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    headings = [h.lower() for h in re.findall(r"^#+ (.+)$", text, re.M)]
    for word in ("deploy", "submit", "watch", "preempt", "resume", "rotate", "tear down"):
        assert any(word in h for h in headings), f"docs/kubernetes.md has no section on '{word}'"
    # every kubectl -k path it names exists
    for path in re.findall(r"kubectl (?:apply|delete) -k ([^\s`]+)", text):
        assert (ROOT / path / "kustomization.yaml").exists(), f"docs/kubernetes.md names {path}, which does not exist"
    for line in re.findall(r"^\s*(?:RAY_AUTH_MODE=token .*)?ray job submit (.*)$", text, re.M):
        assert "--address" in line, line
