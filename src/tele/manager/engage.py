"""Engagements on the manager: the ENGAGE / LEAVE / UNINSTALL flows and the agents' view of them.

The flow of one ENGAGE (seeds 001 and 004): find the workload, make its agent configuration,
check that the requested service port is unambiguous and free (`table.EngagementTable`, pure),
make sure the workload's pods run an agent (`rollouts.Rollouts`: evict them so that the webhook
injects it; patch the workload when a disruption budget refuses), wait for an agent to arrive
(`agents.AgentRegistry`), then activate and tell the agents. Connections the agents take are
paired with the client's dial-back streams by `dialback.DialBack`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from tele import __version__
from tele.contracts import agentconfig
from tele.manager.agents import AgentRegistry
from tele.manager.auth import audit_line
from tele.manager.changes import Changes
from tele.manager.dialback import DialBack
from tele.manager.proxyvia import ProxyVia
from tele.manager.rollouts import Rollouts
from tele.manager.sessions import Session
from tele.manager.state import AgentWorkloads
from tele.manager.table import (
    KINDS,
    TAKES_SERVICE_PORTS,
    EngagementTable,
    WorkloadKey,
    choose_ports,
    container_ports,
    pick_container,
)
from tele.manager.view import ClusterView
from tele.manager.withhold import Source, Withheld, likely_sources
from tele.rpc import agent_api as aapi
from tele.rpc import filters
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import Empty
from tele.rpc.server import Router

log = logging.getLogger(__name__)

JudgeExports = Callable[[dict[str, Any], str, dict[str, str], str], Awaitable[Withheld]]


@dataclass(frozen=True)
class AgentSettings:
    """What the manager's configuration (Helm values) says about the agents it installs; the
    injector and the engagements make every agent configuration with `config`."""

    manager_namespace: str
    agent_image: str
    agent_port: int
    manager_port: int = api.DEFAULT_PORT
    """Helm `apiPort`: where agents reach the manager."""
    log_level: str = "info"
    pull_policy: str = ""
    resources: dict[str, Any] = field(default_factory=dict)
    inject_policy: str = "OnDemand"
    """OnDemand: engaging a workload injects its agent; WhenEnabled: only workloads whose pod
    template says `inject-traffic-agent: enabled` get one (engaging others is refused)."""
    arrival_timeout: float = 30.0
    """Helm `timeouts.agentArrival`: the longest an engagement waits for its agent."""
    mount_policies: dict[str, str] = field(default_factory=dict)
    rollouts_watched: bool = False
    """Argo Rollouts are watched (the Helm value workloads.argoRollouts.enabled)."""

    def config(
        self,
        workload: agentconfig.Obj,
        services: Iterable[agentconfig.Obj],
        replaced: Collection[str],
        *,
        require_service: bool,
    ) -> agentconfig.AgentConfig:
        """The agent configuration of `workload` (NotInterceptable when it cannot have one)."""
        return agentconfig.generate(
            workload=workload,
            services=services,
            manager_namespace=self.manager_namespace,
            agent_image=self.agent_image,
            manager_port=self.manager_port,
            agent_port=self.agent_port,
            log_level=self.log_level,
            pull_policy=self.pull_policy,
            resources=self.resources,
            default_mount_policies=self.mount_policies,
            replaced=replaced,
            require_service=require_service,
        )


class Engagements:
    """The engagement RPCs: clients engage, leave and uninstall; agents watch their workload's
    engagements. Each step is one part's: the table, the agents, the roll-outs, the dials."""

    def __init__(
        self,
        *,
        view: ClusterView,
        client_session: Callable[[str], Session[api.ClientIdentity]],
        table: EngagementTable,
        agents: AgentRegistry,
        rollouts: Rollouts,
        dials: DialBack,
        agent_workloads: AgentWorkloads,
        changes: Changes,
        settings: AgentSettings,
        absent: Collection[str] = frozenset(),
        authorize: Callable[[str, str, str, str], Awaitable[None]] | None = None,
        judge_exports: JudgeExports | None = None,
        prefetch_exports: Callable[[str, set[Source]], Awaitable[None]] | None = None,
        proxy_via: ProxyVia | None = None,
    ) -> None:
        self._proxy_via = proxy_via if proxy_via is not None else ProxyVia(agent_sessions=list)
        self._prefetch_exports = prefetch_exports
        self._authorize = authorize
        self._judge_exports = judge_exports
        """(pod spec, container, mount policies, namespace) -> what the caller may not read."""
        """(kind, workload kind, namespace, workload name) -> None, or RpcError: RBAC."""
        self._view = view
        self._client_session = client_session
        self._table = table
        self._agents = agents
        self._rollouts = rollouts
        self._dials = dials
        self._agent_workloads = agent_workloads
        self._changes = changes
        self._settings = settings
        self._absent = absent
        """Client sessions with no connection now: their engagements are not given to agents."""
        self._tap_counters: dict[str, dict[str, aapi.TapCounters]] = {}
        self._pods_followed: trio.Event | None = None
        """The change notice the serving pods were last followed for: every client's watch
        wakes on each change, and one look at the engagements per change is enough."""
        """Agent session -> its wiretaps' counters by engagement id (only live wiretaps of its
        own workload are kept: what an agent says cannot grow this)."""

    def register(self, router: Router) -> None:
        router.unary(aapi.ARRIVE_AS_AGENT, self._agents.arrive)
        router.stream(aapi.WATCH_ENGAGEMENTS, self.watch_engagements)
        router.unary(aapi.ENGAGE, self.engage)
        router.unary(aapi.LEAVE, self.leave)
        router.unary(aapi.UNINSTALL, self.uninstall)
        router.stream(aapi.WATCH_DIALS, self.watch_dials)
        router.stream(aapi.WATCH_SERVING, self.watch_serving)
        router.unary(aapi.PROXY_VIA, self.proxy_via)
        router.stream(aapi.WATCH_PROXY_DIALS, self.watch_proxy_dials)
        router.unary(aapi.REPORT_TAPS, self.report_taps)
        router.unary(aapi.TAP_COUNTERS, self.tap_counters)

    # --- agents ---------------------------------------------------------------------------------

    async def watch_engagements(
        self, request: api.SessionRequest
    ) -> AsyncIterator[aapi.EngagementList]:
        session = self._agents.of_caller(request.session_id)
        if session is None:
            raise RpcError(Code.NOT_FOUND, "unknown agent session; arrive again")
        identity = session.identity
        key = (identity.workload_kind, identity.namespace, identity.workload_name)
        last: aapi.EngagementList | None = None
        while self._agents.get(request.session_id) is not None:
            current = aapi.EngagementList(
                engagements=[
                    a.engagement
                    for a in self._table.of_workload(key)
                    if a.session_id not in self._absent
                ]
            )
            if current != last:
                yield current
                last = current
            await self._changes.event.wait()

    async def watch_proxy_dials(self, request: api.SessionRequest) -> AsyncIterator[aapi.ProxyDial]:
        if self._agents.of_caller(request.session_id) is None:
            raise RpcError(Code.NOT_FOUND, "unknown agent session; arrive again")
        async for dial in self._proxy_via.watch(request.session_id):
            yield dial

    async def report_taps(self, request: aapi.TapReport) -> Empty:
        session = self._agents.of_caller(request.session_id)
        if session is None:
            raise RpcError(Code.NOT_FOUND, "unknown agent session; arrive again")
        identity = session.identity
        key = (identity.workload_kind, identity.namespace, identity.workload_name)
        live = {
            a.engagement.id for a in self._table.of_workload(key) if a.info.kind == aapi.WIRETAP
        }
        self._tap_counters[request.session_id] = {
            k: v for k, v in request.taps.items() if k in live
        }
        return Empty()

    async def tap_counters(self, request: api.SessionRequest) -> aapi.TapCountersReply:
        """The caller's wiretaps' counters, summed over the agents that report them."""
        self._client_session(request.session_id)
        for gone in [s for s in self._tap_counters if self._agents.get(s) is None]:
            del self._tap_counters[gone]
        mine = {
            a.engagement.id
            for a in self._table.active.values()
            if a.session_id == request.session_id and a.info.kind == aapi.WIRETAP
        }
        sums: dict[str, aapi.TapCounters] = {}
        for counters in self._tap_counters.values():
            for engagement_id, c in counters.items():
                if engagement_id not in mine:
                    continue
                was = sums.get(engagement_id, aapi.TapCounters())
                sums[engagement_id] = aapi.TapCounters(
                    **{
                        field: getattr(was, field) + getattr(c, field)
                        for field in aapi.TapCounters.__struct_fields__
                    }
                )
        return aapi.TapCountersReply(taps=sums)

    # --- clients --------------------------------------------------------------------------------

    async def engage(self, request: aapi.EngageRequest) -> aapi.EngagementInfo:
        """One flow for the three kinds: find the workload and the container (and its ports),
        refuse conflicts, make sure the pods run an agent with the wanted configuration (a
        replace rolls them without the container), wait for such an agent, then activate.
        Nothing is left behind when a step fails: a replace that does not activate rolls the
        pods back."""
        session = self._client_session(request.session_id)
        kind = request.kind
        if kind not in KINDS:
            raise RpcError(Code.INVALID_ARGUMENT, f"Unknown engagement kind {kind!r}.")
        if kind == aapi.WIRETAP and api.WIRETAP_CHANNELS not in session.identity.capabilities:
            # An older client would give the copy channel's records to its handler as if they
            # were the caller's bytes: refuse it, saying what to do (other kinds still work).
            raise RpcError(Code.FAILED_PRECONDITION, wiretap_needs_newer_client(session.identity))
        refused = filters.problem(
            request.headers, request.path_equal, request.path_prefix, request.path_regex
        )
        filtered = bool(request.headers or request.path_equal or request.path_prefix)
        filtered = filtered or bool(request.path_regex)
        if not refused and filtered and (kind != "intercept" or request.mechanism != "http"):
            refused = "HTTP filters need an intercept with --mechanism http"
        if refused:
            # The agent could not match it: never report such an engagement ACTIVE.
            raise RpcError(Code.INVALID_ARGUMENT, refused)
        self._check_namespace(request.namespace)
        workload = await self._find_workload(request.namespace, request.workload)
        if _no_replicas(workload):
            # No pod will ever run an agent: say so now, not after the agent timeout.
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"{workload['kind']} {request.namespace}/{request.workload} has 0 replicas: "
                f"scale it up first (kubectl scale -n {request.namespace} "
                f"{str(workload['kind']).lower()}/{request.workload} --replicas=1).",
            )
        key = (str(workload["kind"]), request.namespace, request.workload)
        template = (workload.get("spec") or {}).get("template") or {}
        inject = f"{agentconfig.ANNOTATION_PREFIX}{agentconfig.INJECT_ANNOTATION}"
        if (
            self._settings.inject_policy == "WhenEnabled"
            and agentconfig.injection_policy(template) != "enabled"
        ):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"The traffic manager injects agents only into workloads whose pod template is "
                f"annotated {inject}: enabled (Helm agentInjector.injectPolicy "
                f"WhenEnabled); annotate {key[0]} "
                f"{request.namespace}/{request.workload} first.",
            )
        if self._authorize is not None:
            denied: RpcError | None = None
            async with trio.open_nursery() as nursery:
                # What it may be handed is asked meanwhile (manager.withhold): cached for later.
                if self._prefetch_exports is not None:
                    spec = ((workload.get("spec") or {}).get("template") or {}).get("spec") or {}
                    nursery.start_soon(self._prefetch_exports, key[1], likely_sources(spec))
                try:
                    await self._authorize(kind, key[0], key[1], key[2])
                except RpcError as exc:  # raised outside the nursery: not in a group
                    denied = exc
                    nursery.cancel_scope.cancel()
            if denied is not None:
                raise denied
        template = (workload.get("spec") or {}).get("template") or {}
        if kind == "replace" and agentconfig.manually_injected(template):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"The traffic agent of {request.workload} was injected by hand "
                f"({agentconfig.ANNOTATION_PREFIX}{agentconfig.MANUALLY_INJECTED_ANNOTATION}): "
                "its containers cannot be replaced; intercept its ports instead.",
            )
        container = request.container
        if kind not in TAKES_SERVICE_PORTS:
            container = pick_container(workload, request)
        name = request.name or (
            f"{request.workload}/{container}" if kind == "ingest" else request.workload
        )
        table = self._table
        self._follow_serving_pods()
        existing = table.existing(request, name)
        if existing is not None:
            return existing
        replaced = table.replaced_containers(key) | ({container} if kind == "replace" else set())
        config = self._config(workload, key, replaced, require_service=kind in TAKES_SERVICE_PORTS)
        chosen: list[agentconfig.Intercept] = []
        if kind in TAKES_SERVICE_PORTS:
            container, chosen = choose_ports(config, request)
        elif kind == "replace":
            chosen = container_ports(config, container, request)
        table.check_conflicts(key, container, chosen, request)
        pending = (key, container)
        if kind == "replace":
            table.replacing[pending] = session.label
        activated = False
        try:
            timeout = min(request.agent_timeout, self._settings.arrival_timeout)
            try:
                arrived = await self._rollouts.ensure_agent(key, workload, timeout)
            except RpcError as exc:
                raise self._unreachable_manager(exc, key, timeout, config) from None
            agents = self._serving_first(arrived)
            agents, withheld = await self._withhold(agents, workload, key, container)
            info = table.activate(
                request,
                session.label,
                key,
                name,
                container,
                chosen,
                agents,
                withheld=withheld.notes,
                mount_error=withheld.volumes,
            )
            self._dials.client_dials(request.session_id)  # dial requests wait there
            activated = True
        finally:
            if kind == "replace":
                del table.replacing[pending]
                if not activated:
                    # Give the container back (shielded: the caller may have given up).
                    with trio.CancelScope(shield=True), trio.move_on_after(10):
                        await self._rollouts.restore(key)
        log.info("%s engaged %s %s/%s (%s)", session.label, key[0], key[1], key[2], kind)
        audit_line(
            "engagement-start",
            session=request.session_id,
            kind=kind,
            workload=f"{key[0]} {key[1]}/{key[2]}",
            name=name,
            container=container,
        )
        self._changes.notify()
        return info

    async def proxy_via(self, request: aapi.ProxyViaRequest) -> aapi.ProxyViaReply:
        """--proxy-via CIDR=WORKLOAD: the caller may engage the workload (the same RBAC as an
        intercept), its pods can run an agent, and one runs; then its route id."""
        session = self._client_session(request.session_id)
        self._check_namespace(request.namespace)
        workload = await self._find_workload(request.namespace, request.workload)
        key = (str(workload["kind"]), request.namespace, request.workload)
        if _no_replicas(workload):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"{key[0]} {key[1]}/{key[2]} has 0 replicas: no pod can dial for --proxy-via",
            )
        if self._authorize is not None:
            await self._authorize("proxy-via", *key)
        try:
            services = [s for (ns, _), s in self._view.services.items() if ns == key[1]]
            replaced = self._table.replaced_containers(key)
            self._settings.config(workload, services, replaced, require_service=False)
        except agentconfig.NotInterceptable as exc:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"{key[0]} {key[1]}/{key[2]} cannot run a traffic agent for --proxy-via: {exc}",
            ) from None
        agents = self._agents.of_workload(key) or await self._rollouts.ensure_agent(
            key, workload, min(request.agent_timeout, self._settings.arrival_timeout)
        )
        try:
            route_id = self._proxy_via.add(request.session_id, key)
        except ValueError as exc:
            raise RpcError(Code.RESOURCE_EXHAUSTED, str(exc)) from None
        log.info("%s proxies through %s %s/%s", session.label, *key)
        audit_line("proxy-via", session=request.session_id, workload=f"{key[0]} {key[1]}/{key[2]}")
        return aapi.ProxyViaReply(
            route_id=route_id,
            workload_kind=key[0],
            pods=sorted(f"{a.namespace}/{a.pod_name}" for a in agents),
        )

    async def _withhold(
        self,
        agents: list[aapi.AgentIdentity],
        workload: dict[str, Any],
        key: WorkloadKey,
        container: str,
    ) -> tuple[list[aapi.AgentIdentity], Withheld]:
        """The agents as the caller may see them: environment values and volumes from
        Secrets/ConfigMaps it may not `get` left out (manager.withhold)."""
        if self._judge_exports is None or not agents:
            return agents, Withheld()
        pod = self._view.pods.get((key[1], agents[0].pod_name)) or {}
        template = (workload.get("spec") or {}).get("template") or {}
        spec = pod.get("spec") or template.get("spec") or {}
        policies = agents[0].mount_policies.get(container, {})
        withheld = await self._judge_exports(spec, container, policies, key[1])
        if not withheld.env and not withheld.volumes:
            return agents, withheld
        shown = []
        for agent in agents:
            env = {
                k: v
                for k, v in agent.environment.get(container, {}).items()
                if k not in withheld.env
            }
            ports = dict(agent.sftp_ports)
            if withheld.volumes:
                ports.pop(container, None)
            shown.append(
                msgspec.structs.replace(
                    agent,
                    environment={**agent.environment, container: env},
                    sftp_ports=ports,
                    sftp_port=0 if withheld.volumes else agent.sftp_port,
                )
            )
        return shown, withheld

    async def watch_serving(self, request: api.SessionRequest) -> AsyncIterator[aapi.ServingPods]:
        """The pod serving each of the caller's engagements: at once, then on every change."""
        last: aapi.ServingPods | None = None
        while True:
            self._client_session(request.session_id)  # ends the stream with the session
            self._follow_serving_pods()
            current = aapi.ServingPods(
                pods=[
                    aapi.ServingPod(
                        engagement_id=a.info.id,
                        name=a.info.name,
                        pod_name=a.info.pod_name,
                        pod_ips=a.info.pod_ips,
                        sftp_port=a.info.sftp_port,
                        mount_point=a.info.mount_point,
                        agent=self._agents.arrival(a.info.namespace, a.info.pod_name),
                    )
                    for a in self._table.active.values()
                    if a.session_id == request.session_id
                ]
            )
            if current != last:
                yield current
                last = current
            await self._changes.event.wait()

    def _follow_serving_pods(self) -> None:
        """An engagement whose pod has no agent any more (the pod was deleted, evicted or
        rolled) is served from then on by the pods whose agents of the workload are up, the
        first live and ready one first; until one is up it keeps the pod it had. One whose
        pod's agent arrived again (restarted there) gets its new file server port."""
        if self._pods_followed is self._changes.event:
            return  # nothing changed since the last look
        self._pods_followed = self._changes.event
        for slot, active in list(self._table.active.items()):
            agents = self._agents.of_workload(active.workload_key)
            if not agents:
                continue
            if active.info.pod_name in {a.pod_name for a in agents}:
                # Its agent may have restarted in the pod: its file server's port with it.
                latest = self._agents.latest(active.info.namespace, active.info.pod_name)
                if latest is not None and self._table.agent_arrived_again(slot, latest.identity):
                    log.info("the agent of pod %s arrived again", active.info.pod_name)
                continue
            info = self._table.serve_from(slot, self._serving_first(agents))
            log.info(
                "%s is served by pod %s/%s now (pod %s has no agent any more)",
                info.name,
                info.namespace,
                info.pod_name,
                active.info.pod_name,
            )

    def _serving_first(self, agents: list[aapi.AgentIdentity]) -> list[aapi.AgentIdentity]:
        """The agents in the order a client should use their pods (for `--to-pod` and the
        volumes): live and ready pods first (an agent of a terminating pod may still have its
        session), then by pod name, so that the choice is stable."""

        def rank(agent: aapi.AgentIdentity) -> tuple[int, str]:
            pod = self._view.pods.get((agent.namespace, agent.pod_name))
            if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
                return (2, agent.pod_name)
            conditions = (pod.get("status") or {}).get("conditions") or []
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            return (0 if ready else 1, agent.pod_name)

        return sorted(agents, key=rank)

    def _config(
        self,
        workload: dict[str, Any],
        key: WorkloadKey,
        replaced: Collection[str],
        *,
        require_service: bool,
    ) -> agentconfig.AgentConfig:
        try:
            manual = self._manual_config(workload, key)
            if manual is not None:
                return manual
            return self._settings.config(
                workload,
                [s for (ns, _), s in self._view.services.items() if ns == key[1]],
                replaced,
                require_service=require_service,
            )
        except agentconfig.NotInterceptable as exc:
            why = f"{key[2]} cannot be engaged: {str(exc).rstrip('.')}."
            raise RpcError(Code.FAILED_PRECONDITION, why) from None

    def _unreachable_manager(
        self, exc: RpcError, key: WorkloadKey, timeout: float, config: agentconfig.AgentConfig
    ) -> RpcError:
        """An agent that did not arrive, of a hand-injected workload whose configuration
        (`tele genyaml config`) names another address than this manager's: the error says
        so (the agent cannot reach the manager there), else it is `exc` as it is."""
        if exc.code is not Code.DEADLINE_EXCEEDED:
            return exc
        ours = (f"traffic-manager.{self._settings.manager_namespace}", self._settings.manager_port)
        theirs = (config.manager_host, config.manager_port)
        host = theirs[0].removesuffix(".svc.cluster.local").removesuffix(".svc")
        if (host, theirs[1]) == ours or not ours[1]:  # the same, or this port unknown
            return exc
        return RpcError(
            exc.code,
            f"No traffic agent of {key[0]} {key[1]}/{key[2]} arrived within {timeout:g}s: its "
            f"hand-injected traffic agent is configured to reach the traffic manager at "
            f"{theirs[0]}:{theirs[1]}, but it "
            f"listens at {ours[0]}:{ours[1]} (Helm apiPort); write the agent's configuration "
            "again with `tele genyaml config` while connected, and apply it.",
        )

    @staticmethod
    def _manual_config(
        workload: dict[str, Any], key: WorkloadKey
    ) -> agentconfig.AgentConfig | None:
        """A hand-injected workload's agent runs with the configuration its pod template gives
        (`tele genyaml config`, with any --agent-port): engagements name that one's ports."""
        template = (workload.get("spec") or {}).get("template") or {}
        if not agentconfig.manually_injected(template):
            return None
        config = agentconfig.manual_config(template)
        if config is None:
            return None
        made_for = (config.workload_kind, config.namespace, config.workload_name)
        if made_for != key:
            raise agentconfig.NotInterceptable(
                f"the traffic agent in its pod template was configured for {made_for[0]} "
                f"{made_for[1]}/{made_for[2]}; write its configuration for this workload with "
                "`tele genyaml config`"
            )
        return config

    def _check_namespace(self, namespace: str) -> None:
        if namespace not in self._view.namespaces:
            raise RpcError(Code.NOT_FOUND, f"There is no namespace {namespace}.")
        if not self._view.is_managed(namespace):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"Namespace {namespace} is not managed by this traffic manager.",
            )

    async def _find_workload(self, namespace: str, name: str) -> dict[str, Any]:
        for kind in ("Deployment", "StatefulSet", "Rollout", "ReplicaSet"):
            found = self._view.workloads.get((kind, namespace, name))
            if found is not None:
                return dict(found)
        names = sorted({w.name for w in self._view.list_workloads(namespace)})  # as `tele list`
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        # Rollouts are not even watched unless enabled: say how, when it is one (or may be).
        if not self._settings.rollouts_watched:
            exists = await self._rollouts.rollout_exists(namespace, name)
            enable = "seen only with the Helm value workloads.argoRollouts.enabled=true"
            if exists:
                hint = f"; it is an Argo Rollout, {enable}"
            elif exists is None and not close:
                hint = f" (if it is an Argo Rollout: those are {enable})"
        refusal = f"No workload named {name} in namespace {namespace}{hint}"
        raise RpcError(Code.NOT_FOUND, refusal if refusal.endswith("?") else refusal + ".")

    async def uninstall(self, request: aapi.UninstallRequest) -> aapi.UninstallReply:
        """Remove the agent from workloads (all of the namespace's with `all_agents`)."""
        self._client_session(request.session_id)
        if request.all_agents:
            keys = sorted(k for k in self._agent_workloads if k[1] == request.namespace)
        else:
            keys = []
            for name in request.workloads:
                kind = str((await self._find_workload(request.namespace, name))["kind"])
                keys.append((kind, request.namespace, name))
        removed: dict[WorkloadKey, dict[str, Any]] = {}
        for key in keys:
            found = self._view.workloads.get(key)
            if found is None:
                continue
            workload = dict(found)
            template = (workload.get("spec") or {}).get("template") or {}
            if agentconfig.manually_injected(template):
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"The agent of {key[2]} was injected by hand "
                    f"({agentconfig.ANNOTATION_PREFIX}{agentconfig.MANUALLY_INJECTED_ANNOTATION}); "
                    "remove it from the pod template instead.",
                )
            if agentconfig.injection_policy(template) == "enabled":
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"The agent of {key[2]} is installed by its pod template's "
                    "inject-traffic-agent annotation; remove the annotation instead.",
                )
            holders = [a.info for a in self._table.of_workload(key)]
            if holders:
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"{key[2]} is engaged by {holders[0].client} ({holders[0].name}); "
                    "it must leave first.",
                )
            self._agent_workloads.discard(key)
            removed[key] = workload
            log.info("removed the traffic agent from %s %s/%s", *key)
        await self._rollouts.remove_and_wait(removed)
        return aapi.UninstallReply(removed=[key[2] for key in removed])

    async def leave(self, request: aapi.LeaveRequest) -> Empty:
        self._client_session(request.session_id)
        active = self._table.leave(request.session_id, request.name)
        if active is None:
            raise RpcError(Code.NOT_FOUND, f"No engagement named {request.name} of this session.")
        log.info("%s left %s", active.info.client, request.name)
        audit_line(
            "engagement-end", session=request.session_id, name=request.name, kind=active.info.kind
        )
        self._changes.notify()
        if active.info.kind == "replace":
            await self._rollouts.restore_and_wait(active.workload_key)
        return Empty()

    def end_session(self, session_id: str) -> None:
        """A client departed or expired: its engagements end, its pending dials fail, and the
        containers it replaced come back (rolled by `Rollouts.serve_restores`)."""
        ended = self._table.end_session(session_id)
        for key in sorted({a.workload_key for a in ended if a.info.kind == "replace"}):
            self._rollouts.queue_restore(key)
        self._dials.end_session(session_id)
        self._proxy_via.end_session(session_id)
        if ended:
            names = ", ".join(a.info.name for a in ended)
            log.info("engagements %s ended with their session", names)
            for active in ended:
                audit_line(
                    "engagement-end",
                    session=session_id,
                    name=active.info.name,
                    kind=active.info.kind,
                    client=active.info.client,
                )
            self._changes.notify()

    async def watch_dials(self, request: api.SessionRequest) -> AsyncIterator[aapi.DialRequest]:
        self._client_session(request.session_id)
        async for dial in self._dials.watch(request.session_id):
            yield dial


def _no_replicas(workload: dict[str, Any]) -> bool:
    """The workload asks for no pods (`spec.replicas: 0`; absent means 1)."""
    replicas = (workload.get("spec") or {}).get("replicas")
    return isinstance(replicas, int) and replicas == 0


def wiretap_needs_newer_client(identity: api.ClientIdentity) -> str:
    """Why a client without api.WIRETAP_CHANNELS gets no wiretap: one sentence."""
    version = identity.client_version[:40] or "of an unknown version"
    return (
        f"This traffic manager needs tele {__version__} or newer for wiretap (it sends a "
        f"wiretap's copies on one stream that older clients cannot read); your client is tele "
        f"{version}: upgrade tele to use wiretap."
    )
