"""The traffic agent's configuration for a workload, and the pod mutation that injects it.

Sans-IO: objects in (workload pod template, the namespace's Services), plain data out. The
configuration is hierarchical (seed 001): every container of the workload with every Service
port that leads to it; it travels with the pod as an annotation (seed 004), where the agent
reads it through the downward API.

Port takeover. A Service port whose targetPort is a *name* is taken over without privileges:
the app container's port is renamed `tm-<name>` and the agent container takes the name, so the
Service's traffic reaches the agent, which forwards what is not engaged to the app's port. A
*numeric* targetPort cannot be renamed; there an init container (`tele-agent-init`, NET_ADMIN)
redirects the container port to the agent port inside the pod's network namespace, as
Telepresence does with iptables. A headless Service's ports are redirected the same way, named or
not: its callers dial pod IPs and container port numbers, never a port name. TCP and UDP alike.

Volumes (seed 004, "Volume Mount Policies"): each app volume mount gets a policy, from the Helm
value `agent.mountPolicies` overridden by the pod template's `telepresence.io/mount-policies`
annotation (a JSON object; keys are volume names or absolute mount paths). Remote and
RemoteReadOnly volumes are mounted into the agent under /tel_app_mounts/<container> (read-only
for RemoteReadOnly, so the pod's kernel refuses writes whatever the client does) and exported
to clients; Local ones are not shared but listed, so a client knows the app expects them;
Ignore ones are neither. The legacy `inject-ignore-volume-mounts` annotation (volume names,
comma-separated) still marks volumes Ignore.

Replaced containers (`tele replace`). A container marked `replace` in the configuration does not
run at all: the webhook drops it from the pod, and the agent takes its declared ports over
directly (agent port = container port, same names), so named and numeric Service targets and
direct pod-IP callers all reach the agent without renames or redirects. Its env and volume
mounts are still copied into the agent first (what `replace` hands the client). The manager
rolls the pods by eviction when a replace starts and again when it ends, so the webhook makes
pods with, then without, the container.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import msgspec

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "telepresence.io/"
LEGACY_PREFIX = "telepresence.getambassador.io/"
INJECT_ANNOTATION = "inject-traffic-agent"
MOUNT_POLICIES_ANNOTATION = "mount-policies"
IGNORE_VOLUMES_ANNOTATION = "inject-ignore-volume-mounts"
TERMINATING_TLS_ANNOTATION = "inject-terminating-tls-secret"
SERVICE_NAME_ANNOTATION = "inject-service-name"
"""Only this Service's ports lead to the agent (when several select the pods)."""
SERVICE_PORTS_ANNOTATION = "inject-service-ports"
"""Only these Service ports (names or numbers, comma-separated) lead to the agent."""
CONTAINER_PORTS_ANNOTATION = "inject-container-ports"
"""Container ports (names or numbers, comma-separated) the agent takes although no Service
leads to them: their callers dial the pod IP, so they are redirected by the init container."""
MANUALLY_INJECTED_ANNOTATION = "manually-injected"
"""`true`: the pod template carries the agent itself (`tele genyaml`); the webhook leaves its
pods alone and the manager never rolls them."""
TLS_VOLUME = "traffic-agent-terminating-tls"
TLS_DIR = "/var/run/secrets/tele/terminating-tls"
AGENT_TOKEN_AUDIENCE = "tele-traffic-manager"
"""The audience of the agent's projected ServiceAccount token: the manager reviews it for this
audience, so the token is worth nothing to the API server or anyone else."""
TOKEN_VOLUME = "traffic-agent-token"
TOKEN_DIR = "/var/run/secrets/tele/manager-token"
TOKEN_SECONDS = 3600
"""The token's life; the kubelet writes a new one at 80 % of it, the agent re-reads the file."""
MOUNT_POLICIES = ("Ignore", "Local", "Remote", "RemoteReadOnly")
REMOTE_POLICIES = ("Remote", "RemoteReadOnly")
MOUNT_PREFIX = "/tel_app_mounts"
CONFIG_ANNOTATION = ANNOTATION_PREFIX + "agent-config"
AGENT_CONTAINER = "traffic-agent"
INIT_CONTAINER = "tele-agent-init"
AGENT_PORT = 9900
PORT_NAME_LIMIT = 15  # IANA service names, as Kubernetes validates container port names

