"""Userspace TCP, sans-IO: one connection where the kernel's app opened and tele is the far end.

The runtime (tele.vif) feeds segments read from the TUN with `receive(tcp, payload, now)` (or
`receive_view` with what `packet.fast_tcp` read), turns events from `events()` into tunnel
actions, and writes what `data_to_send(now)` returns to the TUN. Time is only ever passed in:
`next_deadline()` says when `on_timer(now)` is due. Call `data_to_send` after a batch of input
(segments, send, consume, close, timers): ACKs of one batch are coalesced into one segment.

Life of a connection (RFC 9293 states, tele always the passive side):

    SynReceived event ──accept()──> SYN-ACK ──ACK──> ESTABLISHED ──> ... ──> Closed event
                      ╰─refuse(reason)──> RST or ICMP unreachable at once, Closed event

Flow control both ways is bounded: bytes delivered in `DataReceived` count against our receive
window until the runtime calls `consume(n)` (after the tunnel took them), and `send(data)`
accepts only what fits in the send buffer (a `Writable` event says when more fits).

Sequence numbers are kept internally as unbounded integers ("absolute" numbers, starting at the
wire value of the ISN) so that comparisons are plain; `unwrap()` maps a 32-bit wire value to the
absolute number closest to a reference, and `& 0xFFFFFFFF` maps back. That is the one place
where wrap-around happens. Timestamps and SACK are not negotiated: the path is the local kernel,
which neither reorders nor loses much, and every segment is 12 bytes lighter without them.
"""

from __future__ import annotations

import enum
import functools
import random
from dataclasses import dataclass

from tele.net.packet import (
    Bytes,
    Packet,
    SegmentView,
    TCPFlowEncoder,
    Unreachable,
    icmp_unreachable_for,
)
from tele.net.tcp import ACK, FIN, PSH, RST, SYN, TCPHeader

SEQ_MASK = 0xFFFFFFFF
_SEQ_HALF = 1 << 31
_SEQ_MOD = 1 << 32
_MAX_WSCALE = 14
_MAX_WINDOW_FIELD = 0xFFFF
_IPV4_MIN_MSS = 536  # RFC 9293 3.7.1: the MSS to assume when the peer sends none
_IPV6_MIN_MSS = 1220
_MIN_MSS = 88


@functools.lru_cache(maxsize=64)
def _syn_ack_options(mss: int, wscale: int | None) -> bytes:
    """A SYN-ACK's options: the same few combinations for every connection of a device."""
    return TCPHeader(0, 0, 0, 0, 0, 0, mss=mss, wscale=wscale).options_bytes()


def unwrap(wire: int, reference: int) -> int:
    """The absolute sequence number nearest to `reference` whose low 32 bits are `wire`."""
    delta = (wire - reference) & SEQ_MASK
    if delta >= _SEQ_HALF:
        delta -= _SEQ_MOD
    return reference + delta


def seq_lt(a: int, b: int) -> bool:
    """a < b in 32-bit sequence space (RFC 1982 serial number arithmetic)."""
    return a != b and ((b - a) & SEQ_MASK) < _SEQ_HALF


def seq_le(a: int, b: int) -> bool:
    """a <= b in 32-bit sequence space."""
    return ((b - a) & SEQ_MASK) < _SEQ_HALF


class TCPState(enum.Enum):
    SYN_PENDING = "SYN-PENDING"  # SYN seen, waiting for the runtime's accept() or refuse()
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSED = "CLOSED"


# Tuples, not sets: membership tests by identity, and Enum.__hash__ is Python code.
_RECEIVING = (TCPState.ESTABLISHED, TCPState.FIN_WAIT_1, TCPState.FIN_WAIT_2)
_SENDING = (
    TCPState.ESTABLISHED,
    TCPState.CLOSE_WAIT,
    TCPState.FIN_WAIT_1,
    TCPState.LAST_ACK,
    TCPState.CLOSING,
)


# --- events: what happened, for the runtime ------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynReceived:
    """The kernel's app connects to `dest_addr`:`dest_port`: dial it, then accept() or refuse()."""

    client_addr: bytes
    client_port: int
    dest_addr: bytes
    dest_port: int


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake completed (our SYN-ACK was acknowledged)."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    """In-order bytes from the app; call `consume(len(data))` once the tunnel took them."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The app sent FIN after its last byte: half-close the tunnel stream."""


@dataclass(frozen=True, slots=True)
class Writable:
    """Space opened in the send buffer after a `send()` could not take everything."""

    space: int


@dataclass(frozen=True, slots=True)
class Reset:
    """The connection was reset: by the app (`by_peer`) or given up by us (retransmissions)."""

    reason: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over; the runtime drops it from its table. Always the last event."""


Event = SynReceived | Established | DataReceived | PeerClosed | Writable | Reset | Closed


class RefuseReason(enum.Enum):
    """How to tell the app that the dial failed: what the app's connect() will then report."""

    REFUSED = "connection refused"  # RST: ECONNREFUSED
    HOST_UNREACHABLE = "host unreachable"  # ICMP: EHOSTUNREACH
    NETWORK_UNREACHABLE = "network unreachable"  # ICMP: ENETUNREACH
    PROHIBITED = "administratively prohibited"  # ICMP: EACCES / EHOSTUNREACH


