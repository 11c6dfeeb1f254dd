"""The packet loop: reads the TUN under trio, drives `tele.net`'s TCP connections and UDP flows,
and joins each one to a tunnel stream.

```
Stack.serve
 |- reader: wait_readable(fd), then read everything queued (one wakeup, many packets)
 |- timers: one heap of connection deadlines (retransmission, persist, TIME-WAIT, UDP idle)
 |- per TCP connection: dial the tunnel, then accept() (SYN-ACK) or refuse() (RST / ICMP);
 |    '- two directions: tunnel -> send() (waits for Writable), DataReceived -> tunnel (by the
 |       reader itself; a sender task only for what it cannot put on the stream at once)
 |  (none for a connection accepted early, below, while the readers can relay it alone)
 '- per UDP flow: dial a UDP tunnel stream, datagrams both ways until idle
```
A SYN is answered only once the dial succeeded, so an app sees "connection refused" or "no
route to host" at once instead of a connection that dies later. Except (with an `early_opener`)
for a destination whose last dial was accepted within `StackConfig.early_accept` seconds: its
SYN is answered at once and its OPEN sent right after (no round trip through the tunnel first,
and the app's first bytes follow the OPEN), on the bet that it is still open. Such a connection
has no task while the packet reader and the link's reader can relay it alone
(`Stack._open_early`). If that dial is refused after all, the app sees its accepted connection
reset (not "connection refused"), once: the destination is forgotten, and its next SYN waits
for the dial again. An app's reset (or an app that stopped answering) resets the tunnel stream:
the far end gets a reset too, not an end it could take for all there was. Memory is bounded per
connection by its TCP buffers and per UDP flow by a small datagram queue; the tables by
`max_connections` and the UDP table's `max_flows`.
"""

from __future__ import annotations

import errno
import functools
import heapq
import ipaddress
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn

import trio

from tele.net import packet as pk
from tele.net.errors import PacketError
from tele.net.icmp import ICMPv4Header, ICMPv6Header
from tele.net.tcp import ACK, SYN, TCPHeader
from tele.net.tcpstate import (
    Closed,
    DataReceived,
    PeerClosed,
    RefuseReason,
    Reset,
    SynReceived,
    TCPConfig,
    TCPConnection,
    Writable,
)
from tele.net.tunnel import (
    Destination,
    Protocol,
    ResetReason,
)
from tele.net.udp import UDPHeader
from tele.net.udpflows import FiveTuple, UDPFlow, UDPFlowTable
from tele.net.vnet import VNET_HDR_NONE, checksum_settled
from tele.rpc.h2stream import H2Stream
from tele.rpc.tunnel import TunnelError, TunnelRefused, relay_datagrams, reset, reset_reason
from tele.vif.routing import Network

log = logging.getLogger(__name__)

Dialer = Callable[[Destination], Awaitable[trio.abc.HalfCloseableStream]]
"""Opens a tunnel stream to a destination; raises `TunnelError` when refused or unreachable."""

EarlyOpener = Callable[[Destination], H2Stream | None]
"""Opens a tunnel stream to a destination at once, with no schedule point: the OPEN is queued
and the stream returned without waiting for the answer (`tele.rpc.tunnel.open_now`), so a
refusal surfaces as `TunnelRefused` from the stream's later calls. None when that cannot be done
without waiting (no link up, the peer's stream limit): the `Dialer` is used then."""

READ_SIZE: Final = 65_536 + 64
"""Largest packet the device hands over (a 64 KiB GSO super-segment plus its headers)."""
TUNNEL_READ: Final = 256 * 1024
UDP_QUEUE: Final = 64
"""Datagrams held per UDP flow while its tunnel stream is slow; more are dropped (as a full
socket buffer would)."""

_REFUSAL: Final = {
    ResetReason.REFUSED: RefuseReason.REFUSED,
    ResetReason.RESET: RefuseReason.REFUSED,
    ResetReason.UNREACHABLE: RefuseReason.HOST_UNREACHABLE,
    ResetReason.TIMEOUT: RefuseReason.HOST_UNREACHABLE,
    ResetReason.POLICY: RefuseReason.PROHIBITED,
    ResetReason.INTERNAL: RefuseReason.NETWORK_UNREACHABLE,
}


@dataclass(slots=True)
class StackConfig:
    """Limits and timers of the packet loop."""

    subnets: Sequence[Network] = ()
    """Destinations served; packets to anything else are answered with ICMP unreachable."""
    tcp: TCPConfig = field(default_factory=TCPConfig)
    dial_timeout: float = 10.0
    max_connections: int = 16_384
    udp_idle_timeout: float = 60.0
    max_udp_flows: int = 1024
    linger: float = 30.0
    """How long a flow whose TCP connection ended in order may still take to hand the app's
    last bytes and EOF to the tunnel (a far end that stops reading would hold it forever)."""
    early_accept: float = 10.0
    """A SYN to a destination whose dial was accepted this recently is answered before its own
    dial is (needs an early opener; see the module's doc); 0: never."""
    early_destinations: int = 4096
    """How many such destinations are remembered (the oldest are forgotten)."""


