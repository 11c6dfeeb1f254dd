"""Client sessions and their leases, without I/O: time is passed in.

A session is created on arrival, renewed by every Remain, and ends on Depart or when its lease
runs out; the manager's reaper asks `expire(now)` at `next_deadline()` and tears down what the
expired sessions owned (engagements, tunnel streams).
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import msgspec

I = TypeVar("I", bound=msgspec.Struct)  # noqa: E741 - the identity type


@dataclass
class Session(Generic[I]):
    session_id: str
    identity: I
    arrived_at: float
    expires_at: float
    owner: str = ""
    """The identity that made the session (tele.manager.auth.Principal.key): only it may use
    the id."""

    @property
    def label(self) -> str:
        """How people see this client: user@host (or the agent's pod)."""
        user = getattr(self.identity, "user", None)
        if user is not None:
            return f"{user}@{getattr(self.identity, 'host', '')}"
        return str(getattr(self.identity, "pod_name", self.session_id))


@dataclass
class SessionTable(Generic[I]):
    lease: float
    sessions: dict[str, Session[I]] = field(default_factory=dict)
    _deadlines: list[tuple[float, str]] = field(default_factory=list)

    def arrive(self, identity: I, now: float, *, owner: str = "") -> Session[I]:
        session_id = secrets.token_hex(16)  # also a valid tunnel session id (tele.net.tunnel)
        session = Session(session_id, identity, now, now + self.lease, owner)
        self.sessions[session_id] = session
        heapq.heappush(self._deadlines, (session.expires_at, session_id))
        return session

    def remain(self, session_id: str, now: float) -> Session[I] | None:
        """Renew the lease; None if the session is unknown or already expired."""
        session = self.sessions.get(session_id)
        if session is None or session.expires_at <= now:
            return None
        session.expires_at = now + self.lease
        heapq.heappush(self._deadlines, (session.expires_at, session_id))
        return session

    def get(self, session_id: str, now: float) -> Session[I] | None:
        session = self.sessions.get(session_id)
        if session is None or session.expires_at <= now:
            return None
        return session

    def depart(self, session_id: str) -> Session[I] | None:
        return self.sessions.pop(session_id, None)

    def next_deadline(self) -> float | None:
        """When the earliest lease may run out (stale heap entries are skipped lazily)."""
        while self._deadlines:
            expires_at, session_id = self._deadlines[0]
            session = self.sessions.get(session_id)
            if session is not None and session.expires_at == expires_at:
                return expires_at
            heapq.heappop(self._deadlines)
        return None

    def expire(self, now: float) -> list[Session[I]]:
        """Remove and return every session whose lease ran out at `now`."""
        expired: list[Session[I]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            expires_at, session_id = heapq.heappop(self._deadlines)
            session = self.sessions.get(session_id)
            if session is not None and session.expires_at == expires_at:
                del self.sessions[session_id]
                expired.append(session)
        return expired


class Connection(Hashable, Protocol):
    """What Presence needs of a caller's connection (tele.rpc.server.CallerConnection)."""

    def on_end(self, callback: Callable[[], None]) -> None: ...


class Presence:
    """Which client sessions have a connection to this manager right now.

    A client whose last connection closed (a laptop that slept, a daemon killed) keeps its
    lease for a while, but nobody handles its engaged traffic: its engagements are suspended
    (`absent`) at once, so the app serves that traffic again, and resumed when the session calls
    in again on a new connection. A session never seen on a connection is not absent."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.connections: dict[str, set[Connection]] = {}
        self.absent: set[str] = set()

    def seen(self, session_id: str, connection: Connection | None) -> None:
        if connection is None:
            return
        held = self.connections.setdefault(session_id, set())
        if connection not in held:
            held.add(connection)
            connection.on_end(lambda: self._gone(session_id, connection))
        if session_id in self.absent:
            self.absent.discard(session_id)
            self.on_change()

    def _gone(self, session_id: str, connection: Connection) -> None:
        held = self.connections.get(session_id)
        if held is None:
            return
        held.discard(connection)
        if not held:
            del self.connections[session_id]
            self.absent.add(session_id)
            self.on_change()

    def forget(self, session_id: str) -> None:
        self.connections.pop(session_id, None)
        self.absent.discard(session_id)
