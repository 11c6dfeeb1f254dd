"""The daemon's cluster session: reach the traffic manager, arrive, keep the lease, depart.

```
ClusterSession.run
 |- link pool: h2 over a port-forward to a ready manager pod (found anew for every link), or
 |             over TCP to a manager address; a broken link is replaced with back-off
 |- heartbeat: Remain every lease/3; a session the manager no longer knows (it restarted, or
 |             the lease ran out while the link was down) is replaced by arriving again
 |- cluster info: follows WatchClusterInfo (managed namespaces and the VIF's routes change live)
 '- network: the VIF and DNS (tele.vif.connect), set up by this daemon when it has
             CAP_NET_ADMIN, else through the privileged helper `tele connect` started
```
Departing is shielded with a timeout in `finally`, so quitting or disconnecting always tries to
end the session at once instead of leaving it to the lease. The parts: locating the manager
(`tele.daemon.locate`), the session lease (`tele.daemon.lease`), the local side of engagements
(`tele.daemon.engagements`); this module starts them in order and reports on them.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from tele import gctune
from tele.config import (
    ClientNetwork,
    Config,
    Routing,
    merge_networks,
    network_builtins,
    network_from_extension,
    network_from_manager,
)
from tele.daemon.engagements import LocalEngagements
from tele.daemon.lease import SessionLease
from tele.daemon.locate import ManagerLocator
from tele.daemon.mounts import Mounts, tunnel_relay
from tele.errors import ConnectionFailed, TeleError, UserError, first_leaf
from tele.k8s.client import KubeClient
from tele.k8s.config import ClusterConnection
from tele.net.tunnel import Destination
from tele.rpc import agent_api as aapi
from tele.rpc import daemon_api as dapi
from tele.rpc import manager_api as mapi
from tele.rpc.client import Client
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import H2Link, H2Stream, LinkSettings
from tele.rpc.links import LinkPool
from tele.rpc.method import Req, Resp, Unary

if TYPE_CHECKING:
    from tele.vif.connect import NetworkOptions, NetworkStatus
    from tele.vif.privileges import Privileges

log = logging.getLogger(__name__)

DEFAULT_MANAGER_NAMESPACE = "ambassador"


def apply_network(options: NetworkOptions, network: ClientNetwork) -> None:
    """The merged DNS and routing settings into the VIF's options (unset keys keep tele's
    defaults)."""
    routing, dns = network.routing, network.dns
    options.also_proxy = list(routing.also_proxy_subnets or [])
    options.never_proxy = list(routing.never_proxy_subnets or [])
    options.allow_conflicting = list(routing.allow_conflicting_subnets or [])
    options.include_suffixes = list(dns.include_suffixes or [])
    if dns.exclude_suffixes is not None:
        options.exclude_suffixes = list(dns.exclude_suffixes)
    options.excludes = list(dns.excludes or [])
    options.mappings = {m.name: m.alias_for for m in dns.mappings or []}
    if dns.lookup_timeout is not None:
        options.lookup_timeout = float(dns.lookup_timeout)
    options.dns_upstream = [dns.local_ip] if dns.local_ip else []


def manager_namespace(flag: str, extension: Mapping[str, Any], settings: Config) -> str:
    """The traffic manager's namespace: --manager-namespace, else the kubeconfig extension's
    `manager.namespace`, else the config's `cluster.defaultManagerNamespace`, else ambassador."""
    manager = extension.get("manager")
    from_extension = manager.get("namespace") if isinstance(manager, dict) else None
    return (
        flag
        or (from_extension if isinstance(from_extension, str) else "")
        or settings.cluster.default_manager_namespace
        or DEFAULT_MANAGER_NAMESPACE
    )


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str:
    """The token of an `Authorization: Bearer` header ("" for none, or Basic)."""
    for name, value in headers:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
    return ""


