"""The addresses a Service holds: its ClusterIP and node ports, allocated when it is created or
changed and released when it goes (or on dry runs, and when its validation fails).
"""

from __future__ import annotations

from .allocators import IpAllocator, PortAllocator
from .errors import Cause, StatusError, invalid
from .store import ApiObject


class ServiceAddresses:
    """The ClusterIP range and the node-port range of one cluster."""

    def __init__(self, service_cidr: str) -> None:
        self.ips = IpAllocator(service_cidr)
        self.node_ports = PortAllocator()

    def allocate(
        self, obj: ApiObject, old: ApiObject | None, claimed: list[str], ports: list[int]
    ) -> None:
        spec = obj["spec"]
        old_spec = (old or {}).get("spec") or {}
        name = obj["metadata"]["name"]
        causes: list[Cause] = []
        if spec.get("type") == "ExternalName":
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
        elif spec.get("clusterIP") == "None":
            spec["clusterIPs"] = ["None"]
        elif old_spec.get("clusterIP") and not spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]
            spec["clusterIPs"] = [spec["clusterIP"]]
        elif not spec.get("clusterIP"):
            ip = self.ips.allocate()
            if ip is None:
                raise StatusError(
                    500, "InternalError", "failed to allocate a serviceIP: range is full"
                )
            claimed.append(ip)
            spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
        elif spec["clusterIP"] != old_spec.get("clusterIP"):
            cause = self.ips.claim(spec["clusterIP"])
            if cause is not None:
                causes.append(cause)
            else:
                claimed.append(spec["clusterIP"])
            spec["clusterIPs"] = [spec["clusterIP"]]
        if spec.get("type") != "ExternalName":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        old_ports = {p.get("nodePort") for p in old_spec.get("ports") or [] if p.get("nodePort")}
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            for i, port in enumerate(spec.get("ports") or []):
                wanted = port.get("nodePort")
                if wanted and wanted in old_ports:
                    continue
                if wanted:
                    cause = self.node_ports.claim(int(wanted), f"spec.ports[{i}].nodePort")
                    if cause is not None:
                        causes.append(cause)
                    else:
                        ports.append(int(wanted))
                else:
                    allocated = self.node_ports.allocate()
                    if allocated is not None:
                        ports.append(allocated)
                        port["nodePort"] = allocated
        else:
            for port in spec.get("ports") or []:
                port.pop("nodePort", None)
        if causes:
            for ip in claimed:
                self.ips.release(ip)
            for p in ports:
                self.node_ports.release(p)
            raise invalid("Service", name, "", causes)

    def release(self, obj: ApiObject, keep: ApiObject | None = None) -> None:
        spec = obj.get("spec") or {}
        keep_spec = (keep or {}).get("spec") or {}
        if spec.get("clusterIP") not in (None, "", "None") and spec.get(
            "clusterIP"
        ) != keep_spec.get("clusterIP"):
            self.ips.release(spec["clusterIP"])
        kept = {p.get("nodePort") for p in keep_spec.get("ports") or []}
        for port in spec.get("ports") or []:
            if port.get("nodePort") and port["nodePort"] not in kept:
                self.node_ports.release(port["nodePort"])

    def undo(self, claimed: list[str], ports: list[int]) -> None:
        """Give back what `allocate` claimed for a write that is not stored (a dry run)."""
        for ip in claimed:
            self.ips.release(ip)
        for port in ports:
            self.node_ports.release(port)
