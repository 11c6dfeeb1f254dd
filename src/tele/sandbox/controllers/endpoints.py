"""Endpoints and EndpointSlice controller: a Service's selector over pods with an address,
ready ones in `addresses`, others in `notReadyAddresses`; named and numeric targetPorts."""

from __future__ import annotations

import copy

from tele.sandbox.apiserver.kinds import ResourceType
from tele.sandbox.apiserver.store import ApiObject
from tele.sandbox.kubelet.probes import resolve_port

from .manager import ControllerManager
from .objects import pod_ready, resource_of_kind

SVC = resource_of_kind("", "Service")
EP = resource_of_kind("", "Endpoints")
SLICE = resource_of_kind("discovery.k8s.io", "EndpointSlice")
SLICE_LABEL = "kubernetes.io/service-name"


def _target(svc_port: ApiObject, pod: ApiObject) -> int | None:
    target = svc_port.get("targetPort", svc_port.get("port"))
    if isinstance(target, int) or str(target).isdigit():
        return int(str(target))
    for c in (pod.get("spec") or {}).get("containers") or []:
        port = resolve_port(target, c)
        if port is not None:
            return port
    return None


async def reconcile(manager: ControllerManager, namespace: str, name: str) -> None:
    store = manager.api.store
    svc = store.get(SVC.key, namespace, name)
    if svc is None:
        return
    spec = svc.get("spec") or {}
    selector = spec.get("selector")
    if not selector or spec.get("type") == "ExternalName":
        return
    pods = [
        p
        for p in store.objects("/pods", namespace)
        if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
        and (p.get("status") or {}).get("podIP")
        and not p["metadata"].get("deletionTimestamp")
        and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]
    # Group pods by their resolved port set: Endpoints subsets share one port list each.
    groups: dict[tuple[tuple[str, int, str], ...], tuple[list[ApiObject], list[ApiObject]]] = {}
    slice_endpoints: list[ApiObject] = []
    slice_ports: dict[str, ApiObject] = {}
    for pod in sorted(pods, key=lambda p: p["status"]["podIP"]):
        ports = []
        for sp in spec.get("ports") or []:
            port = _target(sp, pod)
            if port is not None:
                ports.append((sp.get("name") or "", port, sp.get("protocol") or "TCP"))
                slice_ports.setdefault(
                    sp.get("name") or "",
                    {
                        "name": sp.get("name") or "",
                        "port": port,
                        "protocol": sp.get("protocol") or "TCP",
                    },
                )
        ready = pod_ready(pod) or bool(spec.get("publishNotReadyAddresses"))
        address: ApiObject = {
            "ip": pod["status"]["podIP"],
            "nodeName": pod["spec"].get("nodeName"),
            "targetRef": {
                "kind": "Pod",
                "namespace": namespace,
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            },
        }
        pspec = pod.get("spec") or {}
        if pspec.get("hostname") and pspec.get("subdomain") == name:
            address["hostname"] = pspec["hostname"]
        group = groups.setdefault(tuple(ports), ([], []))
        group[0 if ready else 1].append(address)
        endpoint: ApiObject = {
            "addresses": [address["ip"]],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
            "nodeName": address["nodeName"],
            "targetRef": address["targetRef"],
        }
        if "hostname" in address:
            endpoint["hostname"] = address["hostname"]
        slice_endpoints.append(endpoint)
    subsets = []
    for port_set, (ready_addrs, not_ready) in groups.items():
        subset: ApiObject = {
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in port_set]
        }
        if ready_addrs:
            subset["addresses"] = ready_addrs
        if not_ready:
            subset["notReadyAddresses"] = not_ready
        if port_set:
            subsets.append(subset)
    labels = dict(svc["metadata"].get("labels") or {})
    owner = {
        "apiVersion": "v1",
        "kind": "Service",
        "name": name,
        "uid": svc["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    endpoints = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "subsets": subsets,
    }
    await _put(manager, EP, namespace, name, endpoints, fields=("subsets", "metadata.labels"))
    slice_name = f"{name}-{svc['metadata']['uid'][:5]}"
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": namespace,
            "labels": {
                **labels,
                SLICE_LABEL: name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [owner],
        },
        "addressType": "IPv4",
        "endpoints": slice_endpoints,
        "ports": list(slice_ports.values()),
    }
    await _put(
        manager, SLICE, namespace, slice_name, eps, fields=("endpoints", "ports", "metadata.labels")
    )


async def _put(
    manager: ControllerManager,
    kind: ResourceType,
    namespace: str,
    name: str,
    body: ApiObject,
    *,
    fields: tuple[str, ...],
) -> None:
    live = manager.api.store.get(kind.key, namespace, name)
    if live is None:
        await manager.api.create(kind, namespace, body, manager.ctx)
        return

    def pick(obj: ApiObject, path: str) -> object:
        for part in path.split("."):
            obj = (obj or {}).get(part) or {}
        return obj or None

    if all(pick(live, f) == pick(body, f) for f in fields):
        return
    new = copy.deepcopy(live)
    for f in fields:
        target = new
        parts = f.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = copy.deepcopy(pick(body, f)) or ([] if f != "metadata.labels" else {})
    await manager.api.update(kind, namespace, name, new, manager.ctx)
