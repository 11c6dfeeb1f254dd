"""PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and strategic merge patch.

Strategic merge patch merges lists by the merge key that the published schema names
(`x-kubernetes-patch-merge-key`, strategy `merge`), honours `$patch`, `$retainKeys`,
`$setElementOrder/<field>` and `$deleteFromPrimitiveList/<field>` as kubectl sends them.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from . import schemas
from .errors import StatusError, bad_request

_DELETE = object()


def json_patch(target: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    try:
        return jsonpatch.JsonPatch(operations).apply(copy.deepcopy(target))
    except jsonpatch.JsonPatchTestFailed as exc:
        raise StatusError(
            422, "Invalid", f"the server rejected our request due to an error in our request: {exc}"
        ) from None
    except (
        jsonpatch.JsonPatchException,
        jsonpatch.JsonPointerException,
        TypeError,
        KeyError,
    ) as exc:
        raise StatusError(
            422, "Invalid", f"the server rejected our request due to an error in our request: {exc}"
        ) from None


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(target: dict[str, Any], patch: Any, schema: schemas.Schema | None) -> Any:
    if not isinstance(patch, dict):
        raise bad_request(
            "json: cannot unmarshal array into Go value of type map[string]interface {}"
        )
    result = _merge_map(target, patch, schema)
    if result is _DELETE:
        return {}
    return result


def _strip(value: Any) -> Any:
    """A fresh value taken from a patch: directives removed at every level."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [
            _strip(v) for v in value if not (isinstance(v, dict) and v.get("$patch") == "delete")
        ]
    return value


def _merge_map(original: Any, patch: dict[str, Any], schema: schemas.Schema | None) -> Any:
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return _strip(patch)
    out: dict[str, Any] = dict(original) if isinstance(original, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(out.get(field), list) and isinstance(value, list):
                out[field] = [v for v in out[field] if v not in value]
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        sub = schemas.child(schema, key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(out.get(key), value, sub)
        elif isinstance(value, dict):
            merged = _merge_map(out.get(key), value, sub)
            if merged is _DELETE:
                out.pop(key, None)
            else:
                out[key] = merged
        else:
            out[key] = value
    for key, order in patch.items():
        if key.startswith("$setElementOrder/") and isinstance(order, list):
            field = key.split("/", 1)[1]
            if isinstance(out.get(field), list):
                sub = schemas.child(schema, field)
                out[field] = _reorder(out[field], order, _merge_key(sub))
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_key(schema: schemas.Schema | None) -> str | None:
    if schema is None:
        return None
    key = schema.get("x-kubernetes-patch-merge-key")
    return key if isinstance(key, str) else None


def _is_merge(schema: schemas.Schema | None) -> bool:
    if schema is None:
        return False
    strategy = str(schema.get("x-kubernetes-patch-strategy", ""))
    return "merge" in strategy.split(",")


def _merge_list(original: Any, patch: list[Any], schema: schemas.Schema | None) -> list[Any]:
    if not _is_merge(schema):
        return [_strip(v) for v in patch if not (isinstance(v, dict) and v.get("$patch"))]
    if any(isinstance(v, dict) and v.get("$patch") == "replace" for v in patch):
        return [_strip(v) for v in patch if not (isinstance(v, dict) and "$patch" in v)]
    current = list(original) if isinstance(original, list) else []
    key = _merge_key(schema)
    if key is None or not all(isinstance(v, dict) for v in patch):
        for value in patch:
            if value not in current:
                current.append(value)
        return current
    item_schema = schemas.items(schema)
    for elem in patch:
        ident = elem.get(key)
        index = next(
            (i for i, v in enumerate(current) if isinstance(v, dict) and v.get(key) == ident),
            None,
        )
        if elem.get("$patch") == "delete":
            if index is not None:
                del current[index]
            continue
        if index is None:
            current.append(_strip(elem))
        else:
            merged = _merge_map(current[index], elem, item_schema)
            if merged is _DELETE:
                del current[index]
            else:
                current[index] = merged
    return current


def _reorder(values: list[Any], order: list[Any], key: str | None) -> list[Any]:
    def ident(v: Any) -> Any:
        return v.get(key) if key is not None and isinstance(v, dict) else v

    wanted = [ident(o) for o in order]
    placed = [v for w in wanted for v in values if ident(v) == w]
    rest = [v for v in values if ident(v) not in wanted]
    return placed + rest
