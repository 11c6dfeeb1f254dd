"""Request bodies into objects: kind and version checks, pruning or refusing undeclared fields,
defaults, and validation (422 Invalid with one cause per field).
"""

from __future__ import annotations

from typing import Any

from . import crd, defaults, payloads, schemas, validation
from .context import RequestContext
from .errors import bad_request, invalid
from .kinds import ResourceType
from .store import ApiObject


def decode(
    resource_type: ResourceType, body: Any, namespace: str, ctx: RequestContext
) -> ApiObject:
    """Check kind/apiVersion/namespace of a body and prune or refuse undeclared fields."""
    if not isinstance(body, dict):
        raise bad_request(f"the body of the request was not a {resource_type.kind} object")
    payloads.check_type_meta(body)
    kind = body.get("kind") or resource_type.kind
    api_version = body.get("apiVersion") or resource_type.api_version
    if kind != resource_type.kind or api_version != resource_type.api_version:
        raise bad_request(
            f'{kind} in version "{api_version.rpartition("/")[2]}" cannot be handled as a '
            f"{resource_type.kind}: the object provided is of the wrong kind"
        )
    obj = dict(body)
    obj["kind"], obj["apiVersion"] = resource_type.kind, resource_type.api_version
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise bad_request(
            f'{resource_type.kind} in version "{resource_type.version}" cannot be handled as a '
            f"{resource_type.kind}: metadata must be an object"
        )
    meta = dict(meta)
    if resource_type.namespaced:
        body_ns = meta.get("namespace")
        if body_ns and namespace and body_ns != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        meta["namespace"] = namespace or body_ns or ""
    else:
        meta.pop("namespace", None)
    obj["metadata"] = meta
    schema = schemas.kind_schema(resource_type.group, resource_type.version, resource_type.kind)
    report = validation.FieldReport()
    obj = validation.check_fields(obj, schema, "", report)
    kind, version = resource_type.kind, resource_type.version
    prefix = f'{kind} in version "{version}" cannot be handled as a {kind}'
    if report.type_errors:
        raise bad_request(f"{prefix}: json: cannot unmarshal: {report.type_errors[0]}")
    if report.unknown:
        unknown = ", ".join(f'unknown field "{p}"' for p in report.unknown)
        if ctx.field_validation == "Strict":
            raise bad_request(f"{prefix}: strict decoding error: {unknown}")
        if ctx.field_validation == "Warn":
            ctx.warnings += [f'unknown field "{p}"' for p in report.unknown]
    if not isinstance(obj, dict):
        raise bad_request(f"{prefix}: the body is not an object")
    if not resource_type.custom:
        _drop_nulls(obj)
    return obj


def _drop_nulls(obj: ApiObject) -> None:
    """Remove null fields, as Go's decoder leaves a null field at its zero value (omitted when
    encoded): `spec: null` is no spec, for defaulting and validation alike."""
    pending: list[Any] = [obj]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            for key in [k for k, v in value.items() if v is None]:
                del value[key]
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def decode_typed(group: str, version: str, kind: str, body: Any) -> ApiObject:
    """A body of a kind that is never stored (reviews, TokenRequest, Eviction, Binding, Scale):
    400 unless it is an object whose fields have their declared types; unknown fields dropped."""
    prefix = f'{kind} in version "{version}" cannot be handled as a {kind}'
    if not isinstance(body, dict):
        raise bad_request(f"the body of the request was not a {kind} object")
    payloads.check_type_meta(body)
    report = validation.FieldReport()
    obj = validation.check_fields(body, schemas.kind_schema(group, version, kind), "", report)
    if report.type_errors:
        raise bad_request(f"{prefix}: json: cannot unmarshal: {report.type_errors[0]}")
    if not isinstance(obj, dict):
        raise bad_request(f"{prefix}: the body is not an object")
    return obj


def apply_defaults(resource_type: ResourceType, obj: ApiObject) -> None:
    if not resource_type.custom:  # custom objects are stored as sent (no schema defaulting)
        defaults.apply_defaults(obj)


def check_valid(resource_type: ResourceType, obj: ApiObject, old: ApiObject | None = None) -> None:
    if resource_type.custom:
        # Only object metadata: a custom kind may share a built-in kind's name, and its
        # schema is not enforced. (The kind blanked: its names are DNS subdomains.)
        causes = validation.metadata_causes({**obj, "kind": ""})
    else:
        causes = validation.validate(obj)
        if resource_type.kind == crd.KIND:
            causes += crd.causes(obj)
    if old is not None and not resource_type.custom:
        causes += validation.update_causes(obj, old)
    if causes:
        raise invalid(
            resource_type.kind, obj["metadata"].get("name", ""), resource_type.group, causes
        )
