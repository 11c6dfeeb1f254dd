"""Addresses and routes of the TUN device (pyroute2), and the subnet arithmetic behind them.

Which subnets go to the device: the cluster's pod and Service subnets plus `also_proxy`, minus
`never_proxy` (carved out exactly, so the rest of a subnet still goes through tele). Before any
route is added, the namespace's routes are checked for overlaps with another interface (a VPN,
a local network): that refuses with a sentence naming the route and its interface, unless the
subnet is covered by `allow_conflicting`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tele.vif.errors import RouteConflict, VifError
from tele.vif.netns import call_in_netns

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TXQUEUE_LEN = 10_000
"""Packets the kernel queues towards the TUN before dropping."""


def parse_networks(texts: Iterable[str]) -> list[Network]:
    """CIDRs (host bits allowed: "10.0.0.1/8" means 10.0.0.0/8); UserError-free ValueError."""
    return [ipaddress.ip_network(text.strip(), strict=False) for text in texts if text.strip()]


def _collapse(networks: Iterable[Network]) -> list[Network]:
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def proxied_subnets(
    cluster: Iterable[Network], also: Iterable[Network] = (), never: Iterable[Network] = ()
) -> list[Network]:
    """The subnets to route to the device: cluster + also, minus never, collapsed."""
    remaining = _collapse([*cluster, *also])
    for hole in _collapse(never):
        carved: list[Network] = []
        for net in remaining:
            if net.version != hole.version or not net.overlaps(hole):
                carved.append(net)
            elif hole.supernet_of(net):  # type: ignore[arg-type]
                continue
            else:
                carved.extend(net.address_exclude(hole))  # type: ignore[arg-type]
        remaining = carved
    return sorted(_collapse(remaining), key=lambda n: (n.version, n))


@dataclass(frozen=True, slots=True)
class Route:
    """An existing route of the namespace, as far as conflict checks need it."""

    network: Network
    interface: str
    table: int = 254


def find_conflict(
    wanted: Sequence[Network],
    existing: Iterable[Route],
    *,
    own_interface: str,
    allow: Sequence[Network] = (),
) -> tuple[Network, Route] | None:
    """The first (subnet, route) where a wanted subnet overlaps another interface's route.

    Default routes never conflict (every subnet overlaps them, and a more specific route wins),
    nor do routes of our own device or those inside an allowed subnet.
    """
    for route in existing:
        if route.interface == own_interface or route.network.prefixlen == 0:
            continue
        for net in wanted:
            if net.version != route.network.version or not net.overlaps(route.network):
                continue
            if any(
                a.version == net.version and a.supernet_of(net)  # type: ignore[arg-type]
                for a in allow
            ):
                continue
            return net, route
    return None


def conflict_message(net: Network, route: Route) -> str:
    return (
        f"the cluster subnet {net} overlaps the route {route.network} on interface "
        f"{route.interface}; tele will not take that traffic away from {route.interface} "
        f"unless you pass --allow-conflicting-subnets {net} (or use --never-proxy, "
        f"or --vnat {net} to reach it through virtual IPs)"
    )


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name) if hasattr(msg, "get_attr") else msg.get(name)


def _routes(ipr: Any) -> list[Route]:
    names = {link["index"]: _attr(link, "IFLA_IFNAME") for link in ipr.get_links()}
    routes: list[Route] = []
    for family in (2, 10):  # AF_INET, AF_INET6
        for msg in ipr.get_routes(family=family, table=254):
            if msg["type"] not in (1,):  # RTN_UNICAST; skip local/broadcast/unreachable
                continue
            dst = _attr(msg, "RTA_DST")
            prefix = msg["dst_len"]
            if dst is None:
                dst = "0.0.0.0" if family == 2 else "::"
            oif = _attr(msg, "RTA_OIF")
            name = names.get(oif, f"#{oif}") if oif is not None else "(multipath)"
            routes.append(Route(ipaddress.ip_network(f"{dst}/{prefix}", strict=False), name))
    return routes


@dataclass(slots=True)
class DeviceConfig:
    """What `configure` sets on the device."""

    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    mtu: int
    subnets: list[Network]
    allow_conflicting: list[Network]
    address6: ipaddress.IPv6Address | None = None
    """An IPv6 address for the device when IPv6 subnets are routed: without one, the kernel
    has no source address for them (the device's link-local one does not reach beyond it)."""


def configure(netns: str | None, config: DeviceConfig) -> list[Network]:
    """Check for conflicts, then address the device, bring it up and route `subnets` to it.

    Returns the routes that were added (to remove on the way out). Blocking (netlink).
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def work() -> list[Network]:
        added: list[Network] = []
        with IPRoute() as ipr:
            found = find_conflict(
                config.subnets,
                _routes(ipr),
                own_interface=config.name,
                allow=config.allow_conflicting,
            )
            if found is not None:
                raise RouteConflict(conflict_message(*found))
            try:
                (index,) = ipr.link_lookup(ifname=config.name)
                prefix = 32 if config.address.version == 4 else 128
                ipr.addr("replace", index=index, address=str(config.address), prefixlen=prefix)
                if config.address6 is not None and any(n.version == 6 for n in config.subnets):
                    ipr.addr("replace", index=index, address=str(config.address6), prefixlen=128)
                # A burst of SYNs (a pool opening 1,000 connections) overflows the default
                # 500-packet queue: dropped SYNs cost the app 1 s, 3 s, 7 s retransmissions.
                ipr.link("set", index=index, mtu=config.mtu, txqlen=TXQUEUE_LEN, state="up")
                for net in config.subnets:
                    ipr.route("replace", dst=str(net), oif=index)
                    added.append(net)
            except (NetlinkError, ValueError) as exc:
                raise VifError(f"cannot configure {config.name}: {exc}") from exc
        return added

    return call_in_netns(netns, work)


def change_routes(
    netns: str | None,
    device: str,
    add: Sequence[Network],
    remove: Sequence[Network],
    allow: Sequence[Network] = (),
) -> list[Network]:
    """Route `add` to `device` (after the same conflict check as `configure`) and delete the
    routes of `remove`: the cluster's subnets changed while connected. Returns what was added.
    A conflict refuses the whole change before anything is touched. Blocking (netlink).
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def work() -> list[Network]:
        added: list[Network] = []
        with IPRoute() as ipr:
            found = find_conflict(add, _routes(ipr), own_interface=device, allow=allow)
            if found is not None:
                raise RouteConflict(conflict_message(*found))
            indexes = ipr.link_lookup(ifname=device)
            if not indexes:
                raise VifError(f"the virtual interface {device} is gone")
            try:
                for net in add:
                    ipr.route("replace", dst=str(net), oif=indexes[0])
                    added.append(net)
            except NetlinkError as exc:
                raise VifError(f"cannot route {net} to {device}: {exc}") from exc
            for net in remove:
                try:
                    ipr.route("del", dst=str(net), oif=indexes[0])
                except NetlinkError:
                    pass  # already gone
        return added

    return call_in_netns(netns, work)


def remove_routes(netns: str | None, device: str, subnets: Iterable[Network]) -> None:
    """Delete our routes (best effort: the device's removal drops them anyway)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def work() -> None:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=device)
            for net in subnets:
                try:
                    if indexes:
                        ipr.route("del", dst=str(net), oif=indexes[0])
                    else:
                        ipr.route("del", dst=str(net))
                except NetlinkError:
                    pass  # already gone

    call_in_netns(netns, work)


def delete_link(netns: str | None, device: str) -> bool:
    """Delete a leftover device by name; True when there was one."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def work() -> bool:
        with IPRoute() as ipr:
            indexes = ipr.link_lookup(ifname=device)
            if not indexes:
                return False
            try:
                ipr.link("del", index=indexes[0])
            except NetlinkError:
                return False
            return True

    return call_in_netns(netns, work)
