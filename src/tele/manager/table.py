"""The manager's engagement table, pure: who engaged what, and the rules an ENGAGE must pass.

No I/O, no clock, no trio: the table takes requests and agent configurations and answers with
what to record or an `RpcError` saying why not (tests/manager/test_table.py drives it). The
flow around it (finding the workload, rolling pods, waiting for agents) is
`tele.manager.engage.Engagements`'.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tele.contracts import agentconfig
from tele.rpc import agent_api as aapi
from tele.rpc import filters
from tele.rpc.agent_api import PAST_TENSE
from tele.rpc.errors import Code, RpcError

WorkloadKey = tuple[str, str, str]
"""(kind, namespace, name)"""

KINDS = ("intercept", "replace", "ingest", aapi.WIRETAP)
TAKES_SERVICE_PORTS = ("intercept", aapi.WIRETAP)
"""The kinds that name service ports (a replace takes container ports, an ingest none)."""
SHARED = ("ingest", aapi.WIRETAP)
"""The kinds that take nothing away from anyone: they never conflict, and several clients may
use the same name."""
_ENGAGEMENT_ID = re.compile(r"[0-9a-f]{16}")


@dataclass
class Active:
    info: aapi.EngagementInfo
    session_id: str
    workload_key: WorkloadKey
    engagement: aapi.Engagement


@dataclass
class EngagementTable:
    """Active engagements by (client session, name), and replaces being prepared."""

    active: dict[tuple[str, str], Active] = field(default_factory=dict)
    """By (client session, engagement name): names are unique per session; across sessions
    only ingests may share one."""
    replacing: dict[tuple[WorkloadKey, str], str] = field(default_factory=dict)
    """(workload key, container) of replaces being prepared -> the replacing client."""
    new_id: Callable[[], str] = field(default=lambda: secrets.token_hex(8))

    # --- questions ------------------------------------------------------------------------------

    def of_workload(self, key: WorkloadKey) -> list[Active]:
        return [a for a in self.active.values() if a.workload_key == key]

    def by_engagement_id(self, engagement_id: str) -> Active | None:
        return next((a for a in self.active.values() if a.engagement.id == engagement_id), None)

    def replaced_containers(self, key: WorkloadKey) -> frozenset[str]:
        """The containers of a workload that its pods must be made without, now: those of
        active replaces and of replaces being prepared (what the webhook asks)."""
        names = {
            a.info.container
            for a in self.active.values()
            if a.workload_key == key and a.info.kind == "replace"
        }
        names |= {container for (k, container) in self.replacing if k == key}
        return frozenset(names)

    # --- the rules of an ENGAGE ------------------------------------------------------------------

    def existing(self, request: aapi.EngageRequest, name: str) -> aapi.EngagementInfo | None:
        """The session's own engagement of that name (engaging again is idempotent), None if
        there is none; refused when the name is another kind's, or (but for ingests) another
        session's."""
        mine = self.active.get((request.session_id, name))
        if mine is not None:
            if mine.info.kind != request.kind:
                raise RpcError(
                    Code.ALREADY_EXISTS,
                    f"You already have {_an(mine.info.kind)} named {name}; leave it first.",
                )
            differs = _differs(mine, request)
            if differs:
                raise RpcError(
                    Code.ALREADY_EXISTS,
                    f"You already have {mine.info.kind} {name} ({describe_engagement(mine.info)})"
                    f" with another {differs}; to change it, leave it first (`tele leave {name}`).",
                )
            return mine.info
        if request.kind not in SHARED:
            for other in self.active.values():
                if other.info.name == name and other.info.kind not in SHARED:
                    raise RpcError(
                        Code.ALREADY_EXISTS, f"{name} is already engaged by {other.info.client}."
                    )
        return None

    def check_conflicts(
        self,
        key: WorkloadKey,
        container: str,
        chosen: list[agentconfig.Intercept],
        request: aapi.EngageRequest,
    ) -> None:
        """A replace takes a whole container, a tcp intercept a whole port; http intercepts
        share a port when their filters differ; ingests and wiretaps never conflict."""
        if request.kind in SHARED:
            return
        being_replaced = self.replacing.get((key, container))
        if being_replaced is not None:
            raise RpcError(
                Code.ALREADY_EXISTS,
                f"Container {container} of {request.workload} is being replaced by "
                f"{being_replaced}.",
            )
        ports = {i.container_port for i in chosen}
        for other in self.active.values():
            if (
                other.workload_key != key
                or other.info.kind in SHARED
                or other.info.container != container
            ):
                continue
            if "replace" in (other.info.kind, request.kind):
                raise RpcError(
                    Code.ALREADY_EXISTS,
                    f"Container {container} of {request.workload} is already "
                    f"{PAST_TENSE[other.info.kind]} by {other.info.client} ({other.info.name}).",
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
                    f"Port {taken.service_port or taken.container_port} of {request.workload} "
                    f"is already engaged by {other.info.client} ({other.info.name}).",
                )

    # --- changes ----------------------------------------------------------------------------------

    def activate(
        self,
        request: aapi.EngageRequest,
        client: str,
        key: WorkloadKey,
        name: str,
        container: str,
        chosen: list[agentconfig.Intercept],
        agents: list[aapi.AgentIdentity],
        withheld: Sequence[str] = (),
        mount_error: str = "",
    ) -> aapi.EngagementInfo:
        """Record the engagement (its agents are up); returns what the client is told.
        `withheld`: sentences on what the user may not read (left out of `agents` already)."""
        engagement_id = request.engagement_id
        taken = {a.engagement.id for a in self.active.values()}
        if not _ENGAGEMENT_ID.fullmatch(engagement_id) or engagement_id in taken:
            engagement_id = self.new_id()
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
            pod_name=agents[0].pod_name if agents else "",
            environment=agents[0].environment.get(container, {}) if agents else {},
            mounts=agents[0].mounts.get(container, []) if agents else [],
            **_mount_fields(agents, container),
            withheld=list(withheld),
            mount_error=mount_error,
            kind=request.kind,
            decrypted=mechanism == "http" and any(a.terminates_tls for a in agents),
            headers=request.headers,
            path_equal=request.path_equal,
            path_prefix=request.path_prefix,
            path_regex=request.path_regex,
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
            copy_responses=request.copy_responses and request.kind == aapi.WIRETAP,
        )
        self.active[(request.session_id, name)] = Active(
            info=info, session_id=request.session_id, workload_key=key, engagement=engagement
        )
        return info

    def serve_from(
        self, slot: tuple[str, str], agents: list[aapi.AgentIdentity]
    ) -> aapi.EngagementInfo:
        """From now on the engagement in `slot` is served by the pods of `agents` (the first:
        the pod its client's `--to-pod` forwards and volumes reach): its pod lost its agent."""
        active = self.active[slot]
        info = active.info
        fields = _mount_fields(agents, info.container)
        if info.mount_error:  # withheld from this user (RBAC): the new pod's are too
            fields["sftp_port"] = 0
        info = msgspec.structs.replace(
            info, pod_ips=[a.pod_ip for a in agents], pod_name=agents[0].pod_name, **fields
        )
        self.active[slot] = dataclasses.replace(active, info=info)
        return info

    def agent_arrived_again(self, slot: tuple[str, str], agent: aapi.AgentIdentity) -> bool:
        """The agent of the pod serving the engagement in `slot` arrived again (it restarted
        in that pod): its file server may listen on another port now. True if that changed
        what the engagement's client is told."""
        active = self.active[slot]
        info = active.info
        fields = _mount_fields([agent], info.container)
        if info.mount_error:  # withheld from this user (RBAC)
            fields["sftp_port"] = 0
        fresh = msgspec.structs.replace(info, **fields)
        if fresh == info:
            return False
        self.active[slot] = dataclasses.replace(active, info=fresh)
        return True

    def leave(self, session_id: str, name: str) -> Active | None:
        return self.active.pop((session_id, name), None)

    def end_session(self, session_id: str) -> list[Active]:
        """Remove and return the session's engagements."""
        ended = [slot for slot, a in self.active.items() if a.session_id == session_id]
        return [self.active.pop(slot) for slot in ended]