Obj = Mapping[str, Any]


class Intercept(msgspec.Struct, frozen=True, kw_only=True):
    """One Service port leading to one container port: the unit a client engages."""

    service_name: str
    service_uid: str
    service_port: int
    service_port_name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""
    target_port_numeric: bool
    container_port_name: str = ""
    container_port: int
    agent_port: int
    headless: bool = False


class ContainerConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    env_prefix: str
    mount_point: str
    mounts: list[str] = []
    """The exported (Remote and RemoteReadOnly) mount paths, sorted."""
    mount_policies: dict[str, str] = {}
    """Mount path -> policy for every app volume mount that is not Ignore."""
    intercepts: list[Intercept] = []
    replace: bool = False
    """The container is replaced by a client: it is left out of the pod and the agent owns its
    ports (every declared one, also those no Service names)."""
    run_as: list[int] = []
    """[uid, gid, supplementary groups...] the app container runs with, as far as its pod
    template says (securityContext runAsUser/runAsGroup, fsGroup, supplementalGroups): the
    agent's file server serves the container's volumes as that user ([] or root: tele's
    non-root image user)."""


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True):
    agent_name: str
    namespace: str
    workload_name: str
    workload_kind: str
    manager_host: str
    manager_port: int
    agent_image: str
    log_level: str = "info"
    pull_policy: str = ""
    """The injected containers' imagePullPolicy (Helm agent.image.pullPolicy); empty: the
    cluster's default."""
    resources: dict[str, Any] = {}
    """The traffic-agent container's resources (Helm agent.resources)."""
    containers: list[ContainerConfig] = []
    terminating_tls_secret: str = ""
    """A kubernetes.io/tls Secret the agent decrypts callers' TLS with (http mechanism)."""

    def intercepts(self) -> list[tuple[str, Intercept]]:
        return [(c.name, i) for c in self.containers for i in c.intercepts]

    def replaced(self) -> list[str]:
        """The names of the containers the configuration marks replaced."""
        return [c.name for c in self.containers if c.replace]


def pod_config(pod: Obj) -> AgentConfig | None:
    """The agent configuration a pod was made with (from its annotation), if any."""
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(CONFIG_ANNOTATION)
    if not raw:
        return None
    try:
        return msgspec.json.decode(str(raw), type=AgentConfig)
    except msgspec.DecodeError:
        return None


class NotInterceptable(ValueError):
    """A workload that cannot get an agent, with the reason `tele list` shows."""


def annotation(obj: Obj, name: str) -> str | None:
    """An annotation by its short name under the current prefix, else the legacy one."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    value = annotations.get(ANNOTATION_PREFIX + name)
    if value is None:
        value = annotations.get(LEGACY_PREFIX + name)
        # A pod template has no name: its labels say whose it is.
        labels = ",".join(f"{k}={v}" for k, v in sorted((meta.get("labels") or {}).items()))
        where = (str(meta.get("namespace") or ""), str(meta.get("name") or labels), name)
        if value is not None and where not in _legacy_warned:
            _legacy_warned.add(where)  # once per object and annotation: the webhook asks often
            log.warning(
                "%s uses the old annotation %s%s; rename it to %s%s",
                "/".join(p for p in where[:2] if p) or "a pod template",  # ns/name or labels
                LEGACY_PREFIX,
                name,
                ANNOTATION_PREFIX,
                name,
            )
    return None if value is None else str(value)


_legacy_warned: set[tuple[str, str, str]] = set()


def injection_policy(template: Obj) -> str | None:
    """`enabled`, `disabled` or None (on demand) from the pod template's annotation."""
    value = annotation(template, INJECT_ANNOTATION)
    return value.lower() if value else None


