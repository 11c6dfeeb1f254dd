"""CustomResourceDefinitions (apiextensions.k8s.io/v1): what a CRD serves, and its checks.

A stored CRD becomes one `ResourceType` per served version (registered with the API's
`KindRegistry` by `rest.Api`); this module derives those kinds, the CRD's defaults, validation
and status, the Table cells of its printer columns and the OpenAPI v3 document of its versions.
Custom objects are stored as sent: the version schemas are published (OpenAPI, `kubectl
explain`) but not enforced (no structural pruning, defaulting or CEL rules), and objects are
not converted between versions (every served version reads the stored objects unchanged).
"""

from __future__ import annotations

import re
from typing import Any

from . import schemas
from .errors import Cause, duplicate, invalid_value, required, unsupported
from .kinds import BUILTIN_GROUPS, PrinterColumn, ResourceType, ScalePaths

ApiObject = dict[str, Any]

KIND = "CustomResourceDefinition"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_KIND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_META_REF = "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def defaults(obj: ApiObject) -> None:
    """The defaults the real API server fills into a CRD."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    names = spec.get("names")
    if isinstance(names, dict) and isinstance(names.get("kind"), str):
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
    spec.setdefault("conversion", {"strategy": "None"})
    for version in spec.get("versions") or []:
        if isinstance(version, dict):
            version.setdefault("served", True)
            version.setdefault("storage", False)


def causes(obj: ApiObject) -> list[Cause]:
    """Validation of a CRD's spec (its schemas are taken as given)."""
    spec = obj.get("spec") or {}
    names = spec.get("names") or {}
    group = str(spec.get("group") or "")
    plural = str(names.get("plural") or "")
    out: list[Cause] = []
    if not group:
        out.append(required("spec.group"))
    elif "." not in group:
        out.append(invalid_value("spec.group", group, "should be a domain with at least one dot"))
    elif group in BUILTIN_GROUPS:
        out.append(invalid_value("spec.group", group, "is served by the API server itself"))
    for field in ("plural", "kind"):
        if not names.get(field):
            out.append(required(f"spec.names.{field}"))
    if plural and not _DNS_LABEL.match(plural):
        out.append(invalid_value("spec.names.plural", plural, "a lowercase RFC 1123 label"))
    if names.get("kind") and not _KIND_NAME.match(str(names["kind"])):
        out.append(invalid_value("spec.names.kind", names["kind"], "must be a CamelCase name"))
    name = (obj.get("metadata") or {}).get("name")
    if group and plural and name != f"{plural}.{group}":
        out.append(invalid_value("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
    scope = spec.get("scope")
    if scope not in ("Namespaced", "Cluster"):
        out.append(unsupported("spec.scope", scope, ["Cluster", "Namespaced"]))
    versions = [v for v in spec.get("versions") or [] if isinstance(v, dict)]
    if not versions:
        out.append(required("spec.versions", "must have exactly one version marked as storage"))
    seen: set[str] = set()
    for i, version in enumerate(versions):
        vname = str(version.get("name") or "")
        if not _DNS_LABEL.match(vname):
            out.append(invalid_value(f"spec.versions[{i}].name", vname, "a DNS-1035 label"))
        if vname in seen:
            out.append(duplicate(f"spec.versions[{i}].name", vname))
        seen.add(vname)
    if versions and sum(1 for v in versions if v.get("storage")) != 1:
        out.append(
            invalid_value(
                "spec.versions", versions, "must have exactly one version marked as storage version"
            )
        )
    return out


def status(obj: ApiObject, now: str) -> ApiObject:
    """The status the apiextensions controllers set once the names are accepted and served."""
    spec = obj.get("spec") or {}
    old = obj.get("status") or {}
    stored = list(old.get("storedVersions") or [])
    for version in spec.get("versions") or []:
        if version.get("storage") and version.get("name") not in stored:
            stored.append(version["name"])
    previous = {c.get("type"): c for c in old.get("conditions") or []}

    def condition(kind: str, reason: str, message: str) -> ApiObject:
        since = (previous.get(kind) or {}).get("lastTransitionTime") or now
        return {
            "type": kind,
            "status": "True",
            "lastTransitionTime": since,
            "reason": reason,
            "message": message,
        }

    return {
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition(
                "Established", "InitialNamesAccepted", "the initial names have been accepted"
            ),
        ],
        "acceptedNames": dict(spec.get("names") or {}),
        "storedVersions": stored,
    }


def kinds_of(obj: ApiObject) -> tuple[ResourceType, ...]:
    """The resources a CRD serves: one per served version, the storage version first."""
    spec = obj.get("spec") or {}
    names = spec.get("names") or {}
    versions = sorted(
        (v for v in spec.get("versions") or [] if v.get("served", True)),
        key=lambda v: not v.get("storage"),
    )
    out = []
    for version in versions:
        subresources = version.get("subresources") or {}
        scale = subresources.get("scale")
        columns = tuple(
            PrinterColumn(
                name=str(c.get("name") or ""),
                type=str(c.get("type") or "string"),
                json_path=str(c.get("jsonPath") or ""),
                description=str(c.get("description") or ""),
                priority=int(c.get("priority") or 0),
                format=str(c.get("format") or ""),
            )
            for c in version.get("additionalPrinterColumns") or []
        )
        out.append(
            ResourceType(
                group=str(spec["group"]),
                version=str(version["name"]),
                kind=str(names["kind"]),
                plural=str(names["plural"]),
                singular=str(names.get("singular") or names["kind"].lower()),
                namespaced=spec.get("scope") == "Namespaced",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                subresources=tuple(s for s in ("status", "scale") if s in subresources),
                has_status="status" in subresources,
                crd=str(obj["metadata"]["name"]),
                printer_columns=columns,
                scale=ScalePaths(
                    str(scale.get("specReplicasPath") or ".spec.replicas"),
                    str(scale.get("statusReplicasPath") or ".status.replicas"),
                    str(scale.get("labelSelectorPath") or ""),
                )
                if isinstance(scale, dict)
                else None,
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            )
        )
    return tuple(out)


# --- JSONPath (the simple form printer columns and scale paths use) ---------------------------

_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _steps(path: str) -> list[str | int] | None:
    steps: list[str | int] = []
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    pos = 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        if m is None:
            return None  # filters and wildcards are not supported: the cell stays empty
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return steps


def get_path(obj: Any, path: str) -> Any:
    """The value at a simple JSONPath such as `.status.replicas` or `.spec.ports[0].port`."""
    steps = _steps(path)
    if steps is None:
        return None
    for step in steps:
        if isinstance(step, int):
            if not isinstance(obj, list) or step >= len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[step] if isinstance(step, int) else obj.get(step)
    return obj


def set_path(obj: ApiObject, path: str, value: Any) -> None:
    """Store `value` at a dotted path, making the objects on the way."""
    steps = _steps(path)
    if not steps or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"not a settable path: {path}")
    for step in steps[:-1]:
        obj = obj.setdefault(str(step), {})
    obj[str(steps[-1])] = value


