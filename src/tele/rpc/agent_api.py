"""The traffic agent <-> manager API and the client <-> manager engagement API.

How engaged traffic flows (cluster -> laptop, though every stream is opened towards the manager):
1. A client ENGAGEs a workload; the manager makes sure its pods run an agent and tells the
   pod's agent through WATCH_ENGAGEMENTS.
2. The agent gets a connection (or, for `http`, a request) that an engagement matches; it opens
   a tunnel stream to the manager: OPEN with `tele-dial-id: engage.<engagement id>`, the
   destination being the original one (pod IP and container port).
3. The manager picks a fresh dial id X and sends DialRequest{X} on the engaging client's
   WATCH_DIALS stream; the client opens a DIAL-BACK stream with `tele-dial-id: X` and connects it
   to its local handler; the manager splices the two streams.
"""

from __future__ import annotations

import msgspec

from tele.rpc.manager_api import SERVICE, SessionRequest
from tele.rpc.method import Empty, ServerStream, Unary

AGENT_DIAL_PREFIX = "engage."
AGENT_RESPONSE_DIAL_PREFIX = "engage-response."
"""A wiretap's copy of the app's answers (what callers receive) on one connection."""
"""An agent's OPEN for engagement E carries the dial id `engage.E`."""
AGENT_TAP_DIAL_PREFIX = "wiretap."
AGENT_TAP_RESPONSE_DIAL_PREFIX = "wiretap-response."
"""An agent's OPEN of wiretap E's copy channel (the copies of many connections, as records:
tele.net.tapcopies) carries `wiretap.E`, or for the copies of the app's answers
`wiretap-response.E`; the client serves it with tele.rpc.tapcopies.serve_copies."""
PROXY_DIAL_PREFIX = "proxy."
"""An agent's OPEN for a proxy-via dial X (it dialled the destination) carries `proxy.X`; one it
could not dial carries `proxyfail.X.<reset reason>` (the manager refuses the client's stream)."""
PROXY_FAIL_PREFIX = "proxyfail."
VIA_DIAL_PREFIX = "via."
"""A client's OPEN for a destination behind a --proxy-via workload carries `via.<route id>`."""
FILES_CLIENT_NAME = "tele-traffic-manager"
"""The common name of the manager's client certificate, the only client an agent's file
server accepts (mutual TLS with the manager's CA)."""


WIRETAP = "wiretap"
"""The engagement kind that copies traffic (read-only) instead of taking it."""

PAST_TENSE = {
    "intercept": "intercepted",
    "replace": "replaced",
    "ingest": "ingested",
    "wiretap": "wiretapped",
}
"""The engagement kinds (`kind` below) as status lines and conflicts name them."""


class Engagement(msgspec.Struct, frozen=True, kw_only=True):
    """What an agent needs to route one engagement's traffic."""

    id: str
    container: str
    agent_port: int
    mechanism: str = "tcp"
    """tcp: whole connections; http: matching requests only."""
    headers: list[tuple[str, str]] = []
    path_equal: list[str] = []
    path_prefix: list[str] = []
    path_regex: list[str] = []
    client: str = ""
    """user@host of the engaging client, for logs."""
    kind: str = "intercept"
    """intercept | replace | ingest | wiretap (an ingest has no ports and never reaches an
    agent; a wiretap gets a copy of its ports' connections, tele.agent.wiretap)."""
    agent_ports: list[int] = []
    """Further agent ports of the engagement (a multi-port intercept, a replace); `agent_port`
    is the first (0 when there is none: a replace of a container without ports)."""
    copy_responses: bool = False
    """A wiretap that also copies what the app answers (on a second copy channel, dialled
    with AGENT_TAP_RESPONSE_DIAL_PREFIX)."""

    def ports(self) -> list[int]:
        """Every agent port this engagement takes."""
        return [p for p in (self.agent_port, *self.agent_ports) if p]