def mount_policies(template: Obj, defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """The policies that apply to `template`'s volumes: the Helm defaults, then the legacy
    ignore annotation, then the mount-policies annotation. NotInterceptable when the
    annotation is not a JSON object of known policies (the user must fix the workload)."""
    policies = dict(defaults or {})
    for name in (annotation(template, IGNORE_VOLUMES_ANNOTATION) or "").split(","):
        if name.strip():
            policies[name.strip()] = "Ignore"
    raw = annotation(template, MOUNT_POLICIES_ANNOTATION)
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or any(
            not isinstance(v, str) or v not in MOUNT_POLICIES for v in parsed.values()
        ):
            raise NotInterceptable(
                f"its {ANNOTATION_PREFIX}{MOUNT_POLICIES_ANNOTATION} annotation must be a JSON "
                f"object of volume names or paths to one of {', '.join(MOUNT_POLICIES)}"
            )
        policies.update(parsed)
    return policies


def mount_policy(policies: Mapping[str, str], volume: str, path: str) -> str:
    """The policy of one volume mount: by volume name, else by mount path (the longest key
    that is the path or one of its parent directories), else Remote."""
    if volume in policies:
        return policies[volume]
    best = ""
    for key in policies:
        if key.startswith("/") and (
            path == key or path.startswith(key.rstrip("/") + "/") or key == "/"
        ):
            best = key if len(key) > len(best) else best
    return policies[best] if best else "Remote"


def _container_mounts(container: Obj, policies: Mapping[str, str]) -> dict[str, str]:
    found = {}
    for mount in container.get("volumeMounts") or []:
        policy = mount_policy(policies, str(mount.get("name") or ""), str(mount["mountPath"]))
        if policy != "Ignore":
            found[str(mount["mountPath"])] = policy
    return found


def _run_as(pod_spec: Obj, container: Obj) -> list[int]:
    """[uid, gid, groups...] of the container as its template says; [] when it names no user."""
    pod_sc = pod_spec.get("securityContext") or {}
    own_sc = container.get("securityContext") or {}

    def number(key: str) -> int | None:
        value = own_sc.get(key, pod_sc.get(key))
        return value if isinstance(value, int) and 0 <= value < 2**32 else None

    uid, gid = number("runAsUser"), number("runAsGroup")
    if uid is None:
        return []
    groups = [g for g in [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])]]
    return [uid, uid if gid is None else gid] + [
        g for g in groups if isinstance(g, int) and 0 <= g < 2**32
    ]


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _env_prefix(index: int) -> str:
    # A_, B_, ..., Z_, BA_, ...: one prefix per container for the app env the agent exports.
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters + "_"


