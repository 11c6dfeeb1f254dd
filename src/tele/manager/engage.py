"""Engagements on the manager: agents' sessions, clients' engagements, and the pairing of an
agent's stream with the engaging client's dial-back stream (see tele.rpc.agent_api).

The flow of one ENGAGE (seeds 001 and 004): find the workload, make its agent configuration,
check that the requested service port is unambiguous and free, make sure the workload's pods
run an agent (evict them so that the webhook injects it; patch the workload when a disruption
budget refuses), wait for an agent to arrive, then activate and tell the agents.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from tele.k8s import client as k8s
from tele.k8s.client import ApiError
from tele.manager import agentconfig
from tele.manager.sessions import Session, SessionTable
from tele.net.tunnel import Accept, OpenRequest, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import H2Stream
from tele.rpc.method import Empty
from tele.rpc.tunnel import reset, splice

if TYPE_CHECKING:
    from tele.manager.server import Manager

log = logging.getLogger(__name__)

AGENT_LEASE = 15.0
DIAL_BACK_TIMEOUT = 10.0
MAX_PENDING_DIALS = 256


@dataclass
class Active:
    info: aapi.EngagementInfo
    session_id: str
    workload_key: tuple[str, str, str]
    engagement: aapi.Engagement


@dataclass
class ClientDials:
    send: trio.MemorySendChannel[aapi.DialRequest]
    receive: trio.MemoryReceiveChannel[aapi.DialRequest]


@dataclass
class Engagements:
    manager: Manager
    agents: SessionTable[aapi.AgentIdentity] = field(
        default_factory=lambda: SessionTable[aapi.AgentIdentity](AGENT_LEASE)
    )
    active: dict[str, Active] = field(default_factory=dict)
    _changed: trio.Event = field(default_factory=trio.Event)
    _dials: dict[str, ClientDials] = field(default_factory=dict)
    _pending: dict[str, trio.MemorySendChannel[tuple[H2Stream, trio.Event]]] = field(
        default_factory=dict
    )

    def register(self, router: Any) -> None:
        router.unary(aapi.ARRIVE_AS_AGENT, self.arrive_as_agent)
        router.stream(aapi.WATCH_ENGAGEMENTS, self.watch_engagements)
        router.unary(aapi.ENGAGE, self.engage)
        router.unary(aapi.LEAVE, self.leave)
        router.unary(aapi.UNINSTALL, self.uninstall)
        router.stream(aapi.WATCH_DIALS, self.watch_dials)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- agents ---------------------------------------------------------------------------------

    async def arrive_as_agent(self, identity: aapi.AgentIdentity) -> aapi.AgentSessionInfo:
        session = self.agents.arrive(identity, self.manager.clock())
        self.manager.wake_reaper()
        log.info(
            "agent of %s %s/%s arrived from pod %s",
            identity.workload_kind,
            identity.namespace,
            identity.workload_name,
            identity.pod_name,
        )
        self._notify()
        return aapi.AgentSessionInfo(session_id=session.session_id, lease_seconds=AGENT_LEASE)

    def agent(self, session_id: str) -> Session[aapi.AgentIdentity] | None:
        return self.agents.get(session_id, self.manager.clock())

    async def remain_agent(self, session_id: str) -> bool:
        return self.agents.remain(session_id, self.manager.clock()) is not None

    def expire_agents(self) -> None:
        for session in self.agents.expire(self.manager.clock()):
            log.info("agent of pod %s expired: no heartbeat within the lease", session.label)
            self._notify()

    async def watch_engagements(
        self, request: api.SessionRequest
    ) -> AsyncIterator[aapi.EngagementList]:
        session = self.agent(request.session_id)
        if session is None:
            raise RpcError(Code.NOT_FOUND, "unknown agent session; arrive again")
        identity = session.identity
        key = (identity.workload_kind, identity.namespace, identity.workload_name)
        last: aapi.EngagementList | None = None
        while self.agent(request.session_id) is not None:
            current = aapi.EngagementList(
                engagements=[a.engagement for a in self.active.values() if a.workload_key == key]
            )
            if current != last:
                yield current
                last = current
            await self._changed.wait()

    def agents_of(self, key: tuple[str, str, str]) -> list[aapi.AgentIdentity]:
        now = self.manager.clock()
        return [
            s.identity
            for s in self.agents.sessions.values()
            if s.expires_at > now
            and (s.identity.workload_kind, s.identity.namespace, s.identity.workload_name) == key
        ]

    # --- clients --------------------------------------------------------------------------------

    async def engage(self, request: aapi.EngageRequest) -> aapi.EngagementInfo:
        session = self.manager.client_session(request.session_id)
        view = self.manager.view
        if not view.is_managed(request.namespace):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"namespace {request.namespace} is not managed by this traffic manager",
            )
        workload = self._find_workload(request.namespace, request.workload)
        key = (str(workload["kind"]), request.namespace, request.workload)
        name = request.name or request.workload
        if name in self.active:
            holder = self.active[name]
            if holder.session_id != request.session_id:
                raise RpcError(
                    Code.ALREADY_EXISTS, f"{name} is already engaged by {holder.info.client}"
                )
            return holder.info
        try:
            config = agentconfig.generate(
                workload=workload,
                services=[s for (ns, _), s in view.services.items() if ns == request.namespace],
                manager_namespace=self.manager.config.namespace,
                agent_image=self.manager.config.agent_image,
                agent_port=self.manager.config.agent_port,
                default_mount_policies=self.manager.config.mount_policies,
            )
        except agentconfig.NotInterceptable as exc:
            raise RpcError(
                Code.FAILED_PRECONDITION, f"{request.workload} cannot be engaged: {exc}"
            ) from None
        container, intercept = self._choose(config, request)
        self._check_conflicts(key, intercept, request)
        await self._ensure_agent(key, workload, request.agent_timeout)
        agents = self.agents_of(key)
        environment = agents[0].environment.get(container, {}) if agents else {}
        mounts = agents[0].mounts.get(container, []) if agents else []
        engagement_id = secrets.token_hex(8)
        info = aapi.EngagementInfo(
            id=engagement_id,
            name=name,
            namespace=request.namespace,
            workload=request.workload,
            workload_kind=key[0],
            container=container,
            service=intercept.service_name,
            service_port=intercept.service_port,
            container_port=intercept.container_port,
            mechanism=request.mechanism,
            client=session.label,
            pod_ips=[a.pod_ip for a in agents],
            environment=environment,
            mounts=mounts,
            **_mount_fields(agents, container),
        )
        self.active[name] = Active(
            info=info,
            session_id=request.session_id,
            workload_key=key,
            engagement=aapi.Engagement(
                id=engagement_id,
                container=container,
                agent_port=intercept.agent_port,
                mechanism=request.mechanism,
                headers=request.headers,
                path_equal=request.path_equal,
                path_prefix=request.path_prefix,
                path_regex=request.path_regex,
                client=session.label,
            ),
        )
        self._client_dials(request.session_id)  # dial requests wait there for the client
        log.info(
            "%s engaged %s %s/%s (%s)", session.label, key[0], key[1], key[2], request.mechanism
        )
        self._notify()
        return info

    def _find_workload(self, namespace: str, name: str) -> dict[str, Any]:
        for kind in ("Deployment", "StatefulSet", "Rollout", "ReplicaSet"):
            found = self.manager.view.workloads.get((kind, namespace, name))
            if found is not None:
                return dict(found)
        raise RpcError(Code.NOT_FOUND, f"no workload named {name} in namespace {namespace}")

    @staticmethod
    def _choose(
        config: agentconfig.AgentConfig, request: aapi.EngageRequest
    ) -> tuple[str, agentconfig.Intercept]:
        candidates = [
            (container, intercept)
            for container, intercept in config.intercepts()
            if (not request.container or container == request.container)
            and (not request.service or intercept.service_name == request.service)
            and (
                not request.port
                or request.port in (intercept.service_port_name, str(intercept.service_port))
            )
        ]
        if not candidates:
            raise RpcError(
                Code.NOT_FOUND,
                f"{request.workload} has no service port matching"
                f"{' service ' + request.service if request.service else ''}"
                f"{' port ' + request.port if request.port else ''}",
            )
        if len(candidates) > 1:
            choices = ", ".join(
                f"{i.service_name}:{i.service_port_name or i.service_port}" for _, i in candidates
            )
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"{request.workload} has several service ports ({choices}); "
                "choose one with --service and --port",
            )
        return candidates[0]

    def _check_conflicts(
        self,
        key: tuple[str, str, str],
        intercept: agentconfig.Intercept,
        request: aapi.EngageRequest,
    ) -> None:
        for other in self.active.values():
            if other.workload_key != key or other.engagement.agent_port != intercept.agent_port:
                continue
            # tcp takes the whole port; http engagements share it when their filters differ.
            if "tcp" in (other.engagement.mechanism, request.mechanism) or (
                other.engagement.headers == request.headers
                and other.engagement.path_prefix == request.path_prefix
                and other.engagement.path_equal == request.path_equal
                and other.engagement.path_regex == request.path_regex
            ):
                raise RpcError(
                    Code.ALREADY_EXISTS,
                    f"port {intercept.service_port} of {request.workload} is already engaged by "
                    f"{other.info.client} ({other.info.name})",
                )

    async def _ensure_agent(
        self, key: tuple[str, str, str], workload: dict[str, Any], timeout: float
    ) -> None:
        self.manager.agent_workloads.add(key)  # new pods of the workload keep getting one
        if self.agents_of(key):
            return
        await self._roll(key, workload, want_agent=True)
        with trio.move_on_after(timeout):
            while not self.agents_of(key):
                await self._changed.wait()
            return
        raise RpcError(
            Code.DEADLINE_EXCEEDED,
            f"no traffic agent of {key[0]} {key[1]}/{key[2]} arrived within {timeout:g}s",
        )

    async def _roll(
        self, key: tuple[str, str, str], workload: dict[str, Any], *, want_agent: bool
    ) -> None:
        """Evict the workload's pods whose agent is not as wanted, so that the webhook makes
        their replacements right; a disruption budget that refuses gets a rollout instead."""
        pods = [
            pod
            for (ns, _), pod in list(self.manager.view.pods.items())
            if ns == key[1] and _owner_name(self.manager.view.workload_of(pod, ns)) == key[2]
        ]
        for pod in pods:
            has_agent = any(
                c.get("name") == agentconfig.AGENT_CONTAINER for c in pod["spec"]["containers"]
            )
            if has_agent == want_agent:
                continue
            try:
                await self.manager.kube.evict(pod["metadata"]["name"], key[1])
            except ApiError as exc:
                if exc.code == 404:
                    continue
                if exc.code != 429:
                    raise
                log.info("eviction refused (%s); rolling the workload out instead", exc.message)
                await self._restart_workload(key, workload)
                return

    async def uninstall(self, request: aapi.UninstallRequest) -> aapi.UninstallReply:
        """Remove the agent from workloads (all of the namespace's with `all_agents`)."""
        self.manager.client_session(request.session_id)
        if request.all_agents:
            keys = sorted(k for k in self.manager.agent_workloads if k[1] == request.namespace)
        else:
            keys = []
            for name in request.workloads:
                kind = str(self._find_workload(request.namespace, name)["kind"])
                keys.append((kind, request.namespace, name))
        removed = []
        for key in keys:
            found = self.manager.view.workloads.get(key)
            if found is None:
                continue
            workload = dict(found)
            template = (workload.get("spec") or {}).get("template") or {}
            if agentconfig.injection_policy(template) == "enabled":
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"the agent of {key[2]} is installed by its pod template's "
                    "inject-traffic-agent annotation; remove the annotation instead",
                )
            holders = [a.info for a in self.active.values() if a.workload_key == key]
            if holders:
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"{key[2]} is engaged by {holders[0].client} ({holders[0].name}); "
                    "it must leave first",
                )
            self.manager.agent_workloads.discard(key)
            await self._roll(key, workload, want_agent=False)
            removed.append(key[2])
            log.info("removed the traffic agent from %s %s/%s", *key)
        return aapi.UninstallReply(removed=removed)

    async def _restart_workload(self, key: tuple[str, str, str], workload: dict[str, Any]) -> None:
        resource = {
            "Deployment": k8s.DEPLOYMENTS,
            "StatefulSet": k8s.STATEFULSETS,
            "ReplicaSet": k8s.REPLICASETS,
            "Rollout": k8s.ROLLOUTS,
        }[key[0]]
        stamp = datetime.now(UTC).isoformat()
        patch = {
            "spec": {
                "template": {
                    "metadata": {
                        "annotations": {agentconfig.ANNOTATION_PREFIX + "restartedAt": stamp}
                    }
                }
            }
        }
        await self.manager.kube.patch(resource, key[2], patch, key[1])

    async def leave(self, request: aapi.LeaveRequest) -> Empty:
        active = self.active.get(request.name)
        if active is None or active.session_id != request.session_id:
            raise RpcError(Code.NOT_FOUND, f"no engagement named {request.name} of this session")
        del self.active[request.name]
        log.info("%s left %s", active.info.client, request.name)
        self._notify()
        return Empty()

    def end_session(self, session_id: str) -> None:
        """A client departed or expired: its engagements end, its pending dials fail."""
        ended = [name for name, a in self.active.items() if a.session_id == session_id]
        for name in ended:
            del self.active[name]
        dials = self._dials.pop(session_id, None)
        if dials is not None:
            dials.send.close()
        if ended:
            log.info("engagements %s ended with their session", ", ".join(ended))
            self._notify()

    async def watch_dials(self, request: api.SessionRequest) -> AsyncIterator[aapi.DialRequest]:
        self.manager.client_session(request.session_id)
        async for dial in self._client_dials(request.session_id).receive:
            yield dial

    def _client_dials(self, session_id: str) -> ClientDials:
        """The session's queue of dial requests, made on first use: requests made before the
        client watches wait there (bounded) instead of being refused."""
        dials = self._dials.get(session_id)
        if dials is None:
            send, receive = trio.open_memory_channel[aapi.DialRequest](MAX_PENDING_DIALS)
            dials = self._dials[session_id] = ClientDials(send, receive)
        return dials

    # --- the two halves of an engaged connection ---------------------------------------------

    def session_allowed(self, request: OpenRequest) -> bool:
        """The tunnel policy's view: agents may open engagement streams, clients the rest."""
        if request.dial_id is not None and request.dial_id.startswith(aapi.AGENT_DIAL_PREFIX):
            return self.agent(request.session) is not None
        return self.manager.sessions.get(request.session, self.manager.clock()) is not None

    async def dial_back(self, request: OpenRequest, stream: H2Stream) -> None:
        dial_id = request.dial_id or ""
        if dial_id.startswith(aapi.AGENT_DIAL_PREFIX):
            await self._from_agent(request, stream, dial_id[len(aapi.AGENT_DIAL_PREFIX) :])
            return
        waiting = self._pending.pop(dial_id, None)
        if waiting is None:
            reset(stream, ResetReason.POLICY)
            return
        done = trio.Event()
        try:
            waiting.send_nowait((stream, done))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            reset(stream, ResetReason.TIMEOUT)
            return
        # The agent side's task splices; this handler (which owns the stream) waits for it.
        await done.wait()

    async def _from_agent(
        self, request: OpenRequest, agent_stream: H2Stream, engagement_id: str
    ) -> None:
        active = next((a for a in self.active.values() if a.engagement.id == engagement_id), None)
        dials = self._dials.get(active.session_id) if active is not None else None
        if active is None or dials is None:
            reset(agent_stream, ResetReason.REFUSED)
            return
        dial_id = secrets.token_hex(12)
        send, receive = trio.open_memory_channel[tuple[H2Stream, trio.Event]](1)
        self._pending[dial_id] = send
        try:
            dials.send.send_nowait(
                aapi.DialRequest(
                    dial_id=dial_id,
                    engagement_id=engagement_id,
                    original_host=str(request.destination.ip),
                    original_port=request.destination.port,
                )
            )
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending.pop(dial_id, None)
            reset(agent_stream, ResetReason.OVERLOADED)
            return
        paired: tuple[H2Stream, trio.Event] | None = None
        with trio.move_on_after(DIAL_BACK_TIMEOUT):
            paired = await receive.receive()
        self._pending.pop(dial_id, None)
        if paired is None:
            log.warning(
                "client %s did not dial back for %s in time", active.info.client, active.info.name
            )
            reset(agent_stream, ResetReason.TIMEOUT)
            return
        client_stream, done = paired
        try:
            accept = Accept().to_headers()
            await agent_stream.send_response(accept)
            await client_stream.send_response(accept)
            await splice(agent_stream, client_stream)
        finally:
            done.set()


def _owner_name(workload: Any) -> str | None:
    return None if workload is None else str(workload["metadata"]["name"])


def _mount_fields(agents: list[aapi.AgentIdentity], container: str) -> dict[str, Any]:
    """What a client needs to mount the engaged container's volumes (from its agent)."""
    if not agents:
        return {}
    return {
        "mount_policies": agents[0].mount_policies.get(container, {}),
        "mount_point": f"{agentconfig.MOUNT_PREFIX}/{container}",
        "sftp_port": agents[0].sftp_port,
    }
