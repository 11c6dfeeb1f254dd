"""The published Kubernetes schemas (bundled by kubernetes-validate) and what we derive from them.

Strategic merge patch needs each list's merge key and patch strategy; strict field validation and
pruning need the declared properties; `kubectl explain` and `kubectl apply` need OpenAPI v3
documents. All of it comes from one definitions file, loaded once on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from typing import Any

SCHEMA_VERSION = "v1.33.0"

Schema = dict[str, Any]

_REF_PREFIX = "#/$defs/"
_PATCH_REF = "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"


@functools.cache
def definitions() -> dict[str, Schema]:
    """All definitions by OpenAPI name, e.g. `io.k8s.api.apps.v1.Deployment`."""
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = root / f"{SCHEMA_VERSION}-local" / "_definitions.json"
    data: dict[str, Schema] = json.loads(path.read_text())["$defs"]
    return data


def deref(schema: Schema | None) -> Schema | None:
    """Follow `$ref` chains to the definition (the referencing schema keeps patch hints)."""
    seen = 0
    while schema is not None and "$ref" in schema and seen < 10:
        ref: str = schema["$ref"]
        schema = definitions().get(ref.removeprefix(_REF_PREFIX))
        seen += 1
    return schema


def child(schema: Schema | None, key: str) -> Schema | None:
    """The (unresolved) schema of property `key` of an object schema, or of its map values."""
    resolved = deref(schema)
    if resolved is None:
        return None
    props = resolved.get("properties")
    if props and key in props:
        sub: Schema = props[key]
        return sub
    extra = resolved.get("additionalProperties")
    if isinstance(extra, dict):
        return extra
    return None


def items(schema: Schema | None) -> Schema | None:
    resolved = deref(schema)
    if resolved is None:
        return None
    sub = resolved.get("items")
    return sub if isinstance(sub, dict) else None


def types(schema: Schema | None) -> set[str]:
    """The JSON types a schema admits (`null` left out); empty when anything goes."""
    resolved = deref(schema)
    if resolved is None:
        return set()
    if "oneOf" in resolved:
        out: set[str] = set()
        for alt in resolved["oneOf"]:
            out |= types(alt)
        return out
    t = resolved.get("type")
    if t is None:
        if "properties" in resolved:
            return {"object"}
        return set()
    found = {t} if isinstance(t, str) else set(t)
    found.discard("null")
    return found


def kind_schema(group: str, version: str, kind: str) -> Schema | None:
    return _by_gvk().get((group, version, kind))


@functools.cache
def _by_gvk() -> dict[tuple[str, str, str], Schema]:
    out: dict[tuple[str, str, str], Schema] = {}
    for schema in definitions().values():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            out[(gvk["group"], gvk["version"], gvk["kind"])] = schema
    return out


def definition_name(group: str, version: str, kind: str) -> str | None:
    for name, schema in definitions().items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            if (gvk["group"], gvk["version"], gvk["kind"]) == (group, version, kind):
                return name
    return None


# --- OpenAPI v3 ----------------------------------------------------------------------------


def _to_openapi(schema: Any) -> Any:
    """JSON-schema dialect of the bundle -> OpenAPI 3.0 as the API server publishes it."""
    if isinstance(schema, list):
        return [_to_openapi(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    # A `$ref` that is not a string is a property named "$ref" (JSONSchemaProps has one).
    is_ref = isinstance(schema.get("$ref"), str)
    for key, value in schema.items():
        if key == "$ref" and is_ref:
            continue
        if key == "type" and isinstance(value, list):
            real = [t for t in value if t != "null"]
            if real:
                out["type"] = real[0]
            continue
        if key == "oneOf" and all(isinstance(v, dict) and "$ref" not in v for v in value):
            # int-or-string and quantity: the server says so with an extension, not oneOf.
            out["x-kubernetes-int-or-string"] = True
            continue
        if key == "enum":
            continue  # the bundle pins apiVersion/kind with enums the server does not publish
        out[key] = _to_openapi(value)
    if is_ref:
        ref = "#/components/schemas/" + schema["$ref"].removeprefix(_REF_PREFIX)
        if out:
            out["allOf"] = [{"$ref": ref}]
        else:
            out["$ref"] = ref
    return out


def _closure(names: list[str]) -> list[str]:
    defs = definitions()
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        text = json.dumps(defs[name])
        start = 0
        while True:
            i = text.find('"$ref": "' + _REF_PREFIX, start)
            if i < 0:
                break
            j = i + len('"$ref": "' + _REF_PREFIX)
            k = text.index('"', j)
            stack.append(text[j:k])
            start = k
    return sorted(seen)


def openapi_v3_document(
    group: str, version: str, resources_: list[tuple[str, str, bool]]
) -> dict[str, Any]:
    """The OpenAPI v3 document of one group/version.

    `resources_` is (plural, kind, namespaced). Paths carry only what clients inspect: the PATCH
    operation of each kind with its `fieldValidation` parameter (kubectl checks that to decide
    server-side field validation) and the GVK extension.
    """
    defs = definitions()
    roots: list[str] = []
    paths: dict[str, Any] = {}
    prefix = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    for plural, kind, namespaced in resources_:
        name = definition_name(group, version, kind)
        if name is not None:
            roots.append(name)
        gvk = {"group": group, "version": version, "kind": kind}
        params = [
            {"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
            for p in ("dryRun", "fieldManager", "fieldValidation", "force")
        ]
        op = {
            "operationId": f"patch{kind}",
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk,
            "parameters": params,
            # kubectl computes client-side apply patches with the v3 schema only when the
            # PATCH operation says it takes strategic merge patches.
            "requestBody": {
                "content": {
                    ct: {"schema": {"$ref": _PATCH_REF}}
                    for ct in (
                        "application/apply-patch+yaml",
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/strategic-merge-patch+json",
                    )
                },
                "required": True,
            },
            "responses": {"200": {"description": "OK"}},
        }
        base = f"{prefix}/namespaces/{{namespace}}/{plural}" if namespaced else f"{prefix}/{plural}"
        paths[base + "/{name}"] = {"patch": op}
    for meta in (
        "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
        "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
        "io.k8s.apimachinery.pkg.apis.meta.v1.Patch",
    ):
        roots.append(meta)
    schemas = {name: _to_openapi(defs[name]) for name in _closure(roots)}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": SCHEMA_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def openapi_components(names: list[str]) -> dict[str, Any]:
    """The named definitions and everything they reference, in OpenAPI 3.0 form."""
    defs = definitions()
    return {name: _to_openapi(defs[name]) for name in _closure(names)}


def document_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:128].upper()
