"""UDP flow table: keys, idle expiry with time passed in, bounded count, replies."""

from __future__ import annotations

import pytest

from tele.net.ip import PROTO_UDP
from tele.net.packet import encode, parse_packet
from tele.net.udp import UDPHeader
from tele.net.udpflows import FiveTuple, UDPFlowTable

from .tcp_script import CLIENT4, CLIENT6, DEST4, DEST6


def key(sport: int, dest: bytes = DEST4, client: bytes = CLIENT4) -> FiveTuple:
    return FiveTuple(PROTO_UDP, client, sport, dest, 53)


def test_key_of_a_packet_and_reply_packet() -> None:
    query = parse_packet(encode(CLIENT6, DEST6, UDPHeader(5353, 53, 0), b"query"))
    flow_key = FiveTuple.of(query)
    assert flow_key == FiveTuple(PROTO_UDP, CLIENT6, 5353, DEST6, 53)
    table: UDPFlowTable[str] = UDPFlowTable()
    flow, evicted = table.open(flow_key, "stream-1", 0.0)
    assert evicted is None and flow.handle == "stream-1"
    reply = parse_packet(flow.reply(b"answer"))
    assert (reply.ip.src, reply.ip.dst) == (DEST6, CLIENT6)
    assert isinstance(reply.transport, UDPHeader)
    assert reply.transport == UDPHeader(53, 5353, 14, reply.transport.checksum)
    assert bytes(reply.payload) == b"answer"


def test_idle_flows_expire_and_traffic_keeps_them() -> None:
    table: UDPFlowTable[int] = UDPFlowTable(idle_timeout=10.0)
    table.open(key(1), 1, 0.0)
    table.open(key(2), 2, 1.0)
    assert table.next_deadline() == 10.0
    assert table.outbound(key(1), 100, 5.0) is not None  # key 1 active again
    assert table.next_deadline() == 11.0
    assert table.expire(10.9) == []
    expired = table.expire(11.0)
    assert [f.handle for f in expired] == [2]
    assert key(2) not in table and key(1) in table
    flow = table.inbound(key(1), 300, 14.0)
    assert flow is not None
    assert (flow.datagrams_out, flow.bytes_out, flow.datagrams_in, flow.bytes_in) == (
        1,
        100,
        1,
        300,
    )
    assert table.next_deadline() == 24.0
    assert [f.handle for f in table.expire(100.0)] == [1]
    assert table.next_deadline() is None and len(table) == 0


def test_count_is_bounded_by_evicting_the_least_recently_used() -> None:
    table: UDPFlowTable[int] = UDPFlowTable(max_flows=3)
    for port in (1, 2, 3):
        table.open(key(port), port, float(port))
    table.outbound(key(1), 10, 4.0)
    _, evicted = table.open(key(4), 4, 5.0)
    assert evicted is not None and evicted.handle == 2
    assert len(table) == 3
    assert [p for p in (1, 2, 3, 4) if key(p) in table] == [1, 3, 4]


def test_unknown_and_duplicate_flows() -> None:
    table: UDPFlowTable[None] = UDPFlowTable()
    assert table.outbound(key(9), 1, 0.0) is None
    assert table.inbound(key(9), 1, 0.0) is None
    assert table.close(key(9)) is None
    table.open(key(9), None, 0.0)
    with pytest.raises(KeyError):
        table.open(key(9), None, 0.0)
    closed = table.close(key(9))
    assert closed is not None and closed.key == key(9)
    with pytest.raises(ValueError):
        UDPFlowTable(max_flows=0)
