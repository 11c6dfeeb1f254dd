"""`meta.k8s.io/v1` Table rendering: `kubectl get` prints the columns it prints on Kubernetes.

Each kind has its column definitions and a row function; cells are what the real server sends
(strings for ages, integers for counts). Rows carry a PartialObjectMetadata so that `-A` and
`--show-labels` work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .kinds import PrinterColumn
from .selectors import label_selector_text

ApiObject = dict[str, Any]
Row = list[Any]


def human_duration(seconds: float) -> str:
    """kubectl's duration.HumanDuration: 5s, 3m2s, 10m, 2h5m, 3d4h, 8y..."""
    s = int(seconds)
    if s < 0:
        return "<invalid>"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    return f"{hours // 24 // 365}y"


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def age(obj: ApiObject, now: float) -> str:
    created = parse_time(obj.get("metadata", {}).get("creationTimestamp"))
    return "<unknown>" if created is None else human_duration(now - created)


def _col(
    name: str, kind: str = "string", fmt: str = "", priority: int = 0, desc: str = ""
) -> ApiObject:
    return {"name": name, "type": kind, "format": fmt, "description": desc, "priority": priority}


NAME = _col("Name", fmt="name", desc="Name must be unique within a namespace.")
AGE = _col(
    "Age",
    desc="CreationTimestamp is a timestamp representing the server time when this object was "
    "created.",
)