def _an(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def describe_engagement(info: aapi.EngagementInfo) -> str:
    """`tcp, service port echo:http` / `http: header x-dev=me, service port echo:80`."""
    how = filters.describe(
        info.mechanism, info.headers, info.path_equal, info.path_prefix, info.path_regex
    )
    ports = ", ".join(f"{p.service}:{p.service_port_name or p.service_port}" for p in info.ports)
    if info.kind not in TAKES_SERVICE_PORTS:
        return f"container {info.container}"
    return f"{how}, service port {ports}" if ports else how


def _differs(mine: Active, request: aapi.EngageRequest) -> str:
    """What `request` asks differently from the engagement `mine` ("" when nothing): engaging
    again is idempotent only for the same request."""
    engagement = mine.engagement
    if request.kind in TAKES_SERVICE_PORTS and (
        request.mechanism != engagement.mechanism
        or list(request.headers) != list(engagement.headers)
        or request.path_equal != engagement.path_equal
        or request.path_prefix != engagement.path_prefix
        or request.path_regex != engagement.path_regex
    ):
        return "mechanism or filter"
    if request.service and request.service != mine.info.service:
        return "service"
    if request.container and request.container != mine.info.container:
        return "container"
    names = set()
    for port in mine.info.ports:
        names |= {port.service_port_name, str(port.service_port), str(port.container_port)}
    wanted = [p for p in (*request.ports, request.port) if p]
    if any(p not in names for p in wanted):
        return "port"
    return ""


# --- choosing what an engagement takes ----------------------------------------------------------


def choose_ports(
    config: agentconfig.AgentConfig, request: aapi.EngageRequest
) -> tuple[str, list[agentconfig.Intercept]]:
    """The container and the service ports a (multi-port) intercept takes, in the order
    the request names them; each must be unambiguous, and all in one container."""
    wanted = request.ports or [request.port]
    chosen: list[tuple[str, agentconfig.Intercept]] = []
    replaced = set(config.replaced())
    offered = [
        (container, intercept)
        for container, intercept in config.intercepts()
        # A replaced container's own ports are no service's; other service-less ports are
        # the workload's inject-container-ports (callers dial the pod IP).
        if (intercept.service_name or container not in replaced)
        and (not request.container or container == request.container)
        and (not request.service or intercept.service_name == request.service)
    ]
    for port in wanted:
        candidates = [
            (container, intercept)
            for container, intercept in offered
            if not port or port in (intercept.service_port_name, str(intercept.service_port))
        ]
        if not candidates:
            # The container port, when it is the target of one service port only.
            by_container = [
                (container, intercept)
                for container, intercept in offered
                if port in (intercept.container_port_name, str(intercept.container_port))
            ]
            candidates = by_container if len(by_container) == 1 else []
        if not candidates:
            have = ", ".join(
                f"{i.service_name}:{i.service_port_name or i.service_port} "
                f"{i.service_port}\u2192{i.container_port}"
                if i.service_name
                else f"container port {i.container_port_name or i.container_port}"
                for _, i in offered
            )
            raise RpcError(
                Code.NOT_FOUND,
                f"{request.workload} has no service port matching"
                f"{' service ' + request.service if request.service else ''}"
                f"{' port ' + port if port else ''}"
                f" ({'its service ports: ' + have if have else 'it has no service port'}).",
            )
        if len(candidates) > 1:
            choices = ", ".join(
                f"{i.service_name}:{i.service_port_name or i.service_port}" for _, i in candidates
            )
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"{request.workload} has several service ports ({choices}); "
                "choose one with --service and --port.",
            )
        if candidates[0] in chosen:
            raise RpcError(Code.INVALID_ARGUMENT, f"Port {port} is named twice.")
        chosen.append(candidates[0])
    containers = sorted({container for container, _ in chosen})
    if len(containers) > 1:
        raise RpcError(
            Code.FAILED_PRECONDITION,
            f"The ports lead to different containers ({', '.join(containers)}); "
            "intercept each container separately.",
        )
    return containers[0], [intercept for _, intercept in chosen]


