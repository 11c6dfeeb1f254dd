"""A scripted kernel-side app for TCP state machine tests: plain bytes in and out."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from tele.net.packet import Packet, TCPFlowEncoder, parse_packet
from tele.net.tcp import ACK, SYN, TCPHeader
from tele.net.tcpstate import TCPConfig, TCPConnection

CLIENT4 = socket.inet_aton("10.0.0.1")
DEST4 = socket.inet_aton("10.96.0.10")
CLIENT6 = socket.inet_pton(socket.AF_INET6, "fd00::1")
DEST6 = socket.inet_pton(socket.AF_INET6, "fd00:96::10")
MASK = 0xFFFFFFFF


@dataclass
class App:
    """The app's socket as the kernel would drive it: it builds segments towards tele."""

    isn: int = 1000
    client: bytes = CLIENT4
    dest: bytes = DEST4
    sport: int = 40000
    dport: int = 8080
    snd_nxt: int = field(init=False)
    rcv_nxt: int = 0
    window: int = 65535

    def __post_init__(self) -> None:
        self.snd_nxt = (self.isn + 1) & MASK
        self._encoder = TCPFlowEncoder(self.client, self.dest, self.sport, self.dport)

    def packet(
        self,
        flags: int,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int | None = None,
        **options: Any,
    ) -> Packet:
        opts = TCPHeader(0, 0, 0, 0, 0, 0, **options).options_bytes() if options else b""
        wire = self._encoder.segment(
            self.snd_nxt if seq is None else seq & MASK,
            self.rcv_nxt if ack is None else ack & MASK,
            flags,
            self.window if window is None else window,
            payload,
            opts,
        )
        return parse_packet(wire)

    def syn(self, **options: Any) -> Packet:
        return self.packet(SYN, seq=self.isn, ack=0, **options)

    def data(self, payload: bytes, flags: int = ACK) -> Packet:
        """The next in-order segment; advances the app's send sequence."""
        segment = self.packet(flags, payload)
        self.snd_nxt = (self.snd_nxt + len(payload)) & MASK
        return segment


def parse_all(frames: list[bytes]) -> list[Packet]:
    """Parse what the connection wrote (checksums verified: addresses must be right)."""
    return [parse_packet(frame) for frame in frames]


def tcp(packet: Packet) -> TCPHeader:
    header = packet.transport
    assert isinstance(header, TCPHeader)
    return header


def establish(
    app: App, *, config: TCPConfig | None = None, iss: int = 5000, **syn_options: Any
) -> TCPConnection:
    """SYN, accept, SYN-ACK, ACK: an ESTABLISHED connection with its events drained."""
    options = syn_options or {"mss": 1460, "wscale": 7}
    conn = TCPConnection(app.syn(**options), config=config)
    conn.accept(iss=iss)
    (syn_ack,) = parse_all(conn.data_to_send(0.0))
    app.rcv_nxt = (tcp(syn_ack).seq + 1) & MASK
    conn.receive_packet(app.packet(ACK), 0.0)
    conn.events()
    return conn