def _pod_row(o: ApiObject, now: float) -> Row:
    status = o.get("status") or {}
    spec = o.get("spec") or {}
    statuses = status.get("containerStatuses") or []
    total = len(spec.get("containers") or [])
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
    reason = status.get("reason") or status.get("phase") or "Pending"
    for c in statuses:
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state and state["terminated"].get("reason"):
            reason = state["terminated"]["reason"]
    if o["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    ip = status.get("podIP") or "<none>"
    return [
        o["metadata"]["name"],
        f"{ready}/{total}",
        reason,
        restarts,
        age(o, now),
        ip,
        spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        "<none>",
    ]


def _ports_text(ports: list[ApiObject]) -> str:
    parts = []
    for p in ports:
        text = str(p.get("port"))
        if p.get("nodePort"):
            text += f":{p['nodePort']}"
        parts.append(f"{text}/{p.get('protocol', 'TCP')}")
    return ",".join(parts) or "<none>"


def _service_row(o: ApiObject, now: float) -> Row:
    spec = o.get("spec") or {}
    external = ",".join(spec.get("externalIPs") or [])
    if spec.get("type") == "ExternalName":
        external = spec.get("externalName", "")
    ingress = ((o.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    if spec.get("type") == "LoadBalancer":
        external = ",".join(i.get("ip") or i.get("hostname", "") for i in ingress) or "<pending>"
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [
        o["metadata"]["name"],
        spec.get("type", ""),
        spec.get("clusterIP") or "<none>",
        external or "<none>",
        _ports_text(spec.get("ports") or []),
        age(o, now),
        selector or "<none>",
    ]


def _images(o: ApiObject) -> tuple[str, str]:
    containers = (
        (((o.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    ) or []
    return (
        ",".join(c.get("name", "") for c in containers),
        ",".join(c.get("image", "") for c in containers),
    )


def _deployment_row(o: ApiObject, now: float) -> Row:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    names, images = _images(o)
    return [
        o["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 0)}",
        status.get("updatedReplicas", 0),
        status.get("availableReplicas", 0),
        age(o, now),
        names,
        images,
        label_selector_text(spec.get("selector")),
    ]


def _replicaset_row(o: ApiObject, now: float) -> Row:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    names, images = _images(o)
    return [
        o["metadata"]["name"],
        spec.get("replicas", 0),
        status.get("replicas", 0),
        status.get("readyReplicas", 0),
        age(o, now),
        names,
        images,
        label_selector_text(spec.get("selector")),
    ]


def _statefulset_row(o: ApiObject, now: float) -> Row:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    names, images = _images(o)
    return [
        o["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 0)}",
        age(o, now),
        names,
        images,
    ]


def _endpoints_row(o: ApiObject, now: float) -> Row:
    addrs = []
    for subset in o.get("subsets") or []:
        for a in subset.get("addresses") or []:
            for p in subset.get("ports") or [{}]:
                addrs.append(f"{a.get('ip')}:{p.get('port')}" if p else str(a.get("ip")))
    text = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [o["metadata"]["name"], text or "<none>", age(o, now)]


def _slice_row(o: ApiObject, now: float) -> Row:
    ports = ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"
    addrs = [a for e in o.get("endpoints") or [] for a in e.get("addresses") or []]
    text = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [o["metadata"]["name"], o.get("addressType", ""), ports, text or "<unset>", age(o, now)]


def _event_row(o: ApiObject, now: float) -> Row:
    last = parse_time(
        o.get("lastTimestamp") or o.get("eventTime") or o["metadata"].get("creationTimestamp")
    )
    seen = "<unknown>" if last is None else human_duration(now - last)
    inv = o.get("involvedObject") or {}
    return [
        seen,
        o.get("type", ""),
        o.get("reason", ""),
        f"{str(inv.get('kind', '')).lower()}/{inv.get('name', '')}",
        o.get("message", ""),
    ]


def _pdb_row(o: ApiObject, now: float) -> Row:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    return [
        o["metadata"]["name"],
        str(spec.get("minAvailable", "N/A")),
        str(spec.get("maxUnavailable", "N/A")),
        status.get("disruptionsAllowed", 0),
        age(o, now),
    ]


def _binding_row(o: ApiObject, now: float) -> Row:
    ref = o.get("roleRef") or {}
    return [o["metadata"]["name"], f"{ref.get('kind')}/{ref.get('name')}", age(o, now)]


_COLUMNS: dict[str, tuple[list[ApiObject], Callable[[ApiObject, float], Row]]] = {
    "Pod": (
        [
            NAME,
            _col("Ready"),
            _col("Status"),
            _col("Restarts", "string"),
            AGE,
            _col("IP", priority=1),
            _col("Node", priority=1),
            _col("Nominated Node", priority=1),
            _col("Readiness Gates", priority=1),
        ],
        _pod_row,
    ),
    "Service": (
        [
            NAME,
            _col("Type"),
            _col("Cluster-IP"),
            _col("External-IP"),
            _col("Port(s)"),
            AGE,
            _col("Selector", priority=1),
        ],
        _service_row,
    ),
    "Deployment": (
        [
            NAME,
            _col("Ready"),
            _col("Up-to-date", "integer"),
            _col("Available", "integer"),
            AGE,
            _col("Containers", priority=1),
            _col("Images", priority=1),
            _col("Selector", priority=1),
        ],
        _deployment_row,
    ),
    "ReplicaSet": (
        [
            NAME,
            _col("Desired", "integer"),
            _col("Current", "integer"),
            _col("Ready", "integer"),
            AGE,
            _col("Containers", priority=1),
            _col("Images", priority=1),
            _col("Selector", priority=1),
        ],
        _replicaset_row,
    ),
    "StatefulSet": (
        [NAME, _col("Ready"), AGE, _col("Containers", priority=1), _col("Images", priority=1)],
        _statefulset_row,
    ),
    "CustomResourceDefinition": (
        [NAME, _col("Created At", fmt="date")],
        lambda o, now: [o["metadata"]["name"], o["metadata"].get("creationTimestamp")],
    ),
    "Namespace": (
        [NAME, _col("Status"), AGE],
        lambda o, now: [
            o["metadata"]["name"],
            (o.get("status") or {}).get("phase", ""),
            age(o, now),
        ],
    ),
    "ConfigMap": (
        [NAME, _col("Data", "integer"), AGE],
        lambda o, now: [
            o["metadata"]["name"],
            len(o.get("data") or {}) + len(o.get("binaryData") or {}),
            age(o, now),
        ],
    ),
    "Secret": (
        [NAME, _col("Type"), _col("Data", "integer"), AGE],
        lambda o, now: [
            o["metadata"]["name"],
            o.get("type", ""),
            len(o.get("data") or {}),
            age(o, now),
        ],
    ),
    "ServiceAccount": (
        [NAME, _col("Secrets", "integer"), AGE],
        lambda o, now: [o["metadata"]["name"], len(o.get("secrets") or []), age(o, now)],
    ),
    "Endpoints": ([NAME, _col("Endpoints"), AGE], _endpoints_row),
    "EndpointSlice": (
        [NAME, _col("AddressType"), _col("Ports"), _col("Endpoints"), AGE],
        _slice_row,
    ),
    "Event": (
        [_col("Last Seen"), _col("Type"), _col("Reason"), _col("Object"), _col("Message")],
        _event_row,
    ),
    "PodDisruptionBudget": (
        [
            NAME,
            _col("Min Available"),
            _col("Max Unavailable"),
            _col("Allowed Disruptions", "integer"),
            AGE,
        ],
        _pdb_row,
    ),
    "RoleBinding": ([NAME, _col("Role"), AGE], _binding_row),
    "ClusterRoleBinding": ([NAME, _col("Role"), AGE], _binding_row),
    "Role": (
        [NAME, _col("Created At", fmt="date")],
        lambda o, now: [o["metadata"]["name"], o["metadata"].get("creationTimestamp", "")],
    ),
    "ClusterRole": (
        [NAME, _col("Created At", fmt="date")],
        lambda o, now: [o["metadata"]["name"], o["metadata"].get("creationTimestamp", "")],
    ),
    "MutatingWebhookConfiguration": (
        [NAME, _col("Webhooks", "integer"), AGE],
        lambda o, now: [o["metadata"]["name"], len(o.get("webhooks") or []), age(o, now)],
    ),
    "ValidatingWebhookConfiguration": (
        [NAME, _col("Webhooks", "integer"), AGE],
        lambda o, now: [o["metadata"]["name"], len(o.get("webhooks") or []), age(o, now)],
    ),
}


def _node_row(o: dict[str, Any], now: float) -> Row:
    """kubectl's node columns: Ready/NotReady (plus SchedulingDisabled), roles from the
    node-role.kubernetes.io/ labels, the kubelet version; wide: addresses and nodeInfo."""
    status = o.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    text = "Ready" if ready is not None and ready.get("status") == "True" else "NotReady"
    if not ready:
        text = "Unknown"
    if (o.get("spec") or {}).get("unschedulable"):
        text += ",SchedulingDisabled"
    labels = (o.get("metadata") or {}).get("labels") or {}
    roles = sorted(
        {k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/")}
        | ({labels["kubernetes.io/role"]} if labels.get("kubernetes.io/role") else set())
    )
    info = status.get("nodeInfo") or {}
    addresses = status.get("addresses") or []

    def address(kind: str) -> str:
        return next((a["address"] for a in addresses if a.get("type") == kind), "<none>")

    return [
        o["metadata"]["name"],
        text,
        ",".join(r for r in roles if r) or "<none>",
        age(o, now),
        info.get("kubeletVersion", ""),
        address("InternalIP"),
        address("ExternalIP"),
        info.get("osImage") or "<unknown>",
        info.get("kernelVersion") or "<unknown>",
        info.get("containerRuntimeVersion") or "<unknown>",
    ]


_COLUMNS["Node"] = (
    [
        NAME,
        _col("Status"),
        _col("Roles"),
        AGE,
        _col("Version"),
        _col("Internal-IP", priority=1),
        _col("External-IP", priority=1),
        _col("OS-Image", priority=1),
        _col("Kernel-Version", priority=1),
        _col("Container-Runtime", priority=1),
    ],
    _node_row,
)
_COLUMNS["Lease"] = (
    [NAME, _col("Holder"), AGE],
    lambda o, now: [
        o["metadata"]["name"],
        (o.get("spec") or {}).get("holderIdentity", ""),
        age(o, now),
    ],
)


def _partial(o: ApiObject) -> ApiObject:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": o["metadata"],
    }


def _json_path_cell(obj: ApiObject, column: PrinterColumn, now: float) -> Any:
    from .crd import get_path

    value = get_path(obj, column.json_path)
    if value is None:
        return None
    if column.type == "date":
        created = parse_time(str(value))
        return "<invalid>" if created is None else human_duration(now - created)
    if column.type == "integer" and isinstance(value, int | float | str):
        try:
            return int(value)
        except ValueError:
            return str(value)
    if isinstance(value, dict | list):
        return value
    return value if column.type in ("number", "boolean") else str(value)


def _printer(
    printer: tuple[PrinterColumn, ...],
) -> tuple[list[ApiObject], Callable[[ApiObject, float], Row]]:
    """Columns of a custom kind: Name and its additionalPrinterColumns (Name, Age if none)."""
    if not printer:
        return [NAME, AGE], lambda o, t: [o["metadata"]["name"], age(o, t)]
    columns = [NAME] + [_col(c.name, c.type, c.format, c.priority, c.description) for c in printer]
    return (
        columns,
        lambda o, t: [o["metadata"]["name"]] + [_json_path_cell(o, c, t) for c in printer],
    )


def table(
    kind: str,
    objs: list[ApiObject],
    list_meta: ApiObject,
    now: float | None = None,
    *,
    include_object: bool = True,
    printer: tuple[PrinterColumn, ...] | None = None,
) -> ApiObject:
    """A Table of `objs`; `printer` (a custom kind's columns, maybe none) replaces the
    built-in columns of `kind`."""
    now = time.time() if now is None else now
    if printer is not None:
        columns, row_fn = _printer(printer)
    else:
        columns, row_fn = _COLUMNS.get(
            kind, ([NAME, AGE], lambda o, t: [o["metadata"]["name"], age(o, t)])
        )
    rows = []
    for o in objs:
        row: ApiObject = {"cells": row_fn(o, now)}
        if include_object:
            row["object"] = _partial(o)
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns,
        "rows": rows,
    }
