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
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from tele import __version__
from tele.contracts import agentconfig
from tele.contracts.namespaces import NamespaceSelector
from tele.k8s import client as k8s
from tele.k8s.client import KubeClient
from tele.manager.agentfiles import FilesAuthority, FilesDialer
from tele.manager.agents import AgentRegistry
from tele.manager.auth import Authenticator, Principal, audit_line, caller
from tele.manager.changes import Changes
from tele.manager.clients import ClientSessions
from tele.manager.dialback import DialBack
from tele.manager.engage import AgentSettings, Engagements
from tele.manager.feed import ClusterFeed
from tele.manager.linktls import LinkTLS
from tele.manager.loglevels import LogLevels
from tele.manager.podlogs import ClusterLogs
from tele.manager.proxyvia import ProxyVia
from tele.manager.rollouts import Rollouts, live_pod
from tele.manager.sessions import Presence
from tele.manager.state import AgentWorkloads
from tele.manager.table import EngagementTable, describe_engagement
from tele.manager.tunnelpolicy import never_dialed
from tele.manager.view import ClusterView
from tele.manager.webhook import AgentInjector, WebhookServer, ensure_tls, patch_ca_bundle
from tele.manager.withhold import Source, Withheld, judge
from tele.net.tunnel import OpenRequest, Refuse, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.agent_api import PAST_TENSE
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import TUNNEL_STREAMS, LinkSettings
from tele.rpc.h2stream import H2Stream
from tele.rpc.method import Empty
from tele.rpc.server import HandlerShares, PeerConnections, Router, serve_connection
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
    webhook_path: str = "/traffic-agent"
    """Helm `agentInjector.webhook.servicePath`: where the webhook answers."""
    webhook_service: str = "agent-injector"
    """Helm `agentInjector.name`: the webhook's Service, named by its certificate."""
    webhook_extra_names: tuple[str, ...] = ()
    """More names for the webhook's certificate (a webhook reached by URL, e.g. for tests)."""
    agent_image: str = "tele/traffic-agent"
    agent_port: int = 9900
    agent_log_level: str = "info"
    agent_pull_policy: str = "IfNotPresent"
    """Helm `agent.image.pullPolicy`: the injected containers' imagePullPolicy."""
    agent_resources: dict[str, Any] = field(default_factory=dict)
    """Helm `agent.resources`: the traffic-agent container's resources (requests, limits)."""
    inject_policy: str = "OnDemand"
    """Helm `agentInjector.injectPolicy`: OnDemand (a client's engagement injects the agent) or
    WhenEnabled (only workloads annotated `inject-traffic-agent: enabled` get one)."""
    agent_arrival: float = 30.0
    """Helm `timeouts.agentArrival`: how long an engagement waits for its agent."""
    client_config: dict[str, Any] = field(default_factory=dict)
    """Helm `client` (dns, routing): delivered to every client in its ClusterInfo."""
    log_level: str = "info"
    """The manager's own configured level (Helm `logLevel`); `tele loglevel` changes it a while."""
    mount_policies: dict[str, str] = field(default_factory=dict)
    """Helm `agent.mountPolicies`: volume name or mount path -> policy (agentconfig)."""
    pod_ip: str = ""
    """The manager pod's IP (the source of its connections to agents), from the chart."""
    missing_kind_retry: float = 30.0
    """Seconds between looks for an enabled kind the cluster does not serve (no Rollout CRD)."""
    auth_mode: str = "enforcing"
    """Helm `security.authentication.mode`: enforcing, permissive or disabled (manager.auth)."""
    credential_recheck: float = 60.0
    """Seconds between reviews of each link's token (manager.auth.RECHECK_SECONDS)."""
    revoked_grace: float = 15.0
    """Seconds an identity whose link's token was revoked has to come back with a valid one
    before its sessions end (manager.auth.REVOKED_GRACE)."""
    allow_loopback_dials: bool = False
    """Tunnel streams may reach the manager's loopback: only for tests that run the manager on
    the host, where their servers listen on 127.0.0.1 (the chart has no value for it)."""

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
            webhook_service=env.get("TELE_WEBHOOK_SERVICE") or "agent-injector",
            webhook_path=env.get("TELE_WEBHOOK_PATH") or "/traffic-agent",
            agent_image=env.get("TELE_AGENT_IMAGE") or "tele/traffic-agent",
            agent_port=int(env.get("TELE_AGENT_PORT") or 9900),
            agent_log_level=env.get("TELE_AGENT_LOG_LEVEL") or "info",
            agent_pull_policy=env.get("TELE_AGENT_PULL_POLICY") or "IfNotPresent",
            agent_resources=dict(json.loads(env.get("TELE_AGENT_RESOURCES") or "{}")),
            inject_policy=env.get("TELE_INJECT_POLICY") or "OnDemand",
            agent_arrival=float(parse_duration(env.get("TELE_AGENT_ARRIVAL") or "30s")),
            client_config=_client_config(env.get("TELE_CLIENT_CONFIG") or "{}"),
            log_level=env.get("TELE_LOG_LEVEL") or "info",
            mount_policies=dict(json.loads(env.get("TELE_MOUNT_POLICIES") or "{}")),
            pod_ip=env.get("TELE_POD_IP") or "",
            auth_mode=env.get("TELE_AUTH_MODE") or "enforcing",
        )


