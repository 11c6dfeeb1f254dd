"""Pure parts of the node runtime: DNS answers from the store, the nftables script, the
pod-template hash, $(VAR) expansion, image names. No root needed."""

from __future__ import annotations

from dnslib import RCODE, DNSRecord

from tele.sandbox.apiserver.store import Store
from tele.sandbox.controllers.deployment import template_hash
from tele.sandbox.kubelet.volumes import expand
from tele.sandbox.network.dns import resolve
from tele.sandbox.network.proxy import ruleset


def _store() -> Store:
    store = Store()
    store.create(
        "/services",
        {
            "metadata": {"namespace": "ns", "name": "echo"},
            "spec": {
                "clusterIP": "10.96.0.20",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            },
        },
    )
    store.create(
        "/services",
        {"metadata": {"namespace": "ns", "name": "web"}, "spec": {"clusterIP": "None"}},
    )
    store.create(
        "/endpoints",
        {
            "metadata": {"namespace": "ns", "name": "web"},
            "subsets": [
                {
                    "addresses": [
                        {"ip": "10.244.0.5", "hostname": "web-0"},
                        {"ip": "10.244.0.6", "hostname": "web-1"},
                    ],
                    "notReadyAddresses": [{"ip": "10.244.0.9"}],
                    "ports": [{"name": "http", "port": 8080}],
                }
            ],
        },
    )
    store.create(
        "/endpoints",
        {
            "metadata": {"namespace": "ns", "name": "echo"},
            "subsets": [
                {
                    "addresses": [{"ip": "10.244.0.2"}, {"ip": "10.244.0.3"}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                }
            ],
        },
    )
    return store


def _ask(store: Store, name: str, qtype: str = "A") -> tuple[int, list[str]]:
    reply = resolve(store, DNSRecord.question(name, qtype))
    return reply.header.rcode, sorted(str(rr.rdata) for rr in reply.rr)


def test_dns_answers() -> None:
    store = _store()
    assert _ask(store, "echo.ns.svc.cluster.local") == (RCODE.NOERROR, ["10.96.0.20"])
    assert _ask(store, "echo.ns.svc.cluster.local", "AAAA") == (RCODE.NOERROR, [])
    assert _ask(store, "web.ns.svc.cluster.local") == (
        RCODE.NOERROR,
        ["10.244.0.5", "10.244.0.6"],
    )
    assert _ask(store, "web-1.web.ns.svc.cluster.local") == (RCODE.NOERROR, ["10.244.0.6"])
    assert _ask(store, "_http._tcp.echo.ns.svc.cluster.local", "SRV") == (
        RCODE.NOERROR,
        ["0 100 80 echo.ns.svc.cluster.local."],
    )
    assert _ask(store, "10-244-0-7.ns.pod.cluster.local") == (RCODE.NOERROR, ["10.244.0.7"])
    for missing in (
        "nope.ns.svc.cluster.local",
        "echo.other.svc.cluster.local",
        "web-7.web.ns.svc.cluster.local",
        "example.com",
        "echo.ns",
    ):
        assert _ask(store, missing)[0] == RCODE.NXDOMAIN, missing


def test_proxy_ruleset() -> None:
    store = _store()
    eps = {("ns", e["metadata"]["name"]): e for e in store.objects("/endpoints")}
    script = ruleset(store.objects("/services"), eps)
    assert "ip daddr 10.96.0.20 tcp dport 80 jump svc1" in script
    assert "numgen random mod 2 vmap { 0 : jump svc1e0, 1 : jump svc1e1 }" in script
    assert "meta l4proto tcp dnat to 10.244.0.2:8080" in script
    assert "ip saddr 10.244.0.3 meta mark set meta mark | 0x4000" in script
    assert "10.244.0.5" not in script  # headless: DNS only, no NAT
    assert script.startswith("table ip tele-proxy {}\ndelete table ip tele-proxy\n")


def test_template_hash_and_expansion() -> None:
    template = {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}}
    h = template_hash(template)
    assert h == template_hash({**template}) and h != template_hash({**template, "x": 1})
    assert set(h) <= set("bcdfghjklmnpqrstvwxz2456789")
    assert expand("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_node_selectors_affinity_operators_and_tolerations() -> None:
    from tele.sandbox.kubelet.kubelet import _matches_node, _tolerates

    labels = {"zone": "a", "cores": "8"}

    def affinity(*expressions: dict[str, object]) -> dict[str, object]:
        term = {"matchExpressions": list(expressions)}
        required = {"nodeSelectorTerms": [term]}
        return {
            "affinity": {
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}
            }
        }

    def fits(spec: dict[str, object]) -> bool:
        return _matches_node(spec, labels, "n1")

    assert fits({}) and fits({"nodeSelector": {"zone": "a"}})
    assert not fits({"nodeSelector": {"zone": "a", "disk": "ssd"}})
    assert fits(affinity({"key": "zone", "operator": "In", "values": ["b", "a"]}))
    assert not fits(affinity({"key": "zone", "operator": "NotIn", "values": ["a"]}))
    assert fits(affinity({"key": "disk", "operator": "NotIn", "values": ["ssd"]}))
    assert fits(affinity({"key": "disk", "operator": "DoesNotExist"}))
    assert fits(affinity({"key": "cores", "operator": "Gt", "values": ["4"]}))
    assert not fits(affinity({"key": "cores", "operator": "Lt", "values": ["4"]}))
    assert not fits(affinity({"key": "zone", "operator": "Gt", "values": ["x"]}))  # not a number
    assert not fits(affinity({"key": "zone", "operator": "Bogus"}))
    # Expressions of a term are ANDed; an empty term matches nothing.
    assert not fits(
        affinity({"key": "zone", "operator": "Exists"}, {"key": "disk", "operator": "Exists"})
    )
    empty = {"nodeSelectorTerms": [{}]}
    assert not fits(
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": empty}}}
    )

    taint = {"key": "k", "value": "v", "effect": "NoSchedule"}
    assert _tolerates({"operator": "Exists"}, taint)
    assert _tolerates({"key": "k", "operator": "Exists", "effect": "NoSchedule"}, taint)
    assert _tolerates({"key": "k", "value": "v"}, taint)
    assert not _tolerates({"key": "k", "value": "w"}, taint)
    assert not _tolerates({"key": "k", "operator": "Exists", "effect": "NoExecute"}, taint)
    assert not _tolerates({"operator": "Equal", "value": "v"}, taint)  # Equal needs a key