def generate(
    *,
    workload: Obj,
    services: Iterable[Obj],
    manager_namespace: str,
    agent_image: str,
    manager_port: int = 8081,
    agent_port: int = AGENT_PORT,
    log_level: str = "info",
    pull_policy: str = "",
    resources: Mapping[str, Any] | None = None,
    default_mount_policies: Mapping[str, str] | None = None,
    replaced: Collection[str] = (),
    require_service: bool = True,
) -> AgentConfig:
    """The agent configuration of `workload`; NotInterceptable when no Service leads to it
    (unless `require_service` is False: replace and ingest need no port). The containers named
    in `replaced` are marked replaced (see the module docstring)."""
    meta = workload.get("metadata") or {}
    template = (workload.get("spec") or {}).get("template") or {}
    if injection_policy(template) == "disabled":
        raise NotInterceptable("the workload's pod template disables the traffic agent")
    if (template.get("spec") or {}).get("hostNetwork"):
        raise NotInterceptable(
            "its pods use the node's network (hostNetwork): an agent there would take the "
            "node's ports"
        )
    labels = (template.get("metadata") or {}).get("labels") or {}
    # A hand-injected template has the agent already: it is no app container.
    containers = [
        c
        for c in (template.get("spec") or {}).get("containers") or []
        if c.get("name") != AGENT_CONTAINER
    ]
    next_port = agent_port
    by_container: dict[str, list[Intercept]] = {c["name"]: [] for c in containers}
    only_service = (annotation(template, SERVICE_NAME_ANNOTATION) or "").strip()
    only_ports = _listed(annotation(template, SERVICE_PORTS_ANNOTATION))
    selecting = [
        s
        for s in services
        if _labels_match((s.get("spec") or {}).get("selector") or {}, labels)
        and (not only_service or s["metadata"]["name"] == only_service)
    ]
    if only_service and not selecting:
        raise NotInterceptable(
            f"its {ANNOTATION_PREFIX}{SERVICE_NAME_ANNOTATION} annotation names Service "
            f"{only_service}, which does not select its pods"
        )
    for service in sorted(selecting, key=lambda s: s["metadata"]["name"]):
        spec = service.get("spec") or {}
        for port in spec.get("ports") or []:
            if only_ports and not ({str(port.get("name") or ""), str(port["port"])} & only_ports):
                continue
            found = _target(containers, port)
            if found is None:
                continue
            container, container_port, port_name, numeric = found
            # A replaced container's port is owned by the agent directly (once, however many
            # Service ports lead to it); the agent port it would have had stays reserved so
            # that other containers' agent ports don't move.
            own_port = next_port
            if container in replaced:
                own_port = container_port
                protocol = str(port.get("protocol") or "TCP")
                if any(
                    (i.container_port, i.protocol) == (container_port, protocol)
                    for i in by_container[container]
                ):
                    next_port += 1
                    continue
            by_container[container].append(
                Intercept(
                    service_name=service["metadata"]["name"],
                    service_uid=str(service["metadata"].get("uid") or ""),
                    service_port=int(port["port"]),
                    service_port_name=str(port.get("name") or ""),
                    protocol=str(port.get("protocol") or "TCP"),
                    app_protocol=str(port.get("appProtocol") or ""),
                    target_port_numeric=numeric,
                    container_port_name=port_name,
                    container_port=container_port,
                    agent_port=own_port,
                    headless=spec.get("clusterIP") == "None",
                )
            )
            next_port += 1
    for container in containers:
        if container["name"] in replaced:
            by_container[container["name"]] += _unserved_ports(
                container, by_container[container["name"]]
            )
    next_port = _container_port_intercepts(
        _listed(annotation(template, CONTAINER_PORTS_ANNOTATION)),
        containers,
        by_container,
        next_port,
        replaced,
    )
    policies = mount_policies(template, default_mount_policies)
    configs = []
    for i, c in enumerate(containers):
        mounts = _container_mounts(c, policies)
        configs.append(
            ContainerConfig(
                name=c["name"],
                env_prefix=_env_prefix(i),
                mount_point=f"{MOUNT_PREFIX}/{c['name']}",
                mounts=sorted(p for p, policy in mounts.items() if policy in REMOTE_POLICIES),
                mount_policies=mounts,
                intercepts=by_container[c["name"]],
                replace=c["name"] in replaced,
                run_as=_run_as(template.get("spec") or {}, c),
            )
        )
    if (
        require_service
        and not any(c.intercepts for c in configs)
        and injection_policy(template) != "enabled"
    ):
        raise NotInterceptable("no Service selects the workload's pods with a port they declare")
    name = str(meta.get("name") or "")
    return AgentConfig(
        agent_name=name,
        namespace=str(meta.get("namespace") or ""),
        workload_name=name,
        workload_kind=str(workload.get("kind") or "Deployment"),
        manager_host=f"traffic-manager.{manager_namespace}",
        manager_port=manager_port,
        agent_image=agent_image,
        log_level=log_level,
        pull_policy=pull_policy,
        resources=dict(resources or {}),
        containers=configs,
        terminating_tls_secret=annotation(template, TERMINATING_TLS_ANNOTATION) or "",
    )


def _listed(value: str | None) -> set[str]:
    """A comma-separated annotation as a set of its non-empty items."""
    return {item.strip() for item in (value or "").split(",") if item.strip()}


