"""Property tests of the packet codecs: round trips, and only PacketError on bad bytes."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tele.net import checksum
from tele.net.errors import (
    ChecksumError,
    FragmentError,
    IntegrityError,
    PacketError,
    SanityError,
    UnsupportedError,
)
from tele.net.icmp import (
    ICMPV4_ECHO_REPLY,
    ICMPV4_ECHO_REQUEST,
    ICMPV4_UNREACHABLE,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_UNREACHABLE,
    ICMPv4Header,
    ICMPv6Header,
)
from tele.net.ip import PROTO_TCP, PROTO_UDP, IPv4Header, IPv6Header
from tele.net.packet import (
    Packet,
    TCPFlowEncoder,
    Unreachable,
    echo_reply_for,
    encode,
    fast_tcp,
    icmp_unreachable_for,
    parse_packet,
    rst_for,
)
from tele.net.tcp import ACK, FIN, PSH, RST, SYN, TCPHeader
from tele.net.udp import UDPHeader
from tele.net.vnet import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET_HDR_NONE,
    VirtioNetHeader,
    checksum_settled,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
port = st.integers(1, 0xFFFF)
# Unicast sources: the parsers refuse multicast/broadcast senders (a sanity check).
ipv4_src = st.binary(min_size=4, max_size=4).filter(lambda b: b[0] < 224)
ipv4_any = st.binary(min_size=4, max_size=4)
ipv6_src = st.binary(min_size=16, max_size=16).filter(lambda b: b[0] != 0xFF)
ipv6_any = st.binary(min_size=16, max_size=16)

CLIENT4 = socket.inet_aton("10.0.0.1")
DEST4 = socket.inet_aton("10.96.0.10")
CLIENT6 = socket.inet_pton(socket.AF_INET6, "fd00::1")
DEST6 = socket.inet_pton(socket.AF_INET6, "fd00:96::10")


@st.composite
def ipv4_headers(draw: st.DrawFn) -> IPv4Header:
    options = draw(st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]))
    header_length = 20 + len(options)
    return IPv4Header(
        src=draw(ipv4_src),
        dst=draw(ipv4_any),
        protocol=draw(u8),
        total_length=draw(st.integers(header_length, header_length + 200)),
        ttl=draw(u8),
        tos=draw(u8),
        ident=draw(u16),
        flags=draw(st.integers(0, 3)),
        fragment_offset=draw(st.integers(0, 0x1FFF)),
        options=options,
    )


@given(ipv4_headers())
def test_ipv4_header_round_trips(header: IPv4Header) -> None:
    wire = bytes(header) + bytes(header.payload_length)
    assert IPv4Header.from_bytes(wire) == header
    assert checksum.verify(wire[: header.header_length])


@st.composite
def ipv6_extension_chains(draw: st.DrawFn) -> tuple[int, bytes, int]:
    """(first next_header, raw chain, upper protocol) of valid extension headers."""
    kinds = draw(st.lists(st.sampled_from([0, 60, 43, 44]), max_size=4))
    if 0 in kinds:  # hop-by-hop only first
        kinds = [0] + [k for k in kinds if k != 0]
    upper = draw(st.sampled_from([PROTO_TCP, PROTO_UDP, 58, 99]))
    chain = b""
    for index, kind in enumerate(kinds):
        following = kinds[index + 1] if index + 1 < len(kinds) else upper
        if kind == 44:
            # Atomic fragment: offset 0, no more fragments.
            chain += bytes([following, 0, 0, 0]) + draw(st.binary(min_size=4, max_size=4))
        else:
            units = draw(st.integers(0, 2))
            body = draw(st.binary(min_size=6 + 8 * units, max_size=6 + 8 * units))
            chain += bytes([following, units]) + body
    first = kinds[0] if kinds else upper
    return first, chain, upper


@given(ipv6_src, ipv6_any, ipv6_extension_chains(), u8, u8, st.integers(0, 0xFFFFF), u16)
def test_ipv6_header_round_trips(
    src: bytes,
    dst: bytes,
    chain: tuple[int, bytes, int],
    hop: int,
    tclass: int,
    flow: int,
    extra: int,
) -> None:
    first, raw, upper = chain
    extra %= 300
    header = IPv6Header(src, dst, first, len(raw) + extra, hop, tclass, flow, raw)
    wire = bytes(header) + bytes(extra)
    parsed = IPv6Header.from_bytes(wire)
    assert parsed == header
    assert parsed.protocol == upper
    assert not parsed.is_fragment


@st.composite
def tcp_headers(draw: st.DrawFn) -> TCPHeader:
    flags = draw(u8)
    if flags & SYN:
        flags &= ~(FIN | RST)
    return TCPHeader(
        sport=draw(port),
        dport=draw(port),
        seq=draw(u32),
        ack=draw(u32),
        flags=flags,
        window=draw(u16),
        checksum=draw(u16),
        urgent=draw(u16),
        mss=draw(st.none() | u16),
        wscale=draw(st.none() | u8),
        sack_permitted=draw(st.booleans()),
        timestamps=draw(st.none() | st.tuples(u32, u32)),
        sack=tuple(draw(st.lists(st.tuples(u32, u32), max_size=2))),
    )


@given(tcp_headers(), st.binary(max_size=50))
def test_tcp_header_round_trips(header: TCPHeader, payload: bytes) -> None:
    wire = bytes(header)
    assert len(wire) == header.header_length
    assert TCPHeader.from_bytes(wire + payload) == header


def test_tcp_unknown_and_malformed_options_are_skipped() -> None:
    base = TCPHeader(1000, 80, 1, 0, SYN, 65535)
    # Options: unknown kind 30 (len 6), MSS with a wrong length (3), then a good wscale.
    options = bytes([30, 6, 1, 2, 3, 4, 2, 3, 9, 1, 3, 3, 7, 0, 0, 0])
    fixed = bytearray(bytes(base))
    fixed[12] = ((20 + len(options)) // 4) << 4
    parsed = TCPHeader.from_bytes(bytes(fixed) + options)
    assert parsed.mss is None
    assert parsed.wscale == 7


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (bytes([1, 1, 2, 4]), IntegrityError),  # MSS runs past the header
        (bytes([1, 1, 1, 30]), IntegrityError),  # kind with no length byte
        (bytes([30, 1, 0, 0]), IntegrityError),  # length below 2
    ],
)
def test_tcp_bad_option_lengths(options: bytes, error: type[PacketError]) -> None:
    fixed = bytearray(bytes(TCPHeader(1000, 80, 1, 0, SYN, 65535)))
    fixed[12] = ((20 + len(options)) // 4) << 4
    with pytest.raises(error):
        TCPHeader.from_bytes(bytes(fixed) + options)


def test_tcp_sanity_checks() -> None:
    with pytest.raises(SanityError):
        TCPHeader.from_bytes(bytes(TCPHeader(1, 80, 0, 0, SYN | FIN, 0)))
    with pytest.raises(SanityError):
        TCPHeader.from_bytes(bytes(TCPHeader(0, 80, 0, 0, ACK, 0)))
    with pytest.raises(IntegrityError):
        TCPHeader.from_bytes(bytes(TCPHeader(1, 80, 0, 0, ACK, 0))[:19])


@given(port, port, u16, u16)
def test_udp_header_round_trips(sport: int, dport: int, extra: int, csum: int) -> None:
    header = UDPHeader(sport, dport, 8 + extra % 100, csum)
    assert UDPHeader.from_bytes(bytes(header) + bytes(extra % 100)) == header


@given(u8, u8, u16, u32)
def test_icmp_headers_round_trip(kind: int, code: int, csum: int, rest: int) -> None:
    assert ICMPv4Header.from_bytes(bytes(ICMPv4Header(kind, code, csum, rest))) == (
        ICMPv4Header(kind, code, csum, rest)
    )
    assert ICMPv6Header.from_bytes(bytes(ICMPv6Header(kind, code, csum, rest))) == (
        ICMPv6Header(kind, code, csum, rest)
    )


@given(
    u8,
    st.sampled_from([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_TCPV4 | 0x80]),
    u16,
    st.integers(1, 0xFFFF),
    u16,
    u16,
    st.none() | u16,
)
def test_vnet_header_round_trips(
    flags: int, gso: int, hdr_len: int, gso_size: int, start: int, offset: int, nbuf: int | None
) -> None:
    header = VirtioNetHeader(flags, gso, hdr_len, gso_size, start, offset, nbuf)
    wire = bytes(header)
    assert len(wire) == header.size
    assert VirtioNetHeader.from_bytes(wire, header.size) == header


def test_vnet_header_layout_is_little_endian() -> None:
    header = VirtioNetHeader(F_NEEDS_CSUM, GSO_TCPV4, 0x0102, 1460, 20, 16)
    assert bytes(header) == bytes([1, 1, 2, 1]) + (1460).to_bytes(2, "little") + bytes(
        [20, 0, 16, 0]
    )
    with pytest.raises(SanityError):
        VirtioNetHeader.from_bytes(bytes([0, 9]) + bytes(8))


def test_vnet_checksum_settled() -> None:
    assert checksum_settled(bytes(VirtioNetHeader(F_NEEDS_CSUM)))
    assert checksum_settled(bytes(VirtioNetHeader(F_DATA_VALID)))
    assert not checksum_settled(VNET_HDR_NONE)


# --- whole packets ------------------------------------------------------------------------


@st.composite
def transports(draw: st.DrawFn, version: int) -> tuple[object, bytes]:
    payload = draw(st.binary(max_size=300))
    kind = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    if kind == "tcp":
        return draw(tcp_headers()), payload
    if kind == "udp":
        return UDPHeader(draw(port), draw(port), 0), payload
    icmp_type = draw(u8)
    if version == 4:
        return ICMPv4Header(icmp_type, draw(u8), 0, draw(u32)), payload
    return ICMPv6Header(icmp_type, draw(u8), 0, draw(u32)), payload


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([4, 6]))
    src = draw(ipv4_src if version == 4 else ipv6_src)
    dst = draw(ipv4_any if version == 4 else ipv6_any)
    transport, payload = draw(transports(version))
    return encode(src, dst, transport, payload, ttl=draw(u8))  # type: ignore[arg-type]


@given(packets())
def test_packets_parse_and_round_trip(wire: bytes) -> None:
    packet = parse_packet(wire)
    assert bytes(packet) == wire
    assert Packet.from_bytes(bytes(packet)) == packet


@given(packets(), st.data())
def test_mutated_packets_raise_only_packet_errors(wire: bytes, data: st.DataObject) -> None:
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(u8)
    cut = data.draw(st.integers(0, len(mutated)))
    for candidate in (bytes(mutated), bytes(mutated[:cut]), wire[:cut]):
        try:
            parse_packet(candidate)
        except PacketError:
            pass


def _agrees_with_full_parser(wire: bytes) -> None:
    view = fast_tcp(wire)
    try:
        packet = parse_packet(wire)
    except PacketError:
        assert view is None
        return
    header = packet.transport
    plain = (
        isinstance(header, TCPHeader)
        and not header.flags & SYN
        and header.header_length == 20
        and packet.ip.header_length in (20, 40)
    )
    if view is None:
        assert not plain
        return
    assert isinstance(header, TCPHeader)
    assert (view.src, view.sport, view.dst, view.dport) == (
        packet.ip.src,
        header.sport,
        packet.ip.dst,
        header.dport,
    )
    assert (view.seq, view.ack, view.flags, view.window) == (
        header.seq,
        header.ack,
        header.flags,
        header.window,
    )
    assert bytes(view.payload) == bytes(packet.payload)


@given(packets(), st.data())
def test_fast_path_agrees_with_the_full_parser(wire: bytes, data: st.DataObject) -> None:
    _agrees_with_full_parser(wire)
    mutated = bytearray(wire)
    index = data.draw(st.integers(0, len(mutated) - 1))
    mutated[index] = data.draw(u8)
    _agrees_with_full_parser(bytes(mutated))
    _agrees_with_full_parser(wire[: data.draw(st.integers(0, len(wire)))])


@given(
    st.sampled_from([(CLIENT4, DEST4), (CLIENT6, DEST6)]),
    st.sampled_from([ACK, ACK | PSH, ACK | FIN, RST, RST | ACK]),
    st.binary(max_size=100),
)
def test_fast_path_takes_plain_segments(
    addresses: tuple[bytes, bytes], flags: int, payload: bytes
) -> None:
    src, dst = addresses
    wire = TCPFlowEncoder(src, dst, 4000, 80).segment(9, 7, flags, 100, payload)
    view = fast_tcp(wire)
    assert view is not None
    assert (view.seq, view.ack, view.flags, bytes(view.payload)) == (9, 7, flags, payload)
    if payload:  # a corrupted payload fails the checksum: left to the full parser
        assert fast_tcp(wire[:-1] + bytes([wire[-1] ^ 1])) is None


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_packet_errors(data: bytes) -> None:
    parsers: list[Callable[[bytes], object]] = [
        parse_packet,
        IPv4Header.from_bytes,
        IPv6Header.from_bytes,
        TCPHeader.from_bytes,
        UDPHeader.from_bytes,
        ICMPv4Header.from_bytes,
        ICMPv6Header.from_bytes,
        VirtioNetHeader.from_bytes,
    ]
    for parse in parsers:
        try:
            parse(data)
        except PacketError:
            pass


@given(st.binary(min_size=1, max_size=120))
def test_random_bytes_after_a_valid_version_nibble(data: bytes) -> None:
    for version in (0x45, 0x60):
        try:
            parse_packet(bytes([version]) + data)
        except PacketError:
            pass


def test_corrupted_tcp_checksum_is_detected_unless_offloaded() -> None:
    wire = bytearray(TCPFlowEncoder(CLIENT4, DEST4, 4000, 80).segment(1, 2, ACK, 100, b"data"))
    wire[-1] ^= 0xFF
    with pytest.raises(ChecksumError):
        parse_packet(bytes(wire))
    assert bytes(parse_packet(bytes(wire), verify_checksum=False).payload) == b"dat" + bytes(
        [ord("a") ^ 0xFF]
    )


def test_ipv4_fragments_are_reported() -> None:
    header = IPv4Header(CLIENT4, DEST4, PROTO_UDP, 28, flags=1, ident=77)
    with pytest.raises(FragmentError) as caught:
        parse_packet(bytes(header) + bytes(8))
    assert (caught.value.ident, caught.value.offset, caught.value.more) == (77, 0, True)
    assert caught.value.first
    later = IPv4Header(CLIENT4, DEST4, PROTO_UDP, 28, fragment_offset=185, ident=77)
    with pytest.raises(FragmentError) as caught:
        parse_packet(bytes(later) + bytes(8))
    assert caught.value.offset == 1480 and not caught.value.more


def test_ipv6_fragment_header_is_reported() -> None:
    fragment = bytes([PROTO_UDP, 0]) + (1480 | 1).to_bytes(2, "big") + (99).to_bytes(4, "big")
    header = IPv6Header(CLIENT6, DEST6, 44, 8 + 8, extensions=fragment)
    with pytest.raises(FragmentError) as caught:
        parse_packet(bytes(header) + bytes(8))
    assert (caught.value.ident, caught.value.offset, caught.value.more) == (99, 1480, True)


def test_ipv6_packet_with_extensions_reaches_tcp() -> None:
    tcp_packet = encode(CLIENT6, DEST6, TCPHeader(5000, 80, 7, 0, SYN, 1000), b"")
    tcp_bytes = tcp_packet[40:]
    hop_by_hop = bytes([60, 0]) + bytes(6)
    dest_opts = bytes([PROTO_TCP, 1]) + bytes(14)
    header = IPv6Header(
        CLIENT6, DEST6, 0, 8 + 16 + len(tcp_bytes), extensions=hop_by_hop + dest_opts
    )
    packet = parse_packet(bytes(header) + tcp_bytes)
    assert isinstance(packet.transport, TCPHeader)
    assert packet.transport.sport == 5000
    assert packet.ip.protocol == PROTO_TCP


@pytest.mark.parametrize(
    ("first", "chain", "error"),
    [
        (60, bytes([0, 0]) + bytes(6) + bytes([PROTO_TCP, 0]) + bytes(6), SanityError),  # HBH 2nd
        (60, bytes([PROTO_TCP, 3]) + bytes(6), IntegrityError),  # runs past the payload
        (44, bytes([PROTO_TCP, 0, 0]), IntegrityError),  # truncated fragment header
        (51, bytes([PROTO_TCP, 9]) + bytes(6), IntegrityError),  # AH past the payload
    ],
)
def test_malformed_ipv6_extension_chains(first: int, chain: bytes, error: type[Exception]) -> None:
    header = IPv6Header(CLIENT6, DEST6, first, len(chain), extensions=chain)
    with pytest.raises(error):
        IPv6Header.from_bytes(bytes(header))


def test_ipv6_authentication_header_is_skipped() -> None:
    tcp_bytes = encode(CLIENT6, DEST6, TCPHeader(5000, 80, 7, 0, SYN, 1000))[40:]
    ah = bytes([PROTO_TCP, 4]) + bytes(22)  # (4 + 2) * 4 = 24 bytes
    header = IPv6Header(CLIENT6, DEST6, 51, len(ah) + len(tcp_bytes), extensions=ah)
    packet = parse_packet(bytes(header) + tcp_bytes)
    assert packet.ip.protocol == PROTO_TCP and isinstance(packet.transport, TCPHeader)


def test_ipv6_sanity_and_jumbograms() -> None:
    multicast = b"\xff" + bytes(15)
    with pytest.raises(SanityError):
        IPv6Header.from_bytes(bytes(IPv6Header(multicast, DEST6, PROTO_UDP, 0)))
    with pytest.raises(UnsupportedError):
        IPv6Header.from_bytes(bytes(IPv6Header(CLIENT6, DEST6, 0, 0)) + bytes(8))
    with pytest.raises(IntegrityError):
        IPv6Header.from_bytes(b"\x40" + bytes(39))


def test_unsupported_and_malformed_ip() -> None:
    with pytest.raises(UnsupportedError):
        parse_packet(bytes(IPv4Header(CLIENT4, DEST4, 47, 24)) + bytes(4))  # GRE
    with pytest.raises(IntegrityError):
        parse_packet(b"\x50" + bytes(30))
    with pytest.raises(SanityError):
        parse_packet(bytes(IPv4Header(b"\xe0\x00\x00\x01", DEST4, PROTO_UDP, 28)) + bytes(8))
    udp6 = bytearray(encode(CLIENT6, DEST6, UDPHeader(1, 53, 0), b"q"))
    udp6[46:48] = b"\x00\x00"  # IPv6 forbids a zero UDP checksum
    with pytest.raises(IntegrityError):
        parse_packet(bytes(udp6))


def test_udp_zero_checksum_over_ipv4_means_none() -> None:
    wire = bytearray(encode(CLIENT4, DEST4, UDPHeader(1000, 53, 0), b"query"))
    wire[26:28] = b"\x00\x00"
    assert bytes(parse_packet(bytes(wire)).payload) == b"query"


# --- reply builders -------------------------------------------------------------------------


def test_rst_for_a_syn_acknowledges_it() -> None:
    syn = parse_packet(encode(CLIENT4, DEST4, TCPHeader(40000, 80, 1000, 0, SYN, 65535, mss=1460)))
    reply = rst_for(syn)
    assert reply is not None
    rst = parse_packet(reply)
    assert (rst.ip.src, rst.ip.dst) == (DEST4, CLIENT4)
    assert rst.transport == TCPHeader(80, 40000, 0, 1001, RST | ACK, 0, rst.transport.checksum)


def test_rst_for_an_ack_uses_its_ack_number_and_never_answers_rst() -> None:
    data = parse_packet(encode(CLIENT6, DEST6, TCPHeader(40000, 80, 5, 777, ACK | PSH, 100), b"x"))
    reply = rst_for(data)
    assert reply is not None
    rst = parse_packet(reply)
    assert isinstance(rst.transport, TCPHeader)
    assert (rst.transport.seq, rst.transport.flags) == (777, RST)
    assert rst_for(rst) is None


@pytest.mark.parametrize(("client", "dest"), [(CLIENT4, DEST4), (CLIENT6, DEST6)])
def test_icmp_unreachable_quotes_the_original(client: bytes, dest: bytes) -> None:
    original = encode(client, dest, TCPHeader(40000, 8080, 1000, 0, SYN, 65535, mss=1460))
    syn = parse_packet(original)
    error = parse_packet(icmp_unreachable_for(original, syn.ip, Unreachable.PORT))
    assert (error.ip.src, error.ip.dst) == (dest, client)
    if len(client) == 4:
        assert isinstance(error.transport, ICMPv4Header)
        assert (error.transport.type, error.transport.code) == (ICMPV4_UNREACHABLE, 3)
    else:
        assert isinstance(error.transport, ICMPv6Header)
        assert (error.transport.type, error.transport.code) == (ICMPV6_UNREACHABLE, 4)
    assert bytes(error.payload) == original
    quoted = parse_packet(bytes(error.payload))
    assert quoted == syn


def test_icmp_unreachable_quote_is_bounded() -> None:
    original = encode(CLIENT4, DEST4, UDPHeader(1000, 53, 0), bytes(1400))
    error = icmp_unreachable_for(original, parse_packet(original).ip, Unreachable.HOST)
    assert len(error) == 576
    parse_packet(error)


@pytest.mark.parametrize(
    ("client", "dest", "echo", "reply"),
    [
        (CLIENT4, DEST4, ICMPv4Header(ICMPV4_ECHO_REQUEST, 0, 0, 0x12340001), ICMPV4_ECHO_REPLY),
        (CLIENT6, DEST6, ICMPv6Header(ICMPV6_ECHO_REQUEST, 0, 0, 0x12340001), ICMPV6_ECHO_REPLY),
    ],
)
def test_echo_reply(client: bytes, dest: bytes, echo: object, reply: int) -> None:
    ping = parse_packet(encode(client, dest, echo, b"ping-data"))  # type: ignore[arg-type]
    answer = echo_reply_for(ping)
    assert answer is not None
    pong = parse_packet(answer)
    assert (pong.ip.src, pong.ip.dst) == (dest, client)
    assert pong.transport.type == reply  # type: ignore[union-attr]
    assert (pong.transport.ident, pong.transport.sequence) == (0x1234, 1)  # type: ignore[union-attr]
    assert bytes(pong.payload) == b"ping-data"
    assert echo_reply_for(pong) is None


# --- the per-flow encoder --------------------------------------------------------------------


@given(
    st.sampled_from([(CLIENT4, DEST4), (CLIENT6, DEST6)]),
    u32,
    u32,
    st.sampled_from([ACK, ACK | PSH, ACK | FIN, SYN | ACK, RST]),
    u16,
    st.binary(max_size=3000),
)
def test_flow_encoder_matches_generic_encode(
    addresses: tuple[bytes, bytes], seq: int, ack: int, flags: int, window: int, payload: bytes
) -> None:
    src, dst = addresses
    options = (
        TCPHeader(0, 0, 0, 0, 0, 0, mss=1400, wscale=7).options_bytes() if flags & SYN else b""
    )
    wire = TCPFlowEncoder(src, dst, 80, 40000).segment(seq, ack, flags, window, payload, options)
    packet = parse_packet(wire)
    expected = TCPHeader(80, 40000, seq, ack, flags, window)
    if flags & SYN:
        expected = TCPHeader(80, 40000, seq, ack, flags, window, mss=1400, wscale=7)
    assert wire == encode(src, dst, expected, payload)
    assert bytes(packet.payload) == payload


def complete_offloaded_checksum(frame: bytes, vnet: VirtioNetHeader) -> bytes:
    """What the kernel does with NEEDS_CSUM: sum from csum_start, store at csum_offset."""
    packet = bytearray(frame[vnet.size :])
    start, offset = vnet.csum_start, vnet.csum_start + vnet.csum_offset
    partial = int.from_bytes(packet[offset : offset + 2], "big")
    packet[offset : offset + 2] = b"\x00\x00"
    csum = checksum.internet_checksum(bytes(packet[start:]), partial)
    packet[offset : offset + 2] = csum.to_bytes(2, "big")
    return bytes(packet)


@pytest.mark.parametrize(
    ("src", "dst", "gso_type"), [(CLIENT4, DEST4, GSO_TCPV4), (CLIENT6, DEST6, GSO_TCPV6)]
)
def test_flow_encoder_offload_and_gso(src: bytes, dst: bytes, gso_type: int) -> None:
    encoder = TCPFlowEncoder(src, dst, 80, 40000, vnet_header=True, offload_checksum=True)
    payload = bytes(range(256)) * 200
    frame = encoder.segment(1, 2, ACK | PSH, 500, payload, b"", 1448)
    vnet = VirtioNetHeader.from_bytes(frame)
    ip_len = encoder.ip_header_length
    assert vnet == VirtioNetHeader(F_NEEDS_CSUM, gso_type, ip_len + 20, 1448, ip_len, 16)
    with pytest.raises(ChecksumError):
        parse_packet(frame[10:])
    packet = parse_packet(complete_offloaded_checksum(frame, vnet))
    assert bytes(packet.payload) == payload
    small = encoder.segment(1, 2, ACK, 500, b"hi", b"", 1448)
    vnet_small = VirtioNetHeader.from_bytes(small)
    assert (vnet_small.gso_type, vnet_small.gso_size, vnet_small.flags) == (GSO_NONE, 0, 1)
    assert bytes(parse_packet(complete_offloaded_checksum(small, vnet_small)).payload) == b"hi"


def test_flow_encoder_plain_vnet_and_refusals() -> None:
    frame = TCPFlowEncoder(CLIENT4, DEST4, 80, 1, vnet_header=True).segment(1, 2, ACK, 9, b"x")
    assert frame[:10] == bytes(10)
    assert bytes(parse_packet(frame[10:]).payload) == b"x"
    with pytest.raises(ValueError):
        TCPFlowEncoder(CLIENT4, DEST4, 80, 1, offload_checksum=True)
    with pytest.raises(ValueError):
        TCPFlowEncoder(CLIENT4, DEST4, 80, 1).segment(1, 2, ACK, 9, bytes(3000), b"", 1460)
