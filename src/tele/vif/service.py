"""The VIF as a service of the session: create the device, route the cluster to it, run the
packet loop, and undo all of it on the way out.

`serve_vif` is a task for the session's nursery. Teardown (routes, then the device, then the
undo journal entry) runs in `finally`, shielded and bounded, so a disconnect or a failing task
never leaves routes behind; a crash is covered by the journal (`tele.vif.journal`).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Final, NoReturn

import trio

from tele.net.tcpstate import TCPConfig
from tele.vif import journal
from tele.vif.errors import VifError
from tele.vif.netns import run_in_netns
from tele.vif.routing import (
    DeviceConfig,
    Network,
    configure,
    parse_networks,
    proxied_subnets,
    remove_routes,
)
from tele.vif.runtime import Counters, Dialer, Stack, StackConfig
from tele.vif.tun import TunDevice, open_tun

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


@dataclass(frozen=True, slots=True)
class VifInfo:
    device: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    subnets: list[Network]
    counters: Counters


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
    task_status: trio.TaskStatus[VifInfo] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the VIF until cancelled; `started(VifInfo)` once routes are in place."""
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
    tun: TunDevice = await run_in_netns(
        settings.netns, lambda: open_tun(settings.device, offload=settings.offload)
    )
    added: list[Network] = []
    entry = journal.Entry(netns=settings.netns, device=tun.name, routes=[])
    try:
        journal.record(entry)
        config = DeviceConfig(tun.name, address, settings.mtu, subnets, allow, address6)
        added = await run_in_netns(None, lambda: configure(settings.netns, config))
        entry.routes = [str(n) for n in added]
        journal.record(entry)
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
            config=StackConfig(
                subnets=subnets, tcp=_tcp_config(settings), dial_timeout=settings.dial_timeout
            ),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.serve)
            task_status.started(VifInfo(tun.name, address, subnets, stack.counters))
            await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT) as scope:
            await _teardown(settings.netns, tun, added)
        if scope.cancelled_caught:
            log.error("removing %s took longer than %gs", tun.name, TEARDOWN_TIMEOUT)


async def _teardown(netns: str | None, tun: TunDevice, added: list[Network]) -> None:
    name = tun.name
    try:
        if added:
            await run_in_netns(None, lambda: remove_routes(netns, name, added))
    except VifError as exc:
        log.warning("removing routes of %s: %s", name, exc)
    finally:
        # trio must forget the fd before it is closed (a task may still be parked on it).
        trio.lowlevel.notify_closing(tun.fd)
        tun.close()  # a non-persistent device disappears with its last descriptor
        journal.forget(netns, name)
        log.info("virtual interface %s removed", name)
