"""The CLI <-> user daemon API: the messages of each call (tele.paths says where it listens).

Transport-free definitions only (tele.rpc carries them). The CLI imports this module and never
the daemon's internals. Messages are versioned by the service name; add fields with defaults so
that an older CLI and a newer daemon (or the reverse) still understand each other.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tele.rpc.agent_api import EngagementInfo, TapCounters, UninstallReply
from tele.rpc.manager_api import LogLevelReply, LogSource, LogSources, PodLog, WorkloadList
from tele.rpc.method import Empty, Unary

SERVICE = "tele.daemon.v1"

__all__ = ["Empty"]  # requests that carry nothing; re-exported for the CLI


# -- messages ----------------------------------------------------------------------------------


class VersionReply(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    python: str
    pid: int


class ConnectRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What `tele connect` asks for; empty strings mean the kubeconfig's (or tele's) default."""

    kubeconfig: str = ""
    """A kubeconfig path (or several, `:`-separated as in $KUBECONFIG); empty: ~/.kube/config."""
    context: str = ""
    namespace: str = ""
    manager_namespace: str = ""
    mapped_namespaces: list[str] = []
    manager_address: str = ""
    """host:port of a manager reachable directly (no port-forward); for development."""
    vif: bool = False
    """Set up the network interface and DNS, or fail; TELE_VIF=1 does too."""
    vif_when_possible: bool = False
    """Set them up when the daemon can (CAP_NET_ADMIN, or a privileged helper attached), else
    connect without (ConnectionInfo.network_note says why); TELE_VIF=0 turns this off."""
    also_proxy: list[str] = []
    never_proxy: list[str] = []
    allow_conflicting_subnets: list[str] = []
    vnat: list[str] = []
    """Cluster subnets given virtual IPs (tele.vif.vnat)."""
    proxy_via: list[str] = []
    """`CIDR=WORKLOAD`: the subnet gets virtual IPs and is dialled from the workload's pods."""


