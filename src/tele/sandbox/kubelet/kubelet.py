"""The kubelet: schedules pods onto this node and runs them, one worker per pod.

A pod worker gives the pod a network namespace and address, writes its hosts/resolv.conf and
volumes, runs init containers to completion in order, then supervises each container (probes,
restart policy with back-off, logs) and keeps the pod's status current. Deletion is graceful:
SIGTERM, the grace period, SIGKILL; then the namespace goes and the Pod object is removed.
Everything reacts to store events (no polling of the API).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import logging
import math
import os
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tele.image.errors import InvalidReference
from tele.image.reference import Reference, parse_reference
from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext, timestamp
from tele.sandbox.apiserver.errors import StatusError
from tele.sandbox.apiserver.events import event_object, record_event
from tele.sandbox.apiserver.kinds import by_kind
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.apiserver.store import Event
from tele.sandbox.network import netns, node
from tele.sandbox.network.errors import NodeError
from tele.sandbox.oci_registry import RegistryInfo

from . import runtime, volumes
from .imagestore import Image, ImageError, ImageStore
from .logs import LogFile
from .probes import resolve_port, run_probe
from .pull import Mirror, pull_image, store_name
from .pull import present as present_image

log = logging.getLogger(__name__)

ApiObject = dict[str, Any]
_POD = by_kind("", "Pod")
assert _POD is not None
POD_RESOURCE = _POD
_MAX_BACKOFF = 300.0
UNSCHEDULABLE_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
"""The taint a cordoned node has (the scheduler's NodeUnschedulable plugin checks it)."""
ATTACH_BUFFER = 256


class Kubelet:
    """One node: `<cluster>-node` namespace, pods in `<cluster>-pod-<n>` namespaces."""

    def __init__(
        self,
        api: Api,
        cluster: str,
        state_dir: Path,
        *,
        node_name: str | None = None,
        backoff_base: float = 10.0,
        images_dir: Path | None = None,
        registry: RegistryInfo | None = None,
    ) -> None:
        self.api = api
        self.cluster = cluster
        self.node_ns = f"{cluster}-node"
        self.node_name = node_name or self.node_ns
        self.state_dir = state_dir
        self.backoff_base = backoff_base
        self.ipam = node.PodIpam()
        self.workers: dict[str, PodWorker] = {}
        self.ctx = RequestContext(User("system:node:" + self.node_name, ("system:masters",)))
        self._next_index = 0
        self._nursery: trio.Nursery | None = None
        self._to_schedule: trio.MemorySendChannel[tuple[str, str]] | None = None
        # Containers run with runc from images in this store; a node that cannot (not root,
        # no runc) reports every pull as failed, saying why.
        self.images: ImageStore | None = None
        if runtime.runc_available():
            self.images = ImageStore(images_dir or state_dir / "images")
        self.mirror: Mirror | None = None
        self._pull_locks: dict[str, trio.Lock] = {}
        if registry is not None:
            self.mirror = Mirror(registry.address, registry.credentials, registry.ca_file)

    def next_index(self) -> int:
        self._next_index += 1
        return self._next_index

    def worker_for(self, namespace: str, name: str) -> PodWorker | None:
        for worker in self.workers.values():
            if worker.namespace == namespace and worker.name == name:
                return worker
        return None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.images is not None:
            await trio.to_thread.run_sync(self._cleanup_containers)
        await node.create_node(self.node_ns)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                send, recv = trio.open_memory_channel[tuple[str, str]](math.inf)
                self._to_schedule = send
                nursery.start_soon(self._scheduler, recv)
                unsubscribe = self.api.store.subscribe("/pods", self._on_pod)
                unsubscribe_nodes = self.api.store.subscribe("/nodes", self._on_node)
                try:
                    for pod in self.api.store.objects("/pods"):
                        self._on_pod(Event("ADDED", "/pods", pod, None, 0))
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    unsubscribe()
                    unsubscribe_nodes()
        finally:
            with trio.CancelScope(shield=True):
                await self.cleanup()

    async def cleanup(self) -> None:
        """Remove every namespace of this node (pods first); kills what runs inside."""
        if self.images is not None:
            await trio.to_thread.run_sync(self._cleanup_containers)
        for name in netns.list_netns():
            if name.startswith(f"{self.cluster}-pod-"):
                await netns.delete(name)
        await netns.delete(self.node_ns)

    def pull_lock(self, name: str) -> trio.Lock:
        return self._pull_locks.setdefault(name, trio.Lock())

    def _cleanup_containers(self) -> None:
        runtime.cleanup_sync(self.cluster, self.state_dir / "containers")

    def _on_pod(self, event: Event) -> None:
        pod = event.obj
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta.get("uid", "")
        worker = self.workers.get(uid)
        if event.type == "DELETED":
            if worker is not None:
                worker.removed()
            return
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp") and self._to_schedule is not None:
                self._to_schedule.send_nowait((meta["namespace"], meta["name"]))
            return
        if spec["nodeName"] != self.node_name:
            return
        if worker is None:
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") or self._nursery is None:
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            self._nursery.start_soon(worker.run)
        else:
            worker.update(pod)

    def _on_node(self, event: Event) -> None:
        """The node's spec or labels changed (uncordoned, a taint removed, a label added): the
        pods left Pending are tried again, as the scheduler does (a heartbeat changes neither)."""
        if event.obj["metadata"].get("name") != self.node_name or self._to_schedule is None:
            return
        if event.type == "DELETED":
            return
        old = event.old or {}

        def placement(node_obj: ApiObject) -> tuple[Any, Any]:
            return node_obj.get("spec"), (node_obj.get("metadata") or {}).get("labels")

        if event.type == "MODIFIED" and placement(old) == placement(event.obj):
            return
        for pod in self.api.store.objects("/pods"):
            meta = pod["metadata"]
            if not (pod.get("spec") or {}).get("nodeName") and not meta.get("deletionTimestamp"):
                self._to_schedule.send_nowait((meta["namespace"], meta["name"]))

    def _unfit(self, pod: ApiObject) -> str | None:
        """Why this node cannot take the pod, in the scheduler's words (its filters in their
        order: NodeUnschedulable, TaintToleration, NodeAffinity), or None when it can."""
        node_obj = self.api.store.get("/nodes", "", self.node_name)
        if node_obj is None:
            return None
        spec = pod.get("spec") or {}
        tolerations = spec.get("tolerations") or []
        node_spec = node_obj.get("spec") or {}
        if node_spec.get("unschedulable") and not any(
            _tolerates(t, UNSCHEDULABLE_TAINT) for t in tolerations
        ):
            return "1 node(s) were unschedulable"
        for taint in node_spec.get("taints") or []:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            if not any(_tolerates(t, taint) for t in tolerations):
                return (
                    f"1 node(s) had untolerated taint {{{taint.get('key', '')}: "
                    f"{taint.get('value', '')}}}"
                )
        labels = (node_obj.get("metadata") or {}).get("labels") or {}
        if not _matches_node(spec, labels, self.node_name):
            return "1 node(s) didn't match Pod's node affinity/selector"
        return None

    async def _scheduler(self, recv: trio.MemoryReceiveChannel[tuple[str, str]]) -> None:
        """The scheduler's job for a one-node cluster: bind every unassigned pod here, unless
        the node cannot take it (cordoned, an untolerated taint, a nodeSelector or required
        node affinity it does not match): the pod stays Pending, Unschedulable, until the node
        changes."""
        async for namespace, name in recv:
            pod = self.api.store.get("/pods", namespace, name)
            if pod is None or (pod.get("spec") or {}).get("nodeName"):
                continue
            why = self._unfit(pod)
            if why is not None:
                await self._failed_scheduling(
                    pod,
                    f"0/1 nodes are available: {why}. preemption: 0/1 nodes are available: 1 "
                    "Preemption is not helpful for scheduling.",
                )
                continue
            try:
                await self.api.bind(namespace, name, {"target": {"name": self.node_name}}, self.ctx)
            except StatusError as exc:
                log.info("binding %s/%s: %s", namespace, name, exc.message)
                continue
            await self.event(
                pod,
                "Scheduled",
                f"Successfully assigned {namespace}/{name} to {self.node_name}",
                source="default-scheduler",
            )

    async def _failed_scheduling(self, pod: ApiObject, message: str) -> None:
        """PodScheduled False (Unschedulable) and a FailedScheduling event, once per pod and
        message (the scheduler retries quietly until something changes)."""
        status = pod.get("status") or {}
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        old = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None
        )
        if old is not None and old.get("message") == message:
            return
        body = copy.deepcopy(pod)
        body["metadata"].pop("resourceVersion", None)
        body["status"] = {
            **status,
            "phase": "Pending",
            "conditions": [
                *conditions,
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "lastTransitionTime": timestamp(),
                    "reason": "Unschedulable",
                    "message": message,
                },
            ],
        }
        meta = pod["metadata"]
        try:
            await self.api.update(
                POD_RESOURCE, meta["namespace"], meta["name"], body, self.ctx, subresource="status"
            )
        except StatusError as exc:
            log.info("status of %s/%s: %s", meta["namespace"], meta["name"], exc.message)
        await self.event(
            pod, "FailedScheduling", message, kind="Warning", source="default-scheduler"
        )

    async def event(
        self,
        obj: ApiObject,
        reason: str,
        message: str,
        *,
        kind: str = "Normal",
        source: str = "kubelet",
    ) -> None:
        """Record an Event about `obj` (best effort: events never fail the work they describe)."""
        meta = obj["metadata"]
        involved = {
            "kind": obj.get("kind", "Pod"),
            "apiVersion": obj.get("apiVersion", "v1"),
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta.get("uid"),
        }
        event = event_object(
            involved,
            meta["namespace"],
            reason,
            message,
            event_type=kind,
            component=source,
            now=timestamp(),
            host=self.node_name,
        )
        await record_event(self.api, self.ctx, event)


