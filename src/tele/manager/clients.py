"""Client sessions on the manager: arrive, remain, depart, and the reaper that ends the sessions
(clients' and agents') whose lease ran out. A session's end is announced to `on_session_end`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from tele.manager.agents import AgentRegistry
from tele.manager.auth import Authenticator, audit_line
from tele.manager.sessions import Presence, Session, SessionTable
from tele.manager.view import ClusterView
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import Empty
from tele.rpc.server import CALLER

log = logging.getLogger(__name__)


class ClientSessions:
    """The clients' sessions (a lease of `lease` seconds each) and their reaper."""

    def __init__(
        self,
        *,
        lease: float,
        clock: Callable[[], float],
        view: ClusterView,
        managed: Callable[[], str],
        cluster_info: Callable[[], api.ClusterInfo],
        agents: AgentRegistry,
        presence: Presence,
        auth: Authenticator,
        manager_namespace: str = "",
    ) -> None:
        self._auth = auth
        self._manager_namespace = manager_namespace
        """Arriving needs `create pods/portforward` here (how a client reaches the manager)."""
        self.sessions = SessionTable[api.ClientIdentity](lease)
        self._lease = lease
        self._clock = clock
        self._view = view
        self._managed = managed  # says which namespaces are managed, for a refusal
        self._cluster_info = cluster_info
        self._agents = agents
        self._presence = presence
        self._changed = trio.Event()
        self.on_session_end: list[Callable[[Session[api.ClientIdentity]], None]] = []

    async def arrive(self, identity: api.ClientIdentity) -> api.SessionInfo:
        if self._manager_namespace:
            # What reaching the manager the ordinary way (a port-forward to its pod) needs: a
            # pod that reaches its Service directly gets no more than its user could anyway.
            await self._auth.require(
                "create",
                "pods",
                self._manager_namespace,
                subresource="portforward",
                purpose="to reach the traffic manager",
            )
        unknown = [n for n in identity.mapped_namespaces if not self._view.is_managed(n)]
        if unknown:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"This traffic manager does not manage namespace {unknown[0]}; it manages "
                f"{self._managed()}.",
            )
        session = self.sessions.arrive(identity, self._clock(), owner=self._auth.owner())
        self._presence.seen(session.session_id, CALLER.get())
        self._changed.set()
        log.info(
            "session %s arrived: %s (client %s)",
            session.session_id,
            session.label,
            identity.client_version,
        )
        audit_line("arrival", session=session.session_id, client=session.label)
        return api.SessionInfo(
            session_id=session.session_id,
            lease_seconds=self._lease,
            cluster=self._cluster_info(),
        )

    def get(self, session_id: str) -> Session[api.ClientIdentity]:
        """The live session, else NOT_FOUND (the client must connect again); NOT_FOUND too when
        the caller is not the identity that made it (a stolen id is worth nothing)."""
        session = self.sessions.get(session_id, self._clock())
        if session is None:
            raise RpcError(Code.NOT_FOUND, "the session has expired or is unknown; connect again")
        self._auth.check_owner(session.owner)
        return session

    def alive(self, session_id: str) -> bool:
        return self.sessions.get(session_id, self._clock()) is not None

    def can(self, session_id: str, capability: str) -> bool:
        """Whether the live session's client announced `capability` (api.CLIENT_CAPABILITIES)
        on arrival; an older client announces none."""
        session = self.sessions.get(session_id, self._clock())
        return session is not None and capability in session.identity.capabilities

    async def remain(self, request: api.SessionRequest) -> Empty:
        """A heartbeat, of an agent's session or a client's."""
        if self._agents.remain(request.session_id):
            return Empty()
        self.get(request.session_id)
        if self.sessions.remain(request.session_id, self._clock()) is None:
            raise RpcError(Code.NOT_FOUND, "the session has expired or is unknown; connect again")
        self._presence.seen(request.session_id, CALLER.get())
        self._changed.set()
        return Empty()

    async def depart(self, request: api.SessionRequest) -> Empty:
        try:
            self.get(request.session_id)
        except RpcError:
            return Empty()  # as for an unknown id: another identity's session is none of its
        session = self.sessions.depart(request.session_id)
        if session is not None:
            log.info("session %s departed (%s)", session.session_id, session.label)
            self._end(session)
        return Empty()

    def end_owned(self, owner: str, reason: str) -> list[str]:
        """End every session `owner` made (its credential was revoked); their ids."""
        ended = []
        for session in list(self.sessions.sessions.values()):
            if session.owner != owner:
                continue
            if self.sessions.depart(session.session_id) is None:
                continue
            log.warning("session %s (%s) ended: %s", session.session_id, session.label, reason)
            self._end(session)
            ended.append(session.session_id)
        return ended

    def wake_reaper(self) -> None:
        """A new lease may end before the reaper's current deadline."""
        self._changed.set()

    def _end(self, session: Session[api.ClientIdentity]) -> None:
        self._presence.forget(session.session_id)
        self._changed.set()
        for callback in self.on_session_end:
            callback(session)

    async def reap(self) -> None:
        """End the sessions whose lease ran out, clients' and agents', as their deadlines come."""
        while True:
            for session in self.sessions.expire(self._clock()):
                log.info(
                    "session %s expired (%s): no heartbeat within the lease",
                    session.session_id,
                    session.label,
                )
                self._end(session)
            self._agents.expire()
            deadlines = [
                d
                for d in (self.sessions.next_deadline(), self._agents.next_deadline())
                if d is not None
            ]
            deadline = min(deadlines) if deadlines else None
            self._changed = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._changed.wait()
