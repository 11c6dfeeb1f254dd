"""Service ClusterIP and NodePort allocation with Kubernetes' own error texts.

Dynamic ClusterIPs come from the upper part of the range, leaving the low addresses for static
assignment (the API service takes .1, cluster DNS .10), as the real allocator does.
"""

from __future__ import annotations

import ipaddress
import random

from .errors import Cause, invalid_value


class IpAllocator:
    def __init__(self, cidr: str = "10.96.0.0/16") -> None:
        self.network = ipaddress.ip_network(cidr)
        self.used: set[str] = set()
        size = self.network.num_addresses
        self._static_band = min(max(16, size // 16), 256)
        self._rand = random.Random()

    def claim(self, ip: str, field: str = "spec.clusterIPs") -> Cause | None:
        """Reserve a requested address, or say why not."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return invalid_value(field, [ip], "must be a valid IP address")
        if addr not in self.network or addr in (
            self.network.network_address,
            self.network.broadcast_address,
        ):
            return invalid_value(
                field,
                [ip],
                f"failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. "
                f"The range of valid IPs is {self.network}",
            )
        if ip in self.used:
            return invalid_value(
                field, [ip], f"failed to allocate IP {ip}: provided IP is already allocated"
            )
        self.used.add(ip)
        return None

    def allocate(self) -> str | None:
        first = int(self.network.network_address)
        size = self.network.num_addresses
        span = size - 1 - self._static_band
        start = self._rand.randrange(span)
        for i in range(span):
            candidate = str(ipaddress.ip_address(first + self._static_band + (start + i) % span))
            if (
                candidate not in self.used
                and int(ipaddress.ip_address(candidate)) != first + size - 1
            ):
                self.used.add(candidate)
                return candidate
        for i in range(1, self._static_band):
            candidate = str(ipaddress.ip_address(first + i))
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate
        return None

    def release(self, ip: str | None) -> None:
        if ip:
            self.used.discard(ip)


class PortAllocator:
    def __init__(self, low: int = 30000, high: int = 32767) -> None:
        self.low, self.high = low, high
        self.used: set[int] = set()
        self._rand = random.Random()

    def claim(self, port: int, field: str) -> Cause | None:
        if not self.low <= port <= self.high:
            return invalid_value(
                field,
                port,
                "provided port is not in the valid range. The range of valid ports is "
                f"{self.low}-{self.high}",
            )
        if port in self.used:
            return invalid_value(field, port, "provided port is already allocated")
        self.used.add(port)
        return None

    def allocate(self) -> int | None:
        span = self.high - self.low + 1
        start = self._rand.randrange(span)
        for i in range(span):
            port = self.low + (start + i) % span
            if port not in self.used:
                self.used.add(port)
                return port
        return None

    def release(self, port: int | None) -> None:
        if port:
            self.used.discard(port)