def _container_port_intercepts(
    wanted: set[str],
    containers: list[Obj],
    by_container: dict[str, list[Intercept]],
    next_port: int,
    replaced: Collection[str],
) -> int:
    """Add the `inject-container-ports` ports (no Service leads to them) to `by_container`;
    returns the next free agent port. NotInterceptable for a port no container declares."""
    found: set[str] = set()
    for container in containers:
        name = container["name"]
        for declared in container.get("ports") or []:
            number = int(declared["containerPort"])
            keys = {str(number), str(declared.get("name") or "")} & wanted
            if not keys:
                continue
            found |= keys
            protocol = str(declared.get("protocol") or "TCP")
            if name in replaced or any(
                (i.container_port, i.protocol) == (number, protocol) for i in by_container[name]
            ):
                continue  # the agent has it already
            by_container[name].append(
                Intercept(
                    service_name="",
                    service_uid="",
                    service_port=0,
                    protocol=protocol,
                    target_port_numeric=True,
                    container_port_name=str(declared.get("name") or ""),
                    container_port=number,
                    agent_port=next_port,
                )
            )
            next_port += 1
    missing = sorted(wanted - found)
    if missing:
        raise NotInterceptable(
            f"its {ANNOTATION_PREFIX}{CONTAINER_PORTS_ANNOTATION} annotation names "
            f"{', '.join(missing)}, which no container declares"
        )
    return next_port


def manually_injected(obj: Obj) -> bool:
    """The pod (or pod template) carries an agent its owner added by hand (`tele genyaml`)."""
    return (annotation(obj, MANUALLY_INJECTED_ANNOTATION) or "").strip().lower() == "true"


def _unserved_ports(container: Obj, served: list[Intercept]) -> list[Intercept]:
    """The declared ports of a replaced container that no Service port leads to: the agent owns
    them too (a replaced container's callers may use its pod IP directly)."""
    taken = {(i.container_port, i.protocol) for i in served}
    extra = []
    for declared in container.get("ports") or []:
        number, protocol = int(declared["containerPort"]), str(declared.get("protocol") or "TCP")
        if (number, protocol) in taken:
            continue
        taken.add((number, protocol))
        extra.append(
            Intercept(
                service_name="",
                service_uid="",
                service_port=0,
                protocol=protocol,
                target_port_numeric=False,
                container_port_name=str(declared.get("name") or ""),
                container_port=number,
                agent_port=number,
            )
        )
    return extra


def _target(containers: list[Obj], port: Obj) -> tuple[str, int, str, bool] | None:
    """(container, container port, port name, numeric?) a Service port's targetPort leads to."""
    target = port.get("targetPort", port.get("port"))
    protocol = str(port.get("protocol") or "TCP")
    for container in containers:
        for declared in container.get("ports") or []:
            if str(declared.get("protocol") or "TCP") != protocol:
                continue
            if isinstance(target, str) and not target.isdigit():
                if declared.get("name") == target:
                    return container["name"], int(declared["containerPort"]), target, False
            elif int(declared["containerPort"]) == int(target):
                return container["name"], int(target), str(declared.get("name") or ""), True
    numeric = isinstance(target, int) or (isinstance(target, str) and target.isdigit())
    if numeric and containers:
        # An undeclared numeric port: Kubernetes still routes it, to whichever container listens.
        return containers[0]["name"], int(target), "", True
    return None


def renamed(port_name: str) -> str:
    """The app's port name once the agent has taken `port_name` over."""
    return ("tm-" + port_name)[:PORT_NAME_LIMIT]