class EngagementList(msgspec.Struct, frozen=True, kw_only=True):
    engagements: list[Engagement]


class AgentIdentity(msgspec.Struct, frozen=True, kw_only=True):
    pod_name: str
    namespace: str
    pod_ip: str
    workload_name: str
    workload_kind: str
    version: str
    environment: dict[str, dict[str, str]] = {}
    """Per app container, the environment the agent sees (what a local handler should get)."""
    mounts: dict[str, list[str]] = {}
    mount_policies: dict[str, dict[str, str]] = {}
    """Per app container, mount path -> Local | Remote | RemoteReadOnly (Ignore left out)."""
    sftp_port: int = 0
    """Where an agent older than per-container file servers serves all its containers'
    volumes (/tel_app_mounts); 0 from newer agents (see sftp_ports)."""
    sftp_ports: dict[str, int] = {}
    """Per app container with exported volumes, the port of its own file server (SFTP,
    tele.agent.files), confined to that container's volumes."""
    tls_public_key: str = ""
    """The public key (PEM, EC P-256) of the file servers' TLS key, which never leaves the
    agent: the manager answers the arrival with a certificate for it (tls_cert)."""
    replaced: list[str] = []
    """The containers this agent's pod was made without (its configuration replaces them)."""
    terminates_tls: bool = False
    """The agent decrypts callers' TLS with the workload's certificate (the pod template's
    inject-terminating-tls-secret annotation), so http engagements reach clients decrypted."""


class AgentSessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    lease_seconds: float
    manager_ips: list[str] = []
    """Where the manager's connections to pods come from: the only peers the agent's file
    server accepts (empty: the manager does not know its address; then any peer)."""
    tls_cert: str = ""
    """The file servers' certificate (PEM, for the pod IP, serverAuth), issued by the manager's
    CA for tls_public_key; its file servers accept only the manager's client certificate."""
    tls_ca: str = ""
    """The manager's CA (PEM) that issued tls_cert and the manager's client certificate."""


class EngageRequest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    namespace: str
    workload: str
    name: str = ""
    """The engagement's name (default: the workload's)."""
    service: str = ""
    port: str = ""
    """A service port name or number; empty when the workload has one port."""
    copy_responses: bool = False
    """A wiretap: copy the app's answers too (Engagement.copy_responses)."""
    container: str = ""
    mechanism: str = "tcp"
    headers: list[tuple[str, str]] = []
    path_equal: list[str] = []
    path_prefix: list[str] = []
    path_regex: list[str] = []
    agent_timeout: float = 30.0
    kind: str = "intercept"
    """intercept (service ports), replace (the whole container) or ingest (env, no traffic)."""
    ports: list[str] = []
    """Several ports (a multi-port intercept: service port names or numbers; a replace:
    container port names or numbers, default all); `port` is used when this is empty."""
    engagement_id: str = ""
    """Engaging again in a new session (the manager was replaced): the id it had, kept when
    free, so that the client's local side (handlers, mounts) stays keyed as it was."""


class EngagedPort(msgspec.Struct, frozen=True, kw_only=True):
    """One port an engagement takes: where callers send it, and the container port it is."""

    container_port: int
    service: str = ""
    service_port: int = 0
    service_port_name: str = ""
    protocol: str = "TCP"


class EngagementInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    namespace: str
    workload: str
    workload_kind: str
    container: str
    service: str
    service_port: int
    container_port: int
    mechanism: str
    client: str
    pod_ips: list[str] = []
    """The IPs of the pods whose agents serve it; the first is `pod_name`'s."""
    pod_name: str = ""
    """The pod that `--to-pod` forwards and the volume mounts reach: a live, ready pod of the
    workload whose agent took the engagement (shown to the user)."""
    environment: dict[str, str] = {}
    mounts: list[str] = []
    mount_policies: dict[str, str] = {}
    """Mount path -> Local | Remote | RemoteReadOnly, for the engaged container."""
    mount_point: str = ""
    """The agent's directory with the container's exported volumes (the SFTP root to mount)."""
    sftp_port: int = 0
    local_mount: str = ""
    """Set by the client's daemon: where the volumes are mounted on the client's machine."""
    mount_error: str = ""
    """Why the volumes are not mounted (one sentence): set by the client's daemon, or by the
    manager when the user may not read what they are made of (sftp_port 0 then)."""
    withheld: list[str] = []
    """Sentences: what the manager left out (environment values, volumes) because the user
    may not read the Secrets/ConfigMaps they come from (RBAC)."""
    kind: str = "intercept"
    ports: list[EngagedPort] = []
    """Every port engaged, in the order the request named them (none for an ingest)."""
    local: list[str] = []
    """Set by the client's daemon: the local handler (host:port) of each of `ports`."""
    response_local: str = ""
    """Set by the client's daemon: a wiretap's response handler (host:port), if any."""
    decrypted: bool = False
    """Callers spoke TLS and the agent decrypted their requests (an http engagement of a
    workload with a terminating TLS secret): the client re-encrypts towards its local handler
    unless the user asked for plaintext (`--http-plaintext`)."""
    headers: list[tuple[str, str]] = []
    """The http engagement's filters (shown by intercept, status and list)."""
    path_equal: list[str] = []
    path_prefix: list[str] = []
    path_regex: list[str] = []


class TapCounters(msgspec.Struct, frozen=True, kw_only=True):
    """What a wiretap copied and dropped (one agent's, or summed over the workload's agents)."""

    connections: int = 0
    """Connections seen on the wiretapped ports."""
    copied_bytes: int = 0
    """Bytes that reached the client's side."""
    dropped_connections: int = 0
    """Copies dropped: the handler was absent or too slow (the app was served all the same)."""
    dropped_bytes: int = 0
    response_copied_bytes: int = 0
    """A wiretap with a response port: bytes of the app's answers that reached the client's
    side (each connection's answers are one more copy, counted apart from the above)."""
    response_dropped: int = 0
    """Copies of the app's answers dropped (their handler absent or too slow)."""
    response_dropped_bytes: int = 0


class TapReport(msgspec.Struct, frozen=True, kw_only=True):
    """An agent to the manager: its wiretaps' counters now (by engagement id)."""

    session_id: str
    taps: dict[str, TapCounters] = {}


class TapCountersReply(msgspec.Struct, frozen=True, kw_only=True):
    """The manager to a client: its wiretaps' counters (by engagement id), summed over pods."""

    taps: dict[str, TapCounters] = {}


class ServingPod(msgspec.Struct, frozen=True, kw_only=True):
    """The pod that serves one engagement of a client now (its `--to-pod` forwards and volumes
    reach it), with what a mount of its volumes needs."""

    engagement_id: str
    name: str
    pod_name: str
    pod_ips: list[str] = []
    sftp_port: int = 0
    mount_point: str = ""
    agent: str = ""
    """Which arrival of the pod's traffic agent serves (a tag; "" if unknown or none is up):
    another tag for the same pod means its agent restarted there (crash, OOM kill) and the
    volumes are to be mounted again."""


class ServingPods(msgspec.Struct, frozen=True, kw_only=True):
    """The manager to a client (WATCH_SERVING): the serving pod of each of its engagements."""

    pods: list[ServingPod] = []


class LeaveRequest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    name: str


class DialRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The manager to a client: open a DIAL-BACK stream with `dial_id` for `engagement_id`."""

    dial_id: str
    engagement_id: str
    original_host: str
    original_port: int
    protocol: str = "tcp"
    """tcp, or udp: the stream carries DATAGRAM-framed datagrams of one caller's flow."""
    wiretap: bool = False
    """A wiretap's copy: nobody waits for an answer, so an absent handler resets the stream
    (the agent counts a drop) instead of answering the caller."""
    response: bool = False
    """A wiretap's copy of the app's answers (to the wiretap's response port), not of what
    the caller sent."""
    channel: bool = False
    """A wiretap's copy channel: the stream carries the copies of many connections as records
    (AGENT_TAP_DIAL_PREFIX), each to be given to the handler on a connection of its own. Sent
    only to a client that announced manager_api.WIRETAP_CHANNELS: an older one ignores the
    field and would give the records to its handler as the caller's bytes."""


class ProxyViaRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A client asks to send traffic for a subnet out through a workload's pod (--proxy-via)."""

    session_id: str
    namespace: str
    workload: str
    agent_timeout: float = 30.0


class ProxyViaReply(msgspec.Struct, frozen=True, kw_only=True):
    route_id: str
    """Its OPENs carry the dial id `via.<route_id>`; valid for that session only."""
    workload_kind: str
    pods: list[str]
    """The pods (namespace/name) whose agents dial."""


class ProxyDial(msgspec.Struct, frozen=True, kw_only=True):
    """The manager to an agent: dial `host:port` from the pod, then OPEN `proxy.<dial_id>`."""

    dial_id: str
    host: str
    port: int
    protocol: str = "tcp"
    """tcp: a connection, relayed as bytes; udp: a flow from a socket of the pod's, relayed as
    DATAGRAM frames until idle (tele.rpc.tunnel.relay_udp). Anything else is refused."""


class UninstallRequest(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    namespace: str
    workloads: list[str] = []
    all_agents: bool = False


class UninstallReply(msgspec.Struct, frozen=True, kw_only=True):
    removed: list[str]
    """The workloads whose pods are rolled out without the agent."""


class AgentLogLevel(msgspec.Struct, frozen=True, kw_only=True):
    """The level the manager asks its agents to log at (`tele loglevel`)."""

    level: str = ""
    """trace, debug, info, warning or error; "": the agent's own configured level."""


ARRIVE_AS_AGENT = Unary(f"/{SERVICE}/ArriveAsAgent", AgentIdentity, AgentSessionInfo)
WATCH_ENGAGEMENTS = ServerStream(f"/{SERVICE}/WatchEngagements", SessionRequest, EngagementList)
ENGAGE = Unary(f"/{SERVICE}/Engage", EngageRequest, EngagementInfo)
LEAVE = Unary(f"/{SERVICE}/Leave", LeaveRequest, Empty)
UNINSTALL = Unary(f"/{SERVICE}/UninstallAgents", UninstallRequest, UninstallReply)
REPORT_TAPS = Unary(f"/{SERVICE}/ReportWiretaps", TapReport, Empty)
"""Agents, every few seconds while their wiretap counters move."""
TAP_COUNTERS = Unary(f"/{SERVICE}/WiretapCounters", SessionRequest, TapCountersReply)
"""Clients, for `tele status`."""
PROXY_VIA = Unary(f"/{SERVICE}/ProxyVia", ProxyViaRequest, ProxyViaReply)
WATCH_PROXY_DIALS = ServerStream(f"/{SERVICE}/WatchProxyDials", SessionRequest, ProxyDial)
"""Agents: the dials clients' --proxy-via traffic asks of their pod."""
WATCH_DIALS = ServerStream(f"/{SERVICE}/WatchDials", SessionRequest, DialRequest)
WATCH_SERVING = ServerStream(f"/{SERVICE}/WatchServingPods", SessionRequest, ServingPods)
"""Clients: at once, then whenever one changes, the pod serving each of their engagements; it
changes when that pod's agent is gone (pod deleted, evicted, rolled) and another pod's agent of
the workload is up (an older manager: UNIMPLEMENTED, the pod stays the first one)."""
# The current level at once, then each change (an agent of an older manager: UNIMPLEMENTED).
WATCH_LOG_LEVEL = ServerStream(f"/{SERVICE}/WatchLogLevel", SessionRequest, AgentLogLevel)
