"""The local side of a session's engagements: ask the manager to engage, then run what lasts on
this machine (local handlers' targets and TLS, `--to-pod` forwards, volumes), answer dial-backs,
engage again after a new arrival, and end it all on leave."""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import trio

from tele.daemon.engage import local_tls_context, serve_dial_backs
from tele.daemon.forward import serve_forward, serve_udp_forward
from tele.daemon.lease import SessionLease
from tele.daemon.mounts import MountFlag, Mounts
from tele.errors import TeleError, UserError, single_leaf
from tele.net.tunnel import Destination, Protocol
from tele.rpc import agent_api as aapi
from tele.rpc import daemon_api as dapi
from tele.rpc import filters
from tele.rpc.agent_api import PAST_TENSE
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import H2Stream
from tele.rpc.manager_api import SessionRequest

log = logging.getLogger(__name__)

TAP_POLL_SECONDS = 2.0
"""How often the wiretaps' counters are asked from the manager while there is a wiretap."""
REMOUNT_TRIES = 3
REMOUNT_PAUSE = 1.0
"""A restarted agent's volumes: how often, and how far apart, mounting them again is tried."""
POD_CHANGES_KEPT = 16
"""Per engagement, how many of the sentences saying that its serving pod changed are kept."""
TAKES_SERVICE_PORTS = ("intercept", aapi.WIRETAP)


Dial = Callable[[Destination], Awaitable[H2Stream]]
DialBack = Callable[[Destination, str], Awaitable[H2Stream]]


def parse_to_pod(value: str) -> Destination:
    """`PORT` or `PORT/TCP|UDP` (a `--to-pod` value) as a destination on the pod (its IP is
    filled in once engaged: 0.0.0.0 until then)."""
    port, _, protocol = value.partition("/")
    protocol = protocol.upper() or "TCP"
    if not port.isdigit() or not 0 < int(port) < 65536 or protocol not in ("TCP", "UDP"):
        raise UserError(f"--to-pod {value!r} must be PORT or PORT/UDP (a port from 1 to 65535).")
    return Destination(Protocol(protocol.lower()), ipaddress.ip_address("0.0.0.0"), int(port))


RESPONSE_TARGET: Final = 0
"""The key in an engagement's targets of a wiretap's response handler (no container port is
0): the manager's dial for a response copy asks for it (tele.daemon.engage)."""


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


def describe(info: aapi.EngagementInfo) -> str:
    """How the engagement takes traffic: `tcp`, `http: header x-dev=me, path prefix /api`."""
    return filters.describe(
        info.mechanism, info.headers, info.path_equal, info.path_prefix, info.path_regex
    )


def dapi_session(session_id: str) -> SessionRequest:
    return SessionRequest(session_id=session_id)


