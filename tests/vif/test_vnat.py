"""VNAT (`tele connect --vnat CIDR`): a laptop whose own route covers the cluster's pod subnet
still reaches the pods by name, through virtual IPs; the laptop's route stays (issue 19)."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
import trio

from tele.cli.cluster_cmd import connection_lines
from tele.dns.service import SystemSetup
from tele.errors import first_leaf
from tele.rpc.client import Client
from tele.vif.connect import NetworkOptions, NetworkStatus, serve_network
from tele.vif.errors import RouteConflict
from tele.vif.vnat import (
    MAX_MAPPED,
    VirtualIPs,
    VnatError,
    check,
    check_proxy_via_overlaps,
    check_vnat_proxy_via,
    proxy_via_workload,
    resolve,
)

from .conftest import POD_ADDRESS, Namespaces, run_in
from .test_network import Session, laptop_resolv_conf

CONNECT = """
import socket
address = socket.gethostbyname("echo")
with socket.create_connection(("echo", 7000), timeout=5) as s:
    s.sendall(b"via a virtual IP")
    s.shutdown(socket.SHUT_WR)
    print(address, s.recv(100).decode())
"""


def ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address)


def test_virtual_ips_are_handed_out_once_and_map_back() -> None:
    vips = VirtualIPs("246.246.0.0/30", ["10.244.0.0/16"])
    assert vips.covers(ip("10.244.1.5")) and not vips.covers(ip("10.96.0.1"))
    first = vips.virtual_for(ip("10.244.1.5"))
    assert first == ip("246.246.0.1")
    assert vips.virtual_for(ip("10.244.1.5")) == first  # the same address, the same virtual IP
    assert vips.real_for(ip("246.246.0.1")) == ip("10.244.1.5")
    assert vips.real_for(ip("246.246.0.2")) is None  # never handed out: no destination
    assert vips.virtual_for(ip("10.244.1.6")) == ip("246.246.0.2")
    assert vips.virtual_for(ip("10.244.1.7")) == ip("246.246.0.3")
    assert vips.virtual_for(ip("10.244.1.8")) is None  # the subnet is used up
    assert vips.summary() == {
        "subnet": "246.246.0.0/30",
        "translated": ["10.244.0.0/16"],
        "mapped": 3,
    }


def test_a_huge_virtual_subnet_still_bounds_the_maps() -> None:
    vips = VirtualIPs("240.0.0.0/4", ["10.0.0.0/8"])
    base = int(ip("10.0.0.0"))
    for n in range(MAX_MAPPED):
        assert vips.virtual_for(ipaddress.IPv4Address(base + n)) is not None
    assert vips.virtual_for(ipaddress.IPv4Address(base + MAX_MAPPED)) is None


@pytest.mark.parametrize(
    ("translated", "virtual", "others", "sentence"),
    [
        (
            ["246.246.0.0/24"],
            "246.246.0.0/16",
            [],
            "--vnat 246.246.0.0/24 overlaps the virtual IP subnet 246.246.0.0/16; choose another "
            "cluster.virtualIPSubnet in the config",
        ),
        (
            ["fd00::/64"],
            "246.246.0.0/16",
            [],
            "--vnat fd00::/64 is IPv6 but the virtual IP subnet 246.246.0.0/16 is IPv4; set "
            "cluster.virtualIPSubnet to an IPv6 subnet",
        ),
        (
            ["10.244.0.0/16"],
            "10.96.0.0/12",
            ["10.96.0.0/16"],
            "The virtual IP subnet 10.96.0.0/12 overlaps the routed subnet 10.96.0.0/16; choose "
            "another cluster.virtualIPSubnet in the config",
        ),
    ],
)
def test_bad_vnat_settings_are_one_sentence(
    translated: list[str], virtual: str, others: list[str], sentence: str
) -> None:
    with pytest.raises(VnatError) as refused:
        check(translated, virtual, others)
    assert str(refused.value) == sentence


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


async def test_a_laptop_route_over_the_pod_subnet_is_left_alone_and_names_still_work(
    netns: Namespaces, cluster_link: Client, nursery: trio.Nursery
) -> None:
    # The laptop's own network (a VPN, a docker bridge) has the cluster's pod subnet.
    _ip(netns.laptop, "link", "add", "tele-lan0", "type", "veth", "peer", "name", "tele-lan1")
    _ip(netns.laptop, "link", "set", "tele-lan0", "up")
    _ip(netns.laptop, "route", "add", "10.244.0.0/16", "dev", "tele-lan0")
    resolv = laptop_resolv_conf(netns, "nameserver 127.0.0.2\n")
    options = NetworkOptions(
        enabled=True, netns=netns.laptop, dns_setup=SystemSetup.RESOLV_CONF, resolv_conf=resolv
    )
    # Without VNAT tele refuses to take the laptop's traffic away from its own route.
    with pytest.raises(BaseExceptionGroup) as refused:
        async with trio.open_nursery() as attempt:
            await attempt.start(serve_network, options, Session(cluster_link))
            attempt.cancel_scope.cancel()
    conflict = first_leaf(refused.value)
    assert isinstance(conflict, RouteConflict)
    assert str(conflict).endswith("or --vnat 10.244.0.0/16 to reach it through virtual IPs)")
    assert "tele0" not in _ip(netns.laptop, "link", "show")

    options.vnat = ["10.244.0.0/16"]
    status: NetworkStatus = await nursery.start(serve_network, options, Session(cluster_link))
    result = await run_in(netns.laptop, CONNECT)
    address, echoed = result.stdout.strip().split(" ", 1)
    assert (address, echoed) == ("246.246.0.1", "via a virtual IP"), result.stderr
    assert status.vnat is not None and status.vnat.real_for(ip(address)) == ip(POD_ADDRESS)
    summary = status.summary()
    assert summary["vnat"] == {
        "subnet": "246.246.0.0/16",
        "translated": ["10.244.0.0/16"],
        "mapped": 1,
    }
    assert "246.246.0.0/16" in summary["subnets"]  # type: ignore[operator]
    assert "10.244.0.0/16" not in summary["subnets"]  # type: ignore[operator]
    shown = connection_lines(
        {
            "kube_server": "https://k",
            "kube_context": "dev",
            "namespace": "default",
            "manager_namespace": "ambassador",
            "network": summary,
        }
    )
    assert "  Virtual IPs:        246.246.0.0/16 for 10.244.0.0/16 (1 in use)" in shown
    routes = _ip(netns.laptop, "route", "show")
    assert "10.244.0.0/16 dev tele-lan0" in routes  # the laptop's route is untouched
    assert "246.246.0.0/16 dev tele0" in routes
    # A virtual IP never handed out leads nowhere (refused, not dialed as itself).
    unknown = await run_in(
        netns.laptop,
        "import errno, socket\ntry:\n"
        "    socket.create_connection(('246.246.0.9', 7000), timeout=5)\n"
        "except OSError as exc:\n    print(errno.errorcode.get(exc.errno, exc))\n",
    )
    assert unknown.stdout.strip() in ("ECONNREFUSED", "EHOSTUNREACH"), unknown


def test_symbolic_vnat_names_stand_for_the_clusters_subnets() -> None:
    pods, services, also = ["10.244.0.0/16"], ["10.96.0.0/16"], ["10.50.0.0/16"]
    assert resolve(["all"], pods, services, also) == [*pods, *services, *also]
    assert resolve(["pods", "10.1.0.0/16"], pods, services, also) == [*pods, "10.1.0.0/16"]
    assert resolve(["service", "service", "also"], pods, services, also) == [*services, *also]


def test_the_privileged_helper_routes_the_virtual_subnet_but_nothing_public() -> None:
    """`tele connect --vnat` with sudo: the helper must take the default virtual subnet (class E,
    never routed on the internet), and still refuse public ranges."""
    from tele.vif.helper import ALLOWED_SUBNETS, HelperError, check_inside

    allowed = list(ALLOWED_SUBNETS)
    check_inside("route", [ipaddress.ip_network("246.246.0.0/16")], allowed)
    for public in ("8.8.8.0/24", "0.0.0.0/1", "224.0.0.0/3"):
        with pytest.raises(HelperError):
            check_inside("route", [ipaddress.ip_network(public)], allowed)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("api", ("api", "dev")),
        ("api.staging", ("api", "staging")),
        ("api.v2.staging", ("api.v2", "staging")),
        ("api.v2", ("api.v2", "dev")),  # v2 is no managed namespace: a dotted name in dev
        ("api.", ("api.", "dev")),
        (".staging", (".staging", "dev")),
    ],
)
def test_a_proxy_via_workload_names_its_namespace_after_a_dot(
    value: str, expected: tuple[str, str]
) -> None:
    assert proxy_via_workload(value, "dev", {"dev", "staging"}) == expected


def test_overlapping_proxy_via_subnets_must_go_through_one_workload() -> None:
    pairs = [("10.0.0.0/16", "a"), ("10.1.0.0/16", "b"), ("10.0.0.0/16", "a"), ("::/0", "b")]
    assert check_proxy_via_overlaps(pairs) == [
        ("10.0.0.0/16", "a"),
        ("10.1.0.0/16", "b"),
        ("::/0", "b"),
    ]
    assert check_proxy_via_overlaps([("10.0.0.0/16", "a"), ("10.0.1.0/24", "a")])
    with pytest.raises(VnatError) as refused:
        check_proxy_via_overlaps([("10.0.0.0/16", "a"), ("10.0.1.0/24", "b")])
    assert str(refused.value) == (
        "--proxy-via 10.0.1.0/24=b overlaps --proxy-via 10.0.0.0/16=a: an address can go out "
        "through one workload only; give subnets that do not overlap"
    )


def test_a_proxy_via_subnet_must_not_overlap_a_vnat_subnet() -> None:
    # Apart, the other IP version, or not yet resolved (a symbolic name): accepted.
    check_vnat_proxy_via(["10.0.0.0/16", "pods"], [("10.1.0.0/16", "a"), ("::/0", "a")])
    check_vnat_proxy_via(["10.0.0.0/16"], [("pods", "a")])
    with pytest.raises(VnatError) as refused:
        check_vnat_proxy_via(["10.0.0.0/8"], [("192.168.0.0/16", "a"), ("10.9.0.0/24", "b")])
    assert str(refused.value) == (
        "--proxy-via 10.9.0.0/24=b overlaps --vnat 10.0.0.0/8: an address goes out through the "
        "workload or through the traffic manager, not both; give subnets that do not overlap "
        "(a --proxy-via subnet gets virtual IPs without --vnat)"
    )