class ContainerRun:
    """What the kubelet knows of one container: state, restarts, readiness, logs, process."""

    def __init__(self, spec: ApiObject, init: bool) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.state: ApiObject = {
            "waiting": {"reason": "PodInitializing" if not init else "Pending"}
        }
        self.last_state: ApiObject = {}
        self.restarts = 0
        self.backoff_step = 0
        self.ready = False
        self.started = False
        self.proc: trio.Process | None = None
        self.container: runtime.Container | None = None
        self.process: ApiObject | None = None  # the runc process spec, for exec
        self.image: Image | None = None
        self.logs: list[LogFile] = []
        self.done = trio.Event()
        # What `kubectl attach` reaches: the running container's output as it comes, its
        # stdin (spec.stdin: a pipe, or with spec.tty the pty both go through).
        self.attached: set[trio.MemorySendChannel[bytes]] = set()
        self.stdin: trio.abc.SendStream | None = None
        self.pty: int | None = None
        """The pty master's fd while a `tty: true` container runs."""
        self.attach_sessions = 0

    def attach(self) -> trio.MemoryReceiveChannel[bytes]:
        """The container's output from now on, until it ends (a reader that falls
        `ATTACH_BUFFER` chunks behind is dropped, as a stalled stream is)."""
        send, recv = trio.open_memory_channel[bytes](ATTACH_BUFFER)
        if self.proc is None or self.proc.returncode is not None:
            send.close()
        else:
            self.attached.add(send)
        return recv

    def output(self, chunk: bytes) -> None:
        for channel in list(self.attached):
            try:
                channel.send_nowait(chunk)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.attached.discard(channel)
                channel.close()

    def output_ended(self) -> None:
        for channel in self.attached:
            channel.close()
        self.attached.clear()

    def resize(self, width: int, height: int) -> None:
        if self.pty is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
            # runc copies its terminal's size to the container's on SIGWINCH (its terminal is
            # not its controlling one: the kernel does not send it).
            if self.proc is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGWINCH)

    def signal(self, sig: int) -> None:
        """Signal the container's main process (SIGKILL: everything in the container)."""
        if self.container is not None:
            self.container.signal(sig)
        elif self.proc is not None and self.proc.returncode is None:
            if sig == signal.SIGKILL:
                kill_group(self.proc)
            else:
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    @property
    def container_id(self) -> str:
        if self.container is not None:
            return f"runc://{self.container.id}"
        return f"tele://{self.name}-{self.restarts}"

    def status(self) -> ApiObject:
        image = self.spec.get("image", "")
        out: ApiObject = {
            "name": self.name,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "restartCount": self.restarts,
            "image": image,
            "imageID": (
                f"{parse_reference(self.image.ref).name}@{self.image.digest}"
                if self.image is not None
                else f"tele-sandbox://{image}"
            ),
            "started": self.started,
        }
        if "waiting" not in self.state:
            out["containerID"] = self.container_id
        return out


