"""Sans-IO pieces of the API server: store history, selectors, patches, validation, tables."""

from __future__ import annotations

import pytest

from tele.sandbox.apiserver import patch, schemas
from tele.sandbox.apiserver.errors import StatusError
from tele.sandbox.apiserver.selectors import matches_labels, parse_label_selector
from tele.sandbox.apiserver.store import Store, TooOld
from tele.sandbox.apiserver.table import human_duration


def _obj(name: str, **extra: object) -> dict:  # type: ignore[type-arg]
    return {"metadata": {"name": name, "namespace": "ns", "uid": name}, **extra}


def test_store_history_and_too_old() -> None:
    store = Store(history_size=3)
    seen = []
    store.subscribe("/configmaps", seen.append)
    for i in range(5):
        store.create("/configmaps", _obj(f"c{i}"))
    assert [e.obj["metadata"]["name"] for e in seen] == [f"c{i}" for i in range(5)]
    assert [e.rv for e in store.events_since("/configmaps", 2)] == [3, 4, 5]
    with pytest.raises(TooOld):
        store.events_since("/configmaps", 1)
    removed = store.remove("/configmaps", "ns", "c0")
    assert removed["metadata"]["resourceVersion"] == "6"
    assert [o["metadata"]["name"] for o in store.objects("/configmaps")] == ["c1", "c2", "c3", "c4"]


def test_label_selector_syntax() -> None:
    sel = parse_label_selector("app=web, tier!=db,env in (prod, staging),!legacy,team")
    assert matches_labels(sel, {"app": "web", "env": "prod", "team": "a"})
    assert not matches_labels(sel, {"app": "web", "env": "prod", "team": "a", "legacy": "1"})
    assert not matches_labels(sel, {"app": "web", "env": "dev", "team": "a"})
    for bad in ("a in (b", "a=b=c", "=x"):
        with pytest.raises(StatusError):
            parse_label_selector(bad)


def test_strategic_merge_patch_uses_schema_merge_keys() -> None:
    schema = schemas.kind_schema("apps", "v1", "Deployment")
    live = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "a", "image": "a:1", "ports": [{"containerPort": 80}]},
                        {"name": "b", "image": "b:1"},
                    ],
                    "volumes": [{"name": "v", "emptyDir": {}}],
                }
            }
        }
    }
    result = patch.strategic_merge_patch(
        live,
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "b", "image": "b:2"},
                            {"name": "c", "image": "c:1"},
                            {"name": "a", "$patch": "delete"},
                        ],
                        "$setElementOrder/containers": [{"name": "c"}, {"name": "b"}],
                        "volumes": [
                            {
                                "name": "v",
                                "configMap": {"name": "cm"},
                                "$retainKeys": ["name", "configMap"],
                            }
                        ],
                    }
                }
            }
        },
        schema,
    )
    spec = result["spec"]["template"]["spec"]
    assert spec["containers"] == [{"name": "c", "image": "c:1"}, {"name": "b", "image": "b:2"}]
    assert spec["volumes"] == [{"name": "v", "configMap": {"name": "cm"}}]
    # Lists without a merge strategy are replaced; maps merge; null deletes.
    live = {
        "spec": {"template": {"spec": {"containers": [{"name": "a", "args": ["1", "2"]}]}}},
        "metadata": {"labels": {"x": "1", "y": "2"}, "finalizers": ["f1"]},
    }
    result = patch.strategic_merge_patch(
        live,
        {
            "spec": {"template": {"spec": {"containers": [{"name": "a", "args": ["3"]}]}}},
            "metadata": {"labels": {"x": None, "z": "3"}, "finalizers": ["f2"]},
        },
        schema,
    )
    assert result["spec"]["template"]["spec"]["containers"][0]["args"] == ["3"]
    assert result["metadata"]["labels"] == {"y": "2", "z": "3"}
    assert result["metadata"]["finalizers"] == ["f1", "f2"]
    deleted = patch.strategic_merge_patch(
        result, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]}}, schema
    )
    assert deleted["metadata"]["finalizers"] == ["f2"]


def test_merge_and_json_patch() -> None:
    assert patch.merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None}, "l": [2]}) == {
        "a": {"c": 2},
        "l": [2],
    }
    assert patch.json_patch({"a": [1]}, [{"op": "add", "path": "/a/-", "value": 2}]) == {
        "a": [1, 2]
    }
    with pytest.raises(StatusError) as failed:
        patch.json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])
    assert failed.value.code == 422


def test_human_duration_like_kubectl() -> None:
    assert [human_duration(s) for s in (5, 119, 150, 600, 4000, 30000, 200000, 10**8)] == [
        "5s",
        "119s",
        "2m30s",
        "10m",
        "66m",
        "8h",
        "2d7h",
        "3y",
    ]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | int | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def test_protobuf_bodies_decode_to_json() -> None:
    from tele.sandbox.apiserver import protobuf

    # metadata: name, labels map entry, creationTimestamp (Time{seconds}); spec.ports[0] with
    # port 80 and targetPort IntOrString{type: 1 (string), strVal: "http"}; spec.type.
    meta = (
        _field(1, "web")
        + _field(11, _field(1, "app") + _field(2, "web"))
        + _field(8, _field(1, 1700000000))
    )
    port = _field(3, 80) + _field(4, _field(1, 1) + _field(3, "http")) + _field(1, "http")
    spec = _field(1, port) + _field(4, "ClusterIP")
    service = _field(1, meta) + _field(2, spec)
    envelope = _field(1, _field(1, "v1") + _field(2, "Service")) + _field(2, service)
    obj = protobuf.decode(protobuf.MAGIC + envelope)
    assert obj["apiVersion"] == "v1" and obj["kind"] == "Service"
    assert obj["metadata"] == {
        "name": "web",
        "labels": {"app": "web"},
        "creationTimestamp": "2023-11-14T22:13:20Z",
    }
    assert obj["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    assert obj["spec"]["type"] == "ClusterIP"
    with pytest.raises(StatusError) as bad:
        protobuf.decode(b"not protobuf")
    assert bad.value.code == 400
    with pytest.raises(StatusError):
        protobuf.decode(protobuf.MAGIC + b"\x0a\xff")


def test_protobuf_delete_options_under_any_group() -> None:
    from tele.sandbox.apiserver import protobuf

    options = _field(1, 0) + _field(4, "Foreground") + _field(5, "All")
    envelope = _field(1, _field(1, "apps/v1") + _field(2, "DeleteOptions")) + _field(2, options)
    decoded = protobuf.decode(protobuf.MAGIC + envelope)
    assert decoded["gracePeriodSeconds"] == 0
    assert decoded["propagationPolicy"] == "Foreground" and decoded["dryRun"] == ["All"]
