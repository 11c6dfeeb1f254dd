"""The node's API object, as a kubelet keeps it: a `Node` registered at start (addresses,
capacity, conditions, nodeInfo, the well-known labels) and a heartbeat while the kubelet runs
(its `Lease` in `kube-node-lease` renewed every 10 s, the conditions' lastHeartbeatTime every
minute), so that `kubectl get nodes` and `kubectl describe node` print what they print on a
real cluster."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import trio

import tele
from tele.sandbox.apiserver import discovery
from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.errors import StatusError
from tele.sandbox.apiserver.events import event_object, record_event
from tele.sandbox.apiserver.kinds import by_kind
from tele.sandbox.apiserver.rest import Api

log = logging.getLogger(__name__)

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40
LEASE_RENEW_INTERVAL = 10.0
STATUS_INTERVAL = 60.0
MAX_PODS = 110

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


def _now(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _micro_now(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME":
            return value.strip().strip('"')
    return "Linux"


def _memory_kib() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def node_body(name: str, internal_ip: str, state_dir: Path, now: str) -> dict[str, Any]:
    """The Node a kubelet registers for this machine."""
    arch = _ARCH.get(platform.machine(), platform.machine())
    cpus = str(os.cpu_count() or 1)
    memory = f"{_memory_kib()}Ki"
    try:
        storage = f"{shutil.disk_usage(state_dir).total // 1024}Ki"
    except OSError:
        storage = "0"
    resources = {
        "cpu": cpus,
        "memory": memory,
        "ephemeral-storage": storage,
        "hugepages-2Mi": "0",
        "pods": str(MAX_PODS),
    }
    machine_id = _read("/etc/machine-id") or uuid.uuid4().hex
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node-role.kubernetes.io/control-plane": "",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": "10.244.0.0/16", "podCIDRs": ["10.244.0.0/16"]},
        "status": {
            "capacity": resources,
            "allocatable": dict(resources),
            "conditions": _conditions(now, now),
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": machine_id,
                "systemUUID": machine_id,
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(),
                "osImage": _os_image(),
                "containerRuntimeVersion": f"tele-sandbox://{tele.__version__}",
                "kubeletVersion": discovery.KUBE_VERSION["gitVersion"],
                "kubeProxyVersion": discovery.KUBE_VERSION["gitVersion"],
                "operatingSystem": "linux",
                "architecture": arch,
            },
        },
    }


def _conditions(heartbeat: str, transition: str) -> list[dict[str, str]]:
    def condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": status,
            "lastHeartbeatTime": heartbeat,
            "lastTransitionTime": transition,
            "reason": reason,
            "message": message,
        }

    return [
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        condition(
            "DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
    ]


async def _ensure(
    api: Api, kind: str, group: str, namespace: str, body: dict[str, Any], ctx: RequestContext
) -> None:
    rt = by_kind(group, kind)
    assert rt is not None
    try:
        await api.create(rt, namespace, body, ctx)
    except StatusError as exc:
        if exc.code != 409:
            raise
        current = api.get(rt, namespace, body["metadata"]["name"])
        merged = {**body, "metadata": {**current["metadata"], **body["metadata"]}}
        await api.update(rt, namespace, body["metadata"]["name"], merged, ctx)


async def _node_event(api: Api, ctx: RequestContext, name: str, reason: str, message: str) -> None:
    """An Event about the node, recorded as a kubelet does: in `default`, the node's name as
    the involved object's uid (what `kubectl describe node` searches for)."""
    event = event_object(
        {"kind": "Node", "name": name, "uid": name},
        "default",
        reason,
        message,
        event_type="Normal",
        component="kubelet",
        now=_now(api.clock()),
        host=name,
    )
    await record_event(api, ctx, event)


async def _register(api: Api, ctx: RequestContext, name: str, body: dict[str, Any]) -> None:
    """The Node, the lease namespace and the node's Lease, created or brought up to date."""
    node_rt = by_kind("", "Node")
    assert node_rt is not None
    await _ensure(api, "Node", "", "", body, ctx)
    node = api.get(node_rt, "", name)
    await _ensure(
        api,
        "Namespace",
        "",
        "",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": LEASE_NAMESPACE}},
        ctx,
    )
    now = _micro_now(api.clock())
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
            ],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION,
            "acquireTime": now,
            "renewTime": now,
        },
    }
    await _ensure(api, "Lease", "coordination.k8s.io", LEASE_NAMESPACE, lease, ctx)


async def serve_node_status(
    api: Api,
    ctx: RequestContext,
    name: str,
    internal_ip: str,
    state_dir: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Register the Node (replacing an older registration of the same name), then keep its
    heartbeat until cancelled; a Node or Lease deleted meanwhile is registered again."""
    node_rt = by_kind("", "Node")
    lease_rt = by_kind("coordination.k8s.io", "Lease")
    assert node_rt is not None and lease_rt is not None
    body = node_body(name, internal_ip, state_dir, _now(api.clock()))
    await _register(api, ctx, name, body)
    await _node_event(api, ctx, name, "Starting", "Starting kubelet.")
    for condition in body["status"]["conditions"]:
        reason = {
            "MemoryPressure": "NodeHasSufficientMemory",
            "DiskPressure": "NodeHasNoDiskPressure",
            "PIDPressure": "NodeHasSufficientPID",
            "Ready": "NodeReady",
        }[condition["type"]]
        await _node_event(api, ctx, name, reason, f"Node {name} status is now: {reason}")
    task_status.started()

    async def register_again() -> None:
        await _register(api, ctx, name, node_body(name, internal_ip, state_dir, _now(api.clock())))

    transition = body["status"]["conditions"][-1]["lastTransitionTime"]
    last_status = trio.current_time()
    while True:
        await trio.sleep(LEASE_RENEW_INTERVAL)
        try:
            if api.store.get("/nodes", "", name) is None:
                log.info("node %s was deleted: registering it again", name)
                await _register(
                    api, ctx, name, node_body(name, internal_ip, state_dir, _now(api.clock()))
                )
            current = api.get(lease_rt, LEASE_NAMESPACE, name)
            renewed = {
                **current,
                "spec": {**current.get("spec", {}), "renewTime": _micro_now(api.clock())},
            }
            await api.update(lease_rt, LEASE_NAMESPACE, name, renewed, ctx)
            if trio.current_time() - last_status >= STATUS_INTERVAL:
                last_status = trio.current_time()
                current = api.get(node_rt, "", name)
                status = {
                    **current.get("status", {}),
                    "conditions": _conditions(_now(api.clock()), transition),
                }
                await api.update(node_rt, "", name, {**current, "status": status}, ctx)
        except StatusError as exc:
            if exc.code != 404:
                log.warning("node heartbeat of %s failed: %s", name, exc)
                continue
            log.info("the lease of node %s is gone: registering again", name)
            try:
                await _register(
                    api, ctx, name, node_body(name, internal_ip, state_dir, _now(api.clock()))
                )
            except StatusError as again:
                log.warning("registering node %s again failed: %s", name, again)