@dataclass(slots=True)
class Counters:
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    tcp_connections: int = 0
    udp_flows: int = 0
    refused: int = 0
    dropped: int = 0


FlowKey = tuple[bytes, int, bytes, int]

_NOBODY_WAITS: Final = trio.Event()
"""Never waited on (see `_Tcp`); set, so that setting it is a no-op."""
_NOBODY_WAITS.set()

_READER_SENDS: Final = trio.CancelScope()
"""`_Tcp.relay` of a task-less connection: the packet reader sends, and no task waits (never
entered or cancelled: `Stack._start_sender` starts a task instead)."""


@dataclass(eq=False, slots=True)
class _Tcp:
    """A TCP connection with the runtime state that joins it to its tunnel stream."""

    conn: TCPConnection
    inbound: list[bytes] = field(default_factory=list)  # a deque's first block is ~0.5 KiB
    inbound_bytes: int = 0
    peer_closed: bool = False
    closed: bool = False
    # A flow task checks the connection's state, then makes a fresh Event and waits on it:
    # until it does, a set() has nobody to wake, and one shared event stands in (an Event is
    # three objects, with most connections never waiting for send space).
    wake_inbound: trio.Event = field(default_factory=lambda: _NOBODY_WAITS)
    wake_writable: trio.Event = field(default_factory=lambda: _NOBODY_WAITS)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    deadline: float | None = None
    tunnel: H2Stream | None = None
    """The tunnel stream while the app's bytes may be queued on it by the packet reader
    itself (`Stack._after_input`), instead of waking the flow's task to send them."""
    relay: trio.CancelScope | None = None
    """Set while no task sends app -> tunnel (the packet reader does it): the scope of the
    flow's wait for the tunnel, which the reader cancels to have a sender task started for
    what it cannot do at once (`Stack._start_sender`, `Stack._relay_h2`)."""
    early: bool = False
    """Accepted before its dial was (`StackConfig.early_accept`)."""
    reset: bool = False
    """The app reset the connection (or stopped answering): its stream is reset, not ended, so
    the far end does not take what it got for all there was (`Stack._close_stream`)."""
    taskless: bool = False
    """Relayed with no task of its own (`Stack._open_early`): the packet reader puts the app's
    bytes on the tunnel stream and the link's reader hands the stream's to the connection."""


