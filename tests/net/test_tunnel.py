"""The sans-IO tunnel codec: round trips, limits, and fuzzing that decoders raise only
TunnelProtocolError."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tele.net import tunnel
from tele.net.tunnel import (
    Accept,
    DatagramDecoder,
    DatagramTooLarge,
    Destination,
    OpenRequest,
    Protocol,
    Refuse,
    ResetReason,
    TunnelProtocolError,
)

ips = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
)
destinations = st.builds(
    Destination,
    protocol=st.sampled_from(Protocol),
    ip=ips,
    port=st.integers(1, 65_535),
)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)


@given(destinations, ids, st.none() | ids, st.booleans())
def test_open_request_round_trips(
    dest: Destination, session: str, dial_id: str | None, early: bool
) -> None:
    request = OpenRequest(dest, session, dial_id, early)
    headers = request.to_headers()
    assert headers[0] == (":method", "CONNECT")
    assert OpenRequest.from_headers(headers) == request


def test_ipv6_authority_is_bracketed() -> None:
    dest = Destination(Protocol.UDP, ipaddress.ip_address("fd00::1"), 53)
    assert dest.authority == "[fd00::1]:53"
    assert str(dest) == "udp/[fd00::1]:53"
    assert Destination.parse("udp", "[fd00::1]:53") == dest


@pytest.mark.parametrize(
    "authority",
    [
        "10.0.0.1",  # no port
        "10.0.0.1:0",  # port 0
        "10.0.0.1:65536",
        "10.0.0.1:+80",
        "fd00::1:80",  # unbracketed IPv6
        "[10.0.0.1]:80",  # bracketed IPv4
        "[fe80::1%eth0]:80",  # zone id
        "example.com:80",  # names are resolved before a stream opens
        "10.0.0.1:0000080",
    ],
)
def test_bad_authorities_are_refused(authority: str) -> None:
    with pytest.raises(TunnelProtocolError):
        Destination.parse("tcp", authority)


def test_open_request_limits() -> None:
    good = OpenRequest(Destination.parse("tcp", "10.1.2.3:80"), "s1").to_headers()
    with pytest.raises(TunnelProtocolError, match="CONNECT"):
        OpenRequest.from_headers([(":method", "GET"), *good[1:]])
    with pytest.raises(TunnelProtocolError, match=":path"):
        OpenRequest.from_headers([*good, (":path", "/")])
    with pytest.raises(TunnelProtocolError, match="twice"):
        OpenRequest.from_headers([*good, ("tele-session", "s2")])
    with pytest.raises(TunnelProtocolError, match="at most"):
        OpenRequest.from_headers(good + [(f"x-{i}", "v") for i in range(tunnel.MAX_HEADERS)])
    with pytest.raises(TunnelProtocolError, match="longer"):
        OpenRequest.from_headers([*good, ("x-big", "v" * (tunnel.MAX_HEADER_VALUE + 1))])
    with pytest.raises(TunnelProtocolError, match="lacks header tele-protocol"):
        OpenRequest.from_headers([h for h in good if h[0] != "tele-protocol"])
    with pytest.raises(TunnelProtocolError, match="unknown tunnel protocol"):
        OpenRequest.from_headers([*good[:2], ("tele-protocol", "sctp"), *good[3:]])
    with pytest.raises(TunnelProtocolError, match="session id"):
        OpenRequest.from_headers([*good[:3], ("tele-session", "a b")])
    with pytest.raises(TunnelProtocolError, match="dial-back id"):
        OpenRequest.from_headers([*good, ("tele-dial-id", "x" * 65)])
    with pytest.raises(TunnelProtocolError, match="tele-early"):
        OpenRequest.from_headers([*good, ("tele-early", "0")])
    assert OpenRequest.from_headers([*good, ("tele-early", "1")]).early
    # Unknown extra headers are tolerated (forward compatibility) within the limits.
    assert OpenRequest.from_headers([*good, ("x-trace", "1")]).session == "s1"


@pytest.mark.parametrize("reason", list(ResetReason))
def test_refuse_round_trips_every_reason(reason: ResetReason) -> None:
    assert tunnel.decode_response(Refuse(reason).to_headers()) == Refuse(reason)
    assert tunnel.reason_from_code(tunnel.reason_to_code(reason)) is reason


def test_a_refusals_detail_is_shown_printable_and_bounded() -> None:
    said = Refuse(ResetReason.POLICY, "the traffic manager does not dial tcp/127.0.0.1:1: why")
    assert tunnel.decode_response(said.to_headers()) == said
    hostile = [(":status", "403"), ("tele-reason", "policy"), ("tele-detail", "\x1b[2Jx" * 45)]
    shown = tunnel.decode_response(hostile)
    assert isinstance(shown, Refuse) and shown.reason is ResetReason.POLICY
    assert len(shown.detail) == tunnel.MAX_DETAIL and "\x1b" not in shown.detail


@pytest.mark.parametrize("detail", [" ", "refused ", "x" * (tunnel.MAX_DETAIL - 1) + " more"])
def test_a_refusals_detail_never_ends_in_a_blank(detail: str) -> None:
    """h2 refuses a header value with a blank at either end as a protocol error of the whole
    link: a detail cut at MAX_DETAIL on a space would end every stream of the opener's link."""
    for name, value in Refuse(ResetReason.REFUSED, detail).to_headers():
        assert value == value.strip(" \t"), name