class ConnectionInfo(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    kube_server: str
    kube_context: str
    namespace: str
    manager_namespace: str
    manager_pod: str = ""
    manager_version: str = ""
    manager_api_port: int = 0
    """The traffic manager's API port (its pod's `api` port, Helm `apiPort`: where agents
    reach it); 0 when not known (not found yet, or reached by --manager-address)."""
    session_id: str = ""
    managed_namespaces: list[str] = []
    mapped_namespaces: list[str] = []
    pod_subnets: list[str] = []
    service_subnets: list[str] = []
    cluster_domain: str = ""
    connected_at: float = 0.0
    reconnects: int = 0
    last_error: str = ""
    """What is wrong now (why it is reconnecting; for a failed session, why it ended), or an
    engagement that ended without the user asking."""
    last_reconnect: str = ""
    """When and why the session was last replaced by a new one (the manager forgot it)."""
    ended_at: float = 0.0
    """For a failed session (status "failed"): when it ended (unix time)."""
    network: dict[str, Any] | None = None
    """The network interface and DNS (device, subnets, counters), when set up."""
    network_note: str = ""
    """Why there is no network interface, when it was wanted where possible only."""
    dns_and_routing: dict[str, Any] = {}
    """The DNS and routing settings in effect ({"dns": {...}, "routing": {...}}, config.yml
    spelling; unset keys left out), merged from flags, kubeconfig, manager and config."""
    intercepts: list[str] = []
    """"name: intercepted|replaced|ingested workload -> local addresses (mechanism and
    filters)" for each engagement of this session."""
    engagements: list[EngagementStatus] = []
    """The same, as data (`tele status -o json`)."""


class EngagementStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One engagement of the session as `tele status -o json` shows it (no environment)."""

    name: str
    kind: str
    namespace: str
    workload: str
    workload_kind: str
    container: str
    mechanism: str
    headers: list[tuple[str, str]] = []
    path_equal: list[str] = []
    path_prefix: list[str] = []
    path_regex: list[str] = []
    local: list[str] = []
    local_mount: str = ""
    pod_name: str = ""
    """The pod that serves it now: its `--to-pod` forwards and volumes reach that pod."""
    pod_ips: list[str] = []
    pod_change: str = ""
    """The last time the serving pod changed (it was replaced), the sentence that says so."""
    pod_changes: list[str] = []
    """Every such sentence, oldest first (the daemon keeps the last POD_CHANGES_KEPT)."""
    pod_change_count: int = 0
    """How many times the serving pod changed: a follower that looks now and then says the
    ones it has not said (the last `pod_change_count - said` of `pod_changes`)."""
    wiretap: TapCounters | None = None
    """A wiretap's counters (what its agents copied and dropped), as last heard."""


class PortMapping(msgspec.Struct, frozen=True, kw_only=True):
    """`-p LOCAL[:REMOTE]`: the local port, and the service port (intercept) or container port
    (replace) by name or number that goes there; REMOTE empty means the only one."""

    local: int
    remote: str = ""


class InterceptRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`tele intercept`, `tele replace` and `tele ingest` (one engage flow, `kind` says which)."""

    name: str
    workload: str = ""
    """Default: the name."""
    namespace: str = ""
    local_address: str = "127.0.0.1"
    local_port: int = 8080
    port: str = ""
    """The service port (name or number) to take; empty when there is only one."""
    service: str = ""
    container: str = ""
    mechanism: str = "tcp"
    headers: list[tuple[str, str]] = []
    path_equal: list[str] = []
    path_prefix: list[str] = []
    path_regex: list[str] = []
    mount: str = "true"
    """Volumes: "true" (a new temporary directory), "false", or a directory (":ro" appended
    mounts read-only)."""
    kind: str = "intercept"
    """intercept | replace | ingest | wiretap."""
    ports: list[PortMapping] = []
    """Several ports (multi-port intercept; a replace's container ports, default all of them,
    each to the same local port number). Empty: `local_port` and `port` (intercept)."""
    to_pod: list[str] = []
    """`PORT` or `PORT/UDP`: localhost:PORT reaches the engaged pod's PORT while engaged."""
    http_plaintext: bool = False
    """Requests the agent decrypted (a workload with a terminating TLS secret) go to the local
    handler in plaintext instead of over TLS."""
    response_port: int = 0
    """A wiretap: the local port that gets a copy of what the app answers (one connection
    per caller's connection); 0: only what callers send is copied."""


class LeaveRequest(msgspec.Struct, frozen=True, kw_only=True):
    name: str


class UninstallRequest(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str = ""
    workloads: list[str] = []
    all_agents: bool = False


class ListRequest(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str = ""
    """Empty: the namespace given at connect (or the kubeconfig's)."""


class StatusReply(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    pid: int
    started_at: float  # unix time
    uptime: float  # seconds
    log_file: str
    socket: str
    log_level: str
    # "not connected", "connecting", "connected" or "reconnecting"; details in `session`.
    connection: str = "not connected"
    session: ConnectionInfo | None = None


class QuitReply(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    ended: list[str] = []
    """The engagements the quit ended, by name."""


class SetLogLevelRequest(msgspec.Struct, frozen=True, kw_only=True):
    level: str  # trace | debug | info | warning | error
    duration: float = 0.0  # seconds until the configured level returns; 0 = keep it
    local: bool = True
    """The daemon's level."""
    remote: bool = False
    """The traffic manager's and its agents' (through the session)."""


class SetLogLevelReply(msgspec.Struct, frozen=True, kw_only=True):
    level: str
    previous: str
    """The daemon's previous level ("" when only the remote one was set)."""
    revert_to: str | None = None  # the level that returns after `duration`, if any
    revert_in: float | None = None
    traffic_manager: LogLevelReply | None = None
    """The manager's answer, when the remote level was set."""
    remote_problem: str = ""
    """Why the remote level was not set (not connected, refused), when it was asked for."""


class ProgressReply(msgspec.Struct, frozen=True, kw_only=True):
    steps: list[str] = []
    """The current step of each long operation under way (connect, engage), for a terminal."""


class ClusterLogsRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`tele gather-logs`: which of the cluster's logs (through the traffic manager)."""

    traffic_manager: bool = True
    traffic_agents: str = "all"
    """all, none, or a name the agents' pod or workload name contains."""


# -- calls -------------------------------------------------------------------------------------

VERSION: Unary[Empty, VersionReply] = Unary(f"/{SERVICE}/Version", Empty, VersionReply)
STATUS: Unary[Empty, StatusReply] = Unary(f"/{SERVICE}/Status", Empty, StatusReply)
# Replies once the daemon has stopped listening and removed its socket and pid file; the
# process exits right after.
QUIT: Unary[Empty, QuitReply] = Unary(f"/{SERVICE}/Quit", Empty, QuitReply)
# FAILED_PRECONDITION when already connected elsewhere (disconnect first) or no manager is
# installed; UNAVAILABLE when the cluster cannot be reached in time.
CONNECT: Unary[ConnectRequest, ConnectionInfo] = Unary(
    f"/{SERVICE}/Connect", ConnectRequest, ConnectionInfo
)
DISCONNECT: Unary[Empty, Empty] = Unary(f"/{SERVICE}/Disconnect", Empty, Empty)
LIST: Unary[ListRequest, WorkloadList] = Unary(f"/{SERVICE}/List", ListRequest, WorkloadList)
INTERCEPT: Unary[InterceptRequest, EngagementInfo] = Unary(
    f"/{SERVICE}/Intercept", InterceptRequest, EngagementInfo
)
LEAVE: Unary[LeaveRequest, Empty] = Unary(f"/{SERVICE}/Leave", LeaveRequest, Empty)
UNINSTALL: Unary[UninstallRequest, UninstallReply] = Unary(
    f"/{SERVICE}/Uninstall", UninstallRequest, UninstallReply
)
# INVALID_ARGUMENT for an unknown level or a negative duration.
SET_LOG_LEVEL: Unary[SetLogLevelRequest, SetLogLevelReply] = Unary(
    f"/{SERVICE}/SetLogLevel", SetLogLevelRequest, SetLogLevelReply
)
# The cluster's logs for gather-logs, through the session's traffic manager: which there are
# (and which the caller may not read), then each one (its end: tele.manager.podlogs).
CLUSTER_LOG_SOURCES: Unary[ClusterLogsRequest, LogSources] = Unary(
    f"/{SERVICE}/ClusterLogSources", ClusterLogsRequest, LogSources
)
CLUSTER_LOG: Unary[LogSource, PodLog] = Unary(f"/{SERVICE}/ClusterLog", LogSource, PodLog)
# What long operations are doing now (an older daemon: UNIMPLEMENTED; the CLI shows no step).
PROGRESS: Unary[Empty, ProgressReply] = Unary(f"/{SERVICE}/Progress", Empty, ProgressReply)
