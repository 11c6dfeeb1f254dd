"""Engagements on the manager: agents' sessions, clients' engagements, and the pairing of an
agent's stream with the engaging client's dial-back stream (see tele.rpc.agent_api).

The flow of one ENGAGE (seeds 001 and 004): find the workload, make its agent configuration,
check that the requested service port is unambiguous and free, make sure the workload's pods
run an agent (evict them so that the webhook injects it; patch the workload when a disruption
budget refuses), wait for an agent to arrive, then activate and tell the agents.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from tele.contracts import agentconfig
from tele.k8s import client as k8s
from tele.k8s.client import ApiError
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

_ENGAGEMENT_ID = re.compile(r"[0-9a-f]{16}")

AGENT_LEASE = 15.0
DIAL_BACK_TIMEOUT = 10.0
RESTORE_TIMEOUT = 30.0
MAX_PENDING_DIALS = 256
MAX_PENDING_RESTORES = 1024
ORPHAN_GRACE = 60.0
"""Seconds a new manager gives replacing clients to engage again before it rolls back the
pods they had replaced (their daemons do so as soon as they arrive anew)."""
KINDS = ("intercept", "replace", "ingest")
PAST_TENSE = {"intercept": "intercepted", "replace": "replaced", "ingest": "ingested"}


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
    active: dict[tuple[str, str], Active] = field(default_factory=dict)
    """By (client session, engagement name): names are unique per session; across sessions
    only ingests may share one."""
    _changed: trio.Event = field(default_factory=trio.Event)
    _dials: dict[str, ClientDials] = field(default_factory=dict)
    _pending: dict[str, trio.MemorySendChannel[tuple[H2Stream, trio.Event]]] = field(
        default_factory=dict
    )
    _replacing: dict[tuple[tuple[str, str, str], str], str] = field(default_factory=dict)
    """(workload key, container) of replaces being prepared -> the replacing client."""
    _restarted: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """Workload key -> the generation our last restart patch made (its controller is rolling)."""

    def __post_init__(self) -> None:
        self._restores_send, self._restores_receive = trio.open_memory_channel[
            tuple[str, str, str]
        ](MAX_PENDING_RESTORES)

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
        return aapi.AgentSessionInfo(
            session_id=session.session_id,
            lease_seconds=AGENT_LEASE,
            manager_ips=[self.manager.config.pod_ip] if self.manager.config.pod_ip else [],
        )

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
            for session_id, s in self.agents.sessions.items()
            if (s.identity.namespace, s.identity.pod_name) == where
        ]
        for session_id in gone:
            self.agents.depart(session_id)
            log.info("agent of pod %s/%s ended with its pod", *where)
        if gone:
            self._notify()

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
        """One flow for the three kinds: find the workload and the container (and its ports),
        refuse conflicts, make sure the pods run an agent with the wanted configuration (a
        replace rolls them without the container), wait for such an agent, then activate.
        Nothing is left behind when a step fails: a replace that does not activate rolls the
        pods back."""
        session = self.manager.client_session(request.session_id)
        kind = request.kind
        if kind not in KINDS:
            raise RpcError(Code.INVALID_ARGUMENT, f"unknown engagement kind {kind!r}")
        view = self.manager.view
        if not view.is_managed(request.namespace):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"namespace {request.namespace} is not managed by this traffic manager",
            )
        workload = self._find_workload(request.namespace, request.workload)
        key = (str(workload["kind"]), request.namespace, request.workload)
        container = request.container
        if kind != "intercept":
            container = _pick_container(workload, request)
        name = request.name or (
            f"{request.workload}/{container}" if kind == "ingest" else request.workload
        )
        mine = self.active.get((request.session_id, name))
        if mine is not None:
            if mine.info.kind != kind:
                raise RpcError(
                    Code.ALREADY_EXISTS,
                    f"you already have a {mine.info.kind} named {name}; leave it first",
                )
            return mine.info
        if kind != "ingest":
            for other in self.active.values():
                if other.info.name == name and other.info.kind != "ingest":
                    raise RpcError(
                        Code.ALREADY_EXISTS, f"{name} is already engaged by {other.info.client}"
                    )
        replaced = self.replaced_containers(key) | ({container} if kind == "replace" else set())
        config = self._config(workload, key, replaced, require_service=kind == "intercept")
        chosen: list[agentconfig.Intercept] = []
        if kind == "intercept":
            container, chosen = self._choose(config, request)
        elif kind == "replace":
            chosen = _container_ports(config, container, request)
        self._check_conflicts(key, container, chosen, request, session.label)
        pending = (key, container)
        if kind == "replace":
            self._replacing[pending] = session.label
        activated = False
        try:
            agents = await self._ensure_agent(key, workload, request.agent_timeout)
            info = self._activate(request, session.label, key, name, container, chosen, agents)
            activated = True
        finally:
            if kind == "replace":
                del self._replacing[pending]
                if not activated:
                    # Give the container back (shielded: the caller may have given up).
                    with trio.CancelScope(shield=True), trio.move_on_after(10):
                        await self._restore(key)
        log.info("%s engaged %s %s/%s (%s)", session.label, key[0], key[1], key[2], kind)
        self._notify()
        return info

    def _activate(
        self,
        request: aapi.EngageRequest,
        client: str,
        key: tuple[str, str, str],
        name: str,
        container: str,
        chosen: list[agentconfig.Intercept],
        agents: list[aapi.AgentIdentity],
    ) -> aapi.EngagementInfo:
        engagement_id = request.engagement_id
        taken = {a.engagement.id for a in self.active.values()}
        if not _ENGAGEMENT_ID.fullmatch(engagement_id) or engagement_id in taken:
            engagement_id = secrets.token_hex(8)
        first = chosen[0] if chosen else None
        mechanism = request.mechanism if request.kind == "intercept" else "tcp"
        info = aapi.EngagementInfo(
            id=engagement_id,
            name=name,
            namespace=request.namespace,
            workload=request.workload,
            workload_kind=key[0],
            container=container,
            service=first.service_name if first else "",
            service_port=first.service_port if first else 0,
            container_port=first.container_port if first else 0,
            mechanism=mechanism,
            client=client,
            pod_ips=[a.pod_ip for a in agents],
            environment=agents[0].environment.get(container, {}) if agents else {},
            mounts=agents[0].mounts.get(container, []) if agents else [],
            **_mount_fields(agents, container),
            kind=request.kind,
            decrypted=mechanism == "http" and any(a.terminates_tls for a in agents),
            ports=[
                aapi.EngagedPort(
                    container_port=i.container_port,
                    service=i.service_name,
                    service_port=i.service_port,
                    service_port_name=i.service_port_name,
                    protocol=i.protocol,
                )
                for i in chosen
            ],
        )
        engagement = aapi.Engagement(
            id=engagement_id,
            container=container,
            agent_port=first.agent_port if first else 0,
            agent_ports=[i.agent_port for i in chosen[1:]],
            mechanism=mechanism,
            headers=request.headers,
            path_equal=request.path_equal,
            path_prefix=request.path_prefix,
            path_regex=request.path_regex,
            client=client,
            kind=request.kind,
        )
        self.active[(request.session_id, name)] = Active(
            info=info, session_id=request.session_id, workload_key=key, engagement=engagement
        )
        self._client_dials(request.session_id)  # dial requests wait there for the client
        return info

    def replaced_containers(self, key: tuple[str, str, str]) -> frozenset[str]:
        """The containers of a workload that its pods must be made without, now: those of
        active replaces and of replaces being prepared (what the webhook asks)."""
        names = {
            a.info.container
            for a in self.active.values()
            if a.workload_key == key and a.info.kind == "replace"
        }
        names |= {container for (k, container) in self._replacing if k == key}
        return frozenset(names)

    def _config(
        self,
        workload: dict[str, Any],
        key: tuple[str, str, str],
        replaced: Collection[str],
        *,
        require_service: bool,
    ) -> agentconfig.AgentConfig:
        try:
            return agentconfig.generate(
                workload=workload,
                services=[s for (ns, _), s in self.manager.view.services.items() if ns == key[1]],
                manager_namespace=self.manager.config.namespace,
                agent_image=self.manager.config.agent_image,
                agent_port=self.manager.config.agent_port,
                default_mount_policies=self.manager.config.mount_policies,
                replaced=replaced,
                require_service=require_service,
            )
        except agentconfig.NotInterceptable as exc:
            raise RpcError(Code.FAILED_PRECONDITION, f"{key[2]} cannot be engaged: {exc}") from None

    def _find_workload(self, namespace: str, name: str) -> dict[str, Any]:
        for kind in ("Deployment", "StatefulSet", "Rollout", "ReplicaSet"):
            found = self.manager.view.workloads.get((kind, namespace, name))
            if found is not None:
                return dict(found)
        # Rollouts are not even watched unless enabled: say how, in case it is one.
        hint = (
            ""
            if "argoRollouts" in self.manager.config.workloads
            else " (Argo Rollouts are seen only with the Helm value "
            "workloads.argoRollouts.enabled=true)"
        )
        raise RpcError(Code.NOT_FOUND, f"no workload named {name} in namespace {namespace}{hint}")

    @staticmethod
    def _choose(
        config: agentconfig.AgentConfig, request: aapi.EngageRequest
    ) -> tuple[str, list[agentconfig.Intercept]]:
        """The container and the service ports a (multi-port) intercept takes, in the order
        the request names them; each must be unambiguous, and all in one container."""
        wanted = request.ports or [request.port]
        chosen: list[tuple[str, agentconfig.Intercept]] = []
        for port in wanted:
            candidates = [
                (container, intercept)
                for container, intercept in config.intercepts()
                if intercept.service_name  # a replaced container's own ports are no service's
                and (not request.container or container == request.container)
                and (not request.service or intercept.service_name == request.service)
                and (not port or port in (intercept.service_port_name, str(intercept.service_port)))
            ]
            if not candidates:
                raise RpcError(
                    Code.NOT_FOUND,
                    f"{request.workload} has no service port matching"
                    f"{' service ' + request.service if request.service else ''}"
                    f"{' port ' + port if port else ''}",
                )
            if len(candidates) > 1:
                choices = ", ".join(
                    f"{i.service_name}:{i.service_port_name or i.service_port}"
                    for _, i in candidates
                )
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"{request.workload} has several service ports ({choices}); "
                    "choose one with --service and --port",
                )
            if candidates[0] in chosen:
                raise RpcError(Code.INVALID_ARGUMENT, f"port {port} is named twice")
            chosen.append(candidates[0])
        containers = sorted({container for container, _ in chosen})
        if len(containers) > 1:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"the ports lead to different containers ({', '.join(containers)}); "
                "intercept each container separately",
            )
        return containers[0], [intercept for _, intercept in chosen]

    def _check_conflicts(
        self,
        key: tuple[str, str, str],
        container: str,
        chosen: list[agentconfig.Intercept],
        request: aapi.EngageRequest,
        client: str,
    ) -> None:
        """A replace takes a whole container, a tcp intercept a whole port; http intercepts
        share a port when their filters differ; ingests never conflict."""
        if request.kind == "ingest":
            return
        being_replaced = self._replacing.get((key, container))
        if being_replaced is not None:
            raise RpcError(
                Code.ALREADY_EXISTS,
                f"container {container} of {request.workload} is being replaced by "
                f"{being_replaced}",
            )
        ports = {i.container_port for i in chosen}
        for other in self.active.values():
            if (
                other.workload_key != key
                or other.info.kind == "ingest"
                or other.info.container != container
            ):
                continue
            if "replace" in (other.info.kind, request.kind):
                raise RpcError(
                    Code.ALREADY_EXISTS,
                    f"container {container} of {request.workload} is already "
                    f"{PAST_TENSE[other.info.kind]} by {other.info.client} ({other.info.name})",
                )
            shared = ports & {p.container_port for p in other.info.ports}
            if shared and (
                "tcp" in (other.engagement.mechanism, request.mechanism)
                or (
                    other.engagement.headers == request.headers
                    and other.engagement.path_prefix == request.path_prefix
                    and other.engagement.path_equal == request.path_equal
                    and other.engagement.path_regex == request.path_regex
                )
            ):
                taken = next(i for i in chosen if i.container_port in shared)
                raise RpcError(
                    Code.ALREADY_EXISTS,
                    f"port {taken.service_port or taken.container_port} of {request.workload} "
                    f"is already engaged by {other.info.client} ({other.info.name})",
                )

    async def _ensure_agent(
        self, key: tuple[str, str, str], workload: dict[str, Any], timeout: float
    ) -> list[aapi.AgentIdentity]:
        """Roll the pods that are not as wanted (no agent, or another set of replaced
        containers) and wait until none is left and an agent of the wanted kind is up."""
        self.manager.agent_workloads.add(key)  # new pods of the workload keep getting one
        with trio.move_on_after(timeout):
            while True:
                # Taken before looking, so a change while we look (or evict) is not missed.
                changes = (self._changed, self.manager.view_changed())
                replaced = self.replaced_containers(key)
                if await self._roll(key, workload, want_agent=True, replaced=replaced) == 0:
                    ready = [a for a in self.agents_of(key) if set(a.replaced) == replaced]
                    if ready:
                        return ready
                await _first_of(*changes)
        raise RpcError(
            Code.DEADLINE_EXCEEDED,
            f"no traffic agent of {key[0]} {key[1]}/{key[2]} arrived within {timeout:g}s",
        )

    async def _roll(
        self,
        key: tuple[str, str, str],
        workload: dict[str, Any],
        *,
        want_agent: bool,
        replaced: frozenset[str] = frozenset(),
    ) -> int:
        """Evict the workload's live pods that are not as wanted (agent or not; which
        containers replaced), so that the webhook makes their replacements right; a disruption
        budget that refuses gets a rollout instead. Returns how many pods were not as wanted."""
        pods = [
            pod
            for (ns, _), pod in list(self.manager.view.pods.items())
            if ns == key[1]
            and _owner_name(self.manager.view.workload_of(pod, ns)) == key[2]
            and _live(pod)
        ]
        wrong = [pod for pod in pods if not _as_wanted(pod, want_agent, replaced)]
        for pod in wrong:
            try:
                await self.manager.kube.evict(pod["metadata"]["name"], key[1])
            except ApiError as exc:
                if exc.code == 404:
                    continue
                if exc.code != 429:
                    raise
                log.info("eviction refused (%s); rolling the workload out instead", exc.message)
                await self._restart_workload(key, workload)
                break
        return len(wrong)

    async def _restore(self, key: tuple[str, str, str]) -> None:
        """After a replace: roll the pods back to what the remaining engagements want."""
        workload = self.manager.view.workloads.get(key)
        if workload is None:
            return
        try:
            await self._roll(
                key, dict(workload), want_agent=True, replaced=self.replaced_containers(key)
            )
        except ApiError as exc:
            log.warning("cannot roll %s %s/%s back after a replace: %s", *key, exc.message)

    async def serve_restores(self, *, orphan_grace: float = ORPHAN_GRACE) -> NoReturn:
        """Roll workloads back after replaces that ended with their session (which happens
        in synchronous code: the reaper, a departure); once, `orphan_grace` seconds after the
        start, also those a previous manager left replaced (see `restore_orphans`)."""
        async with trio.open_nursery() as nursery:

            async def orphans() -> None:
                await trio.sleep(orphan_grace)
                await self.restore_orphans()

            nursery.start_soon(orphans)
            async for key in self._restores_receive:
                await self._restore(key)
        raise AssertionError("unreachable")  # pragma: no cover

    async def restore_orphans(self) -> list[tuple[str, str, str]]:
        """Roll back the workloads whose pods were made for a replace that nobody holds now:
        a new manager pod starts without engagements, and a replacing client that does not
        come back (its daemon engages again after arriving anew) must not leave the container
        out for good. Returns the workloads rolled back."""
        orphaned = set()
        for (namespace, _), pod in list(self.manager.view.pods.items()):
            config = agentconfig.pod_config(pod)
            if not _live(pod) or config is None or not config.replaced():
                continue
            workload = self.manager.view.workload_of(pod, namespace)
            if workload is None:
                continue
            key = (str(workload.get("kind")), namespace, str(workload["metadata"]["name"]))
            if not set(config.replaced()) <= self.replaced_containers(key):
                orphaned.add(key)
        for key in sorted(orphaned):
            log.info("rolling %s %s/%s back: no client replaces its container now", *key)
            await self._restore(key)
        return sorted(orphaned)

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
        # Once per spec: while the controller rolls out our last restart, the old pods are
        # still there and their evictions still refused; restarting again would only make
        # a new ReplicaSet per view change.
        live = self.manager.view.workloads.get(key) or workload
        generation = int((live.get("metadata") or {}).get("generation") or 0)
        if generation and generation <= self._restarted.get(key, 0):
            return
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
        patched = await self.manager.kube.patch(resource, key[2], patch, key[1])
        self._restarted[key] = int(patched["metadata"].get("generation") or 0)

    async def leave(self, request: aapi.LeaveRequest) -> Empty:
        active = self.active.pop((request.session_id, request.name), None)
        if active is None:
            raise RpcError(Code.NOT_FOUND, f"no engagement named {request.name} of this session")
        log.info("%s left %s", active.info.client, request.name)
        self._notify()
        if active.info.kind == "replace":
            await self._restore_and_wait(active.workload_key)
        return Empty()

    async def _restore_and_wait(self, key: tuple[str, str, str]) -> None:
        """Roll the pods back after a replace and wait (bounded) until an agent of a pod with
        the container running again arrived: when `tele leave` returns, the cluster's app
        answers again. The engagement is over either way; a slow roll is only logged."""
        workload = self.manager.view.workloads.get(key)
        if workload is None:
            return
        try:
            await self._ensure_agent(key, dict(workload), RESTORE_TIMEOUT)
        except ApiError as exc:
            log.warning("cannot roll %s %s/%s back after a replace: %s", *key, exc.message)
        except RpcError:
            log.warning("%s %s/%s: the container is not back within %gs", *key, RESTORE_TIMEOUT)

    def end_session(self, session_id: str) -> None:
        """A client departed or expired: its engagements end, its pending dials fail, and the
        containers it replaced come back (rolled by `serve_restores`)."""
        ended = [slot for slot, a in self.active.items() if a.session_id == session_id]
        restore = set()
        for slot in ended:
            gone = self.active.pop(slot)
            if gone.info.kind == "replace":
                restore.add(gone.workload_key)
        for key in sorted(restore):
            try:
                self._restores_send.send_nowait(key)
            except trio.WouldBlock:
                log.warning("too many roll-backs queued; %s %s/%s keeps its pods", *key)
        dials = self._dials.pop(session_id, None)
        if dials is not None:
            dials.send.close()
        if ended:
            log.info("engagements %s ended with their session", ", ".join(n for _, n in ended))
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


async def _first_of(*events: trio.Event) -> None:
    """Until any of `events` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def _live(pod: Any) -> bool:
    """A pod that is (or will be) running: not deleted, not finished."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def _as_wanted(pod: Any, want_agent: bool, replaced: frozenset[str]) -> bool:
    has_agent = any(c.get("name") == agentconfig.AGENT_CONTAINER for c in pod["spec"]["containers"])
    if has_agent != want_agent:
        return False
    if not has_agent:
        return True
    config = agentconfig.pod_config(pod)
    return frozenset(config.replaced() if config else ()) == replaced


def _pick_container(workload: Any, request: aapi.EngageRequest) -> str:
    """The container a replace or ingest is about: the named one, or the only one."""
    template = (workload.get("spec") or {}).get("template") or {}
    names = [str(c["name"]) for c in (template.get("spec") or {}).get("containers") or []]
    if request.container:
        if request.container not in names:
            raise RpcError(
                Code.NOT_FOUND,
                f"{request.workload} has no container named {request.container} "
                f"(it has {', '.join(names) or 'none'})",
            )
        return request.container
    if len(names) != 1:
        raise RpcError(
            Code.FAILED_PRECONDITION,
            f"{request.workload} has several containers ({', '.join(names)}); "
            "choose one with --container",
        )
    return names[0]


def _container_ports(
    config: agentconfig.AgentConfig, container: str, request: aapi.EngageRequest
) -> list[agentconfig.Intercept]:
    """The ports a replace takes: every TCP port of the container (the agent serves TCP), or
    those the request names (container port names or numbers)."""
    own = [
        i for name, i in config.intercepts() if name == container and i.protocol.upper() == "TCP"
    ]
    wanted = [p for p in request.ports if p] or ([request.port] if request.port else [])
    if not wanted:
        return own
    chosen = []
    for port in wanted:
        # A container port by name or number; else (`intercept --replace`) a service port.
        found = next(
            (i for i in own if port in (i.container_port_name, str(i.container_port))), None
        ) or next(
            (
                i
                for i in own
                if i.service_name and port in (i.service_port_name, str(i.service_port))
            ),
            None,
        )
        if found is None:
            have = ", ".join(str(i.container_port) for i in own) or "none"
            raise RpcError(
                Code.NOT_FOUND,
                f"container {container} of {request.workload} has no TCP port {port} "
                f"(it has {have})",
            )
        if found not in chosen:
            chosen.append(found)
    return chosen
