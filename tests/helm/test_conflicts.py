"""Namespace conflicts between managers as pure decisions (seed 004: all-encompassing)."""

from __future__ import annotations

from typing import Any

import pytest

from tele.helm.conflicts import check_conflicts
from tele.helm.errors import NamespaceConflict
from tele.helm.release import ReleaseRecord

EXISTING = {"alpha": {}, "beta": {"env": "dev"}, "gamma": {"env": "qa"}}


def record(namespace: str, **scope: Any) -> ReleaseRecord:
    return ReleaseRecord(
        name="traffic-manager",
        namespace=namespace,
        revision=1,
        status="deployed",
        chart_version="0.1.0",
        app_version="0.1.0",
        values={},
        scope={"namespaces": [], "namespaceSelector": {}, **scope},
        objects=[],
    )


def conflict(scope: dict[str, Any], *others: ReleaseRecord) -> str | None:
    try:
        check_conflicts("traffic-manager", "mine", scope, others, EXISTING)
    except NamespaceConflict as exc:
        return str(exc)
    return None


DEV = {"matchLabels": {"env": "dev"}}


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        ({}, {}, "in namespace other already manages all namespaces;"),
        ({"namespaces": ["alpha"]}, {}, "already manages all namespaces;"),
        ({}, {"namespaces": ["alpha"]}, "already manages namespaces alpha;"),
        ({}, {"namespaceSelector": DEV}, "already manages namespaces with env in (dev);"),
        ({"namespaces": ["alpha", "beta"]}, {"namespaces": ["beta"]}, "manages namespace beta;"),
        ({"namespaces": ["alpha"]}, {"namespaces": ["beta"]}, None),
        ({"namespaceSelector": DEV}, {"namespaces": ["beta"]}, "manages namespace beta;"),
        ({"namespaceSelector": DEV}, {"namespaces": ["gamma"]}, None),
        # A dynamic selector collides only on namespaces that exist and both select.
        ({"namespaceSelector": DEV}, {"namespaceSelector": {"matchLabels": {"env": "qa"}}}, None),
        (
            {"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "Exists"}]}},
            {"namespaceSelector": DEV},
            "manages namespace beta;",
        ),
    ],
)
def test_overlap_decisions(
    mine: dict[str, Any], theirs: dict[str, Any], expected: str | None
) -> None:
    found = conflict(mine, record("other", **theirs))
    if expected is None:
        assert found is None
    else:
        assert found is not None and expected in found
        assert found.startswith("Release traffic-manager in namespace other already manages")


def test_same_namespace_and_own_record() -> None:
    assert conflict({}, record("mine")) is None  # its own record: an upgrade
    other_release = record("mine")
    other_release.name = "second"
    found = conflict({"namespaces": ["alpha"]}, other_release)
    assert found == (
        "Release second already installs a traffic manager in namespace mine; "
        "upgrade or uninstall it, or choose another --namespace."
    )


def test_a_damaged_record_never_blocks() -> None:
    broken = record(
        "other", namespaceSelector={"matchExpressions": [{"key": "k", "operator": "In"}]}
    )
    assert conflict({}, broken) is None
