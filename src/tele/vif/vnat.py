"""Virtual network address translation (`tele connect --vnat CIDR`, config
`cluster.virtualIPSubnet`): cluster addresses in subnets that clash with this machine's own
routes (a VPN, a docker bridge) are given virtual IPs instead.

The DNS server answers a cluster name whose address lies in a translated subnet with a virtual
IP from the virtual subnet (one per cluster address, kept for the session); only the virtual
subnet is routed to the VIF, and a connection to a virtual IP is dialed through the tunnel to
the cluster address it stands for (the traffic manager dials it). The translated subnets are
never routed, so this machine's own route for them stays as it is. Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence

from tele.vif.routing import Network, parse_networks

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_SUBNET = "246.246.0.0/16"
MAX_MAPPED = 1 << 16
"""Virtual IPs handed out per session at most, whatever the subnet's size: the manager's DNS
answers make the entries, and a hostile or broken one must not grow the maps without bound."""


SYMBOLIC = ("pods", "service", "also", "all")
"""--vnat names for the cluster's pod subnets, its service subnets, the also-proxy subnets, or
all of them (as Telepresence's --vnat takes them)."""


def resolve(
    values: Sequence[str], pods: Sequence[str], services: Sequence[str], also: Sequence[str]
) -> list[str]:
    """--vnat values with the symbolic names replaced by the subnets they stand for."""
    named = {"pods": [*pods], "service": [*services], "also": [*also]}
    named["all"] = [*pods, *services, *also]
    result: list[str] = []
    for value in values:
        for subnet in named.get(value, [value]):
            if subnet not in result:
                result.append(subnet)
    return result


class VnatError(ValueError):
    """A --vnat subnet or the virtual subnet that cannot work (one sentence)."""


def check(translated: Sequence[str], virtual: str, others: Sequence[str] = ()) -> None:
    """VnatError when a subnet is not a CIDR, the virtual subnet overlaps a translated one or
    `others` (the cluster's and the also-proxy subnets), or their IP versions differ."""
    try:
        subnets = parse_networks(translated)
    except ValueError as exc:
        raise VnatError(f"--vnat {exc}: give a subnet such as 10.244.0.0/16") from None
    virtual_net = _virtual_subnet(virtual)
    _check_against_virtual("--vnat", subnets, virtual_net, "choose another")
    for other in parse_networks(others):
        if other.version == virtual_net.version and other.overlaps(virtual_net):
            raise VnatError(
                f"The virtual IP subnet {virtual_net} overlaps the routed subnet {other}; "
                "choose another cluster.virtualIPSubnet in the config"
            )


def parse_proxy_via(values: Sequence[str]) -> list[tuple[str, str]]:
    """`--proxy-via CIDR=WORKLOAD` values as (CIDR or symbolic name, workload); VnatError for
    one that is not of that form."""
    result: list[tuple[str, str]] = []
    for value in values:
        subnet, _, workload = value.partition("=")
        subnet, workload = subnet.strip(), workload.strip()
        if not subnet or not workload:
            raise VnatError(
                f"--proxy-via {value!r} is not CIDR=WORKLOAD: give e.g. 10.0.0.0/24=my-app"
            )
        if subnet not in SYMBOLIC:
            try:
                subnet = str(ipaddress.ip_network(subnet, strict=False))
            except ValueError:
                raise VnatError(
                    f"--proxy-via {subnet!r} is not a CIDR like 10.0.0.0/24 (nor one of "
                    f"{', '.join(SYMBOLIC)})"
                ) from None
        result.append((subnet, workload))
    return result


def proxy_via_workload(value: str, connected: str, managed: Collection[str]) -> tuple[str, str]:
    """A --proxy-via WORKLOAD as (name, namespace): `WORKLOAD.NAMESPACE` names one in another
    namespace the traffic manager manages (a namespace's name has no dot); anything else, dots
    and all, is a workload of the connected namespace (Deployment names may have dots)."""
    name, dot, namespace = value.rpartition(".")
    if dot and name and namespace in managed:
        return name, namespace
    return value, connected


def check_proxy_via(subnets: Sequence[str], virtual: str) -> None:
    """VnatError when a --proxy-via subnet overlaps the virtual IP subnet (its addresses get
    virtual IPs from it) or is of the other IP version."""
    _check_against_virtual(
        "--proxy-via",
        parse_networks(subnets),
        _virtual_subnet(virtual),
        "choose another subnet, or another",
    )


def check_proxy_via_overlaps(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (subnet, workload) pairs without repeats; VnatError when two subnets overlap with
    different workloads (an address would have two ways out, and one would silently win)."""
    unique: list[tuple[str, str]] = []
    for pair in pairs:
        if pair not in unique:
            unique.append(pair)
    networks = [(ipaddress.ip_network(s, strict=False), s, w) for s, w in unique]
    for index, (net, subnet, workload) in enumerate(networks):
        for other, other_subnet, other_workload in networks[:index]:
            if net.version == other.version and net.overlaps(other) and workload != other_workload:
                raise VnatError(
                    f"--proxy-via {subnet}={workload} overlaps --proxy-via "
                    f"{other_subnet}={other_workload}: an address can go out through one "
                    "workload only; give subnets that do not overlap"
                )
    return unique


def check_vnat_proxy_via(translated: Sequence[str], pairs: Sequence[tuple[str, str]]) -> None:
    """VnatError when a --proxy-via subnet overlaps a --vnat subnet: --vnat's addresses are
    dialled by the traffic manager, --proxy-via's by the workload's pods, and an address in
    both would silently go one way. Symbolic values not yet resolved are skipped."""
    vnat_nets = parse_networks([t for t in translated if t not in SYMBOLIC])
    for subnet, workload in pairs:
        if subnet in SYMBOLIC:
            continue
        net = ipaddress.ip_network(subnet, strict=False)
        for other in vnat_nets:
            if net.version == other.version and net.overlaps(other):
                raise VnatError(
                    f"--proxy-via {subnet}={workload} overlaps --vnat {other}: an address "
                    "goes out through the workload or through the traffic manager, not both; "
                    "give subnets that do not overlap (a --proxy-via subnet gets virtual IPs "
                    "without --vnat)"
                )


def _virtual_subnet(virtual: str) -> Network:
    try:
        return ipaddress.ip_network(virtual.strip(), strict=False)
    except ValueError as exc:
        raise VnatError(f"The virtual IP subnet (config cluster.virtualIPSubnet): {exc}") from None


def _check_against_virtual(
    flag: str, subnets: Sequence[Network], virtual_net: Network, remedy: str
) -> None:
    """VnatError when one of `flag`'s subnets is of the other IP version than the virtual IP
    subnet or overlaps it; `remedy` starts the advice for an overlap."""
    for subnet in subnets:
        if subnet.version != virtual_net.version:
            raise VnatError(
                f"{flag} {subnet} is IPv{subnet.version} but the virtual IP subnet "
                f"{virtual_net} is IPv{virtual_net.version}; set cluster.virtualIPSubnet to an "
                f"IPv{subnet.version} subnet"
            )
        if subnet.overlaps(virtual_net):
            raise VnatError(
                f"{flag} {subnet} overlaps the virtual IP subnet {virtual_net}; {remedy} "
                "cluster.virtualIPSubnet in the config"
            )


class VirtualIPs:
    """Virtual IP <-> cluster address, for the addresses in `translated`."""

    def __init__(self, virtual: str, translated: Sequence[str]) -> None:
        check(translated, virtual)
        self.subnet: Network = ipaddress.ip_network(virtual, strict=False)
        self.translated: list[Network] = parse_networks(translated)
        self._by_real: dict[Address, Address] = {}
        self._by_virtual: dict[Address, Address] = {}
        self._next = 1  # the subnet's own address is not handed out
        self._size = min(self.subnet.num_addresses - 1, MAX_MAPPED)
        """Addresses that can be handed out (the first is skipped; the bound of the maps)."""

    def covers(self, address: Address) -> bool:
        """Whether `address` is a cluster address that gets a virtual IP."""
        return any(address in net for net in self.translated)

    def virtual_for(self, real: Address) -> Address | None:
        """The virtual IP of cluster address `real` (made on first use); None when the virtual
        subnet is used up (the name then has no usable address)."""
        found = self._by_real.get(real)
        if found is not None:
            return found
        if self._next > self._size or real.version != self.subnet.version:
            return None
        virtual = self.subnet.network_address + self._next
        self._next += 1
        self._by_real[real] = virtual
        self._by_virtual[virtual] = real
        return virtual

    def real_for(self, virtual: Address) -> Address | None:
        """The cluster address a virtual IP stands for; None for one never handed out."""
        return self._by_virtual.get(virtual)

    def summary(self) -> dict[str, object]:
        return {
            "subnet": str(self.subnet),
            "translated": [str(n) for n in self.translated],
            "mapped": len(self._by_real),
        }
