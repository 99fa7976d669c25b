"""Offline checks of the KubeRay manifests under k8s/, as kustomize renders them.

Each overlay (k8s/cluster, k8s/main-path, k8s/sweep, k8s/sweep-on-cluster) is
rendered with ``tests/kustomize_lite.py`` (the subset of kustomize the overlays
use; compared with ``kubectl kustomize`` where kubectl is installed). Every
rendered RayCluster / RayJob is validated against the KubeRay v1.7 CRD schemas in
``../shared/kuberay-crds/`` (relative to the repository root). The CRDs accept
unknown fields, so the schemas are made strict first: every object schema that
lists ``properties`` and says nothing about extra keys gets
``additionalProperties: false``, which turns a typo such as ``minReplica`` into
an error instead of a silently ignored field. On top of the schema: security
(non-root, no privilege escalation, a cluster-internal dashboard that
``kubectl port-forward`` reaches), one cluster spec for every job, the GPU
worker group, and entry points that exist and set ``train.max_failures``.
"""

from __future__ import annotations

import copy
import functools
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from kustomize_lite import build

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_DIR = Path(os.environ.get("KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
#: The kustomize overlays users apply (kubectl apply -k k8s/<overlay>).
OVERLAYS = ("cluster", "main-path", "sweep", "sweep-on-cluster")
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
ALL_INTERFACES = {"0.0.0.0", "::", "[::]"}

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay CRD schemas not found at {CRD_DIR} (shared/ is not checked out beside the repo)")


# --------------------------------------------------------------------------- loading

@functools.cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(build(K8S / overlay))


def _documents() -> list[tuple[Path, dict]]:
    return [(K8S / overlay, doc) for overlay in OVERLAYS for doc in _rendered(overlay)]


def _ray_manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _documents() if d.get("kind") in CRD_FILES]


def _ids(items: list[tuple[Path, dict]]) -> list[str]:
    return [f"{p.relative_to(K8S)}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for p, d in items]


MANIFESTS = _ray_manifests()


def _manifest(kind: str, name: str | None = None) -> dict:
    for _, doc in MANIFESTS:
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise LookupError(f"no {kind} {name or ''} under {K8S}")


# --------------------------------------------------------------------------- strict schemas

def _strict(schema: Any) -> Any:
    """Make a CRD's OpenAPI v3 schema strict and jsonschema-compatible, in place.

    - ``additionalProperties: false`` where ``properties`` are listed and neither
      ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` is;
    - ``x-kubernetes-int-or-string: true`` -> ``type: [integer, string]``;
    - ``nullable: true`` -> ``null`` added to ``type``.
    Other ``x-kubernetes-*`` keys and the ``int32``/``int64`` formats are
    unknown to jsonschema and ignored by it.
    """
    if not isinstance(schema, dict):
        return schema
    if schema.get("x-kubernetes-int-or-string"):
        schema.pop("anyOf", None)
        schema["type"] = ["integer", "string"]
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for sub in (schema.get("properties") or {}).values():
        _strict(sub)
    for key in ("items", "additionalProperties", "not"):
        _strict(schema.get(key))
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key) or []:
            _strict(sub)
    return schema


@functools.cache
def _validator(kind: str):
    # The CRDs are ~1 MB of YAML each: the C loader reads them ~10x faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(doc: dict) -> list[str]:
    errors = sorted(_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# --------------------------------------------------------------------------- walking manifests

def _cluster_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    return [doc["spec"]["rayClusterSpec"]] if doc["spec"].get("rayClusterSpec") else []


def _pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    for spec in _cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]["spec"]
    if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        yield "submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def _containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every container the manifest makes, KubeRay's autoscaler sidecar included."""
    for where, pod in _pod_specs(doc):
        for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            yield f"{where}/{c['name']}", c
    for spec in _cluster_specs(doc):
        if spec.get("enableInTreeAutoscaling"):
            yield "autoscaler-sidecar", spec.get("autoscalerOptions", {})


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _quantity(value: Any) -> float:
    return float(value)  # GPU counts are plain integers ("1" or 1)


# --------------------------------------------------------------------------- schema tests

def test_manifests_found():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in MANIFESTS}
    assert ("RayCluster", "raypath") in kinds
    assert {("RayJob", "raypath-main-path"), ("RayJob", "raypath-sweep"),
            ("RayJob", "raypath-sweep-on-cluster")} <= kinds
    for overlay in ("main-path", "sweep", "sweep-on-cluster"):  # jobs create or select their cluster
        assert [d["kind"] for d in _rendered(overlay) if d["kind"] in CRD_FILES] == ["RayJob"], overlay


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True)

    def key(d):
        return d["kind"], d["metadata"]["name"]

    expected = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key)
    assert sorted(_rendered(overlay), key=key) == expected


