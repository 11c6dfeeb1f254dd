"""What the manager learns of the cluster: the watches that feed its view (namespaces, services,
pods, workloads), the Service range (service subnets) and the cluster DNS address."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import trio

from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient
from tele.manager.view import ClusterView

log = logging.getLogger(__name__)


class ClusterFeed:
    """Keeps `view` current from watches; `changed()` is set at the next change of it."""

    def __init__(
        self,
        kube: KubeClient,
        view: ClusterView,
        *,
        namespace: str,
        service_subnets: list[str],
        missing_kind_retry: float,
        pod_changed: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._kube = kube
        self._view = view
        self._namespace = namespace
        self._missing_kind_retry = missing_kind_retry
        self._pod_changed = pod_changed
        self.service_subnets = list(service_subnets)
        self.dns_ip = ""
        self._changed = trio.Event()
        self.ready = {"Namespace": trio.Event()}
        """Kinds (Namespace) whose first listing arrived."""

    def changed(self) -> trio.Event:
        """Set at the next change of the cluster view (any watched object)."""
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def watch(self, kind: str, resource: k8s.Resource, namespace: str | None) -> None:
        """Feed one kind (in one namespace, or all) into the view, forever.

        A kind the cluster does not serve (Rollouts enabled, Argo Rollouts not installed) has
        no objects: that is said once in the log and looked for again now and then.
        """
        first = True
        missing = False
        while True:
            try:
                async with aclosing(self._kube.informer(resource, namespace)) as events:
                    async for event in events:
                        if event.type == "RELISTED":
                            self._view.relist(kind, event.object["items"], namespace)
                            if first and kind in self.ready:
                                self.ready[kind].set()
                            first = False
                            if missing:
                                log.info("the cluster serves %s now", resource.api_version)
                                missing = False
                        else:
                            self._view.apply(kind, event.type, event.object)
                            if kind == "Pod":
                                self._pod_changed(event.type, event.object)
                        self._notify()
            except ApiError as exc:
                if exc.code != 404:
                    raise
                if not missing:
                    log.warning(
                        "the cluster does not serve %s %s (%s): none can be engaged until it does",
                        resource.api_version,
                        resource.plural,
                        exc.message,
                    )
                    missing = True
                    self._view.relist(kind, [], namespace)
                    self._notify()
            await trio.sleep(self._missing_kind_retry)

    async def detect_service_subnets(self) -> None:
        """Ask the API server for the Service range: creating a Service with an impossible
        ClusterIP (dry run) fails with "The range of valid IPs is <cidr>"."""
        if self.service_subnets:
            return
        probe = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "tele-service-cidr-probe", "namespace": self._namespace},
            "spec": {"clusterIP": "1.1.1.1", "ports": [{"port": 443}]},
        }
        try:
            await self._kube.request(
                "POST",
                k8s.SERVICES.path(self._namespace),
                params={"dryRun": "All"},
                body=probe,
            )
        except ApiError as exc:
            match = re.search(r"valid IPs is ([0-9a-fA-F.:/]+)", exc.message)
            if match:
                self.service_subnets = [str(ipaddress.ip_network(match.group(1), strict=False))]
                return
            log.warning("cannot learn the service subnet from the API server: %s", exc.message)
            return
        log.warning("the API server accepted an impossible ClusterIP; service subnet unknown")

    async def find_dns_ip(self) -> None:
        """The cluster DNS address: the kube-dns Service, else this pod's resolv.conf."""
        for namespace in ("kube-system",):
            service = await self._kube.get_or_none(k8s.SERVICES, "kube-dns", namespace)
            if service is not None:
                self.dns_ip = str((service.get("spec") or {}).get("clusterIP") or "")
                return
        try:
            text = await trio.Path("/etc/resolv.conf").read_text()
        except OSError:
            return
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                self.dns_ip = parts[1]
                return
