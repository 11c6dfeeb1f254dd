"""The traffic manager process: one nursery tree with the API/tunnel server, the watchers that
feed the cluster view, and the session reaper.

```
serve_manager
 |- watcher per kind (namespaces; services, pods, workloads per namespace or cluster-wide)
 |- session reaper (sleeps until the earliest lease runs out)
 '- API listener (h2): RPC (manager_api) and tunnel streams (TunnelServer) on one link
```
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from tele import __version__
from tele.contracts import agentconfig
from tele.contracts.namespaces import NamespaceSelector
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient
from tele.manager.agents import AgentRegistry
from tele.manager.changes import Changes
from tele.manager.dialback import DialBack
from tele.manager.engage import AgentSettings, Engagements
from tele.manager.rollouts import Rollouts
from tele.manager.sessions import Presence, Session, SessionTable
from tele.manager.state import AgentWorkloads
from tele.manager.table import EngagementTable
from tele.manager.view import ClusterView
from tele.manager.webhook import AgentInjector, WebhookServer, ensure_tls, patch_ca_bundle
from tele.net.tunnel import OpenRequest, ResetReason
from tele.rpc import manager_api as api
from tele.rpc.agent_api import PAST_TENSE
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import TUNNEL_STREAMS, LinkSettings
from tele.rpc.method import Empty
from tele.rpc.server import CALLER, PeerConnections, Router, serve_connection
from tele.rpc.tunnel import TunnelServer

log = logging.getLogger(__name__)

WORKLOAD_RESOURCES = {
    "deployments": k8s.DEPLOYMENTS,
    "replicaSets": k8s.REPLICASETS,
    "statefulSets": k8s.STATEFULSETS,
    "argoRollouts": k8s.ROLLOUTS,
}


@dataclass(frozen=True)
class ManagerConfig:
    namespace: str = "ambassador"
    selector: NamespaceSelector = field(default_factory=NamespaceSelector)
    api_port: int = api.DEFAULT_PORT
    api_host: str | None = None
    """None: every interface (IPv4 and IPv6)."""
    session_lease: float = 60.0
    pod_subnets: tuple[str, ...] = ()
    service_subnets: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    workloads: tuple[str, ...] = ("deployments", "replicaSets", "statefulSets")
    lookup_timeout: float = 4.0
    webhook_port: int | None = None
    """Where the agent injector listens (HTTPS); None: no webhook."""
    webhook_secret: str = "mutator-webhook-tls"
    webhook_name: str = ""
    """The MutatingWebhookConfiguration whose caBundle this manager keeps current."""
    webhook_extra_names: tuple[str, ...] = ()
    """More names for the webhook's certificate (a webhook reached by URL, e.g. for tests)."""
    agent_image: str = "tele/traffic-agent"
    agent_port: int = 9900
    agent_log_level: str = "info"
    mount_policies: dict[str, str] = field(default_factory=dict)
    """Helm `agent.mountPolicies`: volume name or mount path -> policy (agentconfig)."""
    pod_ip: str = ""
    """The manager pod's IP (the source of its connections to agents), from the chart."""
    missing_kind_retry: float = 30.0
    """Seconds between looks for an enabled kind the cluster does not serve (no Rollout CRD)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ManagerConfig:
        """The configuration the Helm chart passes in TELE_* variables."""
        from tele.config import parse_duration

        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        if env.get("TELE_NAMESPACES"):
            values["namespaces"] = json.loads(env["TELE_NAMESPACES"])
        if env.get("TELE_NAMESPACE_SELECTOR"):
            values["namespaceSelector"] = json.loads(env["TELE_NAMESPACE_SELECTOR"])
        workloads = json.loads(env.get("TELE_WORKLOADS") or "{}")
        enabled = tuple(
            kind for kind in WORKLOAD_RESOURCES if workloads.get(kind, kind != "argoRollouts")
        )
        return cls(
            namespace=env.get("TELE_MANAGER_NAMESPACE") or "ambassador",
            selector=NamespaceSelector.from_values(values),
            api_port=int(env.get("TELE_API_PORT") or api.DEFAULT_PORT),
            session_lease=float(parse_duration(env.get("TELE_SESSION_LEASE") or "60s")),
            pod_subnets=_cidrs(env.get("TELE_POD_CIDRS")),
            service_subnets=_cidrs(env.get("TELE_SERVICE_CIDRS")),
            workloads=enabled,
            webhook_port=int(env["TELE_WEBHOOK_PORT"]) if env.get("TELE_WEBHOOK_PORT") else None,
            webhook_secret=env.get("TELE_WEBHOOK_SECRET") or "mutator-webhook-tls",
            webhook_name=env.get("TELE_WEBHOOK_NAME") or "",
            agent_image=env.get("TELE_AGENT_IMAGE") or "tele/traffic-agent",
            agent_port=int(env.get("TELE_AGENT_PORT") or 9900),
            agent_log_level=env.get("TELE_AGENT_LOG_LEVEL") or "info",
            mount_policies=dict(json.loads(env.get("TELE_MOUNT_POLICIES") or "{}")),
            pod_ip=env.get("TELE_POD_IP") or "",
        )


def _cidrs(value: str | None) -> tuple[str, ...]:
    return tuple(
        str(ipaddress.ip_network(v.strip(), strict=False))
        for v in (value or "").split(",")
        if v.strip()
    )


class Manager:
    """State and handlers of one traffic manager."""

    def __init__(
        self,
        config: ManagerConfig,
        kube: KubeClient,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.config = config
        self.kube = kube
        self.clock = clock
        self.view = ClusterView(
            config.selector,
            cluster_domain=config.cluster_domain,
            configured_pod_subnets=list(config.pod_subnets),
        )
        self.sessions = SessionTable[api.ClientIdentity](config.session_lease)
        self.service_subnets: list[str] = list(config.service_subnets)
        self.dns_ip = ""
        self._view_changed = trio.Event()
        self._sessions_changed = trio.Event()
        self._ready = {"Namespace": trio.Event()}
        self.on_session_end: list[Callable[[Session[api.ClientIdentity]], None]] = []
        self.webhook: WebhookServer | None = None
        # Workloads that clients engaged: their pods get an agent (kind, namespace, name); kept
        # in a ConfigMap so that a new manager pod still injects it.
        self.agent_workloads = AgentWorkloads(kube, config.namespace)
        # Engagements, in parts that are given what they use (see tele.manager.engage).
        changes = Changes()
        # Clients whose last connection closed: their engagements are suspended meanwhile.
        self.presence = Presence(on_change=changes.notify)
        self.table = EngagementTable()
        self.agents = AgentRegistry(
            clock=clock, changes=changes, wake_reaper=self.wake_reaper, manager_ip=config.pod_ip
        )
        self.rollouts = Rollouts(
            view=self.view,
            view_changed=self.view_changed,
            kube=kube,
            agent_workloads=self.agent_workloads,
            agents_of=self.agents.of_workload,
            replaced_containers=self.table.replaced_containers,
            changes=changes,
        )
        self.dials = DialBack(
            engagement=self.table.by_engagement_id,
            agent_alive=lambda session_id: self.agents.get(session_id) is not None,
            client_alive=lambda session_id: self.sessions.get(session_id, self.clock()) is not None,
        )
        self.engagements = Engagements(
            view=self.view,
            client_session=self.client_session,
            table=self.table,
            agents=self.agents,
            rollouts=self.rollouts,
            dials=self.dials,
            agent_workloads=self.agent_workloads,
            changes=changes,
            absent=self.presence.absent,
            settings=AgentSettings(
                manager_namespace=config.namespace,
                agent_image=config.agent_image,
                agent_port=config.agent_port,
                mount_policies=config.mount_policies,
                rollouts_watched="argoRollouts" in config.workloads,
            ),
        )
        self.tunnel = TunnelServer(policy=self._tunnel_policy, dial_back=self.dials.dial_back)
        self.injector = AgentInjector(
            view=self.view,
            agent_workloads=self.agent_workloads,
            replaced_containers=self.table.replaced_containers,
            manager_namespace=config.namespace,
            agent_image=config.agent_image,
            agent_port=config.agent_port,
            agent_log_level=config.agent_log_level,
            mount_policies=config.mount_policies,
        )
        self.webhook_port: int | None = None

    # --- RPC ------------------------------------------------------------------------------------

    def router(self) -> Router:
        router = Router()
        router.unary(api.VERSION, self.version)
        router.unary(api.ARRIVE, self.arrive)
        router.unary(api.REMAIN, self.remain)
        router.unary(api.DEPART, self.depart)
        router.unary(api.GET_CLUSTER_INFO, self.get_cluster_info)
        router.stream(api.WATCH_CLUSTER_INFO, self.watch_cluster_info)
        router.unary(api.LOOKUP_DNS, self.lookup_dns)
        router.unary(api.LIST_WORKLOADS, self.list_workloads)
        self.engagements.register(router)
        router.raw(TunnelServer.matches, self.tunnel.handle)
        return router

    async def version(self, _: Empty) -> api.VersionInfo:
        return api.VersionInfo(version=__version__)

    async def arrive(self, identity: api.ClientIdentity) -> api.SessionInfo:
        unknown = [n for n in identity.mapped_namespaces if not self.view.is_managed(n)]
        if unknown:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"this traffic manager does not manage namespace {unknown[0]}; it manages "
                f"{self.config.selector.describe()}",
            )
        session = self.sessions.arrive(identity, self.clock())
        self.presence.seen(session.session_id, CALLER.get())
        self._sessions_changed.set()
        log.info(
            "session %s arrived: %s (client %s)",
            session.session_id,
            session.label,
            identity.client_version,
        )
        return api.SessionInfo(
            session_id=session.session_id,
            lease_seconds=self.config.session_lease,
            cluster=self.cluster_info(),
        )

    def client_session(self, session_id: str) -> Session[api.ClientIdentity]:
        session = self.sessions.get(session_id, self.clock())
        if session is None:
            raise RpcError(Code.NOT_FOUND, "the session has expired or is unknown; connect again")
        return session

    async def remain(self, request: api.SessionRequest) -> Empty:
        if self.agents.remain(request.session_id):
            return Empty()
        if self.sessions.remain(request.session_id, self.clock()) is None:
            raise RpcError(Code.NOT_FOUND, "the session has expired or is unknown; connect again")
        self.presence.seen(request.session_id, CALLER.get())
        self._sessions_changed.set()
        return Empty()

    async def depart(self, request: api.SessionRequest) -> Empty:
        session = self.sessions.depart(request.session_id)
        if session is not None:
            log.info("session %s departed (%s)", session.session_id, session.label)
            self._end(session)
        return Empty()

    def cluster_info(self) -> api.ClusterInfo:
        return api.ClusterInfo(
            manager_namespace=self.config.namespace,
            manager_version=__version__,
            pod_subnets=self.view.pod_subnets(),
            service_subnets=list(self.service_subnets),
            cluster_domain=self.config.cluster_domain,
            dns_ip=self.dns_ip,
            managed_namespaces=self.view.managed_namespaces(),
            cluster_wide=self.config.selector.everything,
        )

    async def get_cluster_info(self, request: api.SessionRequest) -> api.ClusterInfo:
        self.client_session(request.session_id)
        return self.cluster_info()

    async def watch_cluster_info(
        self, request: api.SessionRequest
    ) -> AsyncIterator[api.ClusterInfo]:
        self.client_session(request.session_id)
        last = None
        while True:
            info = self.cluster_info()
            if info != last:
                yield info
                last = info
            await self._view_changed.wait()
            if self.sessions.get(request.session_id, self.clock()) is None:
                return

    async def lookup_dns(self, request: api.LookupRequest) -> api.LookupReply:
        session = self.client_session(request.session_id)
        qtype = request.qtype.upper()
        if self.view.in_cluster_scope(request.name):
            allowed = set(session.identity.mapped_namespaces) or None
            return self.view.resolve(request.name, qtype, allowed)
        return await self._system_lookup(request.name, qtype)

    async def _system_lookup(self, name: str, qtype: str) -> api.LookupReply:
        if qtype not in ("A", "AAAA", "ANY"):
            return api.LookupReply(rcode="NOERROR")
        family = {"A": socket.AF_INET, "AAAA": socket.AF_INET6}.get(qtype, socket.AF_UNSPEC)
        with trio.move_on_after(self.config.lookup_timeout):
            try:
                infos = await trio.socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
            except socket.gaierror as exc:
                if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                    return api.LookupReply(rcode="NXDOMAIN")
                return api.LookupReply(rcode="SERVFAIL")
            records = []
            for fam, _, _, _, sockaddr in infos:
                rtype = "A" if fam == socket.AF_INET else "AAAA"
                record = api.DnsRecord(name=name, type=rtype, value=str(sockaddr[0]))
                if record not in records:
                    records.append(record)
            return api.LookupReply(rcode="NOERROR", records=records)
        return api.LookupReply(rcode="SERVFAIL")

    async def list_workloads(self, request: api.WorkloadsRequest) -> api.WorkloadList:
        self.client_session(request.session_id)
        if not self.view.is_managed(request.namespace):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"namespace {request.namespace} is not managed by this traffic manager",
            )
        services = [s for (ns, _), s in self.view.services.items() if ns == request.namespace]
        listed = []
        for workload in self.view.list_workloads(request.namespace):
            key = (workload.kind, workload.namespace, workload.name)
            if workload.namespace == self.config.namespace and workload.name == "traffic-manager":
                reason = "it is the traffic manager"
            else:
                reason = self._why_not_interceptable(key, services)
            listed.append(
                msgspec.structs.replace(
                    workload,
                    agent_installed=bool(self.agents.of_workload(key)),
                    not_interceptable_reason=reason,
                    engaged_by=sorted(
                        f"{a.info.name} ({PAST_TENSE[a.info.kind]} by {a.info.client})"
                        for a in self.table.of_workload(key)
                    ),
                )
            )
        return api.WorkloadList(workloads=listed)

    def _why_not_interceptable(self, key: tuple[str, str, str], services: list[Any]) -> str:
        try:
            agentconfig.generate(
                workload=self.view.workloads[key],
                services=services,
                manager_namespace=self.config.namespace,
                agent_image=self.config.agent_image,
            )
        except agentconfig.NotInterceptable as exc:
            return str(exc)
        return ""

    async def _tunnel_policy(self, request: OpenRequest) -> ResetReason | None:
        return None if self.dials.session_allowed(request) else ResetReason.POLICY

    # --- lifecycle ------------------------------------------------------------------------------

    def wake_reaper(self) -> None:
        """A new lease may end before the reaper's current deadline."""
        self._sessions_changed.set()

    def _end(self, session: Session[api.ClientIdentity]) -> None:
        self.presence.forget(session.session_id)
        self._sessions_changed.set()
        self.engagements.end_session(session.session_id)
        for callback in self.on_session_end:
            callback(session)

    def _changed(self) -> None:
        self._view_changed.set()
        self._view_changed = trio.Event()

    def view_changed(self) -> trio.Event:
        """Set at the next change of the cluster view (any watched object)."""
        return self._view_changed

    async def reap_sessions(self) -> None:
        while True:
            for session in self.sessions.expire(self.clock()):
                log.info(
                    "session %s expired (%s): no heartbeat within the lease",
                    session.session_id,
                    session.label,
                )
                self._end(session)
            self.agents.expire()
            deadlines = [
                d
                for d in (self.sessions.next_deadline(), self.agents.next_deadline())
                if d is not None
            ]
            deadline = min(deadlines) if deadlines else None
            self._sessions_changed = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._sessions_changed.wait()

    async def watch(self, kind: str, resource: k8s.Resource, namespace: str | None) -> None:
        """Feed one kind (in one namespace, or all) into the view, forever.

        A kind the cluster does not serve (Rollouts enabled, Argo Rollouts not installed) has
        no objects: that is said once in the log and looked for again now and then.
        """
        first = True
        missing = False
        while True:
            try:
                async with aclosing(self.kube.informer(resource, namespace)) as events:
                    async for event in events:
                        if event.type == "RELISTED":
                            self.view.relist(kind, event.object["items"], namespace)
                            if first and kind in self._ready:
                                self._ready[kind].set()
                            first = False
                            if missing:
                                log.info("the cluster serves %s now", resource.api_version)
                                missing = False
                        else:
                            self.view.apply(kind, event.type, event.object)
                            if kind == "Pod":
                                self.agents.pod_changed(event.type, event.object)
                        self._changed()
            except ApiError as exc:
                if exc.code != 404:
                    raise
                if not missing:
                    log.warning(
                        "the cluster does not serve %s %s (%s): none can be engaged until it does",
                        resource.api_version,
                        resource.plural,
                        exc.message,
                    )
                    missing = True
                    self.view.relist(kind, [], namespace)
                    self._changed()
            await trio.sleep(self.config.missing_kind_retry)

    async def detect_service_subnets(self) -> None:
        """Ask the API server for the Service range: creating a Service with an impossible
        ClusterIP (dry run) fails with "The range of valid IPs is <cidr>"."""
        if self.service_subnets:
            return
        probe = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "tele-service-cidr-probe", "namespace": self.config.namespace},
            "spec": {"clusterIP": "1.1.1.1", "ports": [{"port": 443}]},
        }
        try:
            await self.kube.request(
                "POST",
                k8s.SERVICES.path(self.config.namespace),
                params={"dryRun": "All"},
                body=probe,
            )
        except ApiError as exc:
            match = re.search(r"valid IPs is ([0-9a-fA-F.:/]+)", exc.message)
            if match:
                self.service_subnets = [str(ipaddress.ip_network(match.group(1), strict=False))]
                return
            log.warning("cannot learn the service subnet from the API server: %s", exc.message)
            return
        log.warning("the API server accepted an impossible ClusterIP; service subnet unknown")

    async def find_dns_ip(self) -> None:
        """The cluster DNS address: the kube-dns Service, else this pod's resolv.conf."""
        for namespace in ("kube-system",):
            service = await self.kube.get_or_none(k8s.SERVICES, "kube-dns", namespace)
            if service is not None:
                self.dns_ip = str((service.get("spec") or {}).get("clusterIP") or "")
                return
        try:
            text = await trio.Path("/etc/resolv.conf").read_text()
        except OSError:
            return
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                self.dns_ip = parts[1]
                return

    async def _start_webhook(self, nursery: trio.Nursery, port: int) -> None:
        tls = await ensure_tls(
            self.kube,
            self.config.namespace,
            self.config.webhook_secret,
            self.config.webhook_extra_names,
        )
        self.webhook = WebhookServer(tls, self.injector)
        self.webhook_port = await nursery.start(self.webhook.serve, port, self.config.api_host)
        if self.config.webhook_name:
            await patch_ca_bundle(self.kube, self.config.webhook_name, tls.ca_pem)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run everything; reports the bound API port once the view knows the namespaces."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.watch, "Namespace", k8s.NAMESPACES, None)
            static = self.config.selector.static_names
            scopes: list[str | None] = [*sorted(static)] if static is not None else [None]
            kinds: list[tuple[str, k8s.Resource]] = [("Service", k8s.SERVICES), ("Pod", k8s.PODS)]
            kinds += [
                (WORKLOAD_RESOURCES[w].kind, WORKLOAD_RESOURCES[w]) for w in self.config.workloads
            ]
            for scope in scopes:
                for kind, resource in kinds:
                    nursery.start_soon(self.watch, kind, resource, scope)
            nursery.start_soon(self.reap_sessions)
            await self.agent_workloads.load()
            nursery.start_soon(self.agent_workloads.keep_saved)
            nursery.start_soon(self.rollouts.serve_restores)
            await self.detect_service_subnets()
            await self.find_dns_ip()
            with trio.fail_after(30):
                await self._ready["Namespace"].wait()
            if self.config.webhook_port is not None:
                await self._start_webhook(nursery, self.config.webhook_port)
            router = self.router()
            peers = PeerConnections()
            links = LinkSettings(max_concurrent_streams=TUNNEL_STREAMS)  # clients' tunnels

            async def serve(stream: trio.SocketStream) -> None:
                await serve_connection(stream, router, name="manager", settings=links)

            listeners = await nursery.start(
                functools.partial(
                    trio.serve_tcp,
                    lambda stream: peers.serve(stream, serve),
                    self.config.api_port,
                    host=self.config.api_host,
                )
            )
            port = listeners[0].socket.getsockname()[1]
            log.info(
                "traffic manager %s serving on port %d, managing %s",
                __version__,
                port,
                self.config.selector.describe(),
            )
            task_status.started(port)
