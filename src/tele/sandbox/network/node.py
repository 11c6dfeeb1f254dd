"""The node's network namespace and the pod links hanging off it.

Layout (routed, like Calico, so every packet between pods crosses the node's netfilter and the
service NAT always sees both directions): the node namespace `<name>-node` forwards; each pod
namespace gets a veth whose node end `vp<N>` holds the gateway 10.244.0.1/32 and a /32 route to
the pod; the pod end `eth0` holds the pod's /32 with a default route via 10.244.0.1. The cluster
DNS address 10.96.0.10 and the node's own 10.244.0.1 sit on the node's loopback, and the Service
range 10.96.0.0/16 is routed there, so that the node itself reaches ClusterIPs.
"""

from __future__ import annotations

import ipaddress

from . import netns

POD_CIDR = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")
GATEWAY = str(POD_CIDR.network_address + 1)
DNS_IP = str(SERVICE_CIDR.network_address + 10)


class PodIpam:
    """Pod addresses from 10.244.0.0/16 (the gateway .0.1 excluded), lowest free first."""

    def __init__(self, network: ipaddress.IPv4Network = POD_CIDR) -> None:
        self._hosts = network.hosts()
        next(self._hosts)  # the gateway
        self._free: list[str] = []
        self._used: set[str] = set()

    def allocate(self) -> str:
        ip = self._free.pop() if self._free else str(next(self._hosts))
        self._used.add(ip)
        return ip

    def release(self, ip: str) -> None:
        if ip in self._used:
            self._used.remove(ip)
            self._free.append(ip)


async def create_node(name: str) -> None:
    """Create the node namespace (forwarding on, DNS address on loopback, a route for the
    Service range).

    A process in the node's namespace (a `hostNetwork` one on a real node) reaches ClusterIPs
    as on a real node: the route only gets the connection past the routing decision, with the
    node's own address as the source; the proxy's nat output chain then DNATs it to an
    endpoint and the packet is routed again to that pod."""
    await netns.delete(name)
    await netns.add(name)
    await netns.ip_batch(
        name,
        [
            "link set lo up",
            f"addr add {DNS_IP}/32 dev lo",
            f"addr add {GATEWAY}/32 dev lo",
            f"route add {SERVICE_CIDR} dev lo src {GATEWAY}",
        ],
    )
    await netns.run(
        "ip",
        "netns",
        "exec",
        name,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    )


async def attach_pod(node: str, pod_ns: str, index: int, ip: str) -> None:
    """Create pod namespace `pod_ns` wired to `node` by veth `vp<index>` with address `ip`."""
    await netns.delete(pod_ns)
    await netns.add(pod_ns)
    veth = f"vp{index}"
    await netns.ip_batch(
        node,
        [
            f"link add {veth} type veth peer name eth0 netns {pod_ns}",
            f"addr add {GATEWAY}/32 dev {veth}",
            f"link set {veth} up",
            # `replace`: a route left by an earlier pod with this address is taken over.
            f"route replace {ip}/32 dev {veth} scope link",
        ],
    )
    await netns.ip_batch(
        pod_ns,
        [
            "link set lo up",
            f"addr add {ip}/32 dev eth0",
            "link set eth0 up",
            f"route add {GATEWAY}/32 dev eth0 scope link",
            f"route add default via {GATEWAY} dev eth0",
        ],
    )


async def detach_pod(node: str, pod_ns: str, index: int) -> None:
    """Remove the pod's veth (and with it its route) at once, then its namespace.

    Deleting a namespace only drops a reference: the kernel tears its links down later, in a
    work queue, so the veth and the /32 route to the pod's address can outlive `ip netns delete`
    by a moment, and a new pod given the same address would find the route taken.
    """
    await netns.run("ip", "-n", node, "link", "del", f"vp{index}", check=False)
    await netns.delete(pod_ns)
