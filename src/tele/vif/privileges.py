"""The privileged steps of the VIF and DNS, behind one interface with two implementations.

Creating the TUN device, routing subnets to it, binding the DNS server's port 53 and changing
the system's resolver need CAP_NET_ADMIN (or root). `LocalPrivileges` does them in the daemon
itself (a daemon that runs as root), recording each change in the undo journal first;
`tele.vif.helper_link.HelperPrivileges` asks the privileged helper process, which does the same
steps and hands the descriptors over. Everything after the set-up (reading and writing packets,
answering DNS) happens in the daemon either way.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Protocol

import trio

from tele.dns import system
from tele.dns.privileges import DnsPrivileges, DnsSockets, ResolverChange
from tele.vif import journal
from tele.vif.netns import run_in_netns
from tele.vif.routing import DeviceConfig, Network, change_routes, configure, remove_routes
from tele.vif.tun import TunDevice, open_tun

__all__ = ["DnsSockets", "ResolverChange"]  # re-exported: the helper's side uses them


class Privileges(DnsPrivileges, Protocol):
    """The steps that need CAP_NET_ADMIN (the VIF's, and DNS's of tele.dns.privileges); each
    undoes its own partial work when it fails."""

    async def open_device(
        self, netns: str | None, config: DeviceConfig, *, offload: bool
    ) -> tuple[TunDevice, list[Network]]:
        """Create the TUN device, address it, check for conflicts and route `config.subnets`
        to it; the open device and the routes added."""
        ...

    async def change_routes(
        self,
        netns: str | None,
        device: str,
        add: list[Network],
        remove: list[Network],
        allow: list[Network],
    ) -> list[Network]:
        """Route `add` to the device and remove `remove` (RouteConflict: nothing changed)."""
        ...

    async def close_device(self, netns: str | None, tun: TunDevice, routes: list[Network]) -> None:
        """Remove the routes and the device."""
        ...

    async def aclose(self) -> None:
        """Nothing more will be asked; undo whatever is left (the helper exits)."""
        ...

    def describe(self) -> str:
        """Who does the steps, for `tele status`."""
        ...


class LocalPrivileges:
    """The daemon has CAP_NET_ADMIN: do each step here, journaled for a crash."""

    async def open_device(
        self, netns: str | None, config: DeviceConfig, *, offload: bool
    ) -> tuple[TunDevice, list[Network]]:
        tun = await run_in_netns(netns, lambda: open_tun(config.name, offload=offload))
        entry = journal.Entry(netns=netns, device=tun.name, routes=[])
        try:
            journal.record(entry)
            named = replace(config, name=tun.name)
            added = await run_in_netns(None, lambda: configure(netns, named))
            entry.routes = [str(n) for n in added]
            journal.record(entry)
        except BaseException:
            tun.close()  # a non-persistent device disappears with its last descriptor
            journal.forget(netns, tun.name)
            raise
        return tun, added

    async def change_routes(
        self,
        netns: str | None,
        device: str,
        add: list[Network],
        remove: list[Network],
        allow: list[Network],
    ) -> list[Network]:
        added = await run_in_netns(None, lambda: change_routes(netns, device, add, remove, allow))
        entry = next(
            (e for e in journal.pending() if e.device == device and e.netns == netns), None
        )
        if entry is not None:
            gone = {str(n) for n in remove}
            entry.routes = [r for r in entry.routes if r not in gone] + [str(n) for n in added]
            journal.record(entry)
        return added

    async def close_device(self, netns: str | None, tun: TunDevice, routes: list[Network]) -> None:
        name = tun.name
        try:
            if routes:
                await run_in_netns(None, lambda: remove_routes(netns, name, routes))
        finally:
            # trio must forget the fd before it is closed (a task may still be parked on it).
            trio.lowlevel.notify_closing(tun.fd)
            tun.close()
            journal.forget(netns, name)

    async def bind_dns(self, netns: str | None, address: str, port: int) -> DnsSockets:
        from tele.dns.server import bind_sockets

        return await run_in_netns(netns, lambda: bind_sockets(address, port))

    async def set_resolver(self, netns: str | None, change: ResolverChange) -> None:
        if change.resolved:
            await trio.to_thread.run_sync(
                functools.partial(
                    system.resolved_set_link,
                    change.device,
                    change.server,
                    change.domains,
                    netns=netns,
                )
            )
            return  # resolved forgets a link's settings when the device goes away
        journal.record(
            journal.Entry(
                netns, resolv_conf=str(change.resolv_conf), resolv_backup=str(change.resolv_backup)
            )
        )
        await trio.to_thread.run_sync(
            system.override_resolv_conf,
            change.resolv_conf,
            change.resolv_backup,
            change.server,
            change.search,
        )

    async def restore_resolver(self, netns: str | None, change: ResolverChange) -> None:
        if change.resolved:
            return
        await trio.to_thread.run_sync(
            system.restore_resolv_conf, change.resolv_conf, change.resolv_backup
        )
        journal.forget(netns, resolv_conf=str(change.resolv_conf))

    async def aclose(self) -> None:
        pass

    def describe(self) -> str:
        return "daemon"
