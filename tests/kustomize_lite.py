"""``kustomize build`` for the subset of kustomize that ``k8s/`` uses, in Python.

Lets the tests check the rendered manifests on machines without kustomize or
kubectl. Supported: ``resources`` (files and directories), ``components``,
``labels`` (``pairs``, on ``metadata.labels`` only, kustomize's default),
``replacements`` (whole-node copies, ``options.create``) and ``patches`` whose
patch is a ``$patch: delete``. Any other kustomization key is an error, so
the renderer cannot silently ignore what kustomize would do. Order follows
kustomize: resources, then components (each one's own transformations), then
this kustomization's labels, patches and replacements.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "labels", "patches", "replacements"}


class KustomizeError(ValueError):
    pass


def build(directory: str | Path) -> list[dict]:
    """The documents ``kustomize build DIRECTORY`` prints, in the subset above."""
    return _build(Path(directory), "Kustomization")


def _build(directory: Path, expected_kind: str) -> list[dict]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    kust = yaml.safe_load(path.read_text()) or {}
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: unsupported keys {sorted(unknown)}")
    if kust.get("kind", "Kustomization") != expected_kind:
        raise KustomizeError(f"{path}: kind {kust.get('kind')!r}, expected {expected_kind}")
    docs: list[dict] = []
    for res in kust.get("resources", []):
        target = directory / res
        docs.extend(_build(target, "Kustomization") if target.is_dir() else _load(target))
    for comp in kust.get("components", []):
        docs = _apply_component(directory / comp, docs)
    return _transform(kust, path, docs)


def _apply_component(directory: Path, docs: list[dict]) -> list[dict]:
    path = directory / "kustomization.yaml"
    kust = yaml.safe_load(path.read_text()) or {}
    if kust.get("kind") != "Component":
        raise KustomizeError(f"{path}: a component needs kind: Component")
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: unsupported keys {sorted(unknown)}")
    for res in kust.get("resources", []):
        docs = docs + _load(directory / res)
    return _transform(kust, path, docs)


def _load(path: Path) -> list[dict]:
    if not path.is_file():
        raise KustomizeError(f"{path}: resource not found")
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def _transform(kust: dict, path: Path, docs: list[dict]) -> list[dict]:
    for entry in kust.get("labels", []):
        if set(entry) - {"pairs"}:
            raise KustomizeError(f"{path}: labels: only `pairs` is supported, got {sorted(entry)}")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for patch in kust.get("patches", []):
        docs = _patch(patch, path, docs)
    for rep in kust.get("replacements", []):
        _replace(rep, path, docs)
    return docs


def _matches(doc: dict, select: dict) -> bool:
    return all({"kind": doc.get("kind"), "name": doc.get("metadata", {}).get("name")}.get(k) == v
               for k, v in select.items())


def _patch(patch: dict, path: Path, docs: list[dict]) -> list[dict]:
    body = yaml.safe_load(patch.get("patch", "")) if "patch" in patch else None
    if not (isinstance(body, dict) and body.get("$patch") == "delete"):
        raise KustomizeError(f"{path}: patches: only inline `$patch: delete` patches are supported")
    target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
    return [d for d in docs if not _matches(d, target)]


def _replace(rep: dict, path: Path, docs: list[dict]) -> None:
    src = rep["source"]
    sources = [d for d in docs if _matches(d, {k: v for k, v in src.items() if k in ("kind", "name")})]
    if len(sources) != 1:
        raise KustomizeError(f"{path}: replacement source {src} matches {len(sources)} resources")
    value = _get(sources[0], src.get("fieldPath", "metadata.name"))
    for target in rep["targets"]:
        create = (target.get("options") or {}).get("create", False)
        for doc in docs:
            if _matches(doc, target["select"]):
                for field_path in target["fieldPaths"]:
                    _set(doc, field_path, copy.deepcopy(value), create)


def _get(doc: dict, field_path: str) -> Any:
    node: Any = doc
    for part in field_path.split("."):
        node = node[part]
    return node


def _set(doc: dict, field_path: str, value: Any, create: bool) -> None:
    *parents, leaf = field_path.split(".")
    node = doc
    for part in parents:
        if part not in node:
            if not create:
                return
            node[part] = {}
        node = node[part]
    if leaf in node or create:
        node[leaf] = value