def test_responses_from_generic_peers() -> None:
    assert tunnel.decode_response([(":status", "200")]) == Accept()
    assert tunnel.decode_response([(":status", "403")]) == Refuse(ResetReason.POLICY)
    assert tunnel.decode_response([(":status", "504")]) == Refuse(ResetReason.TIMEOUT)
    assert tunnel.decode_response([(":status", "502"), ("tele-reason", "future")]) == Refuse(
        ResetReason.INTERNAL
    )
    for status in ("", "20", "abc", "301", "1000"):
        with pytest.raises(TunnelProtocolError):
            tunnel.decode_response([(":status", status)])
    # Unknown RST_STREAM codes are INTERNAL; a peer's NO_ERROR means it stopped.
    assert tunnel.reason_from_code(0xDEAD) is ResetReason.INTERNAL
    assert tunnel.reason_from_code(tunnel.H2_NO_ERROR) is ResetReason.CANCELLED
    assert tunnel.reason_to_code(ResetReason.RESET) == tunnel.H2_CONNECT_ERROR


@given(st.lists(st.binary(max_size=3000), max_size=20), st.data())
def test_datagrams_survive_any_chunking(payloads: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(tunnel.encode_datagram(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = DatagramDecoder()
    received: list[bytes] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        received += decoder.feed(wire[start:cut])
        start = cut
    decoder.end()
    assert received == payloads
    assert decoder.pending == 0


def test_datagram_maximum() -> None:
    assert tunnel.encode_datagram(b"") == b"\x00\x00"
    with pytest.raises(DatagramTooLarge):
        tunnel.encode_datagram(b"x" * 101, maximum=100)
    decoder = DatagramDecoder(maximum=100)
    assert decoder.feed(b"\x00\x64" + b"y" * 99) == []
    assert decoder.pending == 101  # bounded by 2 + maximum
    assert decoder.feed(b"y\x00") == [b"y" * 100]
    with pytest.raises(DatagramTooLarge):
        decoder.feed(b"\x65")  # 0x0065 = 101 > 100
    with pytest.raises(TunnelProtocolError, match="lost"):
        decoder.feed(b"\x00\x00")
    truncated = DatagramDecoder()
    truncated.feed(b"\x00\x05abc")
    with pytest.raises(TunnelProtocolError, match="ended inside"):
        truncated.end()


@given(st.binary(max_size=4096), st.integers(0, tunnel.MAX_DATAGRAM))
def test_fuzz_datagram_decoder(data: bytes, maximum: int) -> None:
    decoder = DatagramDecoder(maximum)
    try:
        for datagram in decoder.feed(data):
            assert len(datagram) <= maximum
        assert decoder.pending <= tunnel.DATAGRAM_HEADER + maximum
        decoder.end()
    except TunnelProtocolError:
        pass


header_text = st.text(max_size=300)
header_names = st.one_of(
    st.sampled_from(
        [
            *(":method", ":authority", ":status", ":path", ":scheme", ":protocol"),
            *("tele-protocol", "tele-session", "tele-dial-id", "tele-reason"),
        ]
    ),
    header_text,
)
header_values = st.one_of(
    st.sampled_from(["CONNECT", "tcp", "udp", "200", "502", "10.0.0.1:80", "[::1]:1", "s"]),
    header_text,
)


@given(st.lists(st.tuples(header_names, header_values), max_size=40))
def test_fuzz_header_decoders(headers: list[tuple[str, str]]) -> None:
    try:
        request = OpenRequest.from_headers(headers)
    except TunnelProtocolError:
        pass
    else:
        assert OpenRequest.from_headers(request.to_headers()) == request
    try:
        tunnel.decode_response(headers)
    except TunnelProtocolError:
        pass


@given(header_values, header_values)
def test_fuzz_destination_parse(protocol: str, authority: str) -> None:
    try:
        dest = Destination.parse(protocol, authority)
    except TunnelProtocolError:
        return
    assert Destination.parse(dest.protocol.value, dest.authority) == dest