def pick_container(workload: Any, request: aapi.EngageRequest) -> str:
    """The container a replace or ingest is about: the named one, or the only one."""
    template = (workload.get("spec") or {}).get("template") or {}
    names = [
        str(c["name"])
        for c in (template.get("spec") or {}).get("containers") or []
        if c.get("name") != agentconfig.AGENT_CONTAINER  # a hand-injected agent is no app
    ]
    if request.container:
        if request.container not in names:
            raise RpcError(
                Code.NOT_FOUND,
                f"{request.workload} has no container named {request.container} "
                f"(it has {', '.join(names) or 'none'}).",
            )
        return request.container
    if len(names) != 1:
        raise RpcError(
            Code.FAILED_PRECONDITION,
            f"{request.workload} has several containers ({', '.join(names)}); "
            "choose one with --container.",
        )
    return names[0]


def container_ports(
    config: agentconfig.AgentConfig, container: str, request: aapi.EngageRequest
) -> list[agentconfig.Intercept]:
    """The ports a replace takes: every TCP and UDP port of the container (what the agent
    serves), or those the request names (container port names or numbers)."""
    own = [
        i
        for name, i in config.intercepts()
        if name == container and i.protocol.upper() in ("TCP", "UDP")
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
                f"Container {container} of {request.workload} has no TCP or UDP port {port} "
                f"(it has {have}).",
            )
        if found not in chosen:
            chosen.append(found)
    return chosen


def _mount_fields(agents: list[aapi.AgentIdentity], container: str) -> dict[str, Any]:
    """What a client needs to mount the engaged container's volumes (from its agent)."""
    if not agents:
        return {}
    agent = agents[0]
    own = agent.sftp_ports.get(container, 0)
    return {
        "mount_policies": agent.mount_policies.get(container, {}),
        # A container's own file server is chrooted into its export directory.
        "mount_point": "/" if own else f"{agentconfig.MOUNT_PREFIX}/{container}",
        "sftp_port": own or agent.sftp_port,
    }