class ClusterSession:
    """One `tele connect`: starts its parts in the daemon's nursery and ends them on disconnect
    or quit; what `tele status` shows is gathered here (`info`)."""

    def __init__(
        self,
        request: dapi.ConnectRequest,
        kube: KubeClient,
        *,
        settings: Config | None = None,
        network: NetworkOptions | None = None,
        take_helper: Callable[[], Privileges | None] | None = None,
    ) -> None:
        settings = settings or Config()
        self._settings = settings
        timeouts = settings.timeouts
        connect_timeout = float(timeouts.traffic_manager_connect)
        api_timeout = float(timeouts.traffic_manager_api)
        self.connection: ClusterConnection = kube.connection
        if not request.mapped_namespaces and settings.cluster.mapped_namespaces:
            request = msgspec.structs.replace(
                request, mapped_namespaces=list(settings.cluster.mapped_namespaces)
            )
        self.request = request
        self.namespace = request.namespace or self.connection.namespace
        self.manager_namespace = manager_namespace(
            request.manager_namespace, self.connection.extension, settings
        )
        self.connect_timeout = connect_timeout
        self.connected_at = 0.0
        self.started = False
        self._scope = trio.CancelScope()
        self.locator = ManagerLocator(
            kube,
            self.manager_namespace,
            address=request.manager_address,
            wait=connect_timeout,
            cluster_timeout=float(timeouts.cluster_connect),
        )
        self.pool = LinkPool(
            self._open_transport,
            settings=LinkSettings(keepalive_interval=5),
            name="manager-link",
            prepare=self._authenticate_link,
        )
        self.api_timeout = api_timeout
        self.lease = SessionLease(
            self.pool,
            kube_context=self.connection.context,
            mapped_namespaces=list(request.mapped_namespaces),
            api_timeout=api_timeout,
        )
        self.mounts = Mounts(tunnel_relay(self.dial))
        self.engagements = LocalEngagements(
            self.lease,
            self.mounts,
            namespace=self.namespace,
            dial=self.dial,
            dial_back=self._dial_back,
            agent_timeout=float(timeouts.intercept),
            endpoint_dial=float(timeouts.endpoint_dial),
        )
        # The VIF and DNS (tele.vif.connect): when `network` asks for it (or TELE_VIF=1).
        self.network_options = network
        self.network: NetworkStatus | None = None
        self.network_note = ""
        """Why there is no network (when it was wanted only where possible)."""
        self.client_network = ClientNetwork()
        """The DNS and routing settings in effect, merged from their sources at arrival."""
        self.vnat_subnets: list[str] = []
        self.proxy_routes: list[tuple[str, str]] = []
        """--proxy-via: (subnet, route id the manager gave), once arrived."""
        self.proxy_status: list[dict[str, object]] = []
        """--proxy-via for `tele status`: subnet, workload, pods (those whose agents dial)."""
        """--vnat's subnets, symbolic names resolved (at arrival)."""
        self._take_helper = take_helper
        self._privileges: Privileges | None = None
        """The privileged helper, taken before arriving when --proxy-via needs the VIF."""

    @asynccontextmanager
    async def _open_transport(self) -> AsyncIterator[trio.abc.Stream]:
        """A transport to the manager; TLS with the kubeconfig's client certificate when its
        user has no bearer token (the manager verifies it against the cluster's client CA:
        tele.manager.linktls). The manager's own certificate is not checked: the port-forward
        through the API server is what says this is the manager."""
        async with self.locator.open_transport() as transport:
            context = None
            if not bearer_token(await self.connection.auth_headers()):
                context = self.connection.new_ssl_context()
            if context is None:
                yield transport
                return
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            tls = trio.SSLStream(transport, context, server_hostname="traffic-manager")
            try:
                with trio.fail_after(self.connect_timeout):
                    await tls.do_handshake()
            except trio.TooSlowError:
                raise OSError("the TLS handshake with the traffic manager timed out") from None
            yield tls

    async def _authenticate_link(self, link: H2Link) -> None:
        """Present the kubeconfig's bearer token on a new link to the manager (fetched anew for
        each link: an expired exec-plugin or OIDC token is refreshed, the session stays). A
        manager that does not accept it answers the calls that follow with why."""
        token = bearer_token(await self.connection.auth_headers())
        if not token:
            log.info(
                "the kubeconfig user of %s has no bearer token: its client certificate (if "
                "any) was presented over TLS",
                self.connection.context,
            )
            return
        try:
            await Client(link).call(
                mapi.AUTHENTICATE,
                mapi.AuthenticateRequest(token=token),
                timeout=self.api_timeout,
            )
        except RpcError as exc:
            log.warning("the traffic manager did not accept the kubeconfig's token: %s", exc)

    async def disconnect(self) -> None:
        """Depart while the link is still up, then stop everything of this session."""
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            await self.lease.depart()
        self._scope.cancel()

    # --- what the CLI and the network see -----------------------------------------------------

    @property
    def status(self) -> str:
        return self.lease.status

    @property
    def cluster(self) -> mapi.ClusterInfo | None:
        return self.lease.cluster

    def info(self) -> dapi.ConnectionInfo:
        cluster = self.lease.cluster
        session = self.lease.session
        return dapi.ConnectionInfo(
            status=self.lease.status,
            kube_server=self.connection.server,
            kube_context=self.connection.context,
            namespace=self.namespace,
            manager_namespace=self.manager_namespace,
            manager_pod=self.locator.manager_pod,
            manager_api_port=(
                self.locator.api_port
                if self.locator.manager_pod and not self.locator.by_address
                else 0
            ),
            manager_version=cluster.manager_version if cluster else "",
            session_id=session.session_id if session else "",
            managed_namespaces=cluster.managed_namespaces if cluster else [],
            mapped_namespaces=list(self.request.mapped_namespaces),
            pod_subnets=cluster.pod_subnets if cluster else [],
            service_subnets=cluster.service_subnets if cluster else [],
            cluster_domain=cluster.cluster_domain if cluster else "",
            connected_at=self.connected_at,
            reconnects=self.lease.reconnects,
            last_error=self.lease.problem,
            last_reconnect=self.lease.last_reconnect,
            network=self._network_summary(),
            network_note=self.network_note,
            dns_and_routing=network_builtins(self.client_network),
            intercepts=self.engagements.lines(),
            engagements=self.engagements.statuses(),
        )

    def _network_summary(self) -> dict[str, Any] | None:
        """The VIF's summary, with the --proxy-via routes: subnet, workload, the pods dialling
        (none: the route was lost after arriving again, and its subnet is refused)."""
        if self.network is None:
            return None
        summary = self.network.summary()
        if self.proxy_status:
            summary["proxy_via"] = [dict(route) for route in self.proxy_status]
        return summary

    async def client(self) -> Client:
        return await self.lease.client()

    def session_id(self) -> str:
        return self.lease.session_id()

    async def call_in_session(self, method: Unary[Req, Resp], make: Callable[[str], Req]) -> Resp:
        return await self.lease.call_in_session(method, make)

    async def dial(self, destination: Destination) -> H2Stream:
        """A tunnel stream to a cluster address, through the manager (a `forward.Dialer`)."""
        return await self.pool.dial(destination, session=self.lease.session_id())

    async def _dial_back(self, destination: Destination, dial_id: str) -> H2Stream:
        return await self.pool.dial(destination, session=self.lease.session_id(), dial_id=dial_id)

    async def engage(self, request: dapi.InterceptRequest) -> aapi.EngagementInfo:
        return await self.engagements.engage(request)

    async def leave(self, name: str) -> None:
        await self.engagements.leave(name)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[dapi.ConnectionInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            with self._scope:
                await self._run(task_status)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await self.lease.depart()
                if self._privileges is not None:  # taken for --proxy-via, never used
                    await self._privileges.aclose()
                    self._privileges = None
            self.lease.status = "disconnected"
            gctune.settle()  # the ended session's cycles are garbage now

    def _merged_network(self, cluster: mapi.ClusterInfo | None) -> ClientNetwork:
        """DNS and routing settings, key by key from the first source that sets it: the
        connect flags, the kubeconfig's telepresence.io extension, the manager's Helm values
        `client.*`, config.yml (README: Settings). UserError naming the source when bad."""
        request = self.request
        flags = ClientNetwork(
            routing=Routing(
                also_proxy_subnets=list(request.also_proxy) or None,
                never_proxy_subnets=list(request.never_proxy) or None,
                allow_conflicting_subnets=list(request.allow_conflicting_subnets) or None,
            )
        )
        extension = network_from_extension(self.connection.extension)
        manager = network_from_manager(cluster.client_config) if cluster else ClientNetwork()
        return merge_networks(flags, extension, manager, self._settings.network())

    def _check_vnat(self, cluster: mapi.ClusterInfo | None) -> None:
        """--vnat and cluster.virtualIPSubnet: one sentence when they cannot work (the virtual
        subnet overlapping a --vnat subnet, or once arrived the routed subnets; a --vnat subnet
        overlapping a --proxy-via one, which must go out through the workload). Symbolic
        values (pods, service, also, all) are resolved once the cluster's subnets are known."""
        from tele.vif import vnat

        pairs = self._check_proxy_via(cluster)
        if not self.request.vnat:
            return
        others: list[str] = []
        translated = [v for v in self.request.vnat if v not in vnat.SYMBOLIC]
        if cluster is not None:
            also = self.client_network.routing.also_proxy_subnets or []
            others = [*cluster.pod_subnets, *cluster.service_subnets, *also]
            translated = vnat.resolve(
                self.request.vnat, cluster.pod_subnets, cluster.service_subnets, also
            )
            self.vnat_subnets = translated
        try:
            vnat.check(translated, self._settings.cluster.virtual_ip_subnet, others)
            vnat.check_vnat_proxy_via(translated, pairs)
        except vnat.VnatError as exc:
            raise UserError(str(exc)) from None

    def _check_proxy_via(self, cluster: mapi.ClusterInfo | None) -> list[tuple[str, str]]:
        """--proxy-via CIDR=WORKLOAD values (symbolic subnets once the cluster's are known):
        one sentence when one is malformed, overlaps the virtual IP subnet, or overlaps
        another's subnet with another workload."""
        from tele.vif import vnat

        try:
            pairs = vnat.parse_proxy_via(self.request.proxy_via)
            if cluster is not None:
                also = self.client_network.routing.also_proxy_subnets or []
                pods, services = cluster.pod_subnets, cluster.service_subnets
                pairs = [
                    (subnet, workload)
                    for value, workload in pairs
                    for subnet in vnat.resolve([value], pods, services, also)
                ]
            literal = [(s, w) for s, w in pairs if s not in vnat.SYMBOLIC]
            vnat.check_proxy_via([s for s, _ in literal], self._settings.cluster.virtual_ip_subnet)
            unique = vnat.check_proxy_via_overlaps(literal)
        except vnat.VnatError as exc:
            raise UserError(str(exc)) from None
        return unique if cluster is not None else pairs  # (resolved: every subnet literal)

    async def _proxy_via(self) -> None:
        """Ask the manager for each --proxy-via workload (it checks the caller may engage it and
        that an agent runs in its pods, injecting one if needed): UserError naming the value."""
        from tele.vif.vnat import proxy_via_workload

        cluster = self.lease.cluster
        pairs = self._check_proxy_via(cluster)
        managed = set(cluster.managed_namespaces if cluster is not None else [])
        routes: list[tuple[str, str]] = []
        status: list[dict[str, object]] = []
        for subnet, workload in pairs:
            name, namespace = proxy_via_workload(workload, self.namespace, managed)

            def make(
                session_id: str, name: str = name, namespace: str = namespace
            ) -> aapi.ProxyViaRequest:
                return aapi.ProxyViaRequest(
                    session_id=session_id, namespace=namespace, workload=name
                )

            try:
                reply = await self.lease.call_in_session(aapi.PROXY_VIA, make)
            except RpcError as exc:
                message = exc.message
                _, dot, suffix = workload.rpartition(".")
                if dot and name == workload and exc.code is Code.NOT_FOUND:  # (not split)
                    message = (
                        f"{message.rstrip('.')} (for a workload in another namespace, "
                        f"WORKLOAD.NAMESPACE: {suffix} is no namespace this traffic manager "
                        "manages)."
                    )
                raise UserError(f"--proxy-via {subnet}={workload}: {message}") from None
            log.info("--proxy-via %s: dialled from %s", subnet, ", ".join(reply.pods))
            routes.append((subnet, reply.route_id))
            status.append({"subnet": subnet, "workload": workload, "pods": reply.pods})
        self.proxy_routes[:] = routes  # in place: the VIF reads this list at each dial
        self.proxy_status = status

    async def _keep_proxy_routes(self) -> None:
        """A route id is the session's: after arriving again (a new manager pod, or the lease
        ran out while the link was down) the workloads are asked again; one that cannot be
        (gone meanwhile) is shown by `tele status` and its subnet is refused."""
        lease = self.lease
        seen = lease.arrivals
        while True:
            while lease.arrivals == seen:
                await lease.changed.wait()
            seen = lease.arrivals
            try:
                await self._proxy_via()
            except (UserError, TeleError) as exc:
                self.proxy_routes[:] = []  # refused by the VIF, saying why
                self.proxy_status = [{**r, "pods": []} for r in self.proxy_status]
                log.warning("%s", exc)
                lease.last_error = str(exc)

    def _require_network(self) -> None:
        """--proxy-via's subnets are reached only through the VIF (their virtual IPs are routed
        there): without one (--no-vif, TELE_VIF=0, or neither CAP_NET_ADMIN nor a privileged
        helper) one sentence before the cluster is asked for anything; with one, a VIF that
        cannot be set up fails the connect instead of being a note."""
        from tele.vif.caps import has_net_admin
        from tele.vif.connect import NetworkOptions

        if not self.request.proxy_via:
            return
        options = self.network_options or NetworkOptions.from_env()
        self.network_options = options
        if not options.enabled and not options.when_possible:
            raise UserError(
                "--proxy-via needs the virtual network interface (its subnets' virtual IPs are "
                "routed there), and this connect sets up none; connect without --no-vif."
            )
        if not has_net_admin():
            self._privileges = self._take_helper() if self._take_helper is not None else None
            if self._privileges is None:
                raise UserError(
                    "--proxy-via needs the virtual network interface, and the daemon runs "
                    "without CAP_NET_ADMIN and no privileged helper was started; "
                    "`tele connect --vif` starts one with sudo."
                )
        options.enabled = True

    async def _run(self, task_status: trio.TaskStatus[dapi.ConnectionInfo]) -> None:
        self._merged_network(None)  # the local sources' mistakes, before the cluster is asked
        self._check_vnat(None)
        self._require_network()
        async with trio.open_nursery() as nursery:
            if not self.locator.by_address:
                # A missing manager is the user's to fix: say so at once, don't retry; one
                # that is starting is waited for (and named with its state if it never is).
                await self.locator.find_manager_pod(wait=self.connect_timeout)
            with trio.move_on_after(self.connect_timeout) as waiting:
                await nursery.start(self.pool.serve)
            if waiting.cancelled_caught:
                raise ConnectionFailed(
                    f"Cannot reach the traffic manager in namespace {self.manager_namespace} "
                    f"within {self.connect_timeout:g}s: "
                    f"{(self.pool.last_failure or 'no answer').rstrip('.')}."
                )
            await self.lease.arrive()
            try:
                self.client_network = self._merged_network(self.lease.cluster)
                self._check_vnat(self.lease.cluster)
                await self._proxy_via()
            except UserError:  # the manager's settings do not fit: leave while the link is up
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await self.lease.depart()
                raise
            self.lease.status = "connected"
            self.connected_at = time.time()
            nursery.start_soon(self.lease.heartbeat)
            if self.request.proxy_via:
                nursery.start_soon(self._keep_proxy_routes)
            nursery.start_soon(self.lease.follow_cluster_info, self._cluster_changed)
            await nursery.start(self.mounts.serve)
            await nursery.start(self.engagements.serve)
            await self._start_network(nursery)
            self.started = True
            gctune.settle()  # the session's long-lived objects out of every full collection
            task_status.started(self.info())

    async def _cluster_changed(self, cluster: mapi.ClusterInfo) -> None:
        if self.network is not None:
            await self.network.follow(cluster)

    async def _start_network(self, nursery: trio.Nursery) -> None:
        """The VIF and DNS: set up by this daemon when it has CAP_NET_ADMIN, else through the
        privileged helper that `tele connect` started; without either, a failure when asked
        for (--vif), a note when only wanted where possible."""
        from tele.vif.caps import has_net_admin
        from tele.vif.connect import NetworkOptions, serve_network

        options = self.network_options or NetworkOptions.from_env()
        if not options.enabled and not options.when_possible:
            return
        apply_network(options, self.client_network)
        options.vnat = list(self.vnat_subnets)
        options.proxy_via = self.proxy_routes  # the same list: kept current after re-arrival
        options.virtual_subnet = self._settings.cluster.virtual_ip_subnet
        privileges, self._privileges = self._privileges, None
        if privileges is None and not has_net_admin():
            privileges = self._take_helper() if self._take_helper is not None else None
            if privileges is None:
                reason = (
                    "the daemon runs without CAP_NET_ADMIN and no privileged helper was "
                    "started (tele connect starts one with sudo)"
                )
                if options.enabled:
                    raise UserError(f"Cannot set up the virtual network interface: {reason}.")
                self.network_note = reason
                log.info("no virtual network interface: %s", reason)
                return
        try:
            self.network = await nursery.start(serve_network, options, self, privileges)
        except* TeleError as group:
            if options.enabled:
                raise
            self.network_note = str(first_leaf(group))
            log.warning("connected without a virtual network interface: %s", self.network_note)