_ICMP_FOR_REFUSAL = {
    RefuseReason.HOST_UNREACHABLE: Unreachable.HOST,
    RefuseReason.NETWORK_UNREACHABLE: Unreachable.NETWORK,
    RefuseReason.PROHIBITED: Unreachable.PROHIBITED,
}


@dataclass(frozen=True, slots=True)
class TCPConfig:
    """Per-connection limits and timers (seconds). Buffers bound memory per connection."""

    receive_buffer: int = 256 * 1024
    send_buffer: int = 256 * 1024
    mtu: int = 1500
    vnet_header: bool = False
    offload_checksum: bool = False  # needs vnet_header
    gso: bool = False  # large segments cut by the kernel; needs offload_checksum
    gso_max_size: int = 65535
    initial_rto: float = 1.0  # RFC 6298 2.1
    min_rto: float = 0.2  # Linux's floor; RFC 6298's 1 s is far above a local TUN's RTT
    max_rto: float = 60.0
    max_retransmissions: int = 8
    time_wait: float = 1.0  # short: we are a proxy, and TIME-WAIT only absorbs a resent FIN
    max_out_of_order: int = 64  # segments held beyond a hole
    ttl: int = 64
    fin_ack_delay: float = 0.1
    """How long the ACK of the app's FIN (while we still send) waits to leave with our own FIN
    or data: the tunnel's end usually follows within a round trip, and one packet less per
    connection is a TUN write less (like a delayed ACK; the app's FIN is resent only after its
    RTO, >= 200 ms on Linux, so it waits at most half of that). 0: at once."""
    ack_delay: float = 0.04
    """Delayed ACK (RFC 1122 4.2.3.2) once we have answered on the connection (Linux's
    "pingpong" mode; its first data is ACKed at once, as Linux's quick-ACK does): a small
    in-order segment's ACK (and a window update the app does not need yet) waits this long
    to leave with the answer's first segment, one TUN write less per request (bench/vif.py
    small requests at 50 connections: ~30 against ~32.5 µs of daemon CPU per request). A
    second unacknowledged segment, a full-sized one, or one out of order is ACKed at once.
    40 ms is Linux's minimum delayed-ACK time: an app that writes twice before it reads
    without TCP_NODELAY waits for it as it would with a Linux peer. 0: at once."""

    def __post_init__(self) -> None:
        if self.gso and not self.offload_checksum:
            raise ValueError("gso needs offload_checksum")
        if self.offload_checksum and not self.vnet_header:
            raise ValueError("offload_checksum needs vnet_header")


@dataclass(slots=True)
class _Timers:
    retransmit: float | None = None
    persist: float | None = None
    time_wait: float | None = None
    fin_ack: float | None = None  # the delayed ACK (of a FIN, a small segment, a window update)


@dataclass(slots=True)
class _RTT:
    """RFC 6298 estimator state; `timed` is the (end sequence, send time) being measured."""

    srtt: float | None = None
    rttvar: float = 0.0
    rto: float = 1.0
    backoff: int = 0
    timed: tuple[int, float] | None = None
    persist_backoff: int = 0


