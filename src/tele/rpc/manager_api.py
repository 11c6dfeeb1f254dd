"""The daemon <-> traffic manager API: sessions, cluster info, DNS lookups, workloads, the
cluster side of `tele gather-logs` and `tele loglevel`.

Transport-free definitions (tele.rpc carries them; tunnel streams share the same link). Fields
are added with defaults so that clients and managers of neighbouring versions understand each
other; the manager's version is reported on arrival so the client can warn about skew.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tele.rpc.method import Empty, ServerStream, Unary

SERVICE = "tele.manager.v1"
DEFAULT_PORT = 8081
"""The manager's API port (Service `traffic-manager`, port name `api`)."""


class ClientIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who arrives: shown in `tele status`/`tele list` and kept with the session."""

    user: str
    host: str
    client_version: str
    install_id: str = ""
    kube_context: str = ""
    mapped_namespaces: list[str] = []
    """Namespaces the client wants; empty means all that the manager manages."""
    capabilities: list[str] = []
    """What this client can do beyond the oldest clients (CLIENT_CAPABILITIES): a client of
    an older version sends none, and the manager refuses it what it would misread."""


WIRETAP_CHANNELS = "wiretap-channels"
"""The client serves a wiretap's copy channel (DialRequest.channel: the copies of many
connections as records, tele.rpc.tapcopies); a client without it would hand the records to
its handler as if they were the caller's bytes, so the manager refuses it wiretaps."""
CLIENT_CAPABILITIES = (WIRETAP_CHANNELS,)
"""What this version's clients announce on arrival."""


class ClusterInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a client needs to route and resolve the cluster."""

    manager_namespace: str
    manager_version: str
    pod_subnets: list[str]
    service_subnets: list[str]
    cluster_domain: str = "cluster.local"
    dns_ip: str = ""
    managed_namespaces: list[str] = []
    """The namespaces this manager manages now (changes live with a dynamic selector)."""
    cluster_wide: bool = True
    client_config: dict[str, Any] = {}
    """The Helm values `client` (dns, routing): the client checks them (tele.config
    network_from_manager) and ranks them below its flags and kubeconfig."""


class SessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    lease_seconds: float
    """The session ends if no Remain arrives for this long."""
    cluster: ClusterInfo


class SessionRequest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str


class LookupRequest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    name: str
    """A DNS name as the client saw it, without the trailing dot."""
    qtype: str = "A"
    """A, AAAA, SRV or ANY."""


class DnsRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: str
    value: str
    """An address for A/AAAA; "priority weight port target" for SRV."""
    ttl: int = 5


class LookupReply(msgspec.Struct, frozen=True, kw_only=True):
    rcode: str
    """NOERROR (records may be empty: the name exists with no record of this type),
    NXDOMAIN, or SERVFAIL."""
    records: list[DnsRecord] = []


class WorkloadsRequest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    namespace: str


class WorkloadInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    kind: str
    """Deployment, ReplicaSet, StatefulSet or Rollout."""
    uid: str = ""
    ready_replicas: int = 0
    replicas: int = 0
    services: list[str] = []
    agent_installed: bool = False
    """Its pods carry the traffic agent (connected to the manager or not)."""
    agent_pods: int = 0
    """How many of its pods carry the traffic agent."""
    agents_connected: int = 0
    """How many of those agents are in session with the manager."""
    not_interceptable_reason: str = ""
    engaged_by: list[str] = []


class WorkloadList(msgspec.Struct, frozen=True, kw_only=True):
    workloads: list[WorkloadInfo]


class VersionInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str = "traffic-manager"
    version: str


class LogSourcesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`tele gather-logs`: which of the cluster's logs the caller wants."""

    session_id: str
    traffic_manager: bool = True
    traffic_agents: str = "all"
    """all, none, or a name: the agents whose pod or workload name contains it."""


class LogSource(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    """traffic-manager or traffic-agent."""
    pod: str
    namespace: str
    container: str
    workload: str = ""


class LogSources(msgspec.Struct, frozen=True, kw_only=True):
    sources: list[LogSource]
    problems: list[str] = []
    """One sentence per log the caller asked for and cannot have (RBAC, none found)."""


class PodLogRequest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    source: LogSource


class PodLog(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    truncated: bool = False
    """Only the log's end is here (tele.manager.podlogs bounds each one)."""


class LogLevelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`tele loglevel`: the manager's level and the one it hands its agents."""

    session_id: str
    level: str
    duration: float = 0.0
    """Seconds until the configured level returns; 0: until the next change."""
    agents: bool = True


class LogLevelReply(msgspec.Struct, frozen=True, kw_only=True):
    level: str
    previous: str
    agents: int = 0
    """How many connected agents were told."""


class AuthenticateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The caller's credential, checked by the manager with a TokenReview; the link it came
    on is then that identity's (see tele.manager.auth)."""

    token: str
    """A bearer token: what the client's kubeconfig resolves to, or the agent's projected
    ServiceAccount token."""
    agent: bool = False
    """The token is an agent's, bound to the audience AGENT_TOKEN_AUDIENCE."""


class AuthenticateReply(msgspec.Struct, frozen=True, kw_only=True):
    username: str
    groups: list[str] = []


VERSION = Unary(f"/{SERVICE}/Version", Empty, VersionInfo)
AUTHENTICATE = Unary(f"/{SERVICE}/Authenticate", AuthenticateRequest, AuthenticateReply)
ARRIVE = Unary(f"/{SERVICE}/ArriveAsClient", ClientIdentity, SessionInfo)
REMAIN = Unary(f"/{SERVICE}/Remain", SessionRequest, Empty)
DEPART = Unary(f"/{SERVICE}/Depart", SessionRequest, Empty)
GET_CLUSTER_INFO = Unary(f"/{SERVICE}/GetClusterInfo", SessionRequest, ClusterInfo)
WATCH_CLUSTER_INFO = ServerStream(f"/{SERVICE}/WatchClusterInfo", SessionRequest, ClusterInfo)
LOOKUP_DNS = Unary(f"/{SERVICE}/LookupDNS", LookupRequest, LookupReply)
LIST_WORKLOADS = Unary(f"/{SERVICE}/ListWorkloads", WorkloadsRequest, WorkloadList)
LOG_SOURCES = Unary(f"/{SERVICE}/LogSources", LogSourcesRequest, LogSources)
POD_LOG = Unary(f"/{SERVICE}/PodLog", PodLogRequest, PodLog)
SET_LOG_LEVEL = Unary(f"/{SERVICE}/SetLogLevel", LogLevelRequest, LogLevelReply)