# --- OpenAPI v3 ------------------------------------------------------------------------------


def definition_name(resource_type: ResourceType) -> str:
    """The schema name the API server gives a custom kind: reversed group, version, kind."""
    return ".".join(
        [*reversed(resource_type.group.split(".")), resource_type.version, resource_type.kind]
    )


def openapi_v3_document(kinds: list[ResourceType]) -> ApiObject:
    """The OpenAPI v3 document of one custom group/version (for `kubectl apply` and `explain`)."""
    paths: ApiObject = {}
    components: ApiObject = {}
    for resource_type in kinds:
        gvk = {
            "group": resource_type.group,
            "version": resource_type.version,
            "kind": resource_type.kind,
        }
        schema: ApiObject = dict(resource_type.schema or {"type": "object"})
        properties = dict(schema.get("properties") or {})
        properties["apiVersion"] = {"type": "string"}
        properties["kind"] = {"type": "string"}
        properties["metadata"] = {"allOf": [{"$ref": _META_REF}]}
        schema["properties"] = properties
        schema.setdefault("type", "object")
        schema["x-kubernetes-group-version-kind"] = [gvk]
        components[definition_name(resource_type)] = schema
        op = {
            "operationId": (
                f"patch{resource_type.group.replace('.', '')}{resource_type.version}"
                f"{resource_type.kind}"
            ),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [
                {"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                for p in ("dryRun", "fieldManager", "fieldValidation", "force")
            ],
            "requestBody": {
                "content": {
                    ct: {"schema": {"$ref": "#/components/schemas/" + _PATCH}}
                    for ct in (
                        "application/apply-patch+yaml",
                        "application/json-patch+json",
                        "application/merge-patch+json",
                    )
                },
                "required": True,
            },
            "responses": {"200": {"description": "OK"}},
        }
        prefix = f"/apis/{resource_type.group}/{resource_type.version}"
        if resource_type.namespaced:
            prefix += "/namespaces/{namespace}"
        base = f"{prefix}/{resource_type.plural}"
        paths[base + "/{name}"] = {"patch": op}
    components.update(schemas.openapi_components(_META_ROOTS))
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }


_PATCH = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch"
_META_ROOTS = [
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
    "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
    _PATCH,
]