class TCPConnection:
    """One TCP connection; the kernel's app is the client, tele answers as the server.

    Create it from the app's SYN (the first event is `SynReceived`); all methods are cheap and
    never block. `receive()` returns False when the connection is closed and did not take the
    segment (the runtime answers with `packet.rst_for`, or opens a new connection for a SYN).
    """

    # Slots: a daemon holds one per open connection (a dict of 42 attributes was ~1.5 KiB of
    # the ~17 KiB a connection costs), and attribute access on the data path is a bit faster.
    __slots__ = (
        "_ack_due",
        "_dupacks",
        "_encoder",
        "_events",
        "_fast_retransmit",
        "_fin_acked",
        "_fin_seq",
        "_max_burst",
        "_max_snd_wnd",
        "_ooo",
        "_ooo_fin",
        "_out",
        "_peer_window",
        "_rcv_adv",
        "_retries",
        "_rtt",
        "_scaling",
        "_send_blocked",
        "_snd_wl1",
        "_snd_wl2",
        "_sndbuf",
        "_sndbuf_seq",
        "_sws_override",
        "_syn",
        "_synack_due",
        "_timers",
        "_unconsumed",
        "client",
        "config",
        "dest",
        "header_prediction",
        "irs",
        "iss",
        "mss",
        "mss_local",
        "rcv_nxt",
        "rcv_wscale",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wnd",
        "snd_wscale",
        "state",
    )

    def __init__(self, syn: Packet, *, config: TCPConfig | None = None) -> None:
        tcp = syn.transport
        if not isinstance(tcp, TCPHeader) or tcp.flags & (SYN | ACK) != SYN:
            raise ValueError("a connection starts from a SYN without ACK")
        self.header_prediction = True
        """The fast path for in-order data; tests turn it off to compare with the general path."""
        self.config = cfg = config or TCPConfig()
        ip = syn.ip
        self.client = (ip.src, tcp.sport)
        self.dest = (ip.dst, tcp.dport)
        self.state = TCPState.SYN_PENDING
        # Kept to quote in an ICMP error if the dial fails (dropped once answered); a SYN
        # carries no payload we use.
        self._syn: Packet | None = Packet(ip, tcp, b"")
        self._encoder = TCPFlowEncoder(
            ip.dst,
            ip.src,
            tcp.dport,
            tcp.sport,
            vnet_header=cfg.vnet_header,
            offload_checksum=cfg.offload_checksum,
            ttl=cfg.ttl,
        )
        ip_overhead = self._encoder.ip_header_length + 20
        self.mss_local = cfg.mtu - ip_overhead
        default_mss = _IPV4_MIN_MSS if ip.version == 4 else _IPV6_MIN_MSS
        # Floor as Linux does (TCP_MIN_MSS): a tiny MSS would make us send a packet per byte.
        self.mss = max(min(tcp.mss or default_mss, self.mss_local), _MIN_MSS)
        self._max_burst = self.mss
        if cfg.gso:
            # The IPv4 total length (IPv6 payload length) field caps a super-segment at 64 KiB.
            headers = ip_overhead if ip.version == 4 else 20
            room = min(cfg.gso_max_size, 0xFFFF - headers)
            self._max_burst = max(self.mss, room // self.mss * self.mss)
        # Window scaling happens only when both SYNs carry the option (RFC 7323 1.3).
        self._scaling = tcp.wscale is not None
        self.snd_wscale = min(tcp.wscale or 0, _MAX_WSCALE) if self._scaling else 0
        self.rcv_wscale = 0
        if self._scaling:
            while (cfg.receive_buffer >> self.rcv_wscale) > _MAX_WINDOW_FIELD:
                self.rcv_wscale += 1
            self.rcv_wscale = min(self.rcv_wscale, _MAX_WSCALE)

        # Receive side (absolute sequence numbers).
        self.irs = tcp.seq
        self.rcv_nxt = tcp.seq + 1
        self._rcv_adv = self.rcv_nxt  # right edge of the window we advertised
        self._unconsumed = 0
        self._ooo: list[tuple[int, bytes]] = []  # sorted (seq, data) beyond a hole
        self._ooo_fin: int | None = None

        # Send side: set by accept().
        self.iss = 0
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        self.snd_wnd = 0
        self._max_snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._sndbuf = bytearray()
        self._sndbuf_seq = 0  # sequence number of _sndbuf[0]
        self._fin_seq: int | None = None  # set by close(): where our FIN goes
        self._send_blocked = False
        self._sws_override = False
        self._fast_retransmit = False
        self._dupacks = 0
        self._synack_due = False
        self._fin_acked = False
        self._peer_window = tcp.window  # the SYN's window is never scaled

        self._ack_due = False
        self._timers = _Timers()
        self._rtt = _RTT(rto=cfg.initial_rto)
        self._retries = 0
        self._out: list[bytes] = []
        # A list, not a deque: only appended to and taken whole, and a deque's first block is
        # ~0.5 KiB per connection.
        self._events: list[Event] = [SynReceived(ip.src, tcp.sport, ip.dst, tcp.dport)]

    # --- runtime API --------------------------------------------------------------------

    @property
    def flow(self) -> tuple[bytes, int, bytes, int]:
        """(client address, client port, destination address, destination port)."""
        return (*self.client, *self.dest)

    def events(self) -> list[Event]:
        """Take the events that happened since the last call, oldest first."""
        taken = self._events
        self._events = []
        return taken

    def accept(self, *, iss: int | None = None) -> None:
        """The dial succeeded: answer the SYN with a SYN-ACK (on the next `data_to_send`)."""
        if self.state is not TCPState.SYN_PENDING:
            raise RuntimeError(f"accept() in state {self.state.value}")
        self.iss = random.getrandbits(32) if iss is None else iss & SEQ_MASK
        self.snd_una = self.snd_nxt = self.snd_max = self.iss
        self._sndbuf_seq = self.iss + 1
        self._snd_wl1 = self.irs
        self._snd_wl2 = self.iss
        self.snd_wnd = self._max_snd_wnd = self._peer_window
        self.state = TCPState.SYN_RECEIVED
        self._synack_due = True
        self._syn = None

    def refuse(self, reason: RefuseReason = RefuseReason.REFUSED) -> None:
        """The dial failed: answer at once with RST or ICMP unreachable; the connection ends."""
        if self.state is not TCPState.SYN_PENDING:
            raise RuntimeError(f"refuse() in state {self.state.value}")
        icmp = _ICMP_FOR_REFUSAL.get(reason)
        if icmp is None:
            self._out.append(self._encoder.segment(0, self.rcv_nxt & SEQ_MASK, RST | ACK, 0))
        else:
            syn = self._syn
            assert syn is not None  # kept until accept()
            self._out.append(icmp_unreachable_for(bytes(syn), syn.ip, icmp))
        self._close()

    @property
    def send_space(self) -> int:
        """How many bytes `send()` would take now."""
        return max(self.config.send_buffer - len(self._sndbuf), 0)

    def send(self, data: Bytes) -> int:
        """Queue bytes for the app; returns how many were taken (the rest: wait for Writable)."""
        if self._fin_seq is not None or self.state in (TCPState.CLOSED, TCPState.TIME_WAIT):
            raise RuntimeError(f"send() after close, in state {self.state.value}")
        if self.state is TCPState.SYN_PENDING:
            raise RuntimeError("send() before accept()")
        space = self.send_space
        taken = min(space, len(data))
        if taken:
            self._sndbuf += data[:taken] if taken < len(data) else data
        if taken < len(data):
            self._send_blocked = True
        return taken

    def close(self) -> None:
        """No more data from us (the tunnel half-closed): FIN after the queued bytes."""
        if self._fin_seq is not None or self.state in (TCPState.CLOSED, TCPState.SYN_PENDING):
            return
        self._fin_seq = self._sndbuf_seq + len(self._sndbuf)
        if self.state is TCPState.ESTABLISHED:
            self.state = TCPState.FIN_WAIT_1
        elif self.state is TCPState.CLOSE_WAIT:
            self.state = TCPState.LAST_ACK
        # In SYN-RECEIVED the FIN waits for the handshake (see _on_established).

    def abort(self) -> None:
        """Reset the connection (the tunnel stream failed): RST to the app, then Closed."""
        if self.state is TCPState.CLOSED:
            return
        if self.state is TCPState.SYN_PENDING:
            self.refuse(RefuseReason.REFUSED)
            return
        seq = self.snd_nxt & SEQ_MASK
        self._out.append(self._encoder.segment(seq, self.rcv_nxt & SEQ_MASK, RST | ACK, 0))
        self._close()

    def consume(self, n: int, now: float | None = None) -> bool:
        """The runtime passed on `n` delivered bytes: reopen that much receive window.

        True when there is something to send now (the reopened window is worth announcing):
        only then need the runtime call `data_to_send`. With `now`, an announcement the app
        does not need yet (it may still send 8 segments) waits up to `TCPConfig.ack_delay`
        for a segment to carry it.
        """
        if n < 0 or n > self._unconsumed:
            raise ValueError(f"consume({n}) with {self._unconsumed} bytes unconsumed")
        self._unconsumed -= n
        if self.state in _RECEIVING:
            # Receiver SWS avoidance (RFC 9293 3.8.6.2.2): announce only a worthwhile opening,
            # and (like Linux) only when it at least doubles what the app may still send.
            current = max(self._rcv_adv - self.rcv_nxt, 0)
            free = self._free_space()
            if free - current >= min(self.config.receive_buffer // 2, self.mss_local) and (
                free >= 2 * current
            ):
                delay = self.config.ack_delay
                if (
                    now is not None
                    and delay > 0
                    and current >= 8 * self.mss_local
                    and not self._ack_due
                    and self.snd_max > self.iss + 1
                ):
                    # The app may still send plenty: the update can wait for the answer's
                    # first segment (`ack_delay`), as a small segment's ACK does.
                    if self._timers.fin_ack is None:
                        self._timers.fin_ack = now + delay
                else:
                    self._ack_due = True
        return self._ack_due or bool(self._out)

    @property
    def unconsumed(self) -> int:
        return self._unconsumed

    def next_deadline(self) -> float | None:
        """When `on_timer` must run next, or None when no timer is armed."""
        t = self._timers
        deadlines = [d for d in (t.retransmit, t.persist, t.time_wait, t.fin_ack) if d is not None]
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> None:
        """Run the timers that are due at `now` (retransmission, window probe, TIME-WAIT,
        delayed ACK)."""
        t = self._timers
        if t.time_wait is not None and now >= t.time_wait:
            t.time_wait = None
            self._close()
            return
        if t.retransmit is not None and now >= t.retransmit:
            t.retransmit = None
            self._on_retransmit_timeout()
        if t.persist is not None and now >= t.persist:
            t.persist = None
            self._send_window_probe(now)
        if t.fin_ack is not None and now >= t.fin_ack:
            t.fin_ack = None
            self._ack_due = True

    # --- input --------------------------------------------------------------------------

    def receive_packet(self, packet: Packet, now: float) -> bool:
        tcp = packet.transport
        if not isinstance(tcp, TCPHeader):
            raise TypeError("not a TCP packet")
        return self.receive(tcp, packet.payload, now)

    def receive(self, tcp: TCPHeader, payload: Bytes, now: float) -> bool:
        """Process one segment from the app (RFC 9293 3.10.7.4, passive side)."""
        return self.receive_segment(tcp.seq, tcp.ack, tcp.flags, tcp.window, payload, now)

    def receive_view(self, segment: SegmentView, now: float) -> bool:
        """`receive` for a segment read by `packet.fast_tcp` (the data path)."""
        return self.receive_segment(
            segment.seq, segment.ack, segment.flags, segment.window, segment.payload, now
        )

    def receive_segment(
        self,
        seq_wire: int,
        ack_wire: int,
        flags: int,
        window_field: int,
        payload: Bytes,
        now: float,
    ) -> bool:
        """`receive` with the header fields passed one by one (wire values)."""
        state = self.state
        # Header prediction (Van Jacobson's fast path): the next in-order data segment of a
        # bulk transfer, acknowledging nothing new, window unchanged. The result is exactly
        # what the general path below computes, with most of its tests skipped.
        if (
            state is TCPState.ESTABLISHED
            and self.header_prediction
            and flags & (SYN | FIN | RST | ACK) == ACK
            and seq_wire == self.rcv_nxt & SEQ_MASK
            and not self._ooo
            and self._ooo_fin is None
            and 0 < len(payload) <= self._rcv_adv - self.rcv_nxt
            and ack_wire == self.snd_una & SEQ_MASK
            and window_field << self.snd_wscale == self.snd_wnd
        ):
            seq = self.rcv_nxt
            if self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= self.snd_una):
                self._snd_wl1 = seq
                self._snd_wl2 = self.snd_una
                if self.snd_wnd:
                    self._timers.persist = None
                    self._rtt.persist_backoff = 0
            data = bytes(payload)
            self.rcv_nxt = seq + len(data)
            self._unconsumed += len(data)
            self._events.append(DataReceived(data))
            self._ack_data(len(data), now)
            return True
        if state is TCPState.CLOSED:
            return False
        if state is TCPState.SYN_PENDING:
            # Only a RST matters before we answer: the app gave up while we were dialing.
            if flags & RST and seq_wire == self.rcv_nxt & SEQ_MASK:
                self._reset("connection reset by the app before it was accepted", by_peer=True)
            return True
        if (
            state is TCPState.TIME_WAIT
            and flags & SYN
            and not flags & ACK
            and seq_lt(self.rcv_nxt & SEQ_MASK, seq_wire)
        ):
            # A new connection on the same 4-tuple (RFC 6191): end this one, let the runtime
            # open a fresh one for the SYN.
            self._close()
            return False
        if state is TCPState.SYN_RECEIVED and flags & SYN and seq_wire == self.irs:
            self._synack_due = True  # our SYN-ACK was lost: send it again
            return True

        seq = unwrap(seq_wire, self.rcv_nxt)
        seg_len = len(payload) + (1 if flags & FIN else 0) + (1 if flags & SYN else 0)
        window = max(self._rcv_adv - self.rcv_nxt, 0)
        # 1. Is any of it inside the receive window?
        if seg_len == 0:
            acceptable = seq == self.rcv_nxt if window == 0 else 0 <= seq - self.rcv_nxt < window
        elif window == 0:
            acceptable = False
        else:
            # Any overlap with the window (RFC 9293's test, also taking a segment that starts
            # before RCV.NXT and ends beyond the window, as Linux does).
            first = seq - self.rcv_nxt
            acceptable = first < window and first + seg_len > 0
        if not acceptable:
            # Old duplicate, beyond the window, or a zero-window probe: answer with our state.
            if not flags & RST:
                self._ack_due = True
            return True
        # 2. RST: only an exact match resets; in-window otherwise gets a challenge ACK (RFC 5961).
        if flags & RST:
            if seq == self.rcv_nxt:
                self._reset("connection reset by the app", by_peer=True)
            else:
                self._ack_due = True
            return True
        # 3. A SYN in a synchronized state: challenge ACK (RFC 5961 4.2).
        if flags & SYN:
            self._ack_due = True
            return True
        # 4. ACK.
        if not flags & ACK:
            return True
        if not self._process_ack(ack_wire, flags, window_field, seq, len(payload), now):
            return True
        # 5. Data and FIN.
        if self.state in _RECEIVING:
            if payload:
                self._process_data(seq, payload, now)
                if self._ooo_fin is not None and self._ooo_fin == self.rcv_nxt:
                    self._take_fin(now)
            if flags & FIN and self.state in _RECEIVING:
                self._process_fin(seq + len(payload), now)
        elif flags & FIN and self.state in (TCPState.TIME_WAIT, TCPState.CLOSING):
            self._ack_due = True  # a retransmitted FIN: our ACK was lost
        return True

    def _process_ack(
        self, ack_wire: int, flags: int, window_field: int, seq: int, data_len: int, now: float
    ) -> bool:
        ack = unwrap(ack_wire, self.snd_una)
        if self.state is TCPState.SYN_RECEIVED:
            if ack != self.iss + 1:
                # RFC 9293: an unacceptable ACK in SYN-RECEIVED gets <SEQ=SEG.ACK><CTL=RST>.
                self._out.append(self._encoder.segment(ack_wire, 0, RST, 0))
                return False
            self._on_established()
        if ack > self.snd_max:
            self._ack_due = True  # acknowledges what we never sent
            return False
        window = window_field << self.snd_wscale
        if ack > self.snd_una:
            self._on_new_ack(ack, now)
        elif (
            ack == self.snd_una
            and self.snd_max > self.snd_una
            and data_len == 0
            and not flags & FIN
            and window == self.snd_wnd
        ):
            self._dupacks += 1
            if self._dupacks == 3:
                # Fast retransmit (RFC 5681 3.2): resend the segment at the hole now, not after
                # the RTO; the rest stays in flight.
                self._fast_retransmit = True
                self._rtt.timed = None
        # Window update (RFC 9293 3.10.7.4, fifth check, SND.WL1/WL2 guard old segments).
        if self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack):
            self.snd_wnd = window
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            self._max_snd_wnd = max(self._max_snd_wnd, window)
            if window:
                self._timers.persist = None
                self._rtt.persist_backoff = 0
        if self._fin_acked:
            if self.state is TCPState.FIN_WAIT_1:
                self.state = TCPState.FIN_WAIT_2
            elif self.state is TCPState.CLOSING:
                self._enter_time_wait(now)
            elif self.state is TCPState.LAST_ACK:
                self._close()
                return False
        return True

    def _on_new_ack(self, ack: int, now: float) -> None:
        rtt = self._rtt
        if rtt.timed is not None and ack >= rtt.timed[0]:
            self._rtt_sample(now - rtt.timed[1])
            rtt.timed = None
        data_end = self._sndbuf_seq + len(self._sndbuf)
        done = min(ack, data_end) - self._sndbuf_seq
        if done > 0:
            del self._sndbuf[:done]
            self._sndbuf_seq += done
        if self._fin_seq is not None and ack > self._fin_seq:
            self._fin_acked = True
        self.snd_una = ack
        self.snd_nxt = max(self.snd_nxt, ack)
        self._dupacks = 0
        self._retries = 0
        rtt.backoff = 0
        self._timers.retransmit = None if ack == self.snd_max else now + self._current_rto()
        if self._send_blocked and self.send_space > 0 and self._fin_seq is None:
            self._send_blocked = False
            self._events.append(Writable(self.send_space))

    def _ack_data(self, length: int, now: float) -> None:
        """In-order data arrived: its ACK now, or (a small segment, no other unacknowledged)
        after `TCPConfig.ack_delay`, to leave with the answer's first segment."""
        delay = self.config.ack_delay
        timers = self._timers
        if (
            delay > 0
            and length < self.mss_local
            and timers.fin_ack is None
            and not self._ack_due
            and self.snd_max > self.iss + 1  # we answered before: a request/response flow
        ):
            timers.fin_ack = now + delay
        else:
            self._ack_due = True

    def _process_data(self, seq: int, payload: Bytes, now: float) -> None:
        right = self._rcv_adv
        start = seq
        data = payload
        trimmed = False
        if start < self.rcv_nxt:  # partly old: keep the new tail
            data = data[self.rcv_nxt - start :]
            start = self.rcv_nxt
            trimmed = True
        if start + len(data) > right:  # beyond what we offered: drop the excess
            data = data[: max(right - start, 0)]
            trimmed = True
        if not data:
            self._ack_due = True
            return
        if start == self.rcv_nxt:
            if trimmed or self._ooo:
                self._ack_due = True
            else:
                self._ack_data(len(data), now)
            chunks = [bytes(data)]
            self.rcv_nxt += len(data)
            while self._ooo and self._ooo[0][0] <= self.rcv_nxt:
                ooo_seq, ooo_data = self._ooo.pop(0)
                tail = ooo_seq + len(ooo_data) - self.rcv_nxt
                if tail > 0:
                    chunks.append(ooo_data[len(ooo_data) - tail :])
                    self.rcv_nxt += tail
            joined = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._unconsumed += len(joined)
            self._events.append(DataReceived(joined))
            return
        self._ack_due = True  # a hole: the duplicate ACK at once (fast retransmit)
        if len(self._ooo) < self.config.max_out_of_order:
            # A hole before this segment: keep it (bounded by the window and a count).
            item = (start, bytes(data))
            index = 0
            while index < len(self._ooo) and self._ooo[index][0] < start:
                index += 1
            self._ooo.insert(index, item)

    def _process_fin(self, fin_seq: int, now: float) -> None:
        if fin_seq > self.rcv_nxt:
            if fin_seq <= self._rcv_adv:
                self._ooo_fin = fin_seq  # FIN beyond a hole: take it once the hole fills
            return
        if fin_seq < self.rcv_nxt:
            return
        self._take_fin(now)

    def _take_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self._ooo_fin = None
        self._ooo.clear()
        self._events.append(PeerClosed())
        if self.state is TCPState.ESTABLISHED:
            self.state = TCPState.CLOSE_WAIT
            delay = self.config.fin_ack_delay
            if delay > 0 and not self._ack_due:
                self._timers.fin_ack = now + delay  # see TCPConfig.fin_ack_delay
            else:
                self._ack_due = True
            return
        self._ack_due = True
        if self.state is TCPState.FIN_WAIT_1:
            if self._fin_acked:
                self._enter_time_wait(now)
            else:
                self.state = TCPState.CLOSING
        elif self.state is TCPState.FIN_WAIT_2:
            self._enter_time_wait(now)

    # --- output -------------------------------------------------------------------------

    def data_to_send(self, now: float) -> list[bytes]:
        """The packets to write to the TUN now (each with its virtio-net header if configured)."""
        out = self._out
        self._out = []
        state = self.state
        if state is TCPState.SYN_RECEIVED and self._synack_due:
            self._synack_due = False
            out.append(self._syn_ack())
            # Time the first SYN-ACK only (Karn): its ACK gives the first RTT sample, so the
            # RTO drops from the initial 1 s to what the path needs before any data flows.
            first = self.snd_max == self.iss
            self._rtt.timed = (self.iss + 1, now) if first else None
            self.snd_nxt = self.snd_max = self.iss + 1
            if self._timers.retransmit is None:
                self._timers.retransmit = now + self._current_rto()
            self._ack_due = False
        elif state in _SENDING:
            self._output(out, now)
        if self._ack_due and self.state not in (TCPState.CLOSED, TCPState.SYN_PENDING):
            seq = self.snd_nxt & SEQ_MASK
            out.append(self._encoder.segment(seq, self.rcv_nxt & SEQ_MASK, ACK, self._window()))
            self._ack_due = False
        if out and self._timers.fin_ack is not None:
            self._timers.fin_ack = None  # every segment carries the ACK of the FIN
        return out

    def _output(self, out: list[bytes], now: float) -> None:
        """Send what the peer's window allows: new data, go-back-N retransmission, FIN."""
        encoder = self._encoder
        mss = self.mss
        data_end = self._sndbuf_seq + len(self._sndbuf)
        fin_seq = self._fin_seq
        # Slices of this view are consumed by the encoder before the buffer can change.
        view = memoryview(self._sndbuf)
        if self._fast_retransmit:
            self._fast_retransmit = False
            size = min(data_end, self.snd_max, self.snd_una + self._max_burst) - self.snd_una
            if size > 0:
                start = self.snd_una - self._sndbuf_seq
                out.append(
                    encoder.segment(
                        self.snd_una & SEQ_MASK,
                        self.rcv_nxt & SEQ_MASK,
                        ACK,
                        self._window(),
                        view[start : start + size],
                        b"",
                        mss if size > mss else 0,
                    )
                )
                self._ack_due = False
        while True:
            unsent = data_end - self.snd_nxt
            usable = self.snd_una + self.snd_wnd - self.snd_nxt
            if unsent > 0:
                if usable <= 0:
                    break
                size = min(unsent, usable, self._max_burst)
                # Sender SWS avoidance: no small segment unless it ends the queue or
                # fills half the largest window the app ever offered.
                if (
                    size < mss
                    and size < unsent
                    and size < self._max_snd_wnd // 2
                    and not self._sws_override
                ):
                    break
                self._sws_override = False
                start = self.snd_nxt - self._sndbuf_seq
                payload = view[start : start + size]
                flags = ACK
                end = self.snd_nxt + size
                if end == data_end:
                    flags |= PSH
                    if fin_seq == end:
                        flags |= FIN
            elif fin_seq is not None and self.snd_nxt == fin_seq:
                size = 0
                payload = view[0:0]
                flags = ACK | FIN
                end = fin_seq
            else:
                break
            out.append(
                encoder.segment(
                    self.snd_nxt & SEQ_MASK,
                    self.rcv_nxt & SEQ_MASK,
                    flags,
                    self._window(),
                    payload,
                    b"",
                    mss if size > mss else 0,
                )
            )
            new_nxt = end + (1 if flags & FIN else 0)
            if self.snd_nxt == self.snd_max and self._rtt.timed is None:
                self._rtt.timed = (new_nxt, now)  # Karn: time only first transmissions
            self.snd_nxt = new_nxt
            self.snd_max = max(self.snd_max, new_nxt)
            self._ack_due = False
            if self._timers.retransmit is None:
                self._timers.retransmit = now + self._current_rto()
            if flags & FIN:
                break
        self._arm_persist(now)

    def _arm_persist(self, now: float) -> None:
        """Data (or FIN) waits, nothing is in flight: probe the window until it opens.

        The app's window update could be lost, or the window may stay too small for the sender
        SWS rule; without this timer the connection would then stall for good.
        """
        waiting = self._sndbuf_seq + len(self._sndbuf) > self.snd_nxt or (
            self._fin_seq is not None and self.snd_nxt == self._fin_seq
        )
        timers = self._timers
        if not waiting:
            timers.persist = None
            self._rtt.persist_backoff = 0
        elif timers.retransmit is None and timers.persist is None:
            interval = self._current_rto() * (1 << self._rtt.persist_backoff)
            timers.persist = now + min(interval, self.config.max_rto)

    def _send_window_probe(self, now: float) -> None:
        if self.snd_una + self.snd_wnd > self.snd_nxt:
            # Some window, held back by the SWS rule: send what fits (RFC 9293 3.8.6.2.1).
            self._sws_override = True
            return
        # Like Linux's tcp_xmit_probe_skb: an ACK one below SND.UNA is out of the app's window,
        # so its kernel answers with an ACK carrying the current window.
        seq = (self.snd_una - 1) & SEQ_MASK
        self._out.append(self._encoder.segment(seq, self.rcv_nxt & SEQ_MASK, ACK, self._window()))
        self._rtt.persist_backoff = min(self._rtt.persist_backoff + 1, 16)
        self._arm_persist(now)

    def _on_retransmit_timeout(self) -> None:
        self._retries += 1
        if self._retries > self.config.max_retransmissions:
            seq = self.snd_nxt & SEQ_MASK
            self._out.append(self._encoder.segment(seq, self.rcv_nxt & SEQ_MASK, RST | ACK, 0))
            self._reset("the app stopped acknowledging (retransmission timeout)", by_peer=False)
            return
        rtt = self._rtt
        rtt.backoff += 1
        rtt.timed = None
        if self.state is TCPState.SYN_RECEIVED:
            self._synack_due = True
            return
        # Go back N: everything after SND.UNA is sent again as the window allows.
        self.snd_nxt = self.snd_una
        self._dupacks = 0

    def _rtt_sample(self, sample: float) -> None:
        rtt = self._rtt
        if rtt.srtt is None:
            rtt.srtt = sample
            rtt.rttvar = sample / 2
        else:
            rtt.rttvar = 0.75 * rtt.rttvar + 0.25 * abs(rtt.srtt - sample)
            rtt.srtt = 0.875 * rtt.srtt + 0.125 * sample
        rto = rtt.srtt + max(0.001, 4 * rtt.rttvar)
        rtt.rto = min(max(rto, self.config.min_rto), self.config.max_rto)

    def _current_rto(self) -> float:
        """The RTO with exponential back-off applied (RFC 6298 5.5)."""
        rtt = self._rtt
        return float(min(rtt.rto * (1 << min(rtt.backoff, 16)), self.config.max_rto))

    @property
    def rto(self) -> float:
        return self._current_rto()

    @property
    def srtt(self) -> float | None:
        return self._rtt.srtt

    def _free_space(self) -> int:
        return max(self.config.receive_buffer - self._unconsumed, 0)

    def _window(self) -> int:
        """The window field for the next segment; records the right edge it advertises."""
        shift = self.rcv_wscale
        field_value = min(self._free_space() >> shift, _MAX_WINDOW_FIELD)
        edge = self.rcv_nxt + (field_value << shift)
        if edge < self._rcv_adv:
            # Never move the right edge back (RFC 9293 3.8.6.2.2): rounding by the scale could.
            field_value = min(
                (self._rcv_adv - self.rcv_nxt + (1 << shift) - 1) >> shift, _MAX_WINDOW_FIELD
            )
            edge = self.rcv_nxt + (field_value << shift)
        self._rcv_adv = max(self._rcv_adv, edge)
        return field_value

    def _syn_ack(self) -> bytes:
        # The window in a SYN is never scaled (RFC 7323 2.2).
        window = min(self._free_space(), _MAX_WINDOW_FIELD)
        self._rcv_adv = max(self._rcv_adv, self.rcv_nxt + window)
        options = _syn_ack_options(self.mss_local, self.rcv_wscale if self._scaling else None)
        return self._encoder.segment(
            self.iss & SEQ_MASK, self.rcv_nxt & SEQ_MASK, SYN | ACK, window, b"", options
        )

    def _on_established(self) -> None:
        self.state = TCPState.ESTABLISHED
        self._timers.retransmit = None
        self._retries = 0
        self._rtt.backoff = 0
        self._events.append(Established())
        if self._fin_seq is not None:
            self.state = TCPState.FIN_WAIT_1

    def _enter_time_wait(self, now: float) -> None:
        self.state = TCPState.TIME_WAIT
        self._timers.retransmit = None
        self._timers.persist = None
        self._timers.time_wait = now + self.config.time_wait
        if self.config.time_wait <= 0:
            self._close()

    def _reset(self, reason: str, *, by_peer: bool) -> None:
        self._events.append(Reset(reason, by_peer))
        self._close()

    def _close(self) -> None:
        if self.state is TCPState.CLOSED:
            return
        self.state = TCPState.CLOSED
        self._timers = _Timers()
        self._sndbuf = bytearray()
        self._ooo.clear()
        self._ack_due = False
        self._events.append(Closed())
