"""The sandbox's cluster DNS takes hostile queries: a question that cannot be packed again is
FORMERR, garbage is dropped, nothing raises past the query (a raise ended the DNS server)."""

from __future__ import annotations

import struct

from dnslib import RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.sandbox.network.dns import _answer_bytes
from tests.sandbox.cluster.test_units import _store

_HEADER = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0)


def _query(qname: bytes) -> bytes:
    return _HEADER + qname + struct.pack("!HH", 1, 1)


def _rcode(reply: bytes | None) -> int:
    assert reply is not None
    record = DNSRecord.parse(reply)
    assert record.header.id == 0x1234 and record.header.qr == 1
    return int(record.header.rcode)


def test_a_64_byte_label_is_formerr() -> None:
    reply = _answer_bytes(_store(), _query(b"\x40" + b"a" * 64 + b"\x02ns\x00"))
    assert _rcode(reply) == RCODE.FORMERR


def test_a_compression_chain_past_255_bytes_is_formerr_or_dropped() -> None:
    # After the question, 20 labels of 30 bytes, each pointing back at the one before; the
    # question's name points at the last: it decodes to 620 bytes.
    chain_start = 12 + 2 + 4
    labels = b""
    offsets: list[int] = []
    for _ in range(20):
        offsets.append(chain_start + len(labels))
        pointer = b"\x00" if len(offsets) == 1 else struct.pack("!H", 0xC000 | offsets[-2])
        labels += b"\x1e" + b"b" * 30 + pointer
    question = struct.pack("!H", 0xC000 | offsets[-1]) + struct.pack("!HH", 1, 1)
    reply = _answer_bytes(_store(), _HEADER + question + labels)
    assert reply is None or _rcode(reply) == RCODE.FORMERR


def test_a_good_query_still_answers() -> None:
    reply = _answer_bytes(_store(), DNSRecord.question("echo.ns.svc.cluster.local").pack())
    assert reply is not None
    assert [str(rr.rdata) for rr in DNSRecord.parse(reply).rr] == ["10.96.0.20"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_answer_or_drop(data: bytes) -> None:
    reply = _answer_bytes(_store(), _HEADER + data)
    assert reply is None or DNSRecord.parse(reply).header.qr == 1