def describe_taps(counters: aapi.TapCounters | None) -> str:
    """`12 connections copied (3.1 KiB), 2 dropped (handler absent or slow)`."""
    if counters is None:
        return "no connections copied yet"
    copied = counters.connections - counters.dropped_connections
    plural = "s" if copied != 1 else ""
    text = f"{copied} connection{plural} copied ({_size(counters.copied_bytes)})"
    if counters.dropped_connections:
        text += (
            f", {counters.dropped_connections} dropped ({_size(counters.dropped_bytes)}; "
            "the local handler was absent or too slow)"
        )
    if counters.response_copied_bytes or counters.response_dropped:
        text += f"; answers copied ({_size(counters.response_copied_bytes)})"
        if counters.response_dropped:
            text += (
                f", {counters.response_dropped} dropped "
                f"({_size(counters.response_dropped_bytes)}; the response handler was absent "
                "or too slow)"
            )
    return text


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1024 * 1024):.1f} MiB"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LocalEngagements:
    """A session's engagements on this machine, by name; `serve` runs their local sides."""

    def __init__(
        self,
        lease: SessionLease,
        mounts: Mounts,
        *,
        namespace: str,
        dial: Dial,
        dial_back: DialBack,
        agent_timeout: float = 30.0,
        endpoint_dial: float = 3.0,
    ) -> None:
        self._agent_timeout = agent_timeout
        """Config timeouts.intercept: how long the manager may wait for the agent."""
        self._endpoint_dial = endpoint_dial
        """Config timeouts.endpointDial: connecting to a local handler."""
        self._lease = lease
        self._mounts = mounts
        self._namespace = namespace
        self._dial = dial
        self._dial_back = dial_back
        self.engaged: dict[str, aapi.EngagementInfo] = {}
        # What the user asked for, by engagement name: engaged again after a new arrival.
        self.engage_requests: dict[str, dapi.InterceptRequest] = {}
        # Per engagement id: TLS towards the local handler (decrypted callers' requests).
        self.local_tls: dict[str, ssl.SSLContext] = {}
        self.targets: dict[str, dict[int, tuple[str, int]]] = {}
        """Per engagement id: container port -> the local handler's address."""
        self._local_sides: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._dials_wanted = trio.Event()
        self.steps: dict[int, str] = {}
        """The current step of each engage under way (`tele intercept` shows it on a terminal)."""
        self.tap_counters: dict[str, aapi.TapCounters] = {}
        """Per wiretap engagement id: its counters, as the manager last said."""
        self._taps_wanted = trio.Event()
        self.pod_changes: dict[str, list[str]] = {}
        """Per engagement name: the sentences saying that its serving pod changed, oldest
        first (the last POD_CHANGES_KEPT; `tele status` shows the last one, `tele intercept
        -- COMMAND` says each while it runs)."""
        self.pod_change_count: dict[str, int] = {}
        """Per engagement name: how many times its serving pod changed."""
        self.agent_arrivals: dict[str, str] = {}
        """Per engagement name: which arrival of its serving pod's agent the manager named last
        (ServingPod.agent); another one for the same pod means the agent restarted there."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the local sides, dial-back answers and re-engaging, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._serve_dials)
            nursery.start_soon(self._keep_engagements)
            nursery.start_soon(self._follow_tap_counters)
            nursery.start_soon(self._follow_serving_pods)
            task_status.started()
            await trio.sleep_forever()

    async def engage(self, request: dapi.InterceptRequest) -> aapi.EngagementInfo:
        """The one engage flow of intercept, replace and ingest: parse the local side, ask the
        manager, then start the engagement's local services (`_serve_engagement`); if those
        fail, leave again, so nothing is half done."""
        key = id(request)
        try:
            return await self._engage(request, lambda step: self.steps.__setitem__(key, step))
        finally:
            self.steps.pop(key, None)

    async def _engage(
        self, request: dapi.InterceptRequest, step: Callable[[str], None]
    ) -> aapi.EngagementInfo:
        try:
            mount = MountFlag.parse(request.mount)  # refused before the cluster changes
        except UserError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        to_pod = [parse_to_pod(value) for value in request.to_pod]
        self._refuse_another(request)
        if request.kind in TAKES_SERVICE_PORTS:
            locals_ = [m.local for m in request.ports] or [request.local_port]
            locals_ += [request.response_port] if request.response_port else []
            self._refuse_taken_ports(locals_, request.name)
        workload = request.workload or request.name
        step(
            f"the traffic manager engages {workload} (injecting its traffic agent and waiting "
            "for its pods to roll out with it, when it has none yet)"
        )
        info, mappings = await self._ask_manager(request)
        if info.name in self.engaged:
            # Already ours, asked for the same way: the manager answered with it as it is.
            return self.engaged[info.name]
        targets = _local_targets(info, mappings, request.local_address)
        if request.response_port and request.kind == aapi.WIRETAP:
            targets[RESPONSE_TARGET] = (request.local_address, request.response_port)
        try:
            self._refuse_taken_ports([port for _, port in targets.values()], info.name)
        except UserError:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._lease.call_in_session(
                    aapi.LEAVE,
                    lambda session_id: aapi.LeaveRequest(session_id=session_id, name=info.name),
                )
            raise
        response = targets.get(RESPONSE_TARGET)
        info = msgspec.structs.replace(
            info,
            local=[_host_port(*targets[p.container_port]) for p in info.ports],
            response_local=_host_port(*response) if response else "",
        )
        self.targets[info.id] = targets
        if info.decrypted and not request.http_plaintext:
            self.local_tls[info.id] = local_tls_context()
        # Ingest and wiretap give the volumes read-only (as Telepresence's do).
        step(f"mounting the volumes of {info.workload_kind} {info.workload}")
        read_only = request.kind in ("ingest", aapi.WIRETAP)
        info = await self._mounts.attach(info, mount.read_only_if(read_only))
        step(f"starting {info.name}'s local side (handlers, forwards)")
        self.engaged[info.name] = info
        self.engage_requests[info.name] = request
        self._dials_wanted.set()
        if info.kind == aapi.WIRETAP:
            self._taps_wanted.set()
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

    def _refuse_another(self, request: dapi.InterceptRequest) -> None:
        """The same name asked for differently (another port, filter, mount...) is refused, not
        answered with the engagement as it is: that would say the new request succeeded."""
        held = self.engage_requests.get(request.name) if request.name else None
        info = self.engaged.get(request.name)
        if held is None or info is None or held == request:
            return
        local = f" -> {', '.join(info.local)}" if info.local else ""
        raise UserError(
            f"You already have {info.kind} {info.name} ({describe(info)}{local}); "
            f"to change it, leave it first (`tele leave {info.name}`)."
        )

    def _refuse_taken_ports(self, ports: list[int], asking: str) -> None:
        """Two engagements into one local port would mix their traffic in one handler (`asking`:
        the name asked for, whose own ports are not a conflict)."""
        for name, info in self.engaged.items():
            if name == asking:
                continue
            taken = {port for _, port in self.targets.get(info.id, {}).values()}
            for port in ports:
                if port in taken:
                    raise UserError(
                        f"Local port {port} already receives the traffic of {name}; "
                        f"choose another with --port, or leave {name} first."
                    )

    async def _ask_manager(
        self, request: dapi.InterceptRequest, engagement_id: str = ""
    ) -> tuple[aapi.EngagementInfo, list[dapi.PortMapping]]:
        """ENGAGE on the manager; the engagement and the local port mappings it uses."""
        kind = request.kind
        mappings = list(request.ports)
        if not mappings and kind in TAKES_SERVICE_PORTS:
            mappings = [dapi.PortMapping(local=request.local_port, remote=request.port)]
        remotes = [m.remote for m in mappings]
        info = await self._lease.call_in_session(
            aapi.ENGAGE,
            lambda session_id: aapi.EngageRequest(
                session_id=session_id,
                namespace=request.namespace or self._namespace,
                workload=request.workload or request.name,
                name=request.name,
                service=request.service,
                port=remotes[0] if len(remotes) == 1 else "",
                ports=remotes if len(remotes) > 1 or kind not in TAKES_SERVICE_PORTS else [],
                container=request.container,
                mechanism=request.mechanism,
                headers=request.headers,
                path_equal=request.path_equal,
                path_prefix=request.path_prefix,
                path_regex=request.path_regex,
                kind=kind,
                copy_responses=bool(request.response_port) and kind == aapi.WIRETAP,
                engagement_id=engagement_id,
                agent_timeout=self._agent_timeout,
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
        lease = self._lease
        seen = lease.arrivals
        while True:
            while lease.arrivals == seen:
                await lease.changed.wait()
            seen = lease.arrivals
            for name, request in list(self.engage_requests.items()):
                old = self.engaged.get(name)
                if old is None:
                    continue
                try:
                    info, _ = await self._ask_manager(request, old.id)
                except (RpcError, TeleError) as exc:
                    reason = exc.message if isinstance(exc, RpcError) else str(exc)
                    log.warning("%s ended: it cannot be engaged again: %s", name, reason)
                    lease.last_error = f"{name} ended: {reason}"
                    with trio.CancelScope(shield=True):
                        await self._forget(name)
                    continue
                if info.id != old.id:  # the manager could not keep it: follow the new one
                    self.targets[info.id] = self.targets.pop(old.id, {})
                    if old.id in self.local_tls:
                        self.local_tls[info.id] = self.local_tls.pop(old.id)
                self.engaged[name] = msgspec.structs.replace(old, id=info.id)
                log.info("engaged %s again in the new session", name)
                # Its pod may have been replaced meanwhile: the forwards and volumes follow.
                await self._serving_pod(
                    aapi.ServingPod(
                        engagement_id=info.id,
                        name=name,
                        pod_name=info.pod_name,
                        pod_ips=info.pod_ips,
                        sftp_port=info.sftp_port,
                        mount_point=info.mount_point,
                    )
                )

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
                    raise UserError(f"{info.name} has no pod to forward --to-pod ports to.")
                dial = functools.partial(self._dial_serving_pod, info.name)
                for wanted in to_pod:
                    destination = Destination(
                        wanted.protocol, ipaddress.ip_address(info.pod_ips[0]), wanted.port
                    )
                    serve = serve_forward if wanted.protocol is Protocol.TCP else serve_udp_forward
                    await nursery.start(
                        functools.partial(serve, dial, destination, port=wanted.port)
                    )
                task_status.started()
                await trio.sleep_forever()

    async def _dial_serving_pod(self, name: str, destination: Destination) -> H2Stream:
        """A `--to-pod` connection or flow goes to the pod that serves `name` when it starts:
        the one the engagement named first, or the one that took over since."""
        info = self.engaged.get(name)
        if info is not None and info.pod_ips:
            address = ipaddress.ip_address(info.pod_ips[0])
            destination = Destination(destination.protocol, address, destination.port)
        return await self._dial(destination)

    async def _follow_serving_pods(self) -> None:
        """Follow the manager's word on which pod serves each engagement (WATCH_SERVING), for
        as long as the session lives; again after each new arrival."""
        await self._dials_wanted.wait()
        lease = self._lease
        while True:
            seen = lease.arrivals
            failure: RpcError | None = None
            try:
                client = await lease.client()
                request = SessionRequest(session_id=lease.session_id())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._cancel_on_arrival, seen, nursery.cancel_scope)
                    try:
                        async with client.stream(aapi.WATCH_SERVING, request) as updates:
                            async for update in updates:
                                for serving in update.pods:
                                    await self._serving_pod(serving)
                    except RpcError as exc:
                        failure = exc
                    nursery.cancel_scope.cancel()
            except TeleError as exc:
                log.debug("serving pods watch ended: %s", exc)
            if failure is not None and failure.code is Code.UNIMPLEMENTED:
                log.info("the traffic manager does not say when a serving pod changes")
                return
            if failure is not None:
                log.debug("serving pods watch ended: %s", failure.message)
            with trio.move_on_after(5):
                await lease.changed.wait()

    async def _cancel_on_arrival(self, seen: int, scope: trio.CancelScope) -> None:
        """Cancel `scope` once the session arrives again (a new session: watch anew)."""
        while self._lease.arrivals == seen:
            await self._lease.changed.wait()
        scope.cancel()

    async def _serving_pod(self, serving: aapi.ServingPod) -> None:
        """Another pod serves `serving.name` now: its `--to-pod` forwards go there from the
        next connection on, and its volumes are mounted again, at the same directory."""
        try:
            await self._follow_pod(serving)
        except Exception:
            log.exception("%s: following its new pod %s failed", serving.name, serving.pod_name)

    async def _follow_pod(self, serving: aapi.ServingPod) -> None:
        old = self.engaged.get(serving.name)
        if old is None or old.id != serving.engagement_id or not serving.pod_name:
            return
        known = self.agent_arrivals.get(serving.name, "")
        if serving.agent:  # "" while no agent is up: what comes next is compared with the last
            self.agent_arrivals[serving.name] = serving.agent
        if serving.pod_name == old.pod_name:
            if known and serving.agent and serving.agent != known:
                # Its agent restarted in the pod (a crash, an OOM kill; or the traffic manager
                # did): the mount ended with the old agent's connection.
                sentence = f"the traffic agent of {old.name} in pod {old.pod_name} arrived again"
                await self._moved(serving, old, sentence)
            return
        where = f" ({serving.pod_ips[0]})" if serving.pod_ips else ""
        sentence = (
            f"{serving.name} is served by pod {serving.pod_name}{where} now: pod "
            f"{old.pod_name} was replaced"
        )
        await self._moved(serving, old, sentence)

    async def _moved(
        self, serving: aapi.ServingPod, old: aapi.EngagementInfo, sentence: str
    ) -> None:
        """The engagement is served by `serving` now: the next `--to-pod` connection goes
        there, and volumes that were mounted are mounted again at the same directory (a few
        tries, a second apart: an agent's file server takes connections once its arrival is
        answered, and a client may hear of the arrival first)."""
        moved = msgspec.structs.replace(
            old,
            pod_name=serving.pod_name,
            pod_ips=serving.pod_ips,
            sftp_port=serving.sftp_port,
            mount_point=serving.mount_point or old.mount_point,
        )
        self.engaged[serving.name] = moved  # the next --to-pod connection goes there
        log.info("%s", sentence)
        if self._mounts.mounted(old.id):
            remounted, current = moved, moved
            for attempt in range(REMOUNT_TRIES):
                if attempt:
                    await trio.sleep(REMOUNT_PAUSE)
                remounted = await self._mounts.remount(moved)
                found = self.engaged.get(serving.name)
                if found is None or found.id != moved.id:
                    await self._mounts.detach(moved.id)  # left meanwhile
                    return
                current = found
                if not remounted.mount_error:
                    break
            self.engaged[serving.name] = msgspec.structs.replace(
                current,
                local_mount=remounted.local_mount,
                mount_error=remounted.mount_error,
                environment=remounted.environment,
            )
            if remounted.mount_error:
                sentence += f"; its volumes could not be mounted again: {remounted.mount_error}"
            else:
                sentence += f"; its volumes are mounted again at {remounted.local_mount}"
        said = self.pod_changes.setdefault(serving.name, [])
        said.append(sentence)
        del said[:-POD_CHANGES_KEPT]
        self.pod_change_count[serving.name] = self.pod_change_count.get(serving.name, 0) + 1

    async def _follow_tap_counters(self) -> None:
        """While there are wiretaps, keep their counters as the manager sums them up."""
        while True:
            await self._taps_wanted.wait()
            if not any(i.kind == aapi.WIRETAP for i in self.engaged.values()):
                self._taps_wanted = trio.Event()
                self.tap_counters.clear()
                continue
            try:
                reply = await self._lease.call_in_session(aapi.TAP_COUNTERS, dapi_session)
                self.tap_counters = dict(reply.taps)
            except (RpcError, TeleError) as exc:
                log.debug("wiretap counters: %s", exc)
            await trio.sleep(TAP_POLL_SECONDS)

    def lines(self) -> list[str]:
        """One line per engagement for `tele status`."""
        lines = []
        for info in self.engaged.values():
            where = ", ".join(info.local)
            what = f" -> {where} ({describe(info)})" if where else ""
            volumes = f", volumes at {info.local_mount}" if info.local_mount else ""
            taps = ""
            if info.kind == aapi.WIRETAP:
                taps = "; " + describe_taps(self.tap_counters.get(info.id))
            pod = f", pod {info.pod_name}" if info.pod_name else ""
            lines.append(
                f"{info.name}: {PAST_TENSE.get(info.kind, info.kind)} {info.workload_kind} "
                f"{info.namespace}/{info.workload}{what}{volumes}{pod}{taps}"
            )
        return lines

    def statuses(self) -> list[dapi.EngagementStatus]:
        """Each engagement for `tele status -o json`: what it takes and where it goes."""
        return [
            dapi.EngagementStatus(
                name=i.name,
                kind=i.kind,
                namespace=i.namespace,
                workload=i.workload,
                workload_kind=i.workload_kind,
                container=i.container,
                mechanism=i.mechanism,
                headers=i.headers,
                path_equal=i.path_equal,
                path_prefix=i.path_prefix,
                path_regex=i.path_regex,
                local=i.local,
                local_mount=i.local_mount,
                pod_name=i.pod_name,
                pod_ips=i.pod_ips,
                pod_change=(self.pod_changes.get(i.name) or [""])[-1],
                pod_changes=list(self.pod_changes.get(i.name, ())),
                pod_change_count=self.pod_change_count.get(i.name, 0),
                wiretap=(
                    self.tap_counters.get(i.id, aapi.TapCounters())
                    if i.kind == aapi.WIRETAP
                    else None
                ),
            )
            for i in self.engaged.values()
        ]

    def _own_name(self, name: str) -> str:
        """`name`, or the one engagement of this session that `name` means: the ingest of the
        workload `name` (`leave echo` ends the ingest `echo/echo`), the intercept named
        `name-NAMESPACE` (`intercept -n NS echo` names it `echo-NS`, as Telepresence does)."""
        if name in self.engaged:
            return name
        meant = [
            n
            for n, i in self.engaged.items()
            if i.workload == name and (i.kind == "ingest" or n == f"{name}-{i.namespace}")
        ]
        return meant[0] if len(meant) == 1 else name

    async def leave(self, name: str) -> None:
        name = self._own_name(name)
        info = self.engaged.get(name)
        if info is None:
            raise UserError(f"There is no engagement named {name}; `tele list` shows them.")
        await self._forget(name)
        await self._lease.call_in_session(
            aapi.LEAVE, lambda session_id: aapi.LeaveRequest(session_id=session_id, name=name)
        )

    async def _forget(self, name: str) -> None:
        """End `name` on this machine: its local side stops, its volumes are unmounted."""
        info = self.engaged.get(name)
        scope = self._local_sides.pop(name, None)
        if scope is not None:
            scope.cancel()
        if info is not None:
            await self._mounts.detach(info.id)
            self.targets.pop(info.id, None)
            self.local_tls.pop(info.id, None)
            self.tap_counters.pop(info.id, None)
        self.engaged.pop(name, None)
        self.engage_requests.pop(name, None)
        self.pod_changes.pop(name, None)
        self.pod_change_count.pop(name, None)
        self.agent_arrivals.pop(name, None)

    async def _serve_dials(self) -> None:
        """Answer the manager's dial-back requests for as long as the session lives."""
        await self._dials_wanted.wait()
        lease = self._lease
        while True:
            try:
                client = await lease.client()
                await serve_dial_backs(
                    client,
                    lease.session_id(),
                    self._dial_back,
                    self._target,
                    self.local_tls.get,
                    self._name_of,
                    endpoint_dial=self._endpoint_dial,
                )
            except RpcError as exc:
                log.debug("dial-back watch ended: %s", exc.message)
            with trio.move_on_after(5):
                await lease.changed.wait()

    def _target(self, engagement_id: str, port: int) -> tuple[str, int] | None:
        return self.targets.get(engagement_id, {}).get(port)

    def _name_of(self, engagement_id: str) -> str:
        return next(
            (name for name, info in self.engaged.items() if info.id == engagement_id),
            engagement_id,
        )