def pod_patch(pod: Obj, config: AgentConfig) -> list[dict[str, Any]]:
    """The JSON patch that injects the agent into `pod` (empty if it already has it)."""
    spec = pod.get("spec") or {}
    containers = list(spec.get("containers") or [])
    if any(c.get("name") == AGENT_CONTAINER for c in containers):
        return []
    ops: list[dict[str, Any]] = []
    annotations = (pod.get("metadata") or {}).get("annotations")
    encoded = json.dumps(msgspec.to_builtins(config), separators=(",", ":"), sort_keys=True)
    if annotations is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append(
        {
            "op": "add",
            "path": f"/metadata/annotations/{_escape(CONFIG_ANNOTATION)}",
            "value": encoded,
        }
    )

    agent_ports: list[dict[str, Any]] = []
    numeric: list[Intercept] = []
    replaced = set(config.replaced())
    removed: list[int] = []
    for index, container in enumerate(containers):
        intercepts = next(
            (c.intercepts for c in config.containers if c.name == container.get("name")), []
        )
        if container.get("name") in replaced:
            # The agent takes the container's ports as they are declared (names included).
            removed.append(index)
            for declared in container.get("ports") or []:
                agent_ports.append(
                    {
                        **{k: declared[k] for k in ("name",) if declared.get(k)},
                        "containerPort": int(declared["containerPort"]),
                        "protocol": str(declared.get("protocol") or "TCP"),
                    }
                )
            continue
        for intercept in intercepts:
            if intercept.target_port_numeric or intercept.headless:
                # Callers reach it by number (a headless Service's dial pod IPs): redirected
                # by the init container, the app's port keeps its name.
                numeric.append(intercept)
                agent_ports.append(
                    {"containerPort": intercept.agent_port, "protocol": intercept.protocol}
                )
                continue
            for p_index, declared in enumerate(container.get("ports") or []):
                if declared.get("name") == intercept.container_port_name:
                    ops.append(
                        {
                            "op": "replace",
                            "path": f"/spec/containers/{index}/ports/{p_index}/name",
                            "value": renamed(intercept.container_port_name),
                        }
                    )
                    ops.extend(_probe_ops(container, index, intercept))
            agent_ports.append(
                {
                    "name": intercept.container_port_name,
                    "containerPort": intercept.agent_port,
                    "protocol": intercept.protocol,
                }
            )
    ops.append(
        {
            "op": "add",
            "path": "/spec/containers/-",
            "value": agent_container(config, containers, agent_ports),
        }
    )
    volumes = agent_volumes(config)
    if spec.get("volumes") is None:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    else:
        ops.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes)
    # Last, and from the end: earlier ops address containers by their original index.
    ops.extend({"op": "remove", "path": f"/spec/containers/{i}"} for i in reversed(removed))
    if numeric:
        init = init_container(config)
        if spec.get("initContainers") is None:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [init]})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers/-", "value": init})
    return ops


def agent_volumes(config: AgentConfig) -> list[dict[str, Any]]:
    """The volumes the agent container needs: its token for the manager, the TLS secret."""
    volumes: list[dict[str, Any]] = [
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": AGENT_TOKEN_AUDIENCE,
                            "expirationSeconds": TOKEN_SECONDS,
                            "path": "token",
                        }
                    }
                ]
            },
        }
    ]
    if config.terminating_tls_secret:
        volumes.append(
            {"name": TLS_VOLUME, "secret": {"secretName": config.terminating_tls_secret}}
        )
    return volumes


def init_container(config: AgentConfig, *, config_env: dict[str, Any] | None = None) -> Obj:
    """The init container that installs the port redirects (tele.agent.init)."""
    return {
        "name": INIT_CONTAINER,
        "image": config.agent_image,
        "args": ["agent-init"],
        **({"imagePullPolicy": config.pull_policy} if config.pull_policy else {}),
        "env": [
            {"name": "LOG_LEVEL", "value": config.log_level},
            config_env or _config_env(),  # which ports to redirect where
        ],
        # Root: tele's image runs as a non-root user, and an added capability is effective
        # only for root (nftables needs NET_ADMIN).
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"add": ["NET_ADMIN"]},
        },
    }


def for_manual_injection(config: AgentConfig) -> AgentConfig:
    """`config` for a pod template its owner injects by hand (`tele genyaml`): every port is
    reached through the init container's redirect, so the app's ports keep their names and
    the template needs no other change than the added agent, init container and volumes."""
    containers = [
        msgspec.structs.replace(
            c,
            intercepts=[
                msgspec.structs.replace(i, target_port_numeric=True) if not c.replace else i
                for i in c.intercepts
            ],
        )
        for c in config.containers
    ]
    return msgspec.structs.replace(config, containers=containers)


