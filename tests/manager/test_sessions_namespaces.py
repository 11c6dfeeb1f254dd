"""Sans-IO parts of the manager: the lease table and namespace selectors."""

from __future__ import annotations

import pytest

from tele.contracts.namespaces import NamespaceSelector, SelectorError, overlap
from tele.manager.sessions import SessionTable
from tele.rpc.manager_api import ClientIdentity

WHO = ClientIdentity(user="u", host="h", client_version="0")


def test_leases_expire_in_order_and_renewal_postpones() -> None:
    table = SessionTable(lease=10)
    a = table.arrive(WHO, now=0)
    b = table.arrive(WHO, now=1)
    assert table.next_deadline() == 10
    assert table.remain(a.session_id, now=5) is a
    assert table.next_deadline() == 11  # a's old deadline is stale now
    assert table.expire(now=10.5) == []
    assert table.expire(now=11) == [b]
    assert table.remain(b.session_id, now=11) is None
    assert table.get(a.session_id, now=14.9) is a
    assert table.get(a.session_id, now=15) is None
    assert table.expire(now=15) == [a]
    assert table.next_deadline() is None


def test_depart_removes_at_once() -> None:
    table = SessionTable(lease=10)
    a = table.arrive(WHO, now=0)
    assert table.depart(a.session_id) is a
    assert table.depart(a.session_id) is None
    assert table.expire(now=100) == []


def test_static_dynamic_and_cluster_wide_selectors() -> None:
    static = NamespaceSelector.from_values({"namespaces": ["alpha", "beta"]})
    assert static.static_names == {"alpha", "beta"} and not static.is_dynamic
    assert static.matches("alpha") and not static.matches("gamma")
    long_form = NamespaceSelector.from_values(
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["alpha"]}
                ]
            }
        }
    )
    assert long_form.static_names == {"alpha"}
    dynamic = NamespaceSelector.from_values(
        {
            "namespaceSelector": {
                "matchLabels": {"example.com/managed": "true"},
                "matchExpressions": [
                    {"key": "example.com/environment", "operator": "In", "values": ["dev", "qa"]}
                ],
            }
        }
    )
    assert dynamic.is_dynamic
    assert dynamic.matches("x", {"example.com/managed": "true", "example.com/environment": "qa"})
    assert not dynamic.matches(
        "x", {"example.com/managed": "true", "example.com/environment": "prod"}
    )
    everything = NamespaceSelector.from_values({})
    assert everything.everything and everything.matches("anything")
    not_in = NamespaceSelector.parse(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["prod"]}]}
    )
    assert (
        not_in.is_dynamic and not_in.matches("x", {}) and not not_in.matches("x", {"tier": "prod"})
    )


@pytest.mark.parametrize(
    "values",
    [
        {"namespaces": ["a"], "namespaceSelector": {"matchLabels": {"x": "y"}}},
        {"namespaceSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}},
        {
            "namespaceSelector": {
                "matchExpressions": [{"key": "k", "operator": "Near", "values": ["v"]}]
            }
        },
    ],
)
def test_bad_selectors_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(SelectorError):
        NamespaceSelector.from_values(values)


def test_conflicts_are_all_encompassing() -> None:
    existing = {"alpha": {}, "beta": {"team": "blue"}, "gamma": {"team": "red"}}
    alpha = NamespaceSelector.for_names(["alpha"])
    beta_gamma = NamespaceSelector.for_names(["beta", "gamma"])
    blue = NamespaceSelector.parse({"matchLabels": {"team": "blue"}})
    everything = NamespaceSelector()
    assert overlap(alpha, beta_gamma, existing) is None
    assert overlap(alpha, everything, existing)  # cluster-wide conflicts with everyone
    assert overlap(everything, everything, {}) == {"*"}
    assert overlap(blue, beta_gamma, existing) == {"beta"}
    assert overlap(blue, alpha, existing) is None