@dataclass(eq=False, slots=True)
class _Udp:
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Stack:
    """Serves one TUN descriptor (non-blocking) until cancelled."""

    def __init__(
        self,
        fd: int,
        dialer: Dialer,
        *,
        vnet_header: bool,
        config: StackConfig | None = None,
        early_opener: EarlyOpener | None = None,
    ) -> None:
        self.fd = fd
        self.dialer = dialer
        self.early_opener = early_opener
        # (address, port) -> when its last dial was accepted; oldest first (insertion order).
        self._open_recently: dict[tuple[bytes, int], float] = {}
        self.vnet = vnet_header
        self.config = cfg = config or StackConfig()
        self._header = 10 if vnet_header else 0
        self._tcp: dict[FlowKey, _Tcp] = {}
        self._udp: UDPFlowTable[_Udp] = UDPFlowTable(
            idle_timeout=cfg.udp_idle_timeout, max_flows=cfg.max_udp_flows
        )
        self._dirty: set[_Tcp] = set()
        self._eofs: list[_Tcp] = []
        self._opens: list[_Tcp] = []  # accepted early: their OPEN goes after the flush
        self._heap: list[tuple[float, int, _Tcp]] = []
        self._tie = itertools.count()
        self._timer_at = math.inf
        self._timer_scope = trio.CancelScope()  # the timer task sleeps in it until `_timer_at`
        self._nursery: trio.Nursery | None = None
        self._v4, self._v6 = _ranges(cfg.subnets)
        self.counters = Counters()
        self._failed_packets = 0

    def set_subnets(self, subnets: Sequence[Network]) -> None:
        """The routed subnets changed (the cluster's did): answer echo for the new ones."""
        self._v4, self._v6 = _ranges(subnets)

    # --- service --------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timers)
            task_status.started()
            try:
                await self._reader()
            finally:
                # A task-less connection's stream has no task to close it, and the link's
                # reader must not start one once this nursery closes: reset them all now.
                for record in list(self._tcp.values()):
                    if record.taskless:
                        record.reset = True  # abandoned, as the flow tasks' are
                        self._end_taskless(record)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reader(self) -> NoReturn:
        fd = self.fd
        read = os.read
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = trio.current_time()
            # Read all that is queued: one trio wakeup per packet costs a third of the speed.
            for _ in range(4096):
                try:
                    buf = read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                self.counters.packets_in += 1
                self.counters.bytes_in += len(buf)
                try:
                    self._on_packet(buf, now)
                except Exception:  # a bug on one packet drops that packet, not the session
                    self.counters.dropped += 1
                    self._failed_packets += 1
                    if self._failed_packets in (1, 10) or self._failed_packets % 10_000 == 0:
                        log.exception("a packet from the TUN failed (%d so far); dropped",
                                      self._failed_packets)  # fmt: skip
            self._flush()

    # --- packets from the kernel ----------------------------------------------------------

    def _on_packet(self, buf: bytes, now: float) -> None:
        header = self._header
        settled = bool(header) and checksum_settled(buf)
        view = memoryview(buf)[header:] if header else buf
        segment = pk.fast_tcp(view, verify_checksum=not settled)
        if segment is not None:
            record = self._tcp.get((segment.src, segment.sport, segment.dst, segment.dport))
            if record is not None:
                record.conn.receive_view(segment, now)
                self._after_input(record)
                return
        try:
            packet = pk.parse_packet(view, verify_checksum=not settled)
        except PacketError as exc:
            self.counters.dropped += 1
            log.debug("dropping a packet from the TUN: %s", exc)
            return
        transport = packet.transport
        if isinstance(transport, TCPHeader):
            self._on_tcp(packet, transport, now)
        elif isinstance(transport, UDPHeader):
            self._on_udp(packet, view, now)
        elif isinstance(transport, ICMPv4Header | ICMPv6Header) and self._routed(packet.ip.dst):
            # Echo is answered for the routed subnets: the manager gives no per-address view.
            reply = pk.echo_reply_for(packet)
            if reply is not None:
                self._write(reply)

    def _routed(self, address: bytes) -> bool:
        value = int.from_bytes(address, "big")
        ranges = self._v4 if len(address) == 4 else self._v6
        return any(value & mask == network for network, mask in ranges)

    def _on_tcp(self, packet: pk.Packet, tcp: TCPHeader, now: float) -> None:
        key = (packet.ip.src, tcp.sport, packet.ip.dst, tcp.dport)
        record = self._tcp.get(key)
        if record is not None:
            if record.conn.receive_packet(packet, now):
                self._after_input(record)
                return
            # Closed (or TIME-WAIT ended by a new SYN): forget it, maybe open afresh below.
            self._forget(key, record)
        if tcp.flags & (SYN | ACK) != SYN:
            reply = pk.rst_for(packet)
            if reply is not None:
                self._write(reply)
            return
        if not self._routed(packet.ip.dst):
            self._write(
                pk.icmp_unreachable_for(
                    bytes(packet.ip) + bytes(tcp), packet.ip, pk.Unreachable.NETWORK
                )
            )
            return
        conn = TCPConnection(packet, config=self.config.tcp)
        record = _Tcp(conn)
        if len(self._tcp) >= self.config.max_connections:
            log.warning("refusing a connection: %d are open", len(self._tcp))
            conn.events()
            conn.refuse(RefuseReason.REFUSED)
            self._write_all(conn.data_to_send(now))
            return
        self._tcp[key] = record
        self.counters.tcp_connections += 1
        self._after_input(record)

    def _after_input(self, record: _Tcp) -> None:
        """Dispatch the connection's events; its output goes out with the next flush."""
        self._dirty.add(record)
        conn = record.conn
        for event in conn.events():
            if isinstance(event, DataReceived):
                data = event.data
                tunnel = record.tunnel
                if tunnel is not None and not record.inbound:
                    # Nothing queued before these bytes: they go on the tunnel now if its
                    # windows allow, one task step less than waking the flow's sender.
                    sent = tunnel.send_now(data)
                    if sent:
                        conn.consume(sent, trio.current_time())  # its ACK (if any) leaves
                        # with this flush, or with the answer (`TCPConfig.ack_delay`)
                        if sent == len(data):
                            continue
                        data = data[sent:]
                record.inbound.append(data)
                record.inbound_bytes += len(data)
                record.wake_inbound.set()
                if record.relay is not None:
                    self._start_sender(record)
            elif isinstance(event, Writable):
                record.wake_writable.set()
            elif isinstance(event, PeerClosed):
                record.peer_closed = True
                if record.relay is not None:
                    # Queued on the stream after this flush (`_send_eofs`): the packets to the
                    # app first (a SYN-ACK to the app's next connection waited ~0.15 ms for
                    # this one's HALF-CLOSE to be written, bench/vif.py's sequential loop).
                    self._eofs.append(record)
                    continue
                record.wake_inbound.set()
            elif isinstance(event, SynReceived):
                if self._early_ok(conn.dest):
                    record.early = True
                    conn.accept()  # the SYN-ACK leaves with this flush, before the OPEN
                    self._opens.append(record)
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self._tcp_flow, record)
            elif isinstance(event, Reset):
                log.debug("tcp %s: %s", _flow_name(conn), event.reason)
                record.reset = True
                record.scope.cancel()
                if record.taskless:
                    self._end_taskless(record)
            elif isinstance(event, Closed):
                self._forget((*conn.client, *conn.dest), record)

    def _forget(self, key: FlowKey, record: _Tcp) -> None:
        """The TCP connection ended. A reset already cancelled its flow; after an orderly end
        the flow still hands the app's last bytes and its EOF to the tunnel (our FIN went out
        only after the tunnel's EOF, so nothing else is left), within `linger`."""
        if self._tcp.get(key) is record:
            del self._tcp[key]
        if record.taskless:  # both sides ended (or the app reset it): nothing left to relay
            self._end_taskless(record)
        if not record.closed:
            record.closed = True
            record.scope.deadline = min(
                record.scope.deadline, trio.current_time() + self.config.linger
            )
            record.wake_inbound.set()
            record.wake_writable.set()

    # --- output ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write the output of every connection touched since the last flush; re-arm timers;
        then the app EOFs (`_send_eofs`) and early connections' OPENs (`_open_early`) queued
        meanwhile."""
        if self._dirty:
            now = trio.current_time()
            dirty = self._dirty
            self._dirty = set()
            for record in dirty:
                conn = record.conn
                out = conn.data_to_send(now)
                if out:
                    self._write_all(out)
                deadline = conn.next_deadline()
                # Push only an earlier deadline: the retransmission timer moves later with
                # every ACK, and an entry per move would wake the timer task per flush for
                # nothing. An entry that fires early is re-pushed once with the connection's
                # real deadline.
                if deadline is not None and (record.deadline is None or deadline < record.deadline):
                    self._schedule(record, deadline)
        if self._eofs:
            self._send_eofs()
        if self._opens:
            self._open_early()

    def _schedule(self, record: _Tcp, deadline: float) -> None:
        record.deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._tie), record))
        self._wake_timers_at(deadline)

    def _wake_timers_at(self, deadline: float) -> None:
        """An earlier deadline moves the sleeping timer task's own: it is not woken to learn
        of it (a task step and a scheduler pass per new connection)."""
        if deadline < self._timer_at:
            self._timer_at = deadline
            self._timer_scope.deadline = deadline

    def _send_eofs(self) -> None:
        """The app's EOFs seen since the last flush go onto their tunnel streams (HALF-CLOSE)
        from here where they can, else through a sender task (`_start_sender`)."""
        eofs, self._eofs = self._eofs, []
        for record in eofs:
            if record.relay is None:  # a sender task runs (or the flow ended)
                record.wake_inbound.set()
                continue
            tunnel = record.tunnel
            if record.inbound or tunnel is None or not tunnel.send_eof_now(lazy=True):
                self._start_sender(record)
                record.wake_inbound.set()
            elif record.taskless and tunnel.remote_ended:
                self._end_taskless(record)  # both ways ended: its relay is over

    def _write_all(self, packets: list[bytes]) -> None:
        for data in packets:
            self._write(data)

    def _write(self, data: bytes) -> None:
        # Packets built outside a flow encoder (ICMP, RST for strangers, UDP replies) carry no
        # virtio-net header; an IP packet starts with 0x4_/0x6_, a header's flags byte never.
        if self.vnet and data[0] >= 0x40:
            data = VNET_HDR_NONE + data
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            self.counters.dropped += 1  # the app's TCP retransmits; UDP may lose it anyway
            return
        except OSError as exc:
            self.counters.dropped += 1
            log.debug("TUN write failed: %s", exc)
            return
        self.counters.packets_out += 1
        self.counters.bytes_out += len(data)

    def _touch(self, record: _Tcp) -> None:
        """After a call on the connection from a flow task: dispatch events, write output."""
        self._after_input(record)
        self._flush()

    # --- timers ---------------------------------------------------------------------------

    async def _timers(self) -> NoReturn:
        heap = self._heap
        while True:
            # Entries of connections that ended (or were superseded) go now: woken for each as
            # it came due, the task would run once per connection for nothing.
            while heap and (heap[0][2].closed or heap[0][2].deadline != heap[0][0]):
                heapq.heappop(heap)
            at = heap[0][0] if heap else math.inf
            udp_next = self._udp.next_deadline()
            if udp_next is not None:
                at = min(at, udp_next)
            self._timer_at = at
            with trio.CancelScope(deadline=at) as self._timer_scope:
                await trio.sleep_forever()
            self._timer_at = math.inf  # until it sleeps again, nobody needs to move it
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                deadline, _, record = heapq.heappop(heap)
                if record.deadline != deadline or record.closed:
                    continue  # superseded by an earlier push
                record.deadline = None
                real = record.conn.next_deadline()
                if real is None:
                    continue
                if real > now:
                    self._schedule(record, real)
                    continue
                record.conn.on_timer(now)
                self._after_input(record)
            for flow in self._udp.expire(now):
                flow.handle.scope.cancel()
            self._flush()

    # --- TCP flows ------------------------------------------------------------------------

    async def _tcp_flow(self, record: _Tcp) -> None:
        # One connection's failure must never take the whole VIF (its nursery) down.
        try:
            await self._tcp_flow_inner(record)
        except Exception:
            log.exception("tcp %s: failed", _flow_name(record.conn))
            if not record.closed:
                record.conn.abort()
                self._touch(record)

    async def _tcp_flow_inner(self, record: _Tcp) -> None:
        conn = record.conn
        scope = record.scope
        # A task-less connection's stream, which this task takes over (`_resume`).
        stream: trio.abc.HalfCloseableStream | None = record.tunnel
        with scope:
            if stream is None:
                address, port = key = conn.dest
                # The dial's time limit is the connection's own scope's deadline: one cancel
                # scope per connection instead of two (a scope costs a few µs of a connection).
                scope.deadline = trio.current_time() + self.config.dial_timeout
                try:
                    # Not kept in this frame for the connection's life (nor the SYN's event).
                    stream = await self.dialer(
                        Destination(Protocol.TCP, ipaddress.ip_address(address), port)
                    )
                except TunnelError as exc:
                    self._open_recently.pop(key, None)
                    self._refuse(record, exc.reason, exc)
                    return
                scope.deadline = math.inf
                if not record.early:  # (accepted already: `_after_input`)
                    self._remember_open(key)
            if isinstance(stream, H2Stream):
                try:
                    await self._relay(record, stream)
                except BaseException:
                    record.reset = True  # cut short: the far end must not take it for an end
                    raise
                finally:
                    # Not `aclose()`: its extra yield is a wake-up per connection.
                    self._close_stream(record, stream)
            else:
                async with stream:
                    await self._relay(record, stream)
            return
        # Cancelled: by the dial's deadline, else the connection was reset or closed under us
        # (which marked the record closed).
        if not record.closed:
            if stream is None:
                self._refuse(record, ResetReason.TIMEOUT, "no answer in time")
                return
            conn.abort()
            self._touch(record)

    async def _relay(self, record: _Tcp, stream: trio.abc.HalfCloseableStream) -> None:
        """Both directions between the app's connection and its tunnel stream until both end.

        This task relays tunnel -> app (mostly done by the link's reader, see `_tunnel_to_app`).
        App -> tunnel on an h2 stream is the packet reader's (`_after_input`: the app's bytes
        and its EOF go onto the stream from there); a sender task starts only for what the
        reader cannot do at once (no window, a send in progress: `_start_sender`), and after
        the tunnel's EOF this task does what is left itself. Most connections never need a
        second task: one task start and four task steps less per connection.
        """
        if record.closed:
            return
        conn = record.conn
        if not record.early:
            conn.accept()
            self._touch(record)
        clean = False
        try:
            if isinstance(stream, H2Stream):
                await self._relay_h2(record, stream)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._app_to_tunnel, record, stream)
                    await self._tunnel_to_app(record, stream)
            clean = True
        finally:
            record.relay = record.tunnel = None
            if not clean and not record.closed:
                conn.abort()
                self._touch(record)

    async def _relay_h2(self, record: _Tcp, stream: H2Stream) -> None:
        """`_relay` on an h2 stream: in this one task (and no nursery, whose exit is a schedule
        point) while the packet reader puts the app's bytes on the stream; if it wants a
        sender task (`_start_sender`), this task's wait for the tunnel is cut short and the
        relay goes on in a nursery with one."""
        if record.tunnel is not stream or record.relay is not None:
            # Stands for "the reader sends" until a wait's scope. (A task-less connection's
            # task started by `_start_sender` finds None here: it wants a sender at once.)
            record.relay = trio.CancelScope()
        record.tunnel = stream
        self._catch_up(record, stream)  # what the app sent during the dial
        ended = await self._tunnel_to_app(record, stream, alone=True)
        if record.relay is not None:  # no sender wanted: this task goes on
            record.relay = None
            if not stream.local_ended:
                await self._app_to_tunnel(record, stream)
        elif ended:
            await self._app_to_tunnel(record, stream)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._app_to_tunnel, record, stream)
                await self._tunnel_to_app(record, stream)

    def _catch_up(self, record: _Tcp, stream: H2Stream) -> None:
        """Put what the packet reader queued before the stream was there (the app's first
        bytes, its EOF) onto it now, as the reader would have; a sender task if it cannot."""
        if record.inbound:
            data = b"".join(record.inbound)
            sent = stream.send_now(data)
            if sent:
                record.inbound = [data[sent:]] if sent < len(data) else []
                record.inbound_bytes -= sent
                record.conn.consume(sent, trio.current_time())
                self._touch(record)
            if record.inbound:
                self._start_sender(record)
                return
        if record.peer_closed and not stream.send_eof_now():
            self._start_sender(record)

    def _start_sender(self, record: _Tcp) -> None:
        """The packet reader has app bytes (or an EOF) it could not put on the tunnel itself:
        a sender task takes over app -> tunnel for the rest of the connection (`_relay_h2`
        starts it once its task is out of its wait for the tunnel, which this cuts short)."""
        wait = record.relay
        if wait is not None and record.tunnel is not None:
            record.relay = None
            if record.taskless:
                self._resume(record)
            else:
                wait.cancel()

    # --- task-less connections -------------------------------------------------------------

    def _open_early(self) -> None:
        """Open the tunnel streams of the connections accepted early since the last flush
        (after it: their SYN-ACKs went first, so the app is not kept waiting for the OPEN's
        write nor for the far end it wakes).

        Such a connection gets no task: the packet reader puts the app's bytes and EOF on the
        stream (`_after_input`, `_send_eofs`), the link's reader hands the stream's bytes to
        the connection and its end to `_tunnel_ended` (the stream's push mode), and the
        connection's end closes the stream (`_end_taskless`). A task starts (`_resume`) only
        for what these cannot do at once: bytes the connection has no room for, bytes or an
        EOF the stream cannot take now, a refusal, a reset or a broken link. That is a task
        start and two of its steps less for most connections (bench/timeline.py --rows c,
        eight A/B pairs: the daemon's CPU per connection ~60 µs less, the first byte ~70 µs
        sooner, medians).
        When the stream cannot be opened at once, the flow's task dials it as usual."""
        opens, self._opens = self._opens, []
        assert self._nursery is not None and self.early_opener is not None
        for record in opens:
            if record.closed or record.scope.cancel_called:
                continue  # reset by the app already
            stream = None
            if not record.inbound and not record.peer_closed:
                address, port = record.conn.dest
                try:
                    destination = Destination(Protocol.TCP, ipaddress.ip_address(address), port)
                    stream = self.early_opener(destination)
                except Exception:  # (a bug) must not take the packet reader down: its task
                    log.exception("tcp %s: opening its stream failed", _flow_name(record.conn))
            if stream is None:
                self._nursery.start_soon(self._tcp_flow, record)
                continue
            record.tunnel = stream
            record.relay = _READER_SENDS
            record.taskless = True
            stream.push_to(
                functools.partial(self._deliver, record),
                wake=functools.partial(self._resume, record),
                end=functools.partial(self._tunnel_ended, record),
            )

    def _tunnel_ended(self, record: _Tcp) -> bool:
        """A task-less connection's stream ended (all it sent was taken): our FIN follows."""
        if not record.closed:
            record.conn.close()
            self._touch(record)
        stream = record.tunnel
        if record.taskless and stream is not None and stream.local_ended:
            self._end_taskless(record)  # both ways ended: its relay is over
        return True

    def _resume(self, record: _Tcp) -> None:
        """A task-less connection needs a task after all (`_open_early`): its flow task takes
        the stream over where it is (`_relay_h2`); push mode has ended or ends there."""
        if not record.taskless:
            return
        record.taskless = False
        if isinstance(record.tunnel, H2Stream):
            record.tunnel.deliver_to(None)  # the stream's bytes and end wait for the task now
        assert self._nursery is not None
        self._nursery.start_soon(self._tcp_flow, record)

    def _end_taskless(self, record: _Tcp) -> None:
        """A task-less connection's relay is over (both ways ended, or the connection did):
        close its stream, as a flow task does when its relay is over (`_close_stream`)."""
        record.taskless = False
        stream = record.tunnel
        record.tunnel = record.relay = None
        if isinstance(stream, H2Stream):
            stream.deliver_to(None)
            self._close_stream(record, stream)

    @staticmethod
    def _close_stream(record: _Tcp, stream: H2Stream) -> None:
        """The connection's relay is over: END_STREAM if all was read and sent (`close`), a
        reset if not, or if the app reset the connection, or the relay was cut short."""
        if record.reset:
            reset(stream, ResetReason.RESET)
        stream.close()

    def _early_ok(self, key: tuple[bytes, int]) -> bool:
        """May a SYN to `key` be answered before its dial (`StackConfig.early_accept`)?"""
        if self.early_opener is None:
            return False
        seen = self._open_recently.get(key)
        return seen is not None and trio.current_time() - seen <= self.config.early_accept

    def _remember_open(self, key: tuple[bytes, int]) -> None:
        if self.config.early_accept <= 0 or self.early_opener is None:
            return
        recent = self._open_recently
        recent.pop(key, None)
        recent[key] = trio.current_time()
        if len(recent) > self.config.early_destinations:
            del recent[next(iter(recent))]

    def _tunnel_failed(self, record: _Tcp, exc: BaseException) -> None:
        """The tunnel stream broke: reset the app's connection; an early accept the far end
        refused forgets its destination (its next SYN waits for the dial)."""
        if record.early and isinstance(exc, TunnelRefused):
            self._open_recently.pop(record.conn.dest, None)
            self.counters.refused += 1
            log.debug("tcp %s: refused after an early accept: %s", _flow_name(record.conn), exc)
        record.conn.abort()
        self._touch(record)
        record.scope.cancel()

    def _refuse(self, record: _Tcp, reason: ResetReason, why: object) -> None:
        log.debug("tcp %s: dial failed: %s", _flow_name(record.conn), why)
        self.counters.refused += 1
        if record.early:  # accepted already: the app's connection is reset
            if not record.closed:
                record.conn.abort()
                self._touch(record)
            return
        if not record.closed:
            record.conn.refuse(_REFUSAL.get(reason, RefuseReason.REFUSED))
            self._touch(record)

    async def _tunnel_to_app(
        self, record: _Tcp, stream: trio.abc.HalfCloseableStream, *, alone: bool = False
    ) -> bool:
        """Tunnel -> app until the tunnel's end (True), or (`alone`) until a sender task is
        wanted (False): see `_relay_to_app`."""
        if not isinstance(stream, H2Stream):
            return await self._relay_to_app(record, stream)
        # The link's reader hands each DATA frame to the connection itself while this task
        # waits (one task switch less per response); what the connection cannot take at once
        # comes through `receive_some` below, in order.
        stream.deliver_to(functools.partial(self._deliver, record))
        try:
            return await self._relay_to_app(record, stream, alone=alone)
        finally:
            stream.deliver_to(None)

    def _deliver(self, record: _Tcp, data: bytes) -> int:
        """Take what `record`'s connection can of tunnel bytes now; how many it took."""
        if record.closed:
            return 0
        try:
            taken = record.conn.send(data)
        except RuntimeError:  # the connection ended under us: the relay's own path sees it
            return 0
        if taken:
            self._touch(record)
        return taken

    async def _relay_to_app(
        self, record: _Tcp, stream: trio.abc.HalfCloseableStream, *, alone: bool = False
    ) -> bool:
        """Tunnel -> app until the tunnel ended (or failed, or the connection did): True.
        `alone` (the packet reader sends app -> tunnel): False once it wants a sender task
        (`_start_sender` cancels the scope of the wait for the tunnel, `record.relay`)."""
        conn = record.conn
        while True:
            try:
                if alone:
                    if record.relay is None:
                        return False
                    with trio.CancelScope() as wait:
                        record.relay = wait
                        data = await stream.receive_some(TUNNEL_READ)
                    if wait.cancelled_caught:
                        return False
                else:
                    data = await stream.receive_some(TUNNEL_READ)
            except trio.BrokenResourceError as exc:
                log.debug("tcp %s: tunnel reset (%s)", _flow_name(conn), reset_reason(exc).value)
                self._tunnel_failed(record, exc)
                return True
            if record.closed:
                return True
            if not data:
                conn.close()
                self._touch(record)
                return True
            view = memoryview(data)
            while view:
                if record.closed:  # reset or closed by the app while we waited
                    return True
                taken = conn.send(view)
                view = view[taken:]
                self._touch(record)
                if view and not record.closed:
                    record.wake_writable = trio.Event()
                    if conn.send_space == 0:
                        await record.wake_writable.wait()
            # The connection copied the bytes: an idle connection must not keep its last
            # tunnel read (up to TUNNEL_READ bytes) alive while it waits for the next one.
            del data, view

    async def _app_to_tunnel(self, record: _Tcp, stream: trio.abc.HalfCloseableStream) -> None:
        if isinstance(stream, H2Stream):
            record.tunnel = stream
        try:
            await self._send_to_tunnel(record, stream)
        finally:
            record.tunnel = None

    async def _send_to_tunnel(self, record: _Tcp, stream: trio.abc.HalfCloseableStream) -> None:
        conn = record.conn
        while True:
            while not record.inbound and not record.peer_closed and not record.closed:
                record.wake_inbound = trio.Event()
                await record.wake_inbound.wait()
            if record.inbound:
                inbound = record.inbound
                data = inbound[0] if len(inbound) == 1 else b"".join(inbound)
                inbound.clear()
                size = record.inbound_bytes
                record.inbound_bytes = 0
                try:
                    await stream.send_all(data)
                except trio.BrokenResourceError as exc:
                    self._tunnel_failed(record, exc)
                    return
                del data  # not kept alive while this task waits for the app's next bytes
                # Most consumes announce nothing (receiver SWS avoidance): no flush round then.
                if not record.closed and conn.consume(size):
                    self._touch(record)
                continue
            if record.peer_closed:  # also once the connection ended in order: EOF, not reset
                try:
                    await stream.send_eof()
                except trio.BrokenResourceError as exc:
                    self._tunnel_failed(record, exc)
                return
            if record.closed:
                return

    # --- UDP flows ------------------------------------------------------------------------

    def _on_udp(self, packet: pk.Packet, view: memoryview | bytes, now: float) -> None:
        if not self._routed(packet.ip.dst):
            self._write(pk.icmp_unreachable_for(bytes(view), packet.ip, pk.Unreachable.NETWORK))
            return
        key = FiveTuple.of(packet)
        flow = self._udp.outbound(key, len(packet.payload), now)
        if flow is None:
            send, receive = trio.open_memory_channel[bytes](UDP_QUEUE)
            handle = _Udp(send, receive)
            flow, evicted = self._udp.open(key, handle, now)
            if evicted is not None:
                evicted.handle.scope.cancel()
            self.counters.udp_flows += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._udp_flow_guarded, flow, bytes(view))
            deadline = self._udp.next_deadline()
            if deadline is not None:
                self._wake_timers_at(deadline)  # a new idle deadline
            return
        try:
            flow.handle.send.send_nowait(bytes(packet.payload))
        except trio.WouldBlock:
            self.counters.dropped += 1

    async def _udp_flow_guarded(self, flow: UDPFlow[_Udp], first: bytes) -> None:
        try:
            await self._udp_flow(flow, first)
        except Exception:
            log.exception("udp flow %s: failed", flow.key)

    async def _udp_flow(self, flow: UDPFlow[_Udp], first: bytes) -> None:
        key = flow.key
        handle = flow.handle
        destination = Destination(Protocol.UDP, ipaddress.ip_address(key.dst), key.dport)
        first_packet = pk.parse_packet(first, verify_checksum=False)
        handle.send.send_nowait(bytes(first_packet.payload))
        try:
            with handle.scope:
                try:
                    with trio.fail_after(self.config.dial_timeout):
                        stream = await self.dialer(destination)
                except (TunnelError, trio.TooSlowError) as exc:
                    log.debug("udp %s: dial failed: %s", destination, exc)
                    self.counters.refused += 1
                    unreachable = pk.Unreachable.PORT
                    if isinstance(exc, TunnelError) and exc.reason is not ResetReason.REFUSED:
                        unreachable = pk.Unreachable.HOST
                    self._write(pk.icmp_unreachable_for(first, first_packet.ip, unreachable))
                    return
                async with stream:
                    await self._relay_udp(flow, stream)
        finally:
            if self._udp.get(key) is flow:
                self._udp.close(key)

    async def _relay_udp(self, flow: UDPFlow[_Udp], stream: trio.abc.HalfCloseableStream) -> None:
        """Datagrams of the flow both ways until either side ends; the flow table ends an
        idle flow (its scope)."""
        receive = flow.handle.receive

        async def from_app() -> bytes | None:
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                return None

        async def to_app(datagram: bytes) -> None:
            self._udp.inbound(flow.key, len(datagram), trio.current_time())
            self._write(flow.reply(datagram))

        await relay_datagrams(
            stream,
            from_app,
            to_app,
            name=f"udp {flow.key}",
            idle_timeout=None,
            read_size=TUNNEL_READ,
        )


def _ranges(subnets: Sequence[Network]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(network, netmask) as integers, IPv4 and IPv6 apart: a test per SYN without objects."""
    v4 = [(int(n.network_address), int(n.netmask)) for n in subnets if n.version == 4]
    v6 = [(int(n.network_address), int(n.netmask)) for n in subnets if n.version == 6]
    return v4, v6


def _flow_name(conn: TCPConnection) -> str:
    client, cport, dest, dport = conn.flow
    return f"{ipaddress.ip_address(client)}:{cport} -> {ipaddress.ip_address(dest)}:{dport}"
