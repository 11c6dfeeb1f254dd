"""Traffic agents' sessions on the manager: they arrive, remain (heartbeats), expire, and end
with their pod. Which agents of a workload are up is asked here (`of_workload`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from tele.manager.changes import Changes
from tele.manager.sessions import Session, SessionTable
from tele.manager.table import WorkloadKey
from tele.rpc import agent_api as aapi

log = logging.getLogger(__name__)

AGENT_LEASE = 15.0


class AgentRegistry:
    """The agents' sessions (`sessions`, a lease of AGENT_LEASE seconds each)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        changes: Changes,
        wake_reaper: Callable[[], None],
        manager_ip: str,
        vouch: Callable[[aapi.AgentIdentity], aapi.AgentIdentity] = lambda identity: identity,
        owner: Callable[[], str] = lambda: "",
        check_owner: Callable[[str], None] = lambda owner: None,
        certify: Callable[[aapi.AgentIdentity], tuple[str, str]] = lambda identity: ("", ""),
    ) -> None:
        self._vouch = vouch
        self._certify = certify
        self._owner = owner
        self._check_owner = check_owner
        self.sessions = SessionTable[aapi.AgentIdentity](AGENT_LEASE)
        self._clock = clock
        self._changes = changes
        self._wake_reaper = wake_reaper
        self._manager_ip = manager_ip

    async def arrive(self, identity: aapi.AgentIdentity) -> aapi.AgentSessionInfo:
        """An agent arrives; `vouch` refuses one whose token does not make it that pod's."""
        identity = self._vouch(identity)
        cert, ca = self._certify(identity)  # for the pod IP the manager sees
        session = self.sessions.arrive(identity, self._clock(), owner=self._owner())
        self._wake_reaper()
        log.info(
            "agent of %s %s/%s arrived from pod %s",
            identity.workload_kind,
            identity.namespace,
            identity.workload_name,
            identity.pod_name,
        )
        self._changes.notify()
        return aapi.AgentSessionInfo(
            session_id=session.session_id,
            lease_seconds=AGENT_LEASE,
            manager_ips=[self._manager_ip] if self._manager_ip else [],
            tls_cert=cert,
            tls_ca=ca,
        )

    def get(self, session_id: str) -> Session[aapi.AgentIdentity] | None:
        return self.sessions.get(session_id, self._clock())

    def remain(self, session_id: str) -> bool:
        """A heartbeat; False if no such agent session is alive (it may be a client's);
        RpcError if the caller is not the identity that made it."""
        if self.of_caller(session_id) is None:
            return False
        return self.sessions.remain(session_id, self._clock()) is not None

    def of_caller(self, session_id: str) -> Session[aapi.AgentIdentity] | None:
        """The agent session, if the caller is the identity that made it (RpcError if not)."""
        session = self.sessions.get(session_id, self._clock())
        if session is not None:
            self._check_owner(session.owner)
        return session

    def end_owned(self, owner: str, reason: str) -> list[str]:
        """End the sessions of the agent whose credential was revoked (its pod is gone)."""
        ended = []
        for session in list(self.sessions.sessions.values()):
            if session.owner == owner and self.sessions.depart(session.session_id) is not None:
                log.warning("agent of pod %s ended: %s", session.label, reason)
                ended.append(session.session_id)
        if ended:
            self._changes.notify()
        return ended

    def expire(self) -> None:
        for session in self.sessions.expire(self._clock()):
            log.info("agent of pod %s expired: no heartbeat within the lease", session.label)
            self._changes.notify()

    def next_deadline(self) -> float | None:
        return self.sessions.next_deadline()

    def pod_changed(self, event_type: str, pod: dict[str, Any]) -> None:
        """An agent whose pod is terminating or gone serves nothing any more: its session ends
        now, not when its lease runs out (agents are killed, they do not depart), so that
        nobody counts on it — e.g. a roll that waits for agents of a new configuration."""
        meta = pod.get("metadata") or {}
        if event_type != "DELETED" and not meta.get("deletionTimestamp"):
            return
        where = (meta.get("namespace"), meta.get("name"))
        gone = [
            session_id
            for session_id, s in self.sessions.sessions.items()
            if (s.identity.namespace, s.identity.pod_name) == where
        ]
        for session_id in gone:
            self.sessions.depart(session_id)
            log.info("agent of pod %s/%s ended with its pod", *where)
        if gone:
            self._changes.notify()

    def latest(self, namespace: str, pod_name: str) -> Session[aapi.AgentIdentity] | None:
        """The live session of the agent in pod `namespace/pod_name` that arrived last (an
        agent restarted in its pod has a new one while the old one's lease runs out)."""
        now, latest = self._clock(), None
        for s in self.sessions.sessions.values():
            if s.expires_at <= now or s.identity.pod_name != pod_name:
                continue
            if s.identity.namespace == namespace and (
                latest is None or s.arrived_at >= latest.arrived_at
            ):
                latest = s
        return latest

    def arrival(self, namespace: str, pod_name: str) -> str:
        """Which arrival of the agent in pod `namespace/pod_name` is up (the latest live
        session's tag; "" when none is): it changes when the agent restarts in the same pod
        (a crash, an OOM kill), so that a client knows to reach it again (its volume mount
        ended with the old agent). Not the session id itself, which is the agent's own."""
        latest = self.latest(namespace, pod_name)
        if latest is None:
            return ""
        return hashlib.sha256(latest.session_id.encode()).hexdigest()[:16]

    def of_workload(self, key: WorkloadKey) -> list[aapi.AgentIdentity]:
        now = self._clock()
        return [
            s.identity
            for s in self.sessions.sessions.values()
            if s.expires_at > now
            and (s.identity.workload_kind, s.identity.namespace, s.identity.workload_name) == key
        ]