@needs_crds
@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_matches_crd_schema(path, doc):
    assert doc["apiVersion"] == "ray.io/v1", f"{path}: KubeRay v1.7 manifests use ray.io/v1"
    assert _errors(doc) == [], f"{path}: does not match the {doc['kind']} v1 CRD schema"


@needs_crds
@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_typo_is_rejected(kind):
    """The strict schema catches misspelt fields, so the test above can fail."""
    doc = copy.deepcopy(_manifest(kind))
    spec = _cluster_specs(doc)[0]
    group = spec["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    errors = _errors(doc)
    assert any("minReplica" in e and "Additional properties" in e for e in errors), errors

    # A misspelling deep inside the pod template, alongside the correct field.
    doc = copy.deepcopy(_manifest(kind))
    container = _cluster_specs(doc)[0]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["allowPrivilegeEscalaton"] = True
    errors = _errors(doc)
    assert any("allowPrivilegeEscalaton" in e for e in errors), errors

    # A wrong type is caught too.
    doc = copy.deepcopy(_manifest(kind))
    _cluster_specs(doc)[0]["enableInTreeAutoscaling"] = "yes"
    assert any("enableInTreeAutoscaling" in e for e in _errors(doc))


def test_strict_schema_handles_k8s_extensions():
    schema = _strict({"type": "object", "properties": {
        "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "opt": {"type": "string", "nullable": True},
    }})
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"q": 1}) and v.is_valid({"q": "500m"}) and not v.is_valid({"q": [1]})
    assert v.is_valid({"free": {"anything": 1}}) and v.is_valid({"opt": None})
    assert not v.is_valid({"typo": 1})


# --------------------------------------------------------------------------- security

@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_every_container_is_non_root_without_escalation(path, doc):
    containers = list(_containers(doc))
    assert containers
    for where, c in containers:
        sc = c.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True, f"{path}: {where}: securityContext.runAsNonRoot must be true"
        assert sc.get("allowPrivilegeEscalation") is False, f"{path}: {where}: allowPrivilegeEscalation must be false"
        assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{path}: {where}: capabilities must drop ALL"
        assert not sc.get("privileged"), f"{path}: {where}: privileged container"
    for where, pod in _pod_specs(doc):
        assert (pod.get("securityContext") or {}).get("runAsNonRoot") is True, f"{path}: {where} pod"
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), f"{path}: {where} pod"


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_dashboard_is_cluster_internal_and_port_forwardable(path, doc):
    for spec in _cluster_specs(doc):
        head = spec["headGroupSpec"]
        # kubectl port-forward connects to the pod's localhost: a dashboard bound to the
        # pod IP only would refuse it. 0.0.0.0 inside the pod is still only the pod's
        # interfaces; what keeps it internal is the ClusterIP Service and no Ingress.
        host = head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")
        assert host in ALL_INTERFACES | {"127.0.0.1", "localhost"}, f"{path}: dashboard-host {host!r}"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path}: head service must be ClusterIP"
        assert not head.get("enableIngress"), f"{path}: no ingress to the dashboard"
        ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0].get("ports", [])}
        assert 8265 in ports, f"{path}: the head declares the dashboard port"
    for key, value in _walk(doc):
        if isinstance(value, str):
            assert value not in EXPOSED_SERVICE_TYPES, f"{path}: {key}: {value} exposes the cluster"


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_token_auth_is_on(path, doc):
    """The Jobs API runs arbitrary code: KubeRay's token auth guards it inside the cluster too."""
    for spec in _cluster_specs(doc):
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{path}: authOptions.mode must be token"


def test_no_exposed_services_anywhere():
    """Non-Ray documents too (PVC, kustomization, any Service someone adds)."""
    for path, doc in _documents():
        if doc.get("kind") == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", path
        for key, value in _walk(doc):
            assert not (key in ("type", "serviceType") and isinstance(value, str)
                        and value in EXPOSED_SERVICE_TYPES), f"{path}: {key}"


# --------------------------------------------------------------------------- cluster shape

