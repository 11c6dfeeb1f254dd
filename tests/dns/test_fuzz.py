"""Property: whatever bytes a client sends, the resolver answers (with a reply that parses) or
drops them; it never raises."""

from __future__ import annotations

import struct

import trio
from dnslib import DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.dns.names import NameRules
from tele.dns.server import Resolver
from tele.rpc import manager_api as mapi


async def _lookup(name: str, qtype: str) -> mapi.LookupReply:
    record = mapi.DnsRecord(name=name, type="A", value="10.244.0.9", ttl=5)
    return mapi.LookupReply(rcode="NOERROR", records=[record])


def _answer(data: bytes, *, udp: bool) -> bytes | None:
    resolver = Resolver(NameRules(namespaces=["default"]), _lookup, None, lookup_timeout=1)
    return trio.run(lambda: resolver.answer(data, udp=udp))


def _query(name: bytes, qtype: int, flags: int, qdcount: int) -> bytes:
    return struct.pack("!HHHHHH", 7, flags, qdcount, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)


label = st.one_of(st.binary(max_size=8), st.binary(min_size=60, max_size=70), st.just(b"x" * 63))
labels = st.lists(label, max_size=6)
pointers = st.integers(min_value=0, max_value=0x3FFF).map(lambda p: struct.pack("!H", 0xC000 | p))


@st.composite
def wire_names(draw: st.DrawFn) -> bytes:
    name = b"".join(bytes([min(len(x), 255)]) + x[:255] for x in draw(labels))
    return name + draw(st.one_of(st.just(b"\x00"), pointers, st.binary(max_size=3)))


@settings(max_examples=300, deadline=None)
@given(
    name=wire_names(),
    qtype=st.sampled_from([1, 28, 33, 16, 255, 0, 65535]),
    flags=st.one_of(st.sampled_from([0x0100, 0x0000]), st.integers(min_value=0, max_value=0xFFFF)),
    qdcount=st.integers(min_value=0, max_value=3),
    udp=st.booleans(),
)
def test_a_query_with_any_name_is_answered_or_dropped(
    name: bytes, qtype: int, flags: int, qdcount: int, udp: bool
) -> None:
    reply = _answer(_query(name, qtype, flags, qdcount), udp=udp)
    if reply is not None:
        assert DNSRecord.parse(reply).header.qr == 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), udp=st.booleans())
def test_any_bytes_are_answered_or_dropped(data: bytes, udp: bool) -> None:
    reply = _answer(data, udp=udp)
    if reply is not None:
        assert DNSRecord.parse(reply).header.qr == 1
