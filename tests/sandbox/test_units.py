"""Sans-IO pieces of the API server: store history, selectors, patches, validation, tables."""

from __future__ import annotations

import pytest

from tele.sandbox.apiserver import patch, schemas
from tele.sandbox.apiserver.errors import ApiError
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
        with pytest.raises(ApiError):
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
    with pytest.raises(ApiError) as failed:
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
