"""Offline checks of the KubeRay manifests under k8s/.

Every RayCluster / RayJob is validated against the KubeRay v1.7 CRD schemas in
``../shared/kuberay-crds/`` (relative to the repository root). The CRDs accept
unknown fields, so the schemas are made strict first: every object schema that
lists ``properties`` and says nothing about extra keys gets
``additionalProperties: false``, which turns a typo such as ``minReplica`` into
an error instead of a silently ignored field. On top of the schema: security
(non-root, no privilege escalation, no exposed dashboard), the GPU worker
group, and entry points that exist.
"""

from __future__ import annotations

import copy
import functools
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
#: Entry points written elsewhere that may not exist yet.
PENDING_SCRIPTS = {"jobs/sweep.py"}
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
ALL_INTERFACES = {"0.0.0.0", "::", "[::]"}

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"KubeRay CRD schemas not found at {CRD_DIR} (shared/ is not checked out beside the repo)")


# --------------------------------------------------------------------------- loading

def _documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                docs.append((path, doc))
    return docs


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


@functools.lru_cache(maxsize=None)
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
    assert {("RayJob", "raypath-main-path"), ("RayJob", "raypath-sweep")} <= kinds


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
def test_dashboard_is_not_exposed(path, doc):
    for spec in _cluster_specs(doc):
        head = spec["headGroupSpec"]
        # KubeRay binds the dashboard to 0.0.0.0 when dashboard-host is unset: it must be set.
        host = head.get("rayStartParams", {}).get("dashboard-host")
        assert host and host not in ALL_INTERFACES, f"{path}: dashboard-host must be set and not {host!r}"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path}: head service must be ClusterIP"
        assert not head.get("enableIngress"), f"{path}: no ingress to the dashboard"
    for key, value in _walk(doc):
        if isinstance(value, str):
            assert value not in EXPOSED_SERVICE_TYPES, f"{path}: {key}: {value} exposes the cluster"
            assert "dashboard-host=0.0.0.0" not in value and "dashboard-host 0.0.0.0" not in value, f"{path}: {key}"


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


def test_rayjobs_embed_the_raycluster_spec():
    """The RayJobs' clusters are copies of raycluster.yaml: a fix in one must reach all."""
    cluster = _manifest("RayCluster", "raypath")["spec"]
    for _, doc in MANIFESTS:
        if doc["kind"] == "RayJob":
            assert doc["spec"]["rayClusterSpec"] == cluster, doc["metadata"]["name"]


# --------------------------------------------------------------------------- jobs

RAYJOBS = [(p, d) for p, d in MANIFESTS if d["kind"] == "RayJob"]


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_settings(path, doc):
    spec = doc["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env.get("working_dir"), f"{path}: runtimeEnvYAML needs a working_dir"
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    run_dirs = [s.split("=", 1)[1] for s in sets if s.startswith("run_dir=")]
    assert run_dirs and run_dirs[0].startswith("/runs/"), f"{path}: run_dir must be on the /runs volume"


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_entrypoint_scripts_exist(path, doc):
    scripts = [a for a in shlex.split(doc["spec"]["entrypoint"]) if a.endswith(".py")]
    assert scripts, f"{path}: entrypoint runs no script"
    for script in scripts:
        assert script.startswith("jobs/"), f"{path}: {script} is not under jobs/"
        if script in PENDING_SCRIPTS and not (ROOT / script).is_file():
            continue  # written by someone else; referenced ahead of time
        assert (ROOT / script).is_file(), f"{path}: entrypoint script {script} does not exist"


def test_main_path_entrypoint_config_is_valid():
    """The main-path job's config with its --set overrides passes raypath's validation."""
    from raypath.config import load_config

    argv = shlex.split(_manifest("RayJob", "raypath-main-path")["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    if not (ROOT / config).is_file():
        pytest.skip(f"{config} does not exist yet")
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / config, overrides)
    assert cfg.run_dir.startswith("/runs/")


def test_kustomization_resources_exist():
    kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert kust["resources"]
    for res in kust["resources"]:
        assert (K8S / "base" / res).is_file(), res


def test_params_are_marked():
    """User-set values carry a `# PARAM:` comment (image, storage, GPUs, replicas, run_dir)."""
    for name in ("raycluster.yaml", "rayjob-main-path.yaml", "rayjob-sweep.yaml"):
        lines = (K8S / "base" / name).read_text().splitlines()
        for needle in ("image:", "maxReplicas:", "minReplicas:", "nvidia.com/gpu:"):
            hits = [line for line in lines if needle in line and not line.lstrip().startswith("#")]
            assert hits and all("# PARAM:" in line for line in hits), f"{name}: {needle} lines need # PARAM:"
    pvc = (K8S / "base" / "pvc.yaml").read_text()
    for needle in ("storageClassName:", "storage:"):
        assert all("# PARAM:" in line for line in pvc.splitlines() if needle in line), needle
