"""Decode Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`) to JSON dicts.

kubectl 1.32+ sends typed `create` requests (namespaces, service accounts, tokens, access
reviews...) as protobuf. A body is the `k8s\\0` magic and a `runtime.Unknown` envelope naming the
kind; the payload is decoded with the field table in `protofields.py`. Well-known wrapper types
(Time, Quantity, IntOrString, RawExtension) become their JSON forms; empty strings and unset
timestamps are dropped, as JSON's omitempty would.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tele.jsonlimits import check_depth

from .errors import bad_request
from .payloads import MAX_DEPTH
from .protofields import MESSAGES

MAGIC = b"k8s\x00"
_META = "k8s.io.apimachinery.pkg.apis.meta.v1."

# API group -> proto package of its v1 types
_PACKAGES = {
    "": "k8s.io.api.core.v1",
    "apps": "k8s.io.api.apps.v1",
    "discovery.k8s.io": "k8s.io.api.discovery.v1",
    "admissionregistration.k8s.io": "k8s.io.api.admissionregistration.v1",
    "policy": "k8s.io.api.policy.v1",
    "rbac.authorization.k8s.io": "k8s.io.api.rbac.v1",
    "authorization.k8s.io": "k8s.io.api.authorization.v1",
    "authentication.k8s.io": "k8s.io.api.authentication.v1",
    "autoscaling": "k8s.io.api.autoscaling.v1",
    "meta.k8s.io": "k8s.io.apimachinery.pkg.apis.meta.v1",
}


_META_KINDS = frozenset({"DeleteOptions"})


class ProtobufError(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ProtobufError("varint too long")


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(number, wire type, raw value) of each field in a message."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError("truncated field")
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _scalar(type_: str, wire: int, raw: Any) -> Any:
    if type_ == "string":
        return bytes(raw).decode("utf-8", "replace")
    if type_ == "bytes":
        return base64.b64encode(bytes(raw)).decode()
    if type_ == "bool":
        return bool(raw)
    if type_ in ("int32", "int64"):
        return _signed(raw, 64)
    if type_ in ("uint32", "uint64"):
        return int(raw)
    if type_ == "double":
        import struct

        return struct.unpack("<d", raw)[0]
    if type_ == "float":
        import struct

        return struct.unpack("<f", raw)[0]
    return raw


def _packed(type_: str, raw: bytes) -> list[Any]:
    values = []
    pos = 0
    while pos < len(raw):
        v, pos = _varint(raw, pos)
        values.append(_scalar(type_, 0, v))
    return values


def _special(message: str, data: bytes) -> tuple[bool, Any]:
    if message.endswith(".v1.ExtraValue"):  # a []string type: a list in JSON
        return True, [bytes(v).decode() for n, _, v in _fields(data) if n == 1]
    if message in (_META + "Time", _META + "MicroTime"):
        fields = {n: v for n, _, v in _fields(data)}
        seconds = _signed(fields.get(1, 0), 64)
        if not seconds and not fields.get(2):
            return True, None
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        nanos = fields.get(2, 0)
        if message.endswith("MicroTime"):
            return True, f"{text}.{nanos // 1000:06d}Z"
        return True, text + "Z"
    if message == "k8s.io.apimachinery.pkg.api.resource.Quantity":
        fields = {n: v for n, _, v in _fields(data)}
        return True, bytes(fields.get(1, b"")).decode()
    if message == "k8s.io.apimachinery.pkg.util.intstr.IntOrString":
        fields = {n: v for n, _, v in _fields(data)}
        if fields.get(1, 0) == 1:
            return True, bytes(fields.get(3, b"")).decode()
        return True, _signed(fields.get(2, 0), 64)
    if message in ("k8s.io.apimachinery.pkg.runtime.RawExtension", _META + "FieldsV1"):
        fields = {n: v for n, _, v in _fields(data)}
        raw = bytes(fields.get(1, b""))
        try:
            if raw:
                check_depth(raw, MAX_DEPTH)
            return True, json.loads(raw) if raw else None
        except ValueError:  # TooDeep included
            return True, None
    if message == _META + "Duration":
        fields = {n: v for n, _, v in _fields(data)}
        return True, f"{_signed(fields.get(1, 0), 64) / 1e9:g}s"
    return False, None


def decode_message(message: str, data: bytes, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:  # recursive messages (JSONSchemaProps) nest as deep as a body allows
        raise ProtobufError(f"messages nested deeper than {MAX_DEPTH} levels")
    handled, value = _special(message, data)
    if handled:
        return value
    table = MESSAGES.get(message)
    if table is None:
        raise ProtobufError(f"unknown message {message}")
    out: dict[str, Any] = {}
    for number, wire, raw in _fields(data):
        spec = table.get(number)
        if spec is None:
            continue
        name, type_, label = spec
        if label == "map":
            entry = {n: v for n, _, v in _fields(raw)}
            key = bytes(entry.get(1, b"")).decode()
            if type_ in MESSAGES or type_.startswith("k8s.io"):
                value = decode_message(type_, bytes(entry.get(2, b"")), depth + 1)
            else:
                value = _scalar(type_, 2, entry.get(2, b"" if type_ in ("string", "bytes") else 0))
            out.setdefault(name, {})[key] = value
            continue
        if type_.startswith("k8s.io"):
            value = decode_message(type_, bytes(raw), depth + 1)
        elif label == "repeated" and wire == 2 and type_ not in ("string", "bytes"):
            out.setdefault(name, []).extend(_packed(type_, bytes(raw)))
            continue
        else:
            value = _scalar(type_, wire, raw)
        if label == "repeated":
            out.setdefault(name, []).append(value)
        elif value is not None and value != "":
            out[name] = value
    return out


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf-encoded object (with its envelope) as the equivalent JSON dict."""
    if not body.startswith(MAGIC):
        raise bad_request("the protobuf body does not start with the Kubernetes magic number")
    try:
        envelope = decode_message_raw(body[len(MAGIC) :])
        api_version, kind, raw = envelope
        group, _, version = api_version.rpartition("/")
        # DeleteOptions (and other meta types) travel under whatever group the client talks to.
        package = _PACKAGES.get(group) if kind not in _META_KINDS else _PACKAGES["meta.k8s.io"]
        if package is None or version != "v1":
            raise bad_request(f"no kind {kind!r} is registered for version {api_version!r}")
        obj = decode_message(f"{package}.{kind}", raw)
    except ProtobufError as exc:
        raise bad_request(f"failed to decode protobuf body: {exc}") from None
    if not isinstance(obj, dict):
        raise bad_request("the protobuf body is not an object")
    obj["apiVersion"] = api_version
    obj["kind"] = kind
    return obj


def decode_message_raw(data: bytes) -> tuple[str, str, bytes]:
    fields = {n: v for n, _, v in _fields(data)}
    type_meta = {n: v for n, _, v in _fields(bytes(fields.get(1, b"")))}
    api_version = bytes(type_meta.get(1, b"")).decode()
    kind = bytes(type_meta.get(2, b"")).decode()
    encoding = bytes(fields.get(3, b"")).decode()
    if encoding:
        raise ProtobufError(f"unsupported content encoding {encoding!r}")
    return api_version, kind, bytes(fields.get(2, b""))