class PodWorker:
    """Runs one pod from its namespace's creation to the removal of the Pod object."""

    def __init__(self, kubelet: Kubelet, pod: ApiObject) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.uid: str = pod["metadata"]["uid"]
        self.namespace: str = pod["metadata"]["namespace"]
        self.name: str = pod["metadata"]["name"]
        spec = pod.get("spec") or {}
        self.init_runs = [ContainerRun(c, True) for c in spec.get("initContainers") or []]
        self.runs = [ContainerRun(c, False) for c in spec.get("containers") or []]
        self.dir = kubelet.state_dir / "pods" / self.uid
        self.ip = ""
        self.netns = ""
        self.index = 0
        self.host_network = bool(spec.get("hostNetwork"))
        """In the node's network namespace, with the node's address (a real node's IP)."""
        self.start_time = ""
        self.initialized = False
        self.terminating = trio.Event()
        self.gone = False
        self._cancel = trio.CancelScope()
        self._dirty = trio.Event()
        self._status_written: ApiObject | None = None
        self._exec_count = 0
        self._exec_kill: dict[int, Callable[[], None]] = {}

    # --- events from the store ------------------------------------------------------------

    def update(self, pod: ApiObject) -> None:
        old = self.pod
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.terminating.set()
        if (old["metadata"].get("labels"), old["metadata"].get("annotations")) != (
            pod["metadata"].get("labels"),
            pod["metadata"].get("annotations"),
        ) and self.dir.exists():
            try:
                volumes.write_volumes(
                    self.kubelet.api, pod, self.dir / "volumes", refresh_only=True
                )
            except (volumes.ConfigError, OSError) as exc:
                log.warning("refreshing volumes of %s: %s", self.name, exc)

    def removed(self) -> None:
        self.gone = True
        self.terminating.set()
        self._cancel.cancel()

    def all_runs(self) -> list[ContainerRun]:
        return self.init_runs + self.runs

    def run_named(self, name: str | None) -> ContainerRun | None:
        if not name:
            return self.runs[0] if self.runs else None
        return next((r for r in self.all_runs() if r.name == name), None)

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._status_writer)
                with self._cancel:
                    await self._lifecycle(nursery)
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("pod worker %s/%s failed", self.namespace, self.name)
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown()

    async def _lifecycle(self, nursery: trio.Nursery) -> None:
        self.start_time = timestamp()
        self.index = self.kubelet.next_index()
        if self.host_network:
            self.ip, self.netns = node.GATEWAY, self.kubelet.node_ns
        else:
            self.ip = self.kubelet.ipam.allocate()
            self.netns = f"{self.kubelet.cluster}-pod-{self.index}"
            await node.attach_pod(self.kubelet.node_ns, self.netns, self.index, self.ip)
        self._write_etc()
        self.mark_dirty()
        try:
            volumes.write_volumes(self.kubelet.api, self.pod, self.dir / "volumes")
        except volumes.ConfigError as exc:
            for run in self.runs:
                run.state = {
                    "waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}
                }
            self.mark_dirty()
            await self.kubelet.event(self.pod, "FailedMount", str(exc), kind="Warning")
            await self.terminating.wait()
            return
        self.start_token_rotation(nursery)
        async with trio.open_nursery() as containers:
            for run in self.init_runs:
                containers.start_soon(self._supervise, run)
                await run.done.wait()
                if run.state.get("terminated", {}).get("exitCode", 1) != 0:
                    await self.terminating.wait()
                    containers.cancel_scope.cancel()
                    return
            self.initialized = True
            for run in self.runs:
                containers.start_soon(self._supervise, run)
            await self.terminating.wait()
            await self._terminate()
            containers.cancel_scope.cancel()

    @property
    def _sa_dir(self) -> Path:
        return Path(self.dir / "serviceaccount")

    def _wants_default_service_account(self) -> bool:
        """Some container gets the default token volume at SA_DIR (automount, not mounted)."""
        spec = self.pod.get("spec") or {}
        if spec.get("automountServiceAccountToken", True) is False:
            return False
        return any(
            not any(
                m.get("mountPath", "").rstrip("/") == volumes.SA_DIR
                for m in run.spec.get("volumeMounts") or []
            )
            for run in self.all_runs()
        )

    def start_token_rotation(self, nursery: trio.Nursery) -> None:
        """Write the default service-account directory (if a container gets it) and keep every
        token of the pod fresh in `nursery`: re-minted at 80 % of its life, as a kubelet does
        (the pod's `volumes` are written already)."""
        if self._wants_default_service_account():
            try:
                volumes.write_service_account(self.kubelet.api, self.pod, self._sa_dir)
            except volumes.ConfigError:
                pass  # each container start says why (CreateContainerConfigError) and retries
        nursery.start_soon(
            volumes.refresh_tokens, self.kubelet.api, lambda: self.pod, self._rewrite_tokens
        )

    def _rewrite_tokens(self) -> None:
        """Rotate: the projected volumes and the default service-account directory again (the
        token issuer hands out a new token for those at 80 % of their life)."""
        volumes.write_volumes(self.kubelet.api, self.pod, self.dir / "volumes", refresh_only=True)
        if (self._sa_dir / "token").exists():
            volumes.write_service_account(self.kubelet.api, self.pod, self._sa_dir)

    async def _terminate(self) -> None:
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        live = [r for r in self.all_runs() if r.proc is not None and r.proc.returncode is None]
        for run in live:
            await self.kubelet.event(self.pod, "Killing", f"Stopping container {run.name}")
            run.signal(signal.SIGTERM)
        with trio.move_on_after(float(grace)):
            for run in live:
                assert run.proc is not None
                await run.proc.wait()
        for run in live:
            assert run.proc is not None
            if run.proc.returncode is None:
                run.signal(signal.SIGKILL)
                await run.proc.wait()

    async def _teardown(self) -> None:
        for run in self.all_runs():
            if run.proc is not None and run.proc.returncode is None:
                run.signal(signal.SIGKILL)
                await run.proc.wait()
            if run.container is not None:
                await run.container.remove()
        if self.netns and not self.host_network:
            await node.detach_pod(self.kubelet.node_ns, self.netns, self.index)
        if self.ip and not self.host_network:
            self.kubelet.ipam.release(self.ip)
        self.kubelet.workers.pop(self.uid, None)
        live = self.kubelet.api.store.get("/pods", self.namespace, self.name)
        if (
            live is not None
            and live["metadata"].get("uid") == self.uid
            and live["metadata"].get("deletionTimestamp")
        ):
            try:
                self.kubelet.api.delete_now(POD_RESOURCE, live, "Background", 0)
            except StatusError as exc:
                log.warning("removing pod %s: %s", self.name, exc.message)

    def hostname(self) -> str:
        """The node's name for a hostNetwork pod (the host's UTS), else the pod's."""
        spec = self.pod.get("spec") or {}
        if self.host_network:
            return self.kubelet.node_name
        return str(spec.get("hostname") or self.name)

    def _write_etc(self) -> None:
        spec = self.pod.get("spec") or {}
        hostname = self.hostname()
        fqdn = hostname
        if spec.get("subdomain"):
            fqdn = f"{hostname}.{spec['subdomain']}.{self.namespace}.svc.cluster.local {hostname}"
        etc = self.dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost"
            f" ip6-loopback\n{self.ip}\t{fqdn}\n"
        )
        ns = self.namespace
        policy = spec.get("dnsPolicy") or "ClusterFirst"
        if self.host_network and policy == "ClusterFirst":
            # As the kubelet does: a hostNetwork pod resolves as the node does unless it asks
            # for ClusterFirstWithHostNet.
            policy = "Default"
        if policy == "Default":
            try:
                resolv = Path("/etc/resolv.conf").read_text()
            except OSError:
                resolv = ""
            (etc / "resolv.conf").write_text(resolv)
        else:
            (etc / "resolv.conf").write_text(
                f"search {ns}.svc.cluster.local svc.cluster.local cluster.local\n"
                f"nameserver {node.DNS_IP}\noptions ndots:5\n"
            )
        (etc / "hostname").write_text(hostname + "\n")

    # --- containers ---------------------------------------------------------------------------

    def _mounts(self, run: ContainerRun) -> list[runtime.Mount]:
        """The pod's /etc files, the container's volumeMounts and the service account token.

        configMap, secret, downwardAPI and projected volumes are read-only, as on a real node."""
        spec = self.pod.get("spec") or {}
        etc = self.dir / "etc"
        mounts = [
            runtime.Mount(str(etc / "hosts"), "/etc/hosts", True),
            runtime.Mount(str(etc / "resolv.conf"), "/etc/resolv.conf", True),
            runtime.Mount(str(etc / "hostname"), "/etc/hostname", True),
        ]
        by_name = {v.get("name"): v for v in spec.get("volumes") or []}
        have_sa = False
        for m in run.spec.get("volumeMounts") or []:
            volume = by_name.get(m["name"]) or {}
            source = self.dir / "volumes" / m["name"]
            host_path = (volume.get("hostPath") or {}).get("path")
            if host_path and self.kubelet.images is not None:
                source = Path(host_path)
                if (volume.get("hostPath") or {}).get("type") == "DirectoryOrCreate":
                    source.mkdir(parents=True, exist_ok=True)
            if m.get("subPath"):
                source = source / m["subPath"]
            read_only = bool(m.get("readOnly")) or any(
                kind in volume for kind in ("configMap", "secret", "downwardAPI", "projected")
            )
            mounts.append(runtime.Mount(str(source), m["mountPath"], read_only))
            have_sa = have_sa or m["mountPath"].rstrip("/") == volumes.SA_DIR
        automount = spec.get("automountServiceAccountToken", True) is not False
        if automount and not have_sa:
            sa_dir = self._sa_dir
            if not (sa_dir / "token").exists():  # (written at pod start unless that failed)
                volumes.write_service_account(self.kubelet.api, self.pod, sa_dir)
            mounts.append(runtime.Mount(str(sa_dir), volumes.SA_DIR, True))
        return mounts

    def _k8s_env(self, run: ContainerRun, base: dict[str, str]) -> dict[str, str]:
        base = {
            **base,
            "HOSTNAME": self.hostname(),
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
            "KUBERNETES_SERVICE_PORT_HTTPS": "443",
        }
        pod = self.pod
        if self.ip:
            # As the kubelet does, status.podIP in env is the IP the pod has now, even when the
            # status carrying it has not been written to the API yet.
            pod = {**pod, "status": {**(pod.get("status") or {}), "podIP": self.ip}}
        return volumes.container_env(self.kubelet.api, pod, run.spec, base)

    def _create(self, run: ContainerRun, image: Image) -> runtime.Container:
        """Mount the container's root filesystem and write its bundle (not started yet)."""
        assert self.kubelet.images is not None
        store = self.kubelet.images
        layers = [store.layer_dir(d) for d in reversed(image.diff_ids)]  # top layer first
        env = self._k8s_env(run, runtime.image_env(image))
        argv = runtime.argv_for(image, run.spec, lambda a: volumes.expand(a, env))
        user = runtime.resolve_user(layers, self.pod, run.spec, image)
        cwd = run.spec.get("workingDir") or image.process_config.get("WorkingDir") or "/"
        process = runtime.build_process(argv, env, cwd, user, run.spec)
        memory, cpu_limit, cpu_request = runtime.limits(run.spec)
        mounts = self._mounts(run)
        cid = f"{self.kubelet.cluster}.{self.index}.{run.name}.{run.restarts}"
        container = runtime.Container(
            self.kubelet.cluster, cid, self.kubelet.state_dir / "containers" / cid
        )
        container.memory_limit = memory
        run.container, run.process = container, process
        container.prepare(
            layers,
            lambda rootfs, cgroups_path: runtime.build_config(
                rootfs=rootfs,
                process=process,
                container=run.spec,
                hostname=self.hostname(),
                netns_path=str(netns.netns_path(self.netns)),
                mounts=mounts,
                cgroups_path=cgroups_path,
                cpu_limit=cpu_limit,
                cpu_request=cpu_request,
            ),
        )
        return container

    async def _spawn_in(
        self, run: ContainerRun, command: list[str], *, interactive: bool
    ) -> trio.Process:
        self._exec_count += 1
        tag = f"exec{self._exec_count}"
        container, process = run.container, run.process
        if container is None or process is None:
            raise OSError(errno.ESRCH, f"container {run.name} is not running")
        proc = await container.exec({**process, "args": command}, tag, interactive=interactive)
        self._exec_kill[proc.pid] = lambda: container.kill_exec(tag)
        return proc

    async def spawn_exec(self, run: ContainerRun, command: list[str]) -> trio.Process:
        """`command` in the container's namespaces with stdin, stdout and stderr as pipes."""
        return await self._spawn_in(run, command, interactive=True)

    def kill_exec(self, proc: trio.Process) -> None:
        """End an exec'd process (for runc: the process in the container, then runc exec)."""
        kill = self._exec_kill.pop(proc.pid, None)
        if kill is not None:
            kill()
        kill_group(proc)

    def forget_exec(self, proc: trio.Process) -> None:
        self._exec_kill.pop(proc.pid, None)

    async def exec_in(self, run: ContainerRun, command: list[str]) -> int:
        """Run `command` in the container's namespaces (exec probes); returns its exit code."""
        proc = await self._spawn_in(run, command, interactive=False)
        try:
            assert proc.stdout is not None
            async with proc.stdout:
                while await proc.stdout.receive_some(65536):
                    pass
            return await proc.wait()
        finally:
            # Also when the probe's timeout cancelled us: reap the process, never leave it.
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    self.kill_exec(proc)
                    await proc.wait()
                self._exec_kill.pop(proc.pid, None)
                if proc.stdout is not None:
                    await proc.stdout.aclose()

    def _waiting(self, run: ContainerRun, reason: str, message: str) -> None:
        run.state = {"waiting": {"reason": reason, "message": message}}
        self.mark_dirty()

    async def _image_for(self, run: ContainerRun) -> Image | None:
        """Pull (or find) the container's image as the kubelet does; None once the pod
        terminates without one."""
        name = run.spec.get("image", "")
        store = self.kubelet.images
        if store is None:
            msg = (
                f'Failed to pull image "{name}": rpc error: code = Unavailable desc = this '
                "node cannot run containers (it needs root and runc)"
            )
            self._waiting(run, "ErrImagePull", msg)
            await self.kubelet.event(self.pod, "Failed", msg, kind="Warning")
            await self.terminating.wait()
            return None
        try:
            ref = parse_reference(name)
        except InvalidReference:
            msg = (
                f'Failed to apply default image tag "{name}": couldn\'t parse image name '
                f'"{name}": invalid reference format'
            )
            self._waiting(run, "InvalidImageName", msg)
            await self.kubelet.event(self.pod, "InspectFailed", msg, kind="Warning")
            await self.kubelet.event(self.pod, "Failed", "Error: InvalidImageName", kind="Warning")
            await self.terminating.wait()
            return None
        policy = run.spec.get("imagePullPolicy") or default_pull_policy(ref)
        present = await trio.to_thread.run_sync(present_image, store, ref)
        # Without a registry (the test and benchmark clusters) a present image is used, as
        # on a node with preloaded images.
        if present is not None and (policy != "Always" or self.kubelet.mirror is None):
            await self.kubelet.event(
                self.pod, "Pulled", f'Container image "{name}" already present on machine'
            )
            return present
        if present is None and policy == "Never":
            msg = f'Container image "{name}" is not present with pull policy of Never'
            self._waiting(run, "ErrImageNeverPull", msg)
            await self.kubelet.event(self.pod, "ErrImageNeverPull", msg, kind="Warning")
            await self.kubelet.event(self.pod, "Failed", "Error: ErrImageNeverPull", kind="Warning")
            await self.terminating.wait()
            return None
        step = 0
        while not self.terminating.is_set():
            await self.kubelet.event(self.pod, "Pulling", f'Pulling image "{name}"')
            started = time.monotonic()
            try:
                # One pull of an image at a time (the kubelet's serializeImagePulls): the pods
                # of a Deployment share its layers rather than fetching them side by side.
                async with self.kubelet.pull_lock(store_name(ref)):
                    image = await pull_image(store, ref, self._pull_secrets(), self.kubelet.mirror)
            except ImageError as exc:
                msg = f'Failed to pull image "{name}": {exc}'
                self._waiting(run, "ErrImagePull", msg)
                await self.kubelet.event(self.pod, "Failed", msg, kind="Warning")
                await self.kubelet.event(self.pod, "Failed", "Error: ErrImagePull", kind="Warning")
            else:
                took = time.monotonic() - started
                await self.kubelet.event(
                    self.pod,
                    "Pulled",
                    f'Successfully pulled image "{name}" in {_duration(took)} '
                    f"({_duration(took)} including waiting). Image size: {image.size} bytes.",
                )
                return image
            delay = min(_MAX_BACKOFF, self.kubelet.backoff_base * 2**step)
            step += 1
            # The next sync shows the back-off, as the kubelet's does a moment later.
            with trio.move_on_after(min(1.0, delay / 2)):
                await self.terminating.wait()
            if self.terminating.is_set():
                break
            msg = f'Back-off pulling image "{name}"'
            self._waiting(run, "ImagePullBackOff", msg)
            await self.kubelet.event(self.pod, "BackOff", msg)
            await self.kubelet.event(self.pod, "Failed", "Error: ImagePullBackOff", kind="Warning")
            with trio.move_on_after(delay):
                await self.terminating.wait()
        return None

    def _pull_secrets(self) -> list[ApiObject]:
        """The pod's imagePullSecrets of type kubernetes.io/dockerconfigjson (missing → none)."""
        out = []
        for ref in (self.pod.get("spec") or {}).get("imagePullSecrets") or []:
            secret = self.kubelet.api.store.get("/secrets", self.namespace, ref.get("name", ""))
            if secret is not None and secret.get("type") == "kubernetes.io/dockerconfigjson":
                out.append(secret)
        return out

    async def _supervise(self, run: ContainerRun) -> None:
        policy = (self.pod.get("spec") or {}).get("restartPolicy", "Always")
        if run.init and policy == "Always":
            policy = "OnFailure"
        target = await self._image_for(run)
        if target is None:
            return
        run.image = target
        while not self.terminating.is_set():
            started = time.monotonic()
            exit_code = await self._run_once(run, target)
            if exit_code is None:
                run.backoff_step += 1
                await self._backoff(run)
                continue
            if self.terminating.is_set():
                break
            if policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                break
            if time.monotonic() - started > 600:
                run.backoff_step = 0  # ran long enough: the next back-off starts small again
            run.backoff_step += 1
            run.restarts += 1
            reason = "Error" if exit_code else "Completed"
            run.last_state, run.state = (
                run.state,
                {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off restarting "
                        f"failed container {run.name} in pod {self.name} ({reason})",
                    }
                },
            )
            self.mark_dirty()
            await self.kubelet.event(
                self.pod,
                "BackOff",
                f"Back-off restarting failed container {run.name} in pod {self.name}",
                kind="Warning",
            )
            await self._backoff(run)
        run.done.set()

    async def _backoff(self, run: ContainerRun) -> None:
        delay = min(_MAX_BACKOFF, self.kubelet.backoff_base * 2 ** max(0, run.backoff_step - 1))
        with trio.move_on_after(delay):
            await self.terminating.wait()

    async def _start(self, run: ContainerRun, target: Image) -> trio.Process | None:
        """Create and start one run of the container; None (state set, event sent) when the
        spec cannot be applied or the runtime fails."""
        try:
            container = await trio.to_thread.run_sync(self._create, run, target)
            if run.spec.get("tty"):
                # A pty as the container's stdio (as a runtime gives one for `tty: true`); the
                # kubelet keeps the master: the log and `kubectl attach` read it.
                master, slave = os.openpty()
                try:
                    proc = await container.start(stdin=slave, stdout=slave, stderr=slave)
                finally:
                    os.close(slave)
                run.pty = master
                if run.spec.get("stdin"):
                    run.stdin = trio.lowlevel.FdStream(os.dup(master))
                return proc
            proc = await container.start(
                stdin=subprocess.PIPE if run.spec.get("stdin") else subprocess.DEVNULL
            )
            run.stdin = proc.stdin
            return proc
        except (volumes.ConfigError, runtime.ContainerConfigError) as exc:
            reason, message = "CreateContainerConfigError", str(exc)
        except (runtime.ContainerCreateError, OSError) as exc:
            reason, message = "CreateContainerError", str(exc)
        self._waiting(run, reason, message)
        await self.kubelet.event(self.pod, "Failed", f"Error: {message}", kind="Warning")
        if run.container is not None:
            await run.container.remove()
            run.container = None
        return None

    async def _run_once(self, run: ContainerRun, target: Image) -> int | None:
        proc = await self._start(run, target)
        if proc is None:
            return None
        logfile = LogFile(self.dir / "logs" / run.name / f"{run.restarts}.log")
        run.logs.append(logfile)
        run.proc = proc
        run.state = {"running": {"startedAt": timestamp()}}
        spec = run.spec
        run.started = "startupProbe" not in spec
        run.ready = run.started and "readinessProbe" not in spec and not run.init
        self.mark_dirty()
        await self.kubelet.event(self.pod, "Created", f"Created container: {run.name}")
        await self.kubelet.event(self.pod, "Started", f"Started container {run.name}")
        container = run.container
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, proc, logfile, run)
                async with trio.open_nursery() as probes:
                    if not run.init:
                        probes.start_soon(self._probes, run, proc)
                    code = await proc.wait()
                    # The main process is gone: the rest of the container goes with it, as it
                    # would with its PID namespace.
                    if container is None:
                        kill_group(proc)
                    probes.cancel_scope.cancel()
        finally:
            logfile.close()
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    run.signal(signal.SIGKILL)
                    await proc.wait()
                oom = False
                cannot_run = container.start_error() if container is not None else None
                if container is not None:
                    oom = (
                        proc.returncode == 128 + signal.SIGKILL
                        and not container.killed_by_kubelet
                        and container.oom_killed()
                    )
                    await container.remove()
        run.ready = False
        if code < 0:
            code = 128 - code
        reason = "OOMKilled" if oom else "Completed" if code == 0 else "Error"
        if cannot_run is not None:
            code, reason = 128, "ContainerCannotRun"
            await self.kubelet.event(self.pod, "Failed", f"Error: {cannot_run}", kind="Warning")
        run.state = {
            "terminated": {
                **({"message": cannot_run} if cannot_run is not None else {}),
                "exitCode": code,
                "reason": reason,
                "startedAt": run.state.get("running", {}).get("startedAt", timestamp()),
                "finishedAt": timestamp(),
                "containerID": run.container_id,
            }
        }
        self.mark_dirty()
        return code

    async def _probes(self, run: ContainerRun, proc: trio.Process) -> None:
        spec = run.spec
        async with trio.open_nursery() as nursery:
            if "startupProbe" in spec:
                await self._probe_loop(run, proc, spec["startupProbe"], "startup")
            run.started = True
            self.mark_dirty()
            if "readinessProbe" in spec:
                nursery.start_soon(self._probe_loop, run, proc, spec["readinessProbe"], "readiness")
            else:
                run.ready = True
                self.mark_dirty()
            if "livenessProbe" in spec:
                nursery.start_soon(self._probe_loop, run, proc, spec["livenessProbe"], "liveness")

    async def _probe_loop(
        self, run: ContainerRun, proc: trio.Process, probe: ApiObject, kind: str
    ) -> None:
        await trio.sleep(float(probe.get("initialDelaySeconds") or 0))
        period = float(probe.get("periodSeconds") or 10)
        success_needed = int(probe.get("successThreshold") or 1)
        failure_needed = int(probe.get("failureThreshold") or 3)
        ok_streak = fail_streak = 0
        ever_ok = False
        while True:
            ok = await run_probe(
                probe, self.kubelet.node_ns, self.ip, run.spec, lambda cmd: self.exec_in(run, cmd)
            )
            ok_streak, fail_streak = (ok_streak + 1, 0) if ok else (0, fail_streak + 1)
            if kind == "startup":
                if ok:
                    return
                if fail_streak >= failure_needed:
                    run.signal(signal.SIGKILL)
                    return
            elif kind == "readiness":
                ready = run.ready
                if ok_streak >= success_needed:
                    ready = True
                elif fail_streak >= failure_needed or not ever_ok:
                    ready = False
                ever_ok = ever_ok or ok
                if ready != run.ready:
                    run.ready = ready
                    self.mark_dirty()
            elif fail_streak >= failure_needed:
                await self.kubelet.event(
                    self.pod,
                    "Unhealthy",
                    f"Liveness probe failed for {run.name}; restarting",
                    kind="Warning",
                )
                run.signal(signal.SIGKILL)
                return
            # Until the first success the probe repeats quickly: our programs start in a
            # fraction of a second, and waiting a whole period would make every rollout slow.
            await trio.sleep(period if ever_ok or kind == "liveness" else min(period, 0.1))

    # --- status -------------------------------------------------------------------------------

    def mark_dirty(self) -> None:
        self._dirty.set()

    def compute_status(self) -> ApiObject:
        runs = self.runs
        policy = (self.pod.get("spec") or {}).get("restartPolicy", "Always")
        states = [r.state for r in runs]
        if runs and all("terminated" in s for s in states) and policy != "Always":
            failed = any(s["terminated"]["exitCode"] != 0 for s in states)
            phase = "Failed" if failed else "Succeeded"
        elif (
            self.initialized and runs and all(r.restarts or "waiting" not in r.state for r in runs)
        ):
            phase = "Running"
        else:
            phase = "Pending"
        if (
            any(
                "terminated" in r.state and r.state["terminated"]["exitCode"]
                for r in self.init_runs
            )
            and policy == "Never"
        ):
            phase = "Failed"
        ready = bool(runs) and all(r.ready for r in runs)
        now = timestamp()
        old = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions") or []}

        def cond(kind: str, value: bool, reason: str = "") -> ApiObject:
            status = "True" if value else "False"
            prev = old.get(kind)
            since = prev["lastTransitionTime"] if prev and prev["status"] == status else now
            out: ApiObject = {
                "type": kind,
                "status": status,
                "lastProbeTime": None,
                "lastTransitionTime": since,
            }
            if reason and not value:
                out["reason"] = reason
            return out

        not_ready = "ContainersNotReady" if self.initialized else "PodInitializing"
        status: ApiObject = {
            "phase": phase,
            "conditions": [
                cond("PodReadyToStartContainers", bool(self.ip)),
                cond("Initialized", self.initialized, "ContainersNotInitialized"),
                cond("Ready", ready, not_ready),
                cond("ContainersReady", ready, not_ready),
                cond("PodScheduled", True),
            ],
            "hostIP": node.GATEWAY,
            "hostIPs": [{"ip": node.GATEWAY}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "qosClass": (self.pod.get("status") or {}).get("qosClass", "BestEffort"),
            "containerStatuses": [r.status() for r in runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        return status

    async def _status_writer(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if self.gone:
                return
            live = self.kubelet.api.store.get("/pods", self.namespace, self.name)
            if live is None or live["metadata"].get("uid") != self.uid:
                return
            status = self.compute_status()
            if status == self._status_written:
                continue
            body = copy.deepcopy(live)
            body["metadata"].pop("resourceVersion", None)
            body["status"] = status
            try:
                await self.kubelet.api.update(
                    POD_RESOURCE,
                    self.namespace,
                    self.name,
                    body,
                    self.kubelet.ctx,
                    subresource="status",
                )
                self._status_written = status
            except StatusError as exc:
                if exc.code == 404:
                    return
                log.info("status of %s/%s: %s", self.namespace, self.name, exc.message)
                self.mark_dirty()
                await trio.sleep(0.05)


def _matches_node(spec: ApiObject, labels: dict[str, str], node_name: str) -> bool:
    """The pod's nodeSelector and required node affinity (terms ORed, expressions ANDed; the
    operators In, NotIn, Exists, DoesNotExist, Gt, Lt; matchFields on metadata.name)."""
    selector = spec.get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    fields = {"metadata.name": node_name}
    return any(
        (term.get("matchExpressions") or term.get("matchFields"))
        and all(_expression(e, labels) for e in term.get("matchExpressions") or [])
        and all(_expression(e, fields) for e in term.get("matchFields") or [])
        for term in terms
    )


def _expression(expression: ApiObject, values: dict[str, str]) -> bool:
    key, operator = expression.get("key", ""), expression.get("operator", "")
    wanted = [str(v) for v in expression.get("values") or []]
    have = values.get(key)
    if operator == "In":
        return have is not None and have in wanted
    if operator == "NotIn":
        return have is None or have not in wanted
    if operator == "Exists":
        return have is not None
    if operator == "DoesNotExist":
        return have is None
    if operator in ("Gt", "Lt") and have is not None and len(wanted) == 1:
        try:
            a, b = int(have), int(wanted[0])
        except ValueError:
            return False
        return a > b if operator == "Gt" else a < b
    return False


def _tolerates(toleration: ApiObject, taint: dict[str, str]) -> bool:
    """Kubernetes' ToleratesTaint: the effect matches (or is empty), the key matches (or is
    empty with Exists), and Exists or an Equal value (the taint has none)."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    key = toleration.get("key") or ""
    if key and key != taint["key"]:
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return bool(key) and (toleration.get("value") or "") == taint.get("value", "")


def default_pull_policy(ref: Reference) -> str:
    """Kubernetes' default: `:latest` or no tag → Always; another tag or a digest →
    IfNotPresent."""
    return "Always" if ref.digest is None and ref.tag in (None, "latest") else "IfNotPresent"


def _duration(seconds: float) -> str:
    """Go's time.Duration format, as in the kubelet's events (1.234s, 532ms)."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def kill_group(proc: trio.Process, sig: int = signal.SIGKILL) -> None:
    """Signal a container's whole process group (its main process leads it)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _pump(proc: trio.Process, logfile: LogFile, run: ContainerRun) -> None:
    """Copy a container's output into its log and to attached clients until every writer has
    gone (for a pty: the master reads EIO once the container's side is closed)."""
    if run.pty is not None:
        output: trio.abc.ReceiveStream = trio.lowlevel.FdStream(run.pty)
    else:
        assert proc.stdout is not None
        output = proc.stdout
    try:
        async with output:
            while chunk := await output.receive_some(65536):
                logfile.write(bytes(chunk))
                run.output(bytes(chunk))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        run.pty = None  # closed with its stream
        run.output_ended()
        if run.stdin is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(run.stdin)
            run.stdin = None


__all__ = ["Kubelet", "NodeError", "PodWorker", "resolve_port"]
