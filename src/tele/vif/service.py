"""The VIF as a service of the session: create the device, route the cluster to it, run the
packet loop, follow the cluster's subnets, and undo all of it on the way out.

`serve_vif` is a task for the session's nursery. The privileged steps go through a
`Privileges` (this process, or the privileged helper). Teardown (routes, then the device, then
the undo journal entry) runs in `finally`, shielded and bounded, so a disconnect or a failing
task never leaves routes behind; a crash is covered by the journal (`tele.vif.journal`) or, with
the helper, by the helper itself.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, NoReturn

import trio

from tele.net.tcpstate import TCPConfig
from tele.vif.errors import RouteConflict, VifError
from tele.vif.privileges import LocalPrivileges, Privileges
from tele.vif.routing import DeviceConfig, Network, parse_networks, proxied_subnets
from tele.vif.runtime import Counters, Dialer, EarlyOpener, Stack, StackConfig

log = logging.getLogger(__name__)

DEFAULT_DEVICE: Final = "tele0"
DEFAULT_ADDRESS: Final = "198.18.0.53"
"""The device's own address (where the DNS server listens): from the benchmarking range
(RFC 2544), which no cluster or office network uses."""
DEFAULT_ADDRESS6: Final = "fd7e:1e00::53"
"""The device's IPv6 address when IPv6 subnets are routed (a unique-local address)."""
TEARDOWN_TIMEOUT: Final = 5.0


@dataclass(slots=True)
class VifSettings:
    """How the device is set up; subnets are CIDR strings as the user and manager give them."""

    cluster_subnets: list[str]
    also_proxy: list[str] = field(default_factory=list)
    never_proxy: list[str] = field(default_factory=list)
    allow_conflicting: list[str] = field(default_factory=list)
    device: str = DEFAULT_DEVICE
    address: str = DEFAULT_ADDRESS
    address6: str = DEFAULT_ADDRESS6
    mtu: int = 1500
    offload: bool = True
    """IFF_VNET_HDR + TSO: 64 KiB reads and kernel-cut writes (chosen by bench/vif.py)."""
    netns: str | None = None
    """Work inside this network namespace (tests); None: the daemon's own."""
    dial_timeout: float = 10.0
    tcp_buffer: int = 1024 * 1024
    """Receive and send buffer per TCP connection (the window the app sees). 256 KiB left the
    app rwnd-limited ~80% of the time in bench/vif.py; the memory is used only while the tunnel
    is slower than the app."""


@dataclass(slots=True)
class VifInfo:
    device: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    subnets: list[Network]
    """The subnets routed to the device now (they follow the cluster, see `follow`)."""
    counters: Counters
    follow: Callable[[list[str]], Awaitable[None]] | None = None
    """Route the cluster's new subnets (CIDR strings) instead of the old ones."""


class _Routes:
    """The device's routes as the cluster's subnets change while connected."""

    def __init__(
        self,
        settings: VifSettings,
        privileges: Privileges,
        device: str,
        stack: Stack,
        routed: list[Network],
        subnets: list[Network],
    ) -> None:
        self.settings = settings
        self.privileges = privileges
        self.device = device
        self.stack = stack
        self.routed = routed
        """What the device has (to remove on the way out)."""
        self.subnets = subnets
        """What it should have (VifInfo.subnets: the same list object, updated in place)."""
        self._lock = trio.Lock()

    async def follow(self, cluster_subnets: list[str]) -> None:
        """Add routes for new subnets and remove those of subnets the cluster no longer has.

        A new subnet that conflicts with a local route is not routed (and logged): the session
        goes on with the routes it had.
        """
        settings = self.settings
        try:
            wanted = proxied_subnets(
                parse_networks(cluster_subnets),
                parse_networks(settings.also_proxy),
                parse_networks(settings.never_proxy),
            )
            allow = parse_networks(settings.allow_conflicting)
        except ValueError as exc:
            log.warning("ignoring the cluster's subnets %s: %s", cluster_subnets, exc)
            return
        async with self._lock:
            add = [n for n in wanted if n not in self.routed]
            remove = [n for n in self.routed if n not in wanted]
            if not add and not remove:
                return
            try:
                added = await self.privileges.change_routes(
                    settings.netns, self.device, add, remove, allow
                )
            except (VifError, RouteConflict) as exc:
                log.warning(
                    "the cluster's subnets changed, but %s keeps its routes: %s", self.device, exc
                )
                return
            self.routed[:] = [n for n in self.routed if n not in remove] + added
            self.subnets[:] = sorted(self.routed, key=lambda n: (n.version, n))
            self.stack.set_subnets(self.subnets)
            log.info(
                "virtual interface %s now routes %s (added %s, removed %s)",
                self.device,
                ", ".join(map(str, self.subnets)) or "nothing",
                ", ".join(map(str, added)) or "nothing",
                ", ".join(map(str, remove)) or "nothing",
            )


def _tcp_config(settings: VifSettings) -> TCPConfig:
    return TCPConfig(
        mtu=settings.mtu,
        receive_buffer=settings.tcp_buffer,
        send_buffer=settings.tcp_buffer,
        vnet_header=settings.offload,
        offload_checksum=settings.offload,
        gso=settings.offload,
    )


async def serve_vif(
    settings: VifSettings,
    dialer: Dialer,
    *,
    privileges: Privileges | None = None,
    early_opener: EarlyOpener | None = None,
    task_status: trio.TaskStatus[VifInfo] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the VIF until cancelled; `started(VifInfo)` once routes are in place.

    `early_opener`: opens a tunnel stream at once, without waiting for the far end's answer,
    for destinations recently seen open (`tele.vif.runtime`: accept before the dial).

    `privileges`: who creates the device and routes (default: this process, which then needs
    CAP_NET_ADMIN; else the privileged helper's link).
    """
    privileges = privileges or LocalPrivileges()
    try:
        subnets = proxied_subnets(
            parse_networks(settings.cluster_subnets),
            parse_networks(settings.also_proxy),
            parse_networks(settings.never_proxy),
        )
        allow = parse_networks(settings.allow_conflicting)
        address = ipaddress.ip_address(settings.address)
        address6 = ipaddress.IPv6Address(settings.address6)
    except ValueError as exc:
        raise VifError(f"bad subnet or address for the virtual interface: {exc}") from exc
    config = DeviceConfig(settings.device, address, settings.mtu, subnets, allow, address6)
    tun, added = await privileges.open_device(settings.netns, config, offload=settings.offload)
    routed = list(added)
    try:
        log.info(
            "virtual interface %s (%s) routes %s",
            tun.name,
            address,
            ", ".join(map(str, subnets)) or "nothing",
        )
        stack = Stack(
            tun.fd,
            dialer,
            vnet_header=tun.vnet_header,
            early_opener=early_opener,
            config=StackConfig(
                subnets=subnets, tcp=_tcp_config(settings), dial_timeout=settings.dial_timeout
            ),
        )
        routes = _Routes(settings, privileges, tun.name, stack, routed, list(subnets))
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.serve)
            task_status.started(
                VifInfo(tun.name, address, routes.subnets, stack.counters, routes.follow)
            )
            await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT) as scope:
            try:
                await privileges.close_device(settings.netns, tun, routed)
            except VifError as exc:
                log.warning("removing %s: %s", tun.name, exc)
            log.info("virtual interface %s removed", tun.name)
        if scope.cancelled_caught:
            log.error("removing %s took longer than %gs", tun.name, TEARDOWN_TIMEOUT)
