"""Request payloads (JSON and YAML) decoded with their bounds checked first.

Every body a client sends is hostile until decoded: JSON nesting is measured before msgspec
sees it (decoders recurse per level: 100,000 `[` raised RecursionError and answered 500), and
YAML is scanned event by event with libyaml before it is composed, bounding its nesting, its
node count and what its aliases expand to (a few anchors can stand for billions of nodes once a
schema walk follows them). A body over the bounds is a 400 Status, as the real API server
answers a document it cannot decode. YAML decoding is slow (pure-Python construction), so the
HTTP layer runs it in a worker thread.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import trio
import yaml

from tele.jsonlimits import TooDeep, check_depth

from .errors import StatusError, bad_request

MAX_DEPTH: Final = 100
"""Nesting allowed in a body. Kubernetes objects stay far below (a pod ~10 levels, a CRD with a
full pod-template schema ~40); the schema walk and the encoders recurse per level."""

MAX_YAML_NODES: Final = 200_000
"""Nodes a YAML body may hold, aliases counted as what they expand to: a billion-laughs
document is refused before it is composed (a 3 MiB manifest of short scalars has fewer)."""

_LOADER: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPENING = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSING = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _parse_error(prefix: str, detail: str) -> StatusError:
    return bad_request(f"{prefix}: {detail}" if prefix else detail)


def decode_json(raw: bytes, prefix: str = "couldn't get version/kind; json parse error") -> Any:
    """The decoded document, or 400 (prefix: detail) when it is not JSON or nests too deep."""
    try:
        check_depth(raw, MAX_DEPTH)
    except TooDeep:
        raise _parse_error(prefix, f"exceeded max depth of {MAX_DEPTH}") from None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _parse_error(prefix, str(exc)) from None


_GO_TYPES: Final = {
    bool: "bool",
    int: "number",
    float: "number",
    list: "array",
    dict: "object",
}


def check_type_meta(body: Any, prefix: str = "couldn't get version/kind; json parse error") -> None:
    """400 when `apiVersion` or `kind` is present but not a string (as Go's decoder refuses)."""
    if not isinstance(body, dict):
        return
    for key in ("apiVersion", "kind"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            go_type = _GO_TYPES.get(type(value), type(value).__name__)
            raise _parse_error(
                prefix,
                f"json: cannot unmarshal {go_type} into Go struct field .{key} of type string",
            )


def check_yaml(raw: bytes | str) -> None:
    """Raise TooDeep when the YAML nests deeper than MAX_DEPTH or expands past MAX_YAML_NODES.

    Runs over parser events only (libyaml's parser does not recurse); syntax errors are left
    to the loader that follows."""
    depth = 0
    total = 0  # nodes so far, an alias counted as the nodes of what it names
    anchors: dict[str, int] = {}
    open_collections: list[tuple[str | None, int]] = []  # (anchor, total when it opened)
    try:
        for event in yaml.parse(raw, Loader=_LOADER):
            if isinstance(event, _OPENING):
                depth += 1
                if depth > MAX_DEPTH:
                    raise TooDeep(f"exceeded max depth of {MAX_DEPTH}")
                open_collections.append((event.anchor, total))
                total += 1
            elif isinstance(event, _CLOSING):
                depth -= 1
                anchor, at_open = open_collections.pop()
                if anchor is not None:
                    anchors[anchor] = total - at_open
            elif isinstance(event, yaml.ScalarEvent):
                total += 1
                if event.anchor is not None:
                    anchors[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                total += anchors.get(event.anchor or "", 1)
            if total > MAX_YAML_NODES:
                raise TooDeep(f"more than {MAX_YAML_NODES} nodes (aliases expanded)")
    except yaml.YAMLError:
        return  # the loader reports it, with its position


def decode_yaml(
    raw: bytes | str, prefix: str = "couldn't get version/kind; yaml parse error"
) -> Any:
    """The first YAML document, or 400 when it is not YAML or is over the bounds above."""
    try:
        check_yaml(raw)
    except TooDeep as exc:
        raise _parse_error(prefix, str(exc)) from None
    try:
        return yaml.load(raw, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise _parse_error(prefix, str(exc)) from None


_YAML_IN_THREAD: Final = 64 * 1024
"""YAML bodies from this size on are decoded in a worker thread (a 3 MiB manifest takes
seconds of pure-Python construction: the event loop, and every other client, keep going)."""
_YAML_THREADS = trio.CapacityLimiter(2)


async def decode_yaml_off_loop(
    raw: bytes, prefix: str = "couldn't get version/kind; yaml parse error"
) -> Any:
    """`decode_yaml`, in a worker thread when the body is large."""
    if len(raw) < _YAML_IN_THREAD:
        return decode_yaml(raw, prefix)
    return await trio.to_thread.run_sync(decode_yaml, raw, prefix, limiter=_YAML_THREADS)