def manual_config(template: Obj) -> AgentConfig | None:
    """The configuration a hand-injected pod template gives its agent (the literal
    `_TEL_AGENT_CONFIG` of its traffic-agent container, as `tele genyaml` writes it): what the
    agent runs with, its ports included, so the traffic manager engages it by that and not by
    its own Helm values. None when the template gives none literally; NotInterceptable (the
    reason) when the one it gives is not an agent configuration."""
    spec = template.get("spec") or {}
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    agents = [c for c in containers if c.get("name") == AGENT_CONTAINER]
    if not agents:
        return None
    env = [e for e in agents[0].get("env") or [] if isinstance(e, dict)]
    raw = next((e.get("value") for e in env if e.get("name") == "_TEL_AGENT_CONFIG"), None)
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        return msgspec.json.decode(raw, type=AgentConfig)
    except msgspec.DecodeError as exc:
        raise NotInterceptable(
            f"the {AGENT_CONTAINER} container of its pod template has an _TEL_AGENT_CONFIG that "
            f"is not an agent configuration ({exc}); write it again with `tele genyaml`"
        ) from None


def literal_config_env(config: AgentConfig) -> dict[str, Any]:
    """The agent configuration as a literal env value (a hand-injected pod has no
    configuration annotation for the downward API to read)."""
    encoded = json.dumps(msgspec.to_builtins(config), separators=(",", ":"), sort_keys=True)
    return {"name": "_TEL_AGENT_CONFIG", "value": encoded}


def _probe_ops(container: Obj, index: int, intercept: Intercept) -> list[dict[str, Any]]:
    """Probes that named the renamed port now name its number (the name moved to the agent)."""
    ops = []
    for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(probe_name) or {}
        for kind in ("httpGet", "tcpSocket", "grpc"):
            action = probe.get(kind) or {}
            if action.get("port") == intercept.container_port_name:
                ops.append(
                    {
                        "op": "replace",
                        "path": f"/spec/containers/{index}/{probe_name}/{kind}/port",
                        "value": intercept.container_port,
                    }
                )
    return ops


def agent_container(
    config: AgentConfig, app_containers: list[Obj], ports: list[dict[str, Any]]
) -> dict[str, Any]:
    """The traffic-agent container: the app containers' env (prefixed) and volume mounts."""
    env: list[dict[str, Any]] = [
        {"name": "LOG_LEVEL", "value": config.log_level},
        {"name": "_TEL_AGENT_NAME", "value": config.agent_name},
        {"name": "_TEL_AGENT_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        _config_env(),
    ]
    mounts: list[dict[str, Any]] = []
    for container_config in config.containers:
        app = next((c for c in app_containers if c.get("name") == container_config.name), None)
        if app is None:
            continue
        for variable in app.get("env") or []:
            env.append(
                {**variable, "name": f"_TEL_APP_{container_config.env_prefix}{variable['name']}"}
            )
        for mount in app.get("volumeMounts") or []:
            policy = container_config.mount_policies.get(mount["mountPath"], "Ignore")
            if policy not in REMOTE_POLICIES:
                continue  # Ignore and Local volumes are not shared with clients
            exported = {**mount, "mountPath": container_config.mount_point + mount["mountPath"]}
            if policy == "RemoteReadOnly":
                exported["readOnly"] = True
            mounts.append(exported)
    mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    env.append({"name": "_TEL_AGENT_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"})
    if config.terminating_tls_secret:
        mounts.append({"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True})
        env += [
            {"name": "_TEL_AGENT_TLS_CERT", "value": f"{TLS_DIR}/tls.crt"},
            {"name": "_TEL_AGENT_TLS_KEY", "value": f"{TLS_DIR}/tls.key"},
        ]
    container: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        "image": config.agent_image,
        "args": ["agent"],
        # Root: the agent serves the app's volumes (tele.agent.sftp), whose files any user may own.
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False},
        "ports": ports,
        "env": env,
        "volumeMounts": mounts,
    }
    if config.pull_policy:
        container["imagePullPolicy"] = config.pull_policy
    if config.resources:
        container["resources"] = config.resources
    return container


def _config_env() -> dict[str, Any]:
    """The agent configuration, from the pod's annotation through the downward API."""
    path = f"metadata.annotations['{CONFIG_ANNOTATION}']"
    return {"name": "_TEL_AGENT_CONFIG", "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _escape(key: str) -> str:
    """A map key as a JSON pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
