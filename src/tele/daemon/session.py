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
end the session at once instead of leaving it to the lease.
"""

from __future__ import annotations

import functools
import getpass
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import TYPE_CHECKING

import msgspec
import trio

from tele import __version__, gctune
from tele.daemon.engage import local_tls_context, serve_dial_backs
from tele.daemon.forward import serve_forward, serve_udp_forward
from tele.daemon.mounts import MountFlag, Mounts, tunnel_relay
from tele.errors import ConnectionFailed, TeleError, UserError, single_leaf
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient
from tele.k8s.config import ClusterConnection
from tele.k8s.portforward import open_portforward
from tele.net.tunnel import Destination, Protocol
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

MANAGER_SELECTOR = "app=traffic-manager"
_MANAGER_TROUBLE = frozenset(
    {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN, Code.CANCELLED}
)
DEFAULT_MANAGER_NAMESPACE = "ambassador"


PAST_TENSE = {"intercept": "intercepted", "replace": "replaced", "ingest": "ingested"}


def parse_to_pod(value: str) -> Destination:
    """`PORT` or `PORT/TCP|UDP` (a `--to-pod` value) as a destination on the pod (its IP is
    filled in once engaged: 0.0.0.0 until then)."""
    port, _, protocol = value.partition("/")
    protocol = protocol.upper() or "TCP"
    if not port.isdigit() or not 0 < int(port) < 65536 or protocol not in ("TCP", "UDP"):
        raise UserError(f"--to-pod {value!r} must be PORT or PORT/UDP with a port from 1 to 65535")
    return Destination(Protocol(protocol.lower()), ipaddress.ip_address("0.0.0.0"), int(port))


def _local_targets(
    info: aapi.EngagementInfo, mappings: list[dapi.PortMapping], address: str
) -> dict[int, tuple[str, int]]:
    """Container port -> local handler: the request's `-p` mappings in the order the manager
    answered them, or (a replace of all ports) each port to the same local port number."""
    if mappings and len(mappings) == len(info.ports):
        return {
            p.container_port: (address, m.local) for p, m in zip(info.ports, mappings, strict=True)
        }
    return {p.container_port: (address, p.container_port) for p in info.ports}


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NoManager(UserError):
    """No traffic manager is installed (or none is ready) in the manager namespace."""


def _describe(pods: Iterable[k8s.Obj]) -> str:
    """ "name (phase, reason)" for each pod: what a person needs to see why it is not ready."""
    parts = []
    for pod in pods:
        status = pod.get("status") or {}
        reasons = [
            str((cs.get("state") or {}).get("waiting", {}).get("reason") or "")
            for cs in status.get("containerStatuses") or []
        ]
        detail = ", ".join([str(status.get("phase") or "Pending"), *[r for r in reasons if r]])
        parts.append(f"{pod['metadata']['name']} ({detail})")
    return "; ".join(parts)


def _is_ready(pod: k8s.Obj) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class ClusterSession:
    """One `tele connect`: lives in the daemon's nursery until disconnect or quit."""

    def __init__(
        self,
        request: dapi.ConnectRequest,
        kube: KubeClient,
        *,
        connect_timeout: float,
        api_timeout: float,
        network: NetworkOptions | None = None,
        take_helper: Callable[[], Privileges | None] | None = None,
    ) -> None:
        self.request = request
        self.kube = kube
        self.connection: ClusterConnection = kube.connection
        self.namespace = request.namespace or self.connection.namespace
        self.manager_namespace = request.manager_namespace or DEFAULT_MANAGER_NAMESPACE
        self.connect_timeout = connect_timeout
        self.api_timeout = api_timeout
        self.status = "connecting"
        self.manager_pod = ""
        self.session: mapi.SessionInfo | None = None
        self.cluster: mapi.ClusterInfo | None = None
        self.connected_at = 0.0
        self.reconnects = 0
        self.last_error = ""
        self.pool = LinkPool(
            self._open_transport, settings=LinkSettings(keepalive_interval=5), name="manager-link"
        )
        self._session_changed = trio.Event()
        self.arrivals = 0
        self._scope = trio.CancelScope()
        self.started = False
        self.engaged: dict[str, aapi.EngagementInfo] = {}
        # What the user asked for, by engagement name: engaged again after a new arrival.
        self.engage_requests: dict[str, dapi.InterceptRequest] = {}
        # Per engagement id: TLS towards the local handler (decrypted callers' requests).
        self.local_tls: dict[str, ssl.SSLContext] = {}
        self.targets: dict[str, dict[int, tuple[str, int]]] = {}
        """Per engagement id: container port -> the local handler's address."""
        self._local_sides: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.mounts = Mounts(tunnel_relay(self.dial))
        self._dials_wanted = trio.Event()
        # The VIF and DNS (tele.vif.connect): when `network` asks for it (or TELE_VIF=1).
        self.network_options = network
        self.network: NetworkStatus | None = None
        self.network_note = ""
        """Why there is no network (when it was wanted only where possible)."""
        self._take_helper = take_helper

    async def disconnect(self) -> None:
        """Depart while the link is still up, then stop everything of this session."""
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            await self._depart()
        self._scope.cancel()

    # --- what the CLI sees ------------------------------------------------------------------

    def info(self) -> dapi.ConnectionInfo:
        cluster = self.cluster
        return dapi.ConnectionInfo(
            status=self.status,
            kube_server=self.connection.server,
            kube_context=self.connection.context,
            namespace=self.namespace,
            manager_namespace=self.manager_namespace,
            manager_pod=self.manager_pod,
            manager_version=cluster.manager_version if cluster else "",
            session_id=self.session.session_id if self.session else "",
            managed_namespaces=cluster.managed_namespaces if cluster else [],
            mapped_namespaces=list(self.request.mapped_namespaces),
            pod_subnets=cluster.pod_subnets if cluster else [],
            service_subnets=cluster.service_subnets if cluster else [],
            cluster_domain=cluster.cluster_domain if cluster else "",
            connected_at=self.connected_at,
            reconnects=self.reconnects,
            last_error=self.last_error,
            network=self.network.summary() if self.network is not None else None,
            network_note=self.network_note,
            intercepts=self.engagement_lines(),
        )

    async def client(self) -> Client:
        """An RPC client on a live link (waits for one within the API timeout)."""
        with trio.move_on_after(self.api_timeout):
            return Client(await self.pool.wait_ready())
        raise RpcError(
            Code.UNAVAILABLE, f"no link to the traffic manager: {self.pool.last_failure}"
        )

    async def dial(self, destination: Destination) -> H2Stream:
        """A tunnel stream to a cluster address, through the manager (a `forward.Dialer`)."""
        return await self.pool.dial(destination, session=self.session_id())

    def session_id(self) -> str:
        if self.session is None:
            raise RpcError(Code.UNAVAILABLE, "not connected to the traffic manager yet")
        return self.session.session_id

    # --- finding the manager ----------------------------------------------------------------

    async def find_manager_pod(self, wait: float = 0.0) -> str:
        """A ready manager pod's name, waiting up to `wait` seconds for one to become ready
        (following the pods with a watch). NoManager when none is installed; after the wait, a
        ConnectionFailed naming each pod and what it is doing."""
        try:
            pods, version = await self.kube.list(
                k8s.PODS, self.manager_namespace, label_selector=MANAGER_SELECTOR
            )
        except ApiError as exc:
            if exc.not_found:
                raise self._no_manager() from None
            raise
        current = {p["metadata"]["name"]: p for p in pods}
        if not current and not await self._manager_deployed():
            raise self._no_manager()
        with trio.move_on_after(wait):
            while True:
                ready = [p for p in current.values() if _is_ready(p)]
                if ready:
                    newest = max(
                        ready, key=lambda p: str(p["metadata"].get("creationTimestamp", ""))
                    )
                    return str(newest["metadata"]["name"])
                if wait <= 0:
                    break
                log.info("waiting for the traffic manager: %s", _describe(current.values()))
                watch = self.kube.watch(
                    k8s.PODS,
                    self.manager_namespace,
                    resource_version=version,
                    label_selector=MANAGER_SELECTOR,
                )
                async with aclosing(watch) as events:
                    async for event in events:
                        version = str(event.object["metadata"].get("resourceVersion") or version)
                        if event.type == "DELETED":
                            current.pop(event.name, None)
                        elif event.type != "BOOKMARK":
                            current[event.name] = event.object
                        if any(_is_ready(p) for p in current.values()):
                            break
        raise ConnectionFailed(
            f"the traffic manager in namespace {self.manager_namespace} is not ready"
            f"{f' after {wait:g}s' if wait > 0 else ''}: {_describe(current.values()) or 'no pod'}"
        )

    async def _manager_deployed(self) -> bool:
        found = await self.kube.get_or_none(
            k8s.DEPLOYMENTS, "traffic-manager", self.manager_namespace
        )
        return found is not None

    def _no_manager(self) -> NoManager:
        return NoManager(
            f"no traffic manager is installed in namespace {self.manager_namespace} of "
            f"{self.connection.context}; install one with `tele helm install`"
        )

    def _open_transport(self) -> AbstractAsyncContextManager[trio.abc.Stream]:
        return self._transport()

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[trio.abc.Stream]:
        if self.request.manager_address:
            host, _, port = self.request.manager_address.rpartition(":")
            tcp = await trio.open_tcp_stream(host or "127.0.0.1", int(port))
            self.manager_pod = self.request.manager_address
            async with tcp:
                yield tcp
            return
        pod = await self.find_manager_pod(wait=self.connect_timeout)
        self.manager_pod = pod
        async with open_portforward(
            self.connection, self.manager_namespace, pod, mapi.DEFAULT_PORT
        ) as stream:
            yield stream

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[dapi.ConnectionInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            with self._scope:
                await self._run(task_status)
        except BaseExceptionGroup as group:
            leaf = single_leaf(group)
            if leaf is group:
                raise
            raise leaf from None
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await self._depart()
            self.status = "disconnected"
            gctune.settle()  # the ended session's cycles are garbage now

    async def _run(self, task_status: trio.TaskStatus[dapi.ConnectionInfo]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not self.request.manager_address:
                # A missing manager is the user's to fix: say so at once, don't retry; one
                # that is starting is waited for (and named with its state if it never is).
                await self.find_manager_pod(wait=self.connect_timeout)
            with trio.move_on_after(self.connect_timeout) as waiting:
                await nursery.start(self.pool.serve)
            if waiting.cancelled_caught:
                raise ConnectionFailed(
                    f"cannot reach the traffic manager in namespace {self.manager_namespace} "
                    f"within {self.connect_timeout:g}s: {self.pool.last_failure or 'no answer'}"
                )
            await self._arrive()
            self.status = "connected"
            self.connected_at = time.time()
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._follow_cluster_info)
            nursery.start_soon(self._serve_dials)
            await nursery.start(self.mounts.serve)
            nursery.start_soon(self._keep_engagements)
            await self._start_network(nursery)
            self.started = True
            gctune.settle()  # the session's long-lived objects out of every full collection
            task_status.started(self.info())

    async def _start_network(self, nursery: trio.Nursery) -> None:
        """The VIF and DNS: set up by this daemon when it has CAP_NET_ADMIN, else through the
        privileged helper that `tele connect` started; without either, a failure when asked
        for (--vif), a note when only wanted where possible."""
        from tele.vif.caps import has_net_admin
        from tele.vif.connect import NetworkOptions, serve_network

        options = self.network_options or NetworkOptions.from_env()
        if not options.enabled and not options.when_possible:
            return
        privileges: Privileges | None = None
        if not has_net_admin():
            privileges = self._take_helper() if self._take_helper is not None else None
            if privileges is None:
                reason = (
                    "the daemon runs without CAP_NET_ADMIN and no privileged helper was "
                    "started (tele connect starts one with sudo)"
                )
                if options.enabled:
                    raise UserError(f"cannot set up the virtual network interface: {reason}")
                self.network_note = reason
                log.info("no virtual network interface: %s", reason)
                return
        try:
            self.network = await nursery.start(serve_network, options, self, privileges)
        except BaseException as exc:
            leaf = single_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if options.enabled or not isinstance(leaf, TeleError):
                raise
            self.network_note = str(leaf)
            log.warning("connected without a virtual network interface: %s", leaf)

    async def _arrive(self) -> None:
        identity = mapi.ClientIdentity(
            user=getpass.getuser(),
            host=socket.gethostname(),
            client_version=__version__,
            kube_context=self.connection.context,
            mapped_namespaces=list(self.request.mapped_namespaces),
        )
        client = await self.client()
        try:
            session = await client.call(mapi.ARRIVE, identity, timeout=self.api_timeout)
        except RpcError as exc:
            if exc.code is Code.FAILED_PRECONDITION:
                raise UserError(exc.message) from None
            raise
        self.session = session
        self.cluster = session.cluster
        self.arrivals += 1
        self._session_changed.set()
        self._session_changed = trio.Event()
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

    async def _heartbeat(self) -> None:
        """Renew the lease every lease/3, and at once when a new link came up: a new manager
        (its pod was replaced) does not know the session, and the user should not wait."""
        while True:
            assert self.session is not None
            with trio.move_on_after(max(0.1, self.session.lease_seconds / 3)):
                await self.pool.wait_replaced()
                self.status = "reconnecting"
            try:
                client = await self.client()
                await client.call(
                    mapi.REMAIN,
                    mapi.SessionRequest(session_id=self.session.session_id),
                    timeout=self.api_timeout,
                )
                self.status = "connected"
            except RpcError as exc:
                self.last_error = exc.message
                if exc.code is Code.NOT_FOUND:
                    log.warning("the traffic manager forgot our session; arriving again")
                    self.reconnects += 1
                    try:
                        await self._arrive()
                    except (RpcError, ConnectionFailed) as again:
                        self.last_error = str(again)
                        self.status = "reconnecting"
                else:
                    log.warning("heartbeat failed: %s", exc.message)
                    self.status = "reconnecting"

    async def call_in_session(self, method: Unary[Req, Resp], make: Callable[[str], Req]) -> Resp:
        """Call `method` with a request made for the current session; when the manager does
        not know the session (a new manager pod), arrive again and retry once."""
        for attempt in (0, 1):
            client = await self.client()
            try:
                return await client.call(
                    method, make(self.session_id()), timeout=self.api_timeout + 60
                )
            except RpcError as exc:
                if exc.code in _MANAGER_TROUBLE:
                    # Said by the manager link, not by this daemon: the CLI must not read
                    # UNAVAILABLE as "lost the daemon".
                    raise RpcError(
                        Code.ABORTED, f"the traffic manager did not complete it: {exc.message}"
                    ) from None
                if exc.code is not Code.NOT_FOUND or attempt or "session" not in exc.message:
                    raise
                log.warning("the traffic manager forgot our session; arriving again")
                self.reconnects += 1
                await self._arrive()
        raise AssertionError("unreachable")

    async def _follow_cluster_info(self) -> None:
        while True:
            try:
                client = await self.client()
                request = mapi.SessionRequest(session_id=self.session_id())
                async with client.stream(mapi.WATCH_CLUSTER_INFO, request) as updates:
                    async for info in updates:
                        self.cluster = info
                        if self.network is not None:
                            await self.network.follow(info)
            except RpcError as exc:
                log.debug("cluster info watch ended: %s", exc.message)
            # The link broke or the session was replaced: follow the new one.
            with trio.move_on_after(5):
                await self._session_changed.wait()

    # --- engagements --------------------------------------------------------------------------

    async def engage(self, request: dapi.InterceptRequest) -> aapi.EngagementInfo:
        """The one engage flow of intercept, replace and ingest: parse the local side, ask the
        manager, then start the engagement's local services (`_serve_engagement`); if those
        fail, leave again, so nothing is half done."""
        try:
            mount = MountFlag.parse(request.mount)  # refused before the cluster changes
        except UserError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        to_pod = [parse_to_pod(value) for value in request.to_pod]
        info, mappings = await self._ask_manager(request)
        if info.name in self.engaged:
            # Already ours: the manager answered with the engagement as it is.
            return self.engaged[info.name]
        targets = _local_targets(info, mappings, request.local_address)
        info = msgspec.structs.replace(
            info, local=[_host_port(*targets[p.container_port]) for p in info.ports]
        )
        self.targets[info.id] = targets
        if info.decrypted and not request.http_plaintext:
            self.local_tls[info.id] = local_tls_context()
        # Ingest gives the volumes read-only (as Telepresence's does).
        info = await self.mounts.attach(info, mount.read_only_if(request.kind == "ingest"))
        self.engaged[info.name] = info
        self.engage_requests[info.name] = request
        self._dials_wanted.set()
        scope = trio.CancelScope()
        self._local_sides[info.name] = scope
        try:
            assert self._nursery is not None, "engage before the session runs"
            await self._nursery.start(self._serve_engagement, info, to_pod, scope)
        except BaseException as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.leave(info.name)
            if isinstance(exc, BaseExceptionGroup):
                leaf = single_leaf(exc)
                if isinstance(leaf, TeleError):
                    raise leaf from None
            raise
        return info

    async def _ask_manager(
        self, request: dapi.InterceptRequest, engagement_id: str = ""
    ) -> tuple[aapi.EngagementInfo, list[dapi.PortMapping]]:
        """ENGAGE on the manager; the engagement and the local port mappings it uses."""
        kind = request.kind
        mappings = list(request.ports)
        if not mappings and kind == "intercept":
            mappings = [dapi.PortMapping(local=request.local_port, remote=request.port)]
        remotes = [m.remote for m in mappings]
        info = await self.call_in_session(
            aapi.ENGAGE,
            lambda session_id: aapi.EngageRequest(
                session_id=session_id,
                namespace=request.namespace or self.namespace,
                workload=request.workload or request.name,
                name=request.name,
                service=request.service,
                port=remotes[0] if len(remotes) == 1 else "",
                ports=remotes if len(remotes) > 1 or kind != "intercept" else [],
                container=request.container,
                mechanism=request.mechanism,
                headers=request.headers,
                path_equal=request.path_equal,
                path_prefix=request.path_prefix,
                path_regex=request.path_regex,
                kind=kind,
                engagement_id=engagement_id,
            ),
        )
        return info, mappings

    async def _keep_engagements(self) -> None:
        """Engage again after arriving again. A new arrival means the manager forgot the
        session (its pod was replaced, or the lease ran out while the link was down), and with
        it the session's engagements: they come back without the user asking, with the same
        ids, so their local side (handlers, forwards, mounts) goes on as it was. One that
        cannot (someone else took the port meanwhile) ends, with the reason logged and shown
        by `tele status`."""
        seen = self.arrivals
        while True:
            while self.arrivals == seen:
                await self._session_changed.wait()
            seen = self.arrivals
            for name, request in list(self.engage_requests.items()):
                old = self.engaged.get(name)
                if old is None:
                    continue
                try:
                    info, _ = await self._ask_manager(request, old.id)
                except (RpcError, TeleError) as exc:
                    reason = exc.message if isinstance(exc, RpcError) else str(exc)
                    log.warning("%s ended: it cannot be engaged again: %s", name, reason)
                    self.last_error = f"{name} ended: {reason}"
                    with trio.CancelScope(shield=True):
                        await self._forget(name)
                    continue
                if info.id != old.id:  # the manager could not keep it: follow the new one
                    self.targets[info.id] = self.targets.pop(old.id, {})
                    if old.id in self.local_tls:
                        self.local_tls[info.id] = self.local_tls.pop(old.id)
                self.engaged[name] = msgspec.structs.replace(old, id=info.id, pod_ips=info.pod_ips)
                log.info("engaged %s again in the new session", name)

    async def _serve_engagement(
        self,
        info: aapi.EngagementInfo,
        to_pod: list[Destination],
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """What runs on this machine while `info` lasts (until `leave` cancels `scope`):
        the `--to-pod` forwards to the engaged pod. Started once all of them listen."""
        with scope:
            async with trio.open_nursery() as nursery:
                if to_pod and not info.pod_ips:
                    raise UserError(f"{info.name} has no pod to forward --to-pod ports to")
                for wanted in to_pod:
                    destination = Destination(
                        wanted.protocol, ipaddress.ip_address(info.pod_ips[0]), wanted.port
                    )
                    serve = serve_forward if wanted.protocol is Protocol.TCP else serve_udp_forward
                    await nursery.start(
                        functools.partial(serve, self.dial, destination, port=wanted.port)
                    )
                task_status.started()
                await trio.sleep_forever()

    def engagement_lines(self) -> list[str]:
        """One line per engagement for `tele status`."""
        lines = []
        for info in self.engaged.values():
            where = ", ".join(info.local)
            what = f" -> {where} ({info.mechanism})" if where else ""
            volumes = f", volumes at {info.local_mount}" if info.local_mount else ""
            lines.append(
                f"{info.name}: {PAST_TENSE.get(info.kind, info.kind)} {info.workload_kind} "
                f"{info.namespace}/{info.workload}{what}{volumes}"
            )
        return lines

    def _own_name(self, name: str) -> str:
        """`name`, or the one ingest of this session of the workload `name` (`leave echo`
        ends the ingest `echo/echo`)."""
        if name in self.engaged:
            return name
        ingests = [n for n, i in self.engaged.items() if i.kind == "ingest" and i.workload == name]
        return ingests[0] if len(ingests) == 1 else name

    async def leave(self, name: str) -> None:
        name = self._own_name(name)
        info = self.engaged.get(name)
        if info is None:
            raise UserError(f"there is no engagement named {name}; `tele list` shows them")
        await self._forget(name)
        await self.call_in_session(
            aapi.LEAVE, lambda session_id: aapi.LeaveRequest(session_id=session_id, name=name)
        )

    async def _forget(self, name: str) -> None:
        """End `name` on this machine: its local side stops, its volumes are unmounted."""
        info = self.engaged.get(name)
        scope = self._local_sides.pop(name, None)
        if scope is not None:
            scope.cancel()
        if info is not None:
            await self.mounts.detach(info.id)
            self.targets.pop(info.id, None)
            self.local_tls.pop(info.id, None)
        self.engaged.pop(name, None)
        self.engage_requests.pop(name, None)

    async def _serve_dials(self) -> None:
        """Answer the manager's dial-back requests for as long as the session lives."""
        await self._dials_wanted.wait()
        while True:
            try:
                client = await self.client()

                async def dial_back(destination: Destination, dial_id: str) -> H2Stream:
                    return await self.pool.dial(
                        destination, session=self.session_id(), dial_id=dial_id
                    )

                await serve_dial_backs(
                    client, self.session_id(), dial_back, self._target, self.local_tls.get
                )
            except RpcError as exc:
                log.debug("dial-back watch ended: %s", exc.message)
            with trio.move_on_after(5):
                await self._session_changed.wait()

    def _target(self, engagement_id: str, port: int) -> tuple[str, int] | None:
        return self.targets.get(engagement_id, {}).get(port)

    async def _depart(self) -> None:
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