def _client_config(text: str) -> dict[str, Any]:
    """Helm `client`, checked as clients will read it (a bad value stops the manager with the
    sentence, rather than every client's connect)."""
    from tele.config import network_from_manager

    values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError("TELE_CLIENT_CONFIG must be a JSON object")
    network_from_manager(values)
    return values


def _cidrs(value: str | None) -> tuple[str, ...]:
    return tuple(
        str(ipaddress.ip_network(v.strip(), strict=False))
        for v in (value or "").split(",")
        if v.strip()
    )


class Manager:
    """One traffic manager: its parts wired together and served (`serve`), and the cluster
    queries of client sessions (cluster info, DNS lookups, workload lists)."""

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
        self.auth = Authenticator(
            kube,
            config.auth_mode,
            recheck_seconds=config.credential_recheck,
            revoked_grace=config.revoked_grace,
        )
        self.view = ClusterView(
            config.selector,
            cluster_domain=config.cluster_domain,
            configured_pod_subnets=list(config.pod_subnets),
        )
        self.webhook: WebhookServer | None = None
        # Workloads that clients engaged: their pods get an agent (kind, namespace, name); kept
        # in a ConfigMap so that a new manager pod still injects it.
        self.agent_workloads = AgentWorkloads(kube, config.namespace)
        # Engagements, in parts that are given what they use (see tele.manager.engage).
        changes = Changes()
        # Clients whose last connection closed: their engagements are suspended meanwhile.
        self.presence = Presence(on_change=changes.notify)
        self.table = EngagementTable()
        self.files_authority = FilesAuthority()
        self.link_tls = LinkTLS(kube)

        def wake_reaper() -> None:  # the reaper (of `clients`) also ends agents' sessions
            self.clients.wake_reaper()

        self.agents = AgentRegistry(
            clock=clock,
            changes=changes,
            wake_reaper=wake_reaper,
            manager_ip=config.pod_ip,
            vouch=self.vouch_for_agent,
            owner=self.auth.owner,
            check_owner=self.auth.check_owner,
            certify=self.files_authority.certify,
        )
        self.clients = ClientSessions(
            lease=config.session_lease,
            clock=clock,
            view=self.view,
            managed=config.selector.describe,
            cluster_info=self.cluster_info,
            agents=self.agents,
            presence=self.presence,
            auth=self.auth,
            manager_namespace=config.namespace,
        )
        self.sessions = self.clients.sessions
        self.on_session_end = self.clients.on_session_end
        self.feed = ClusterFeed(
            kube,
            self.view,
            namespace=config.namespace,
            service_subnets=list(config.service_subnets),
            missing_kind_retry=config.missing_kind_retry,
            pod_changed=self.agents.pod_changed,
        )
        self.rollouts = Rollouts(
            view=self.view,
            view_changed=self.feed.changed,
            kube=kube,
            agent_workloads=self.agent_workloads,
            agents_of=self.agents.of_workload,
            replaced_containers=self.table.replaced_containers,
            changes=changes,
        )
        self.dials = DialBack(
            engagement=self.table.by_engagement_id,
            agent_alive=lambda session_id: self.agents.get(session_id) is not None,
            client_alive=self.clients.alive,
            client_takes_channels=lambda session_id: self.clients.can(
                session_id, api.WIRETAP_CHANNELS
            ),
        )
        self.proxy_via = ProxyVia(
            agent_sessions=self._agent_sessions, allow_loopback=config.allow_loopback_dials
        )
        self.engagements = Engagements(
            view=self.view,
            client_session=self.clients.get,
            table=self.table,
            agents=self.agents,
            rollouts=self.rollouts,
            dials=self.dials,
            agent_workloads=self.agent_workloads,
            changes=changes,
            absent=self.presence.absent,
            authorize=self.auth.authorize_engagement,
            judge_exports=self.judge_exports,
            prefetch_exports=self.auth.prefetch,
            settings=self.agent_settings(),
            proxy_via=self.proxy_via,
        )
        self.files_dialer = FilesDialer(
            self.files_authority,
            lambda: [a.identity for a in self.agents.sessions.sessions.values()],
        )
        self.tunnel = TunnelServer(
            policy=self._tunnel_policy,
            dial_back=self._dial_back,
            connector=self.files_dialer.connect,
            plain=lambda destination: self.files_dialer.agent_of(destination) is None,
        )
        self.injector = AgentInjector(
            view=self.view,
            agent_workloads=self.agent_workloads,
            replaced_containers=self.table.replaced_containers,
            settings=self.agent_settings(),
        )
        self.logs = ClusterLogs(
            kube=kube,
            manager_namespace=config.namespace,
            pods=lambda: list(self.view.pods.values()),
            workload_of=self._workload_name,
            require=self.auth.require,
            check_session=self.clients.get,
        )
        self.log_levels = LogLevels(
            config.log_level,
            manager_namespace=config.namespace,
            check_session=self.clients.get,
            check_agent=lambda session_id: self.agents.of_caller(session_id) is not None,
            agent_count=lambda: sum(
                1 for s in self.agents.sessions.sessions.values() if s.expires_at > self.clock()
            ),
            require=self.auth.require,
        )
        self.webhook_port: int | None = None
        # A session's end ends its engagements first, then whatever else listens.
        self.on_session_end.append(lambda session: self.engagements.end_session(session.session_id))

    def agent_settings(self) -> AgentSettings:
        """The Helm values that shape the agents this manager injects and waits for."""
        config = self.config
        return AgentSettings(
            manager_namespace=config.namespace,
            manager_port=config.api_port,
            agent_image=config.agent_image,
            agent_port=config.agent_port,
            log_level=config.agent_log_level,
            pull_policy=config.agent_pull_policy,
            resources=config.agent_resources,
            inject_policy=config.inject_policy,
            arrival_timeout=config.agent_arrival,
            mount_policies=config.mount_policies,
            rollouts_watched="argoRollouts" in config.workloads,
        )

    # --- RPC ------------------------------------------------------------------------------------

    def router(self) -> Router:
        router = Router()
        router.gate(self.auth.gate)
        router.unary(api.VERSION, self.version)
        router.unary(api.AUTHENTICATE, self.auth.authenticate)
        router.unary(api.ARRIVE, self.clients.arrive)
        router.unary(api.REMAIN, self.clients.remain)
        router.unary(api.DEPART, self.clients.depart)
        router.unary(api.GET_CLUSTER_INFO, self.get_cluster_info)
        router.stream(api.WATCH_CLUSTER_INFO, self.watch_cluster_info)
        router.unary(api.LOOKUP_DNS, self.lookup_dns)
        router.unary(api.LIST_WORKLOADS, self.list_workloads)
        router.unary(api.LOG_SOURCES, self.logs.sources)
        router.unary(api.POD_LOG, self.logs.read)
        router.unary(api.SET_LOG_LEVEL, self.log_levels.set)
        router.stream(aapi.WATCH_LOG_LEVEL, self.log_levels.watch)
        self.engagements.register(router)
        router.raw(TunnelServer.matches, self.tunnel.handle, prepare=self.tunnel.prepare)
        return router

    def _workload_name(self, pod: Mapping[str, Any]) -> str:
        namespace = str((pod.get("metadata") or {}).get("namespace") or "")
        workload = self.view.workload_of(pod, namespace)
        return str(((workload or {}).get("metadata") or {}).get("name") or "")

    async def version(self, _: Empty) -> api.VersionInfo:
        return api.VersionInfo(version=__version__)

    def credential_revoked(self, principal: Principal, reason: str) -> None:
        """No link of `principal` has a valid credential any more: its sessions end."""
        ended = self.clients.end_owned(principal.key, reason) + self.agents.end_owned(
            principal.key, reason
        )
        if ended:
            record = {"event": "sessions-ended", "user": principal.username, "reason": reason}
            logging.getLogger("tele.audit").info(
                "audit %s", json.dumps({**record, "sessions": ended}, sort_keys=True)
            )

    async def judge_exports(
        self, pod_spec: dict[str, Any], container: str, policies: dict[str, str], namespace: str
    ) -> Withheld:
        """What of an engaged container the caller may not read (manager.withhold)."""

        async def allowed(source: Source) -> bool:
            verb, resource, subresource, name = source
            return await self.auth.may(
                verb, resource, namespace, subresource=subresource, name=name
            )

        who = caller()
        user = who.username if who is not None and who.username else "this user"
        return await judge(pod_spec, container, policies, allowed, user, namespace)

    def vouch_for_agent(self, identity: aapi.AgentIdentity) -> aapi.AgentIdentity:
        """The agent's identity as its token and this manager's view say: the pod (and so the
        workload) is the one the token is bound to, never what the agent claims."""
        if self.auth.mode == "disabled":
            return identity
        who = caller()
        pod_claim = who.pod() if who is not None and who.agent_audience else None
        namespace = who.service_account_namespace() if who is not None else None
        if who is None or pod_claim is None or namespace is None:
            message = (
                "an agent must present its pod's projected ServiceAccount token "
                f"(audience {agentconfig.AGENT_TOKEN_AUDIENCE})"
            )
            claimed_pod = self.view.pods.get((identity.namespace, identity.pod_name))
            volumes = ((claimed_pod or {}).get("spec") or {}).get("volumes") or []
            if claimed_pod is not None and not any(
                v.get("name") == agentconfig.TOKEN_VOLUME for v in volumes
            ):
                message += (
                    f"; pod {identity.namespace}/{identity.pod_name} was injected without one "
                    "(by an older traffic manager?): restart its workload to inject it anew"
                )
            self.auth.refuse(
                Code.UNAUTHENTICATED,
                message,
                claimed_pod=f"{identity.namespace}/{identity.pod_name}",
            )
            return identity
        pod_name, pod_uid = pod_claim
        pod = self.view.pods.get((namespace, pod_name))
        meta = (pod or {}).get("metadata") or {}
        containers = ((pod or {}).get("spec") or {}).get("containers") or []
        workload = self.view.workload_of(pod, namespace) if pod is not None else None
        why = ""
        if pod is None or meta.get("uid") != pod_uid:
            why = f"pod {namespace}/{pod_name} is not known to the traffic manager"
        elif not any(c.get("name") == agentconfig.AGENT_CONTAINER for c in containers):
            why = f"pod {namespace}/{pod_name} has no traffic agent injected"
        elif workload is None:
            why = f"pod {namespace}/{pod_name} belongs to no workload the manager watches"
        if not why and workload is not None:
            wmeta = workload.get("metadata") or {}
            claimed = (identity.workload_kind, identity.namespace, identity.workload_name)
            real = (str(workload.get("kind")), namespace, str(wmeta.get("name")))
            if claimed != real or identity.pod_name != pod_name:
                why = (
                    f"the agent of pod {namespace}/{pod_name} ({real[0]} {real[2]}) claimed "
                    f"to be pod {identity.pod_name} of {claimed[0]} {claimed[1]}/{claimed[2]}"
                )
        if why:
            self.auth.refuse(
                Code.PERMISSION_DENIED, f"refused as an agent: {why}", user=who.username
            )
            return identity
        status = (pod or {}).get("status") or {}
        audit_line(
            "agent-arrival",
            pod=f"{namespace}/{pod_name}",
            workload=f"{identity.workload_kind} {namespace}/{identity.workload_name}",
        )
        return msgspec.structs.replace(identity, pod_ip=str(status.get("podIP") or identity.pod_ip))

    def cluster_info(self) -> api.ClusterInfo:
        return api.ClusterInfo(
            manager_namespace=self.config.namespace,
            manager_version=__version__,
            pod_subnets=self.view.pod_subnets(),
            service_subnets=list(self.feed.service_subnets),
            cluster_domain=self.config.cluster_domain,
            dns_ip=self.feed.dns_ip,
            managed_namespaces=self.view.managed_namespaces(),
            cluster_wide=self.config.selector.everything,
            client_config=self.config.client_config,
        )

    async def get_cluster_info(self, request: api.SessionRequest) -> api.ClusterInfo:
        self.clients.get(request.session_id)
        return self.cluster_info()

    async def watch_cluster_info(
        self, request: api.SessionRequest
    ) -> AsyncIterator[api.ClusterInfo]:
        self.clients.get(request.session_id)
        last = None
        while True:
            info = self.cluster_info()
            if info != last:
                yield info
                last = info
            await self.feed.changed().wait()
            if not self.clients.alive(request.session_id):
                return

    async def lookup_dns(self, request: api.LookupRequest) -> api.LookupReply:
        session = self.clients.get(request.session_id)
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
        self.clients.get(request.session_id)
        if not self.view.is_managed(request.namespace):
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"Namespace {request.namespace} is not managed by this traffic manager.",
            )
        services = [s for (ns, _), s in self.view.services.items() if ns == request.namespace]
        listed = []
        workloads = self.view.list_workloads(request.namespace)
        visible = {
            kind
            for kind in {w.kind for w in workloads}
            if await self.auth.may_list(kind, request.namespace)
        }
        # Pods tell whether a workload carries agents, also agents not (yet) in session (after
        # the manager was reinstalled, say): `tele list` must not call those "not installed".
        key_of = {id(obj): key for key, obj in self.view.workloads.items()}
        agent_pods: dict[tuple[str, str, str], int] = {}
        for (namespace, _), pod in self.view.pods.items():
            containers = (pod.get("spec") or {}).get("containers") or []
            if (
                namespace != request.namespace
                or not live_pod(pod)  # one being deleted (after `tele uninstall`) is on its way out
                or not any(c.get("name") == agentconfig.AGENT_CONTAINER for c in containers)
            ):
                continue
            owner = self.view.workload_of(pod, namespace)
            if owner is not None and id(owner) in key_of:
                agent_pods[key_of[id(owner)]] = agent_pods.get(key_of[id(owner)], 0) + 1
        for workload in workloads:
            if workload.kind not in visible:
                continue  # the caller may not list these (RBAC): tele list shows them neither
            key = (workload.kind, workload.namespace, workload.name)
            if workload.namespace == self.config.namespace and workload.name == "traffic-manager":
                reason = "it is the traffic manager"
            else:
                reason = self._why_not_interceptable(key, services)
            listed.append(
                msgspec.structs.replace(
                    workload,
                    agent_installed=bool(self.agents.of_workload(key) or agent_pods.get(key)),
                    agent_pods=agent_pods.get(key, 0),
                    agents_connected=len(self.agents.of_workload(key)),
                    not_interceptable_reason=reason,
                    engaged_by=sorted(
                        f"{a.info.name} ({PAST_TENSE[a.info.kind]} by {a.info.client}: "
                        f"{describe_engagement(a.info)})"
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

    def _agent_sessions(self, key: tuple[str, str, str]) -> list[str]:
        now = self.clock()
        return [
            session_id
            for session_id, s in self.agents.sessions.sessions.items()
            if s.expires_at > now
            and (s.identity.workload_kind, s.identity.namespace, s.identity.workload_name) == key
        ]

    async def _dial_back(self, request: OpenRequest, stream: H2Stream) -> None:
        dial_id = request.dial_id or ""
        if dial_id.startswith(aapi.VIA_DIAL_PREFIX) or ProxyVia.is_agent_stream(dial_id):
            await self.proxy_via.handle(request, stream)
        else:
            await self.dials.dial_back(request, stream)

    def _tunnel_policy(self, request: OpenRequest) -> ResetReason | Refuse | None:
        if not self.dials.session_allowed(request):
            return ResetReason.POLICY
        session = self.sessions.get(request.session, self.clock()) or self.agents.get(
            request.session
        )
        try:
            self.auth.gate("CONNECT")
            if session is not None:
                self.auth.check_owner(session.owner)
        except RpcError:
            return ResetReason.POLICY
        if request.dial_id is not None:
            return None  # a dial-back pairs with a stream the manager holds; it dials nothing
        why = self._undialable(request)
        if not why:
            return None
        destination = request.destination
        audit_line("tunnel-denied", destination=str(destination), reason=why)
        return Refuse(ResetReason.POLICY, f"the traffic manager does not dial {destination}: {why}")

    def _undialable(self, request: OpenRequest) -> str:
        """Why the manager must not dial this destination for this session, or "": never its
        loopback, link-local or metadata addresses, nor its own pod; an agent's SFTP port only
        for the session that holds an engagement of that agent's workload (its mounts)."""
        ip, port = request.destination.ip, request.destination.port
        why = never_dialed(ip, allow_loopback=self.config.allow_loopback_dials)
        if why:
            return why
        if self.config.pod_ip and str(ip) == self.config.pod_ip:
            return "it is the traffic manager's own pod"
        for agent in self.agents.sessions.sessions.values():
            identity = agent.identity
            if str(ip) != identity.pod_ip:
                continue
            containers = [c for c, p in identity.sftp_ports.items() if p == port]
            if not containers and not (identity.sftp_port and identity.sftp_port == port):
                continue
            key = (identity.workload_kind, identity.namespace, identity.workload_name)
            if any(
                a.session_id == request.session
                and (not containers or a.info.container in containers)
                for a in self.table.of_workload(key)
            ):
                return ""
            return (
                f"it is the file server of the traffic agent of {identity.workload_kind} "
                f"{identity.namespace}/{identity.workload_name}, reachable only by the session "
                "that engages that workload"
                + (f"'s container {containers[0]}" if containers else "")
            )
        return ""

    # --- lifecycle ------------------------------------------------------------------------------

    async def _start_webhook(self, nursery: trio.Nursery, port: int) -> None:
        tls = await ensure_tls(
            self.kube,
            self.config.namespace,
            self.config.webhook_secret,
            self.config.webhook_extra_names,
            self.config.webhook_service,
        )
        self.webhook = WebhookServer(tls, self.injector, path=self.config.webhook_path)
        self.webhook_port = await nursery.start(self.webhook.serve, port, self.config.api_host)
        if self.config.webhook_name:
            await patch_ca_bundle(self.kube, self.config.webhook_name, tls.ca_pem)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run everything; reports the bound API port once the view knows the namespaces."""
        async with trio.open_nursery() as nursery:
            self.files_dialer.nursery = nursery
            nursery.start_soon(self.feed.watch, "Namespace", k8s.NAMESPACES, None)
            static = self.config.selector.static_names
            scopes: list[str | None] = [*sorted(static)] if static is not None else [None]
            kinds: list[tuple[str, k8s.Resource]] = [("Service", k8s.SERVICES), ("Pod", k8s.PODS)]
            kinds += [
                (WORKLOAD_RESOURCES[w].kind, WORKLOAD_RESOURCES[w]) for w in self.config.workloads
            ]
            for scope in scopes:
                for kind, resource in kinds:
                    nursery.start_soon(self.feed.watch, kind, resource, scope)
            nursery.start_soon(self.clients.reap)
            await nursery.start(self.auth.watch_credentials, self.credential_revoked)
            nursery.start_soon(self.log_levels.controller.serve)
            await self.agent_workloads.load()
            nursery.start_soon(self.agent_workloads.keep_saved)
            nursery.start_soon(self.rollouts.serve_restores)
            await self.feed.detect_service_subnets()
            await self.feed.find_dns_ip()
            with trio.fail_after(30):
                await self.feed.ready["Namespace"].wait()
            if self.config.webhook_port is not None:
                await self._start_webhook(nursery, self.config.webhook_port)
            router = self.router()
            peers = PeerConnections()
            links = LinkSettings(max_concurrent_streams=TUNNEL_STREAMS)  # clients' tunnels
            # Each identity (a user, an agent's pod; everyone not authenticated yet together)
            # has a share of the handler tasks: one's flood cannot starve the others.
            shares = HandlerShares(key=_identity)

            if self.auth.mode != "disabled":
                await nursery.start(self.link_tls.keep_loaded)

            async def serve(stream: trio.SocketStream) -> None:
                try:
                    transport, principal = await self.link_tls.accept(stream)
                except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                    log.info("a link's TLS handshake failed: %s", exc.__cause__ or exc)
                    return
                if principal is not None:
                    log.info(
                        "a link authenticated by client certificate: %s %s",
                        principal.username,
                        list(principal.groups),
                    )
                await serve_connection(
                    transport,
                    router,
                    name="manager",
                    settings=links,
                    shares=shares,
                    principal=principal,
                )

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


def _identity(principal: Any) -> Any:
    """Whose share of the handler tasks a connection's streams take (`HandlerShares`)."""
    return principal.key if isinstance(principal, Principal) else principal
