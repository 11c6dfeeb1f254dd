"""The session lease with the traffic manager: arrive, renew every lease/3 (arriving again when
the manager forgot the session), call in the session, follow the cluster info, depart."""

from __future__ import annotations

import getpass
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from tele import __version__
from tele.errors import ConnectionFailed, UserError
from tele.rpc import manager_api as mapi
from tele.rpc.client import Client
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import H2Link
from tele.rpc.links import LinkPool
from tele.rpc.method import Req, Resp, Unary

log = logging.getLogger(__name__)

_MANAGER_TROUBLE = frozenset(
    {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN, Code.CANCELLED}
)


def no_answer(method: Unary[Req, Resp], waited: float, setting: str) -> RpcError:
    """A manager call that ran out of time, said so that the user knows what to change: the
    call, the wait, and the setting that bounds it."""
    name = method.path.rpartition("/")[2]
    return RpcError(
        Code.DEADLINE_EXCEEDED,
        f"The traffic manager did not answer {name} within {waited:g}s ({setting}); if it is "
        "only slow, raise timeouts.trafficManagerAPI in config.yml (`tele config view` "
        "shows the settings), otherwise look at the traffic-manager pod with kubectl.",
    )


RETRY_ARRIVE: Final = 1.0
"""After arriving again failed: the next attempt (not a lease/3 later; the user waits)."""


