"""The daemon's side of the privileged helper: its `helper.sock` listener, and
`HelperPrivileges`, which asks the helper for each privileged step (tele.vif.privileges).

The helper connects (started by `tele connect` through sudo); `serve_helper_socket` accepts it
when its uid is root (or the daemon's own: a user with CAP_NET_ADMIN), exchanges Hello/Welcome,
and hands it to `on_helper`. Replies that carry descriptors are received with MSG_CMSG_CLOEXEC;
a helper that dies mid-session shows up as an error on the next request, while the descriptors
already handed over keep working.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Final, NoReturn

import trio

from tele import unixsock
from tele.errors import TeleError
from tele.vif import helper_proto as proto
from tele.vif.errors import RouteConflict, VifError
from tele.vif.privileges import DnsSockets, ResolverChange
from tele.vif.routing import DeviceConfig, Network, parse_networks
from tele.vif.tun import TunDevice

log = logging.getLogger(__name__)

CALL_TIMEOUT: Final = 30.0
HELLO_TIMEOUT: Final = 5.0


class HelperPrivileges:
    """Privileged steps done by the helper at the other end of `sock`."""

    def __init__(self, sock: trio.socket.SocketType, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self._lock = trio.Lock()
        self._closed = False

    async def _call(
        self, request: proto.Message, *, fds: int = 0
    ) -> tuple[proto.Message, list[int]]:
        async with self._lock:
            if self._closed:
                raise VifError("the privileged helper is gone")
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    await self.sock.send(proto.encode(request))
                    data, ancillary, _, _ = await self.sock.recvmsg(
                        proto.MAX_MESSAGE, proto.ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                    )
            except trio.TooSlowError:
                raise VifError(
                    f"the privileged helper did not answer within {CALL_TIMEOUT:g}s"
                ) from None
            except OSError as exc:
                raise VifError(f"lost the privileged helper: {exc.strerror or exc}") from exc
            received = proto.fds_received(ancillary)
        if not data:
            self._closed = True
            raise VifError("the privileged helper exited (see helper.log)")
        try:
            reply = proto.decode(data)
        except proto.ProtocolError as exc:
            _close_all(received)
            raise VifError(str(exc)) from exc
        if isinstance(reply, proto.Failed):
            _close_all(received)
            if reply.conflict:
                raise RouteConflict(reply.message)
            raise VifError(reply.message)
        if len(received) != fds:
            _close_all(received)
            raise VifError(f"the helper sent {len(received)} descriptors instead of {fds}")
        return reply, received

    async def open_device(
        self, netns: str | None, config: DeviceConfig, *, offload: bool
    ) -> tuple[TunDevice, list[Network]]:
        request = proto.OpenDevice(
            netns=netns,
            name=config.name,
            offload=offload,
            address=str(config.address),
            address6=str(config.address6 or "fd7e:1e00::53"),
            mtu=config.mtu,
            subnets=[str(n) for n in config.subnets],
            allow_conflicting=[str(n) for n in config.allow_conflicting],
        )
        reply, (fd,) = await self._call(request, fds=1)
        assert isinstance(reply, proto.DeviceOpened)
        os.set_blocking(fd, False)
        return TunDevice(fd, reply.name, reply.vnet_header), parse_networks(reply.routes)

    async def change_routes(
        self,
        netns: str | None,
        device: str,
        add: list[Network],
        remove: list[Network],
        allow: list[Network],
    ) -> list[Network]:
        request = proto.ChangeRoutes(
            add=[str(n) for n in add],
            remove=[str(n) for n in remove],
            allow_conflicting=[str(n) for n in allow],
        )
        reply, _ = await self._call(request)
        assert isinstance(reply, proto.RoutesChanged)
        return parse_networks(reply.added)

    async def close_device(self, netns: str | None, tun: TunDevice, routes: list[Network]) -> None:
        # The helper removes routes and device at Finish (or when this process dies); closing
        # our descriptor is what makes the device go away in the ordinary case.
        trio.lowlevel.notify_closing(tun.fd)
        tun.close()

    async def bind_dns(self, netns: str | None, address: str, port: int) -> DnsSockets:
        _, fds = await self._call(proto.BindDns(address=address, port=port), fds=3)
        udp, tcp, upstream = (socket.socket(fileno=fd) for fd in fds)
        return udp, tcp, upstream

    async def set_resolver(self, netns: str | None, change: ResolverChange) -> None:
        await self._call(
            proto.SetResolver(
                resolved=change.resolved,
                server=change.server,
                search=change.search,
                domains=change.domains,
            )
        )

    async def restore_resolver(self, netns: str | None, change: ResolverChange) -> None:
        await self._call(proto.RestoreResolver())

    def describe(self) -> str:
        return f"privileged helper (pid {self.pid})"

    def hang_up(self) -> None:
        """Close without asking (nothing was set up yet): the helper sees end of file."""
        self._closed = True
        self.sock.close()

    async def aclose(self) -> None:
        """Ask the helper to undo everything and wait for it (bounded), then hang up."""
        with trio.CancelScope(shield=True), trio.move_on_after(CALL_TIMEOUT):
            try:
                await self._call(proto.Finish())
            except VifError as exc:
                log.debug("helper finish: %s", exc)
        self._closed = True
        self.sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def open_helper_listener(path: Path) -> trio.socket.SocketType:
    """A SOCK_SEQPACKET listener at `path` (mode 0600; the caller holds the daemon lock)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with unixsock.addressable(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_helper_socket(
    listener: trio.socket.SocketType,
    on_helper: Callable[[HelperPrivileges], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept helpers until cancelled; each welcomed one goes to `on_helper`."""
    task_status.started()
    with listener:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:  # out of descriptors, for now: not a reason to stop the daemon
                log.warning("accepting a helper failed: %s", exc)
                await trio.sleep(0.1)
                continue
            try:
                helper = await _welcome(sock)
            except (OSError, TeleError, proto.ProtocolError, trio.TooSlowError) as exc:
                log.warning("refused a helper: %s", exc)
                sock.close()
                continue
            log.info("privileged helper pid %d connected", helper.pid)
            on_helper(helper)


async def _welcome(sock: trio.socket.SocketType) -> HelperPrivileges:
    peer = unixsock.peer_credentials(sock)
    if peer.uid not in (0, os.getuid()):
        raise VifError(f"pid {peer.pid} runs as uid {peer.uid}, neither root nor this user")
    with trio.fail_after(HELLO_TIMEOUT):
        data = await sock.recv(proto.MAX_MESSAGE)
    hello = proto.decode(data) if data else None
    if not isinstance(hello, proto.Hello):
        raise VifError("the helper did not say hello")
    if hello.pid != peer.pid:
        raise VifError(f"the helper claims pid {hello.pid}, but pid {peer.pid} connected")
    await sock.send(proto.encode(proto.Welcome()))
    return HelperPrivileges(sock, peer.pid)
