"""UDP flows seen on the TUN: a bounded table keyed by 5-tuple, with idle expiry.

UDP has no connection, so a flow is "the app's socket talking to one destination": it starts
with the first datagram, stays while datagrams pass either way, and ends `idle_timeout` seconds
after the last one (conntrack's approach). The table holds at most `max_flows`; opening one
more evicts the least recently used flow, which is returned so the runtime can close its tunnel
stream. Time is passed in; `next_deadline()` says when `expire(now)` has work.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from tele.net.ip import PROTO_UDP
from tele.net.packet import Packet, encode
from tele.net.udp import UDPHeader

H = TypeVar("H")


class FiveTuple(NamedTuple):
    """A flow as the app sent it: its address and port first, then the destination's."""

    protocol: int
    src: bytes
    sport: int
    dst: bytes
    dport: int

    @classmethod
    def of(cls, packet: Packet) -> FiveTuple:
        """The key of a UDP packet read from the TUN."""
        udp = packet.transport
        if not isinstance(udp, UDPHeader):
            raise TypeError("not a UDP packet")
        return cls(PROTO_UDP, packet.ip.src, udp.sport, packet.ip.dst, udp.dport)


@dataclass(slots=True, eq=False)
class UDPFlow(Generic[H]):
    """One flow; `handle` is the runtime's (its tunnel stream), opaque here."""

    key: FiveTuple
    handle: H
    created: float
    last_seen: float
    datagrams_out: int = 0  # app -> tunnel
    datagrams_in: int = 0  # tunnel -> app
    bytes_out: int = 0
    bytes_in: int = 0

    def reply(self, payload: bytes, *, ttl: int = 64) -> bytes:
        """An IP packet carrying `payload` from the destination back to the app's socket."""
        key = self.key
        header = UDPHeader(key.dport, key.sport, 0)
        return encode(key.dst, key.src, header, payload, ttl=ttl)


class UDPFlowTable(Generic[H]):
    """Flows by 5-tuple, least recently used first (so expiry and eviction are O(1))."""

    def __init__(self, *, idle_timeout: float = 60.0, max_flows: int = 1024) -> None:
        if idle_timeout <= 0 or max_flows <= 0:
            raise ValueError("idle_timeout and max_flows must be positive")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self._flows: OrderedDict[FiveTuple, UDPFlow[H]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def get(self, key: FiveTuple) -> UDPFlow[H] | None:
        """The flow for `key` without touching it."""
        return self._flows.get(key)

    def open(self, key: FiveTuple, handle: H, now: float) -> tuple[UDPFlow[H], UDPFlow[H] | None]:
        """Add a flow; returns it and the flow evicted to make room (or None)."""
        if key in self._flows:
            raise KeyError(f"flow {key} is already open")
        evicted = None
        if len(self._flows) >= self.max_flows:
            _, evicted = self._flows.popitem(last=False)
        flow = UDPFlow(key, handle, now, now)
        self._flows[key] = flow
        return flow, evicted

    def outbound(self, key: FiveTuple, size: int, now: float) -> UDPFlow[H] | None:
        """Record a datagram from the app; None when the flow is unknown (open it first)."""
        flow = self._flows.get(key)
        if flow is None:
            return None
        flow.last_seen = now
        flow.datagrams_out += 1
        flow.bytes_out += size
        self._flows.move_to_end(key)
        return flow

    def inbound(self, key: FiveTuple, size: int, now: float) -> UDPFlow[H] | None:
        """Record a datagram towards the app (a reply); keeps the flow alive too."""
        flow = self._flows.get(key)
        if flow is None:
            return None
        flow.last_seen = now
        flow.datagrams_in += 1
        flow.bytes_in += size
        self._flows.move_to_end(key)
        return flow

    def close(self, key: FiveTuple) -> UDPFlow[H] | None:
        """Remove a flow (its tunnel stream ended); returns it, or None if unknown."""
        return self._flows.pop(key, None)

    def next_deadline(self) -> float | None:
        """When the least recently used flow goes idle, or None for an empty table."""
        for flow in self._flows.values():
            return flow.last_seen + self.idle_timeout
        return None

    def expire(self, now: float) -> list[UDPFlow[H]]:
        """Remove and return the flows idle for `idle_timeout` or longer at `now`."""
        expired: list[UDPFlow[H]] = []
        flows = self._flows
        while flows:
            key, flow = next(iter(flows.items()))
            if flow.last_seen + self.idle_timeout > now:
                break
            del flows[key]
            expired.append(flow)
        return expired