@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_gpu_worker_group(path, doc):
    for spec in _cluster_specs(doc):
        assert spec.get("enableInTreeAutoscaling") is True, path
        groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
        assert "gpu-workers" in groups, f"{path}: no gpu-workers group"
        group = groups["gpu-workers"]
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], f"{path}: minReplicas > maxReplicas"
        assert group["maxReplicas"] >= 1, path
        if "replicas" in group:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], path
        ray_container = group["template"]["spec"]["containers"][0]
        gpus = ray_container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        assert gpus is not None and _quantity(gpus) >= 1, f"{path}: gpu-workers need nvidia.com/gpu limits"
        head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        assert "nvidia.com/gpu" not in head_limits, f"{path}: the head is a CPU pod"


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_run_volume_is_shared(path, doc):
    pvc_names = {d["metadata"]["name"] for _, d in _documents() if d.get("kind") == "PersistentVolumeClaim"}
    assert "raypath-runs" in pvc_names
    for where, pod in _pod_specs(doc):
        if where == "submitter":
            continue
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        assert claims.get(mounts.get("/runs")) == "raypath-runs", f"{path}: {where} must mount raypath-runs at /runs"


def test_one_cluster_spec_for_every_job():
    """The RayJobs that create a cluster embed k8s/cluster's spec; none is written twice."""
    cluster = _manifest("RayCluster", "raypath")["spec"]
    for overlay in ("main-path", "sweep"):
        (job,) = [d for d in _rendered(overlay) if d["kind"] == "RayJob"]
        assert job["spec"]["rayClusterSpec"] == cluster, overlay
    sources = [(p.relative_to(K8S), d) for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"
               for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    assert [p for p, d in sources if "rayClusterSpec" in d.get("spec", {})] == []
    assert [p for p, d in sources if d.get("kind") == "RayCluster"] == [Path("cluster/raycluster.yaml")]


def test_sweep_on_cluster_selects_the_running_cluster():
    job = _manifest("RayJob", "raypath-sweep-on-cluster")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": _manifest("RayCluster")["metadata"]["name"]}
    assert "rayClusterSpec" not in job
    assert not job.get("shutdownAfterJobFinishes"), "a selected cluster is not the job's to delete"


# --------------------------------------------------------------------------- jobs

RAYJOBS = [(p, d) for p, d in MANIFESTS if d["kind"] == "RayJob"]


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_settings(path, doc):
    spec = doc["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    if "rayClusterSpec" in spec:  # the job's own cluster goes when the job ends
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env.get("working_dir"), f"{path}: runtimeEnvYAML needs a working_dir"
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    run_dirs = [s.split("=", 1)[1] for s in sets if s.startswith("run_dir=")]
    assert run_dirs and run_dirs[0].startswith("/runs/"), f"{path}: run_dir must be on the /runs volume"
    # Ray Train's default is 0: one lost worker would fail a job of hours.
    failures = [int(s.split("=", 1)[1]) for s in sets if s.startswith("train.max_failures=")]
    assert failures and (failures[0] > 0 or failures[0] == -1), f"{path}: set train.max_failures"


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_entrypoint_scripts_exist(path, doc):
    scripts = [a for a in shlex.split(doc["spec"]["entrypoint"]) if a.endswith(".py")]
    assert scripts, f"{path}: entrypoint runs no script"
    for script in scripts:
        assert script.startswith("jobs/"), f"{path}: {script} is not under jobs/"
        assert (ROOT / script).is_file(), f"{path}: entrypoint script {script} does not exist"


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_entrypoint_config_is_valid(path, doc):
    """The job's config with its --set overrides passes raypath's validation."""
    from raypath.config import load_config

    argv = shlex.split(doc["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / config, overrides)
    assert cfg.run_dir.startswith("/runs/") and cfg.train.max_failures != 0


def test_params_are_marked():
    """User-set values carry a `# PARAM:` comment (image, storage, GPUs, replicas, run_dir)."""
    for name in ("cluster/raycluster.yaml", "main-path/rayjob.yaml", "sweep/rayjob.yaml",
                 "sweep-on-cluster/rayjob.yaml"):
        lines = (K8S / name).read_text().splitlines()
        for needle in ("image:", "maxReplicas:", "minReplicas:", "nvidia.com/gpu:"):
            hits = [line for line in lines if needle in line and not line.lstrip().startswith("#")]
            if not hits and "rayjob" in name and needle != "image:":
                continue  # the cluster's fields live in cluster/raycluster.yaml only
            assert hits and all("# PARAM:" in line for line in hits), f"{name}: {needle} lines need # PARAM:"
    pvc = (K8S / "cluster" / "pvc.yaml").read_text()
    for needle in ("storageClassName:", "storage:"):
        assert all("# PARAM:" in line for line in pvc.splitlines() if needle in line), needle
