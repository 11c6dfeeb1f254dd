"""The manager's picture of the cluster, fed by watches, queried without I/O.

Informers push every namespace, service, pod and workload event here; clients' questions
(which namespaces are managed, which subnets to route, what does `echo.default` resolve to,
which workloads can be engaged) are answered from memory.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tele.contracts.namespaces import NamespaceSelector
from tele.k8s.objects import pod_is_ready
from tele.rpc.manager_api import DnsRecord, LookupReply, WorkloadInfo

Obj = Mapping[str, Any]
WORKLOAD_KINDS = ("Deployment", "ReplicaSet", "StatefulSet", "Rollout")
DNS_TTL = 5


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = obj.get("metadata") or {}
    return meta


def _key(obj: Obj) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@dataclass
class ClusterView:
    selector: NamespaceSelector
    cluster_domain: str = "cluster.local"
    configured_pod_subnets: list[str] = field(default_factory=list)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    services: dict[tuple[str, str], Obj] = field(default_factory=dict)
    pods: dict[tuple[str, str], Obj] = field(default_factory=dict)
    workloads: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    version: int = 0
    """Bumped on every change that may alter ClusterInfo (namespaces, subnets)."""

    # --- updates -------------------------------------------------------------------------------

    def relist(self, kind: str, items: Iterable[Obj], namespace: str | None = None) -> None:
        """Replace every object of `kind` (only those in `namespace`, when given)."""

        def stale(ns: str) -> bool:
            return namespace is None or ns == namespace

        if kind == "Namespace":
            self.namespaces = {}
        elif kind == "Service":
            self.services = {k: v for k, v in self.services.items() if not stale(k[0])}
        elif kind == "Pod":
            self.pods = {k: v for k, v in self.pods.items() if not stale(k[0])}
        else:
            self.workloads = {
                k: v for k, v in self.workloads.items() if k[0] != kind or not stale(k[1])
            }
        for item in items:
            self.apply(kind, "ADDED", item)
        self.version += 1

    def apply(self, kind: str, event: str, obj: Obj) -> None:
        deleted = event == "DELETED"
        key = _key(obj)
        if kind == "Namespace":
            if deleted:
                self.namespaces.pop(key[1], None)
            else:
                self.namespaces[key[1]] = dict(_meta(obj).get("labels") or {})
            self.version += 1
        elif kind == "Service":
            self._put(self.services, key, obj, deleted)
        elif kind == "Pod":
            before = len(self.pods)
            self._put(self.pods, key, obj, deleted)
            if len(self.pods) != before:
                self.version += 1
        elif kind in WORKLOAD_KINDS:
            self._put(self.workloads, (kind, *key), obj, deleted)

    @staticmethod
    def _put(table: dict[Any, Obj], key: Any, obj: Obj, deleted: bool) -> None:
        if deleted:
            table.pop(key, None)
        else:
            table[key] = obj

    # --- cluster info --------------------------------------------------------------------------

    def managed_namespaces(self) -> list[str]:
        return sorted(
            n for n, labels in self.namespaces.items() if self.selector.matches(n, labels)
        )

    def is_managed(self, namespace: str) -> bool:
        labels = self.namespaces.get(namespace)
        return labels is not None and self.selector.matches(namespace, labels)

    def pod_subnets(self) -> list[str]:
        """Configured subnets, else ones that cover every pod IP (/16 for IPv4, /64 for IPv6)."""
        if self.configured_pod_subnets:
            return list(self.configured_pod_subnets)
        networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
        for pod in self.pods.values():
            if (pod.get("spec") or {}).get("hostNetwork"):
                continue
            for entry in (pod.get("status") or {}).get("podIPs") or []:
                try:
                    address = ipaddress.ip_address(entry.get("ip", ""))
                except ValueError:
                    continue
                prefix = 16 if address.version == 4 else 64
                networks.add(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
        v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
        v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
        collapsed = [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
        return [str(n) for n in collapsed]

    # --- DNS -----------------------------------------------------------------------------------

    def in_cluster_scope(self, name: str) -> bool:
        """Whether the cluster decides about `name` (else the manager's own resolver does)."""
        labels = name.lower().rstrip(".").split(".")
        if name.lower().rstrip(".").endswith("." + self.cluster_domain):
            return True
        return len(labels) >= 2 and (labels[-1] in self.namespaces or labels[-1] == "svc")

    def resolve(self, name: str, qtype: str, allowed: set[str] | None = None) -> LookupReply:
        """Answer a cluster name; `allowed` limits the namespaces (a client's mapped ones)."""
        qname = name.lower().rstrip(".")
        pod_suffix = ".pod." + self.cluster_domain
        if qname.endswith(pod_suffix):
            return self._resolve_pod_ip(qname, qname[: -len(pod_suffix)].split("."), qtype)
        labels = qname.split(".")
        suffix = ["svc", *self.cluster_domain.split(".")]
        if labels[-len(suffix) :] == suffix:
            labels = labels[: -len(suffix)]
        elif labels[-1] == "svc":
            labels = labels[:-1]
        if len(labels) < 2:
            return LookupReply(rcode="NXDOMAIN")
        namespace = labels[-1]
        if not self.is_managed(namespace) or (allowed and namespace not in allowed):
            return LookupReply(rcode="NXDOMAIN")
        if len(labels) == 2:
            service = self.services.get((namespace, labels[0]))
            if service is None:
                return LookupReply(rcode="NXDOMAIN")
            return self._service_records(qname, service, qtype)
        if len(labels) == 3:
            return self._resolve_hostname(qname, labels[0], labels[1], namespace, qtype)
        if len(labels) == 4 and labels[0].startswith("_") and labels[1].startswith("_"):
            service = self.services.get((namespace, labels[2]))
            if service is None:
                return LookupReply(rcode="NXDOMAIN")
            return self._srv(qname, service, labels[0][1:], labels[1][1:], qtype)
        return LookupReply(rcode="NXDOMAIN")

    def _service_records(self, qname: str, service: Obj, qtype: str) -> LookupReply:
        spec = service.get("spec") or {}
        if spec.get("type") == "ExternalName":
            target = str(spec.get("externalName") or "")
            return LookupReply(
                rcode="NOERROR",
                records=[DnsRecord(name=qname, type="CNAME", value=target, ttl=DNS_TTL)],
            )
        ips = [
            ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"
        ]
        if not ips:  # headless: the ready pods behind it
            ips = [ip for pod in self._pods_of(service) for ip in _pod_ips(pod)]
        return LookupReply(rcode="NOERROR", records=_address_records(qname, ips, qtype))

    def _resolve_hostname(
        self, qname: str, hostname: str, service_name: str, namespace: str, qtype: str
    ) -> LookupReply:
        service = self.services.get((namespace, service_name))
        if service is None:
            return LookupReply(rcode="NXDOMAIN")
        for (pod_ns, _), pod in self.pods.items():
            spec = pod.get("spec") or {}
            if (
                pod_ns == namespace
                and spec.get("hostname") == hostname
                and spec.get("subdomain") == service_name
            ):
                return LookupReply(
                    rcode="NOERROR", records=_address_records(qname, _pod_ips(pod), qtype)
                )
        return LookupReply(rcode="NXDOMAIN")

    def _resolve_pod_ip(self, qname: str, labels: list[str], qtype: str) -> LookupReply:
        # a-b-c-d.<namespace>.pod.cluster.local; `labels` is [a-b-c-d, namespace]
        if len(labels) != 2:
            return LookupReply(rcode="NXDOMAIN")
        try:
            address = ipaddress.ip_address(labels[0].replace("-", "."))
        except ValueError:
            return LookupReply(rcode="NXDOMAIN")
        if not self.is_managed(labels[1]):
            return LookupReply(rcode="NXDOMAIN")
        return LookupReply(rcode="NOERROR", records=_address_records(qname, [str(address)], qtype))

    def _srv(
        self, qname: str, service: Obj, port_name: str, protocol: str, qtype: str
    ) -> LookupReply:
        if qtype not in ("SRV", "ANY"):
            return LookupReply(rcode="NOERROR")
        meta = _meta(service)
        target = f"{meta.get('name')}.{meta.get('namespace')}.svc.{self.cluster_domain}"
        records = [
            DnsRecord(
                name=qname, type="SRV", value=f"0 100 {port.get('port')} {target}", ttl=DNS_TTL
            )
            for port in (service.get("spec") or {}).get("ports") or []
            if port.get("name") == port_name
            and str(port.get("protocol") or "TCP").lower() == protocol
        ]
        return LookupReply(rcode="NOERROR" if records else "NXDOMAIN", records=records)

    def _pods_of(self, service: Obj) -> list[Obj]:
        namespace = _key(service)[0]
        selector = (service.get("spec") or {}).get("selector") or {}
        return [
            pod
            for (pod_ns, _), pod in sorted(self.pods.items())
            if pod_ns == namespace
            and _selector_matches(selector, _meta(pod).get("labels") or {})
            and pod_is_ready(pod)
        ]

    # --- workloads -----------------------------------------------------------------------------

    def workload_of(self, pod: Obj, namespace: str) -> Obj | None:
        """The workload that owns a pod: its ReplicaSet's Deployment, else the owner itself."""
        owner = _controller(pod)
        if owner is None:
            return None
        kind, name = owner
        found = self.workloads.get((kind, namespace, name))
        if found is None:
            return None
        if kind == "ReplicaSet":
            parent = _controller(found)
            if parent is not None:
                return self.workloads.get((parent[0], namespace, parent[1]))
        return found

    def list_workloads(self, namespace: str) -> list[WorkloadInfo]:
        result = []
        for (kind, ns, name), obj in sorted(self.workloads.items(), key=lambda i: i[0][2]):
            if ns != namespace:
                continue
            meta = _meta(obj)
            if kind == "ReplicaSet" and meta.get("ownerReferences"):
                continue  # managed by a Deployment: engage that instead
            spec = obj.get("spec") or {}
            status = obj.get("status") or {}
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            services = sorted(
                _key(svc)[1]
                for svc in self.services.values()
                if _key(svc)[0] == ns
                and _selector_matches((svc.get("spec") or {}).get("selector") or {}, labels)
            )
            result.append(
                WorkloadInfo(
                    name=name,
                    namespace=ns,
                    kind=kind,
                    uid=str(meta.get("uid") or ""),
                    replicas=int(spec.get("replicas", 1) or 0),
                    ready_replicas=int(status.get("readyReplicas") or 0),
                    services=services,
                )
            )
        return result


def _controller(obj: Obj) -> tuple[str, str] | None:
    for ref in _meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("kind")), str(ref.get("name"))
    return None


def _pod_ips(pod: Obj) -> list[str]:
    status = pod.get("status") or {}
    ips = [e.get("ip") for e in status.get("podIPs") or [] if e.get("ip")]
    return ips or ([status["podIP"]] if status.get("podIP") else [])


def _address_records(qname: str, ips: Iterable[str], qtype: str) -> list[DnsRecord]:
    records = []
    for ip in ips:
        try:
            version = ipaddress.ip_address(ip).version
        except ValueError:
            continue
        rtype = "A" if version == 4 else "AAAA"
        if qtype in (rtype, "ANY"):
            records.append(DnsRecord(name=qname, type=rtype, value=ip, ttl=DNS_TTL))
    return records