class SessionLease:
    """One client session on the manager over `pool`'s links, kept alive while `heartbeat`
    runs. `arrivals` counts arrivals; `changed` is set at each (a new session: the manager
    forgot the old one and everything in it).

    `status` is live: "reconnecting" as soon as no link to the manager is up (whatever the
    heartbeat last saw), and "connected" as soon as the session is renewed or replaced."""

    def __init__(
        self,
        pool: LinkPool,
        *,
        kube_context: str,
        mapped_namespaces: list[str],
        api_timeout: float,
    ) -> None:
        self.pool = pool
        self._kube_context = kube_context
        self._mapped_namespaces = mapped_namespaces
        self.api_timeout = api_timeout
        self.session: mapi.SessionInfo | None = None
        self.cluster: mapi.ClusterInfo | None = None
        self.state = "connecting"
        """connecting | connected | reconnecting | disconnected, as the heartbeat last saw it
        (`status` also looks at the links)."""
        self.reconnects = 0
        self.last_error = ""
        """The current problem (cleared when the session is renewed), or an engagement that
        ended without the user asking."""
        self.last_reconnect = ""
        """Why the session was last replaced (the manager forgot it), and when."""
        self.arrivals = 0
        self.changed = trio.Event()
        self.heartbeat_link: H2Link | None = None
        """The link the session last called in on: the manager counts the session present
        while it is open (see `heartbeat`)."""

    @property
    def status(self) -> str:
        if self.state == "connected" and self.pool.pick() is None:
            return "reconnecting"
        return self.state

    @status.setter
    def status(self, value: str) -> None:
        self.state = value

    @property
    def problem(self) -> str:
        """`last_error`, or while no link is up, why."""
        if self.state == "connected" and self.pool.pick() is None:
            return f"no link to the traffic manager: {self.pool.last_failure or 'it broke'}"
        return self.last_error

    async def client(self) -> Client:
        """An RPC client on a live link (waits for one within the API timeout)."""
        with trio.move_on_after(self.api_timeout):
            return Client(await self.pool.wait_ready())
        raise RpcError(
            Code.UNAVAILABLE, f"no link to the traffic manager: {self.pool.last_failure}"
        )

    def session_id(self) -> str:
        if self.session is None:
            raise RpcError(Code.UNAVAILABLE, "not connected to the traffic manager yet")
        return self.session.session_id

    async def _call(self, client: Client, method: Unary[Req, Resp], request: Req) -> Resp:
        """`method` on the manager within timeouts.trafficManagerAPI."""
        deadline = trio.current_time() + self.api_timeout
        try:
            return await client.call(method, request, timeout=self.api_timeout)
        except RpcError as exc:
            # (the manager may answer DEADLINE_EXCEEDED itself, for a wait of its own)
            if exc.code is Code.DEADLINE_EXCEEDED and trio.current_time() >= deadline:
                raise no_answer(method, self.api_timeout, "timeouts.trafficManagerAPI") from None
            raise

    async def arrive(self) -> None:
        identity = mapi.ClientIdentity(
            user=getpass.getuser(),
            host=socket.gethostname(),
            client_version=__version__,
            kube_context=self._kube_context,
            mapped_namespaces=list(self._mapped_namespaces),
            capabilities=list(mapi.CLIENT_CAPABILITIES),
        )
        client = await self.client()
        try:
            session = await self._call(client, mapi.ARRIVE, identity)
        except RpcError as exc:
            if exc.code in (Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED):
                raise UserError(exc.message.rstrip(".") + ".") from None
            raise
        self.session = session
        self.heartbeat_link = client.link
        self.cluster = session.cluster
        self.arrivals += 1
        self.changed.set()
        self.changed = trio.Event()
        log.info(
            "arrived as session %s (manager %s, lease %gs)",
            session.session_id,
            session.cluster.manager_version,
            session.lease_seconds,
        )
        if session.cluster.manager_version != __version__:
            log.warning(
                "the traffic manager runs version %s, this client %s",
                session.cluster.manager_version,
                __version__,
            )

    async def heartbeat(self) -> None:
        """Renew the lease every lease/3, and at once when a new link came up (a new manager,
        its pod replaced, does not know the session, and the user should not wait) or when the
        link the session last called in on closed: the manager counts a client whose
        connections all closed as gone (its engagements suspended, their traffic back to the
        app) until it calls in on another, whatever its lease says."""
        while True:
            assert self.session is not None
            replacements = self.pool.replacements
            wait = self.session.lease_seconds / 3 if self.state == "connected" else RETRY_ARRIVE
            with trio.move_on_after(max(0.1, wait)):
                if await self._link_changed(replacements):
                    self.state = "reconnecting"
            old = self.session.session_id
            try:
                client = await self.client()
                await self._call(client, mapi.REMAIN, mapi.SessionRequest(session_id=old))
                self.heartbeat_link = client.link
                self._renewed()
            except RpcError as exc:
                self.last_error = exc.message
                self.state = "reconnecting"
                if exc.code is not Code.NOT_FOUND:
                    log.warning("heartbeat failed: %s", exc.message)
                    continue
                try:
                    await self.arrive_again(old)
                except (RpcError, ConnectionFailed) as again:
                    self.last_error = f"arriving again failed: {again}"

    async def arrive_again(self, old: str) -> None:
        """The manager forgot session `old`: a new session, and `status` says why."""
        log.warning("the traffic manager forgot session %s; arriving again", old)
        await self.arrive()
        assert self.session is not None
        self.reconnects += 1
        self.last_reconnect = (
            f"at {time.strftime('%H:%M:%S', time.gmtime())} UTC the traffic manager no longer "
            f"knew session {old} (a new manager pod, or the lease ran out while the link was "
            f"down): arrived again as session {self.session.session_id}"
        )
        self._renewed()

    def _renewed(self) -> None:
        self.state = "connected"
        self.last_error = ""

    async def _link_changed(self, replacements: int) -> bool:
        """Wait until the heartbeat's link closed (False) or a link came up in place of a
        broken one since `replacements` (True)."""
        replaced = False
        async with trio.open_nursery() as nursery:

            async def wait_replaced() -> None:
                nonlocal replaced
                await self.pool.wait_replaced(since=replacements)
                replaced = True
                nursery.cancel_scope.cancel()

            async def wait_closed(link: H2Link) -> None:
                await link.wait_closed()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_replaced)
            if self.heartbeat_link is not None:
                nursery.start_soon(wait_closed, self.heartbeat_link)
        return replaced

    async def call_in_session(self, method: Unary[Req, Resp], make: Callable[[str], Req]) -> Resp:
        """Call `method` with a request made for the current session; when the manager does
        not know the session (a new manager pod), arrive again and retry once."""
        for attempt in (0, 1):
            try:
                client = await self.client()
                request = make(self.session_id())
            except RpcError as exc:
                # No link or no session yet: the manager's side, not a lost daemon (which is
                # what the CLI reads in UNAVAILABLE).
                raise RpcError(Code.ABORTED, exc.message) from None
            waited = self.api_timeout + 60
            deadline = trio.current_time() + waited
            try:
                return await client.call(method, request, timeout=waited)
            except RpcError as exc:
                if exc.code is Code.DEADLINE_EXCEEDED and trio.current_time() >= deadline:
                    raise RpcError(
                        Code.ABORTED,
                        no_answer(method, waited, "timeouts.trafficManagerAPI plus 60s").message,
                    ) from None
                if exc.code is Code.DEADLINE_EXCEEDED:  # the manager's own wait, its sentence
                    raise RpcError(Code.ABORTED, exc.message) from None
                if exc.code in _MANAGER_TROUBLE:
                    # Said by the manager link, not by this daemon: the CLI must not read
                    # UNAVAILABLE as "lost the daemon".
                    raise RpcError(
                        Code.ABORTED, f"the traffic manager did not complete it: {exc.message}"
                    ) from None
                if exc.code is not Code.NOT_FOUND or attempt or "session" not in exc.message:
                    raise
                await self.arrive_again(self.session_id())
        raise AssertionError("unreachable")

    async def follow_cluster_info(
        self, on_change: Callable[[mapi.ClusterInfo], Awaitable[None]]
    ) -> None:
        """Keep `cluster` current (WatchClusterInfo), calling `on_change` with each update."""
        while True:
            try:
                client = await self.client()
                request = mapi.SessionRequest(session_id=self.session_id())
                async with client.stream(mapi.WATCH_CLUSTER_INFO, request) as updates:
                    async for info in updates:
                        self.cluster = info
                        await on_change(info)
            except RpcError as exc:
                log.debug("cluster info watch ended: %s", exc.message)
            # The link broke or the session was replaced: follow the new one.
            with trio.move_on_after(5):
                await self.changed.wait()

    async def depart(self) -> None:
        session = self.session
        link: H2Link | None = self.pool.pick()
        if session is None or link is None:
            return
        try:
            await Client(link).call(
                mapi.DEPART, mapi.SessionRequest(session_id=session.session_id), timeout=2
            )
            log.info("departed from session %s", session.session_id)
        except RpcError as exc:
            log.warning("could not depart from session %s: %s", session.session_id, exc.message)
        self.session = None
