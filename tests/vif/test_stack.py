"""The packet loop on a packet socketpair standing in for the TUN (no device, no namespace):
the order of answers to a SYN, refusals, and UDP flow expiry, under trio's MockClock."""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing

from tele.net.icmp import ICMPV4_HOST_UNREACHABLE, ICMPv4Header, ICMPv6Header
from tele.net.packet import Packet, encode, parse_packet
from tele.net.tcp import ACK, FIN, PSH, RST, SYN
from tele.net.tcpstate import TCPConfig
from tele.net.tunnel import Accept, Destination, OpenRequest, Protocol, Refuse, ResetReason
from tele.net.udp import UDPHeader
from tele.rpc.h2link import H2Link, LinkSettings
from tele.rpc.h2stream import H2Stream
from tele.rpc.tunnel import TunnelError, dial, open_now
from tele.testing.streams import open_link_pair
from tele.vif.runtime import Stack, StackConfig

from ..net.tcp_script import CLIENT4, DEST4, App, tcp

SUBNETS = [ipaddress.ip_network("10.96.0.0/16")]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def tun() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the kernel's end, the stack's end): one datagram is one packet, as on a TUN."""
    kernel, stack = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.setblocking(False)
    stack.setblocking(False)
    with kernel, stack:
        yield kernel, stack


def pending(kernel: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(kernel.recv(70000))
        except BlockingIOError:
            return out


async def test_syn_is_answered_only_after_the_dial(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    kernel, end = tun
    dialed: list[Destination] = []
    go = trio.Event()
    ours, _theirs = trio.testing.memory_stream_pair()

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        dialed.append(destination)
        await go.wait()
        return ours  # type: ignore[return-value]

    stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS))
    await nursery.start(stack.serve)
    app = App()
    kernel.send(bytes(app.syn(mss=1460)))
    await trio.sleep(3)  # the dial is slow
    assert dialed == [Destination(Protocol.TCP, ipaddress.ip_address(DEST4), 8080)]
    assert pending(kernel) == []  # no SYN-ACK while the dial is open
    go.set()
    await trio.sleep(0.01)
    (synack,) = [parse_packet(p) for p in pending(kernel)]
    assert tcp(synack).flags == SYN | ACK
    assert tcp(synack).ack == app.isn + 1


@pytest.mark.parametrize(
    ("reason", "expect"), [(ResetReason.REFUSED, "rst"), (ResetReason.UNREACHABLE, "icmp")]
)
async def test_failed_dial_is_answered_at_once(
    tun: tuple[socket.socket, socket.socket],
    nursery: trio.Nursery,
    reason: ResetReason,
    expect: str,
) -> None:
    kernel, end = tun

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        raise TunnelError(reason, f"{destination} failed")

    stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS))
    await nursery.start(stack.serve)
    kernel.send(bytes(App().syn()))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)
    (answer,) = [parse_packet(p) for p in pending(kernel)]
    if expect == "rst":
        assert tcp(answer).flags & RST
    else:
        assert isinstance(answer.transport, ICMPv4Header)
        assert answer.transport.code == ICMPV4_HOST_UNREACHABLE
    assert stack.counters.refused == 1
    assert not stack._tcp  # forgotten


async def test_udp_flow_ends_when_idle(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    kernel, end = tun
    streams: list[trio.testing.MemoryReceiveStream] = []

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        assert destination.protocol is Protocol.UDP
        ours, theirs = trio.testing.memory_stream_pair()
        streams.append(theirs.receive_stream)  # type: ignore[arg-type]
        return ours  # type: ignore[return-value]

    config = StackConfig(subnets=SUBNETS, udp_idle_timeout=30)
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=config)
    await nursery.start(stack.serve)
    datagram = encode(CLIENT4, DEST4, UDPHeader(5353, 53, 0), b"question")
    kernel.send(datagram)
    await trio.sleep(1)
    assert len(stack._udp) == 1 and len(streams) == 1
    kernel.send(datagram)  # keeps it alive
    await trio.sleep(29.5)
    assert len(stack._udp) == 1
    await trio.sleep(1)
    assert len(stack._udp) == 0


async def test_app_reset_while_the_tunnel_waits_for_window(
    tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    """The tunnel has more bytes than the app's window takes; the app resets: the flow ends,
    its stream is closed, and the stack still serves the next connection."""
    kernel, end = tun
    broken = trio.Event()

    async def feed(stream: trio.abc.Stream) -> None:
        try:
            await stream.send_all(b"z" * 2_000_000)  # far beyond any window
        except trio.BrokenResourceError:
            broken.set()  # the stack closed its end of the tunnel stream

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        ours, theirs = trio.testing.lockstep_stream_pair()
        nursery.start_soon(feed, theirs)
        return ours  # type: ignore[return-value]

    stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS))
    await nursery.start(stack.serve)
    app = App(window=1000)
    kernel.send(bytes(app.syn(mss=1000)))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)
    (synack,) = [parse_packet(p) for p in pending(kernel)]
    app.rcv_nxt = (tcp(synack).seq + 1) & 0xFFFFFFFF
    kernel.send(bytes(app.packet(ACK)))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)  # data up to the 1000-byte window
    pending(kernel)
    kernel.send(bytes(app.packet(RST)))
    with trio.fail_after(2):
        await broken.wait()
    assert not stack._tcp
    # A new connection is served as usual.
    second = App(sport=40001)
    kernel.send(bytes(second.syn()))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)
    (answer,) = [parse_packet(p) for p in pending(kernel)]
    assert tcp(answer).flags == SYN | ACK


def _silent_dialer() -> tuple[
    Callable[[Destination], Awaitable[trio.abc.HalfCloseableStream]], trio.Event
]:
    """A dialer whose dial never answers, and the event set once it is abandoned."""
    abandoned = trio.Event()

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        try:
            await trio.sleep_forever()
        finally:
            abandoned.set()

    return dialer, abandoned


async def test_dial_without_answer_is_refused_after_the_dial_timeout(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    kernel, end = tun
    dialer, abandoned = _silent_dialer()

    config = StackConfig(subnets=SUBNETS, dial_timeout=5)
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=config)
    await nursery.start(stack.serve)
    kernel.send(bytes(App().syn()))
    await trio.sleep(4.9)
    assert pending(kernel) == [] and not abandoned.is_set()
    await trio.sleep(0.2)
    assert abandoned.is_set()
    (answer,) = [parse_packet(p) for p in pending(kernel)]
    assert isinstance(answer.transport, ICMPv4Header)
    assert answer.transport.code == ICMPV4_HOST_UNREACHABLE
    assert stack.counters.refused == 1
    assert not stack._tcp


async def test_app_reset_during_the_dial_ends_it_without_an_answer(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    kernel, end = tun
    dialer, abandoned = _silent_dialer()

    stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS))
    await nursery.start(stack.serve)
    app = App()
    kernel.send(bytes(app.syn()))
    await trio.sleep(1)
    kernel.send(bytes(app.packet(RST, seq=app.isn + 1, ack=0)))
    await trio.sleep(0.01)
    assert abandoned.is_set()
    await trio.sleep(60)  # long past the dial timeout: nothing is sent for the gone connection
    assert pending(kernel) == []
    assert stack.counters.refused == 0 and not stack._tcp


@pytest.mark.parametrize(
    ("client", "dest", "routed"),
    [
        ("10.0.0.1", "10.96.255.254", True),
        ("10.0.0.1", "10.97.0.1", False),
        ("fd00::1", "fd00:96::1", True),
        ("fd00::1", "fd00:97::1", False),
    ],
)
async def test_only_routed_subnets_are_dialed(
    tun: tuple[socket.socket, socket.socket],
    nursery: trio.Nursery,
    client: str,
    dest: str,
    routed: bool,
) -> None:
    kernel, end = tun
    dialed: list[Destination] = []

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        dialed.append(destination)
        raise TunnelError(ResetReason.REFUSED, "closed port")

    subnets = [*SUBNETS, ipaddress.ip_network("fd00:96::/64")]
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=subnets))
    await nursery.start(stack.serve)
    app = App(client=ipaddress.ip_address(client).packed, dest=ipaddress.ip_address(dest).packed)
    kernel.send(bytes(app.syn()))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)
    (answer,) = [parse_packet(p) for p in pending(kernel)]
    if routed:
        assert dialed == [Destination(Protocol.TCP, ipaddress.ip_address(dest), 8080)]
        assert tcp(answer).flags & RST
    else:
        assert dialed == []
        assert isinstance(answer.transport, ICMPv4Header | ICMPv6Header)
        assert answer.transport.code == 0  # network unreachable / no route


class _OneChunk(trio.abc.HalfCloseableStream):
    """A tunnel stream that delivers one chunk, then nothing more (an idle connection)."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk: bytes | None = chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        chunk, self.chunk = self.chunk, None
        if chunk is None:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        assert chunk is not None
        return chunk

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_an_idle_connection_keeps_no_tunnel_read_alive(
    tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    """Once the connection took a tunnel read into its send buffer, the flow waiting for the
    next read holds no reference to it: 1,000 idle connections must not keep 1,000 reads."""
    kernel, end = tun
    chunk = bytes(3000)
    baseline = sys.getrefcount(chunk)

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        return _OneChunk(chunk)

    stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS))
    await nursery.start(stack.serve)
    app = App()
    kernel.send(bytes(app.syn(mss=1460)))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)
    (synack,) = [parse_packet(p) for p in pending(kernel)]
    app.rcv_nxt = (tcp(synack).seq + 1) & 0xFFFFFFFF
    kernel.send(bytes(app.packet(ACK)))
    received = 0
    with trio.fail_after(2):
        while received < len(chunk):
            await trio.lowlevel.wait_readable(kernel)
            received += sum(len(parse_packet(p).payload) for p in pending(kernel))
    await trio.testing.wait_all_tasks_blocked()
    assert received == len(chunk)
    assert sys.getrefcount(chunk) == baseline


class _SlowFarEnd(trio.abc.HalfCloseableStream):
    """A tunnel stream whose far end takes bytes only once `reading` is set (a send waits
    until then, and a cancelled send delivers nothing), has closed its own side (EOF), and
    records whether our side ended with EOF or was just closed (which a real tunnel turns
    into a reset)."""

    def __init__(self) -> None:
        self.reading = trio.Event()
        self.received = b""
        self.eof = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.reading.wait()
        self.received += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.reading.wait()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self.eof = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_app_bytes_and_eof_reach_a_slow_tunnel_after_the_connection_ended(
    tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    """The app sends its last bytes and FIN while the far end, which already closed its side,
    does not read yet; our FIN is acknowledged and the TCP connection ends in order: the bytes
    and then EOF (not a reset) still reach the far end once it reads."""
    kernel, end = tun
    far = _SlowFarEnd()

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        return far

    # Whichever FIN comes first, the connection ends with the last ACK (no TIME-WAIT to wait).
    config = StackConfig(subnets=SUBNETS, tcp=TCPConfig(time_wait=0))
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=config)
    await nursery.start(stack.serve)
    app = App()
    kernel.send(bytes(app.syn(mss=1460)))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)
    (synack,) = [parse_packet(p) for p in pending(kernel)]
    app.rcv_nxt = (tcp(synack).seq + 1) & 0xFFFFFFFF
    kernel.send(bytes(app.packet(ACK)))
    kernel.send(bytes(app.data(b"last words", ACK | FIN)))
    app.snd_nxt = (app.snd_nxt + 1) & 0xFFFFFFFF  # the FIN's sequence number
    with trio.fail_after(2):
        while True:  # our FIN, after the far end's EOF
            await trio.lowlevel.wait_readable(kernel)
            fins = [p for p in map(parse_packet, pending(kernel)) if tcp(p).flags & FIN]
            if fins:
                break
    app.rcv_nxt = (tcp(fins[0]).seq + 1) & 0xFFFFFFFF
    kernel.send(bytes(app.packet(ACK)))  # acknowledges our FIN: the connection is over
    # A stranger's segment is answered with RST; packets are read in order, so once that
    # answer is here, the ACK before it was taken.
    kernel.send(bytes(App(sport=40001).packet(ACK)))
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(kernel)
    (rst,) = [parse_packet(p) for p in pending(kernel)]
    assert tcp(rst).flags & RST and tcp(rst).dport == 40001
    assert not stack._tcp  # the connection is over, its flow still has the app's bytes
    far.reading.set()
    await trio.testing.wait_all_tasks_blocked()
    assert far.received == b"last words"
    assert far.eof


def _answers(kernel: socket.socket, sport: int) -> list[int]:
    """The flags of what the app on `sport` got (others' SYN-ACKs may be resent meanwhile)."""
    return [tcp(p).flags for p in map(parse_packet, pending(kernel)) if tcp(p).dport == sport]


async def test_a_destination_seen_open_gets_its_syn_answered_before_the_dial(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    kernel, end = tun
    link, incoming = await open_link_pair(nursery)
    opens: list[str] = []
    answering = trio.Event()  # the far end holds its answers to OPENs until set
    refuse = False

    async def far_end() -> None:
        async for stream in incoming:
            nursery.start_soon(answer, stream)

    async def answer(stream: H2Stream) -> None:
        opens.append("early" if OpenRequest.from_headers(stream.request_headers).early else "waits")
        await answering.wait()
        if refuse:
            await stream.send_response(Refuse(ResetReason.REFUSED).to_headers(), end_stream=True)
        else:
            await stream.send_response(Accept().to_headers())

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        return await dial(link, destination, session="s")

    nursery.start_soon(far_end)
    config = StackConfig(subnets=SUBNETS, early_accept=10.0)
    opener = functools.partial(open_now, link, session="s")
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=config, early_opener=opener)
    await nursery.start(stack.serve)

    async def connect(sport: int) -> list[int]:
        """The flags of what the app got for a SYN within 0.5 s (before the far end answers,
        if it holds)."""
        kernel.send(bytes(App(sport=sport).syn(mss=1460)))
        await trio.sleep(0.5)  # the SYN-ACK's retransmission timer is 1 s
        return _answers(kernel, sport)

    # Never seen: the SYN waits for the dial.
    assert await connect(40001) == []
    answering.set()
    await trio.sleep(0.02)
    assert _answers(kernel, 40001) == [SYN | ACK]
    answering = trio.Event()
    # Seen open: answered at once, the far end's answer not awaited.
    assert await connect(40002) == [SYN | ACK]
    assert opens == ["waits", "early"]
    # Only for `early_accept` seconds after the last dial that was awaited.
    await trio.sleep(10)
    assert await connect(40003) == []
    answering.set()
    await trio.sleep(0.02)
    assert _answers(kernel, 40003) == [SYN | ACK]
    # The port closed since: the next early accept is reset once (the app never gets data
    # from a connection that was not there), then the destination waits for its dial again,
    # whose refusal the app gets at once.
    refuse = True
    assert await connect(40004) == [SYN | ACK, RST | ACK]
    assert await connect(40005) == [RST | ACK]
    assert opens == ["waits", "early", "waits", "early", "waits"]
    assert stack.counters.refused == 2


def _broken_opener(destination: Destination) -> H2Stream | None:
    raise RuntimeError("a bug in the opener")


@pytest.mark.parametrize("opener", [lambda _: None, _broken_opener], ids=["none", "raises"])
async def test_an_early_accept_whose_stream_cannot_be_opened_at_once_is_dialed(
    clock: trio.testing.MockClock,
    tun: tuple[socket.socket, socket.socket],
    nursery: trio.Nursery,
    opener: Callable[[Destination], H2Stream | None],
) -> None:
    """No stream at once (no link up, the peer's stream limit; or the opener failed): the
    flow's task dials. The SYN was answered already, so a failed dial resets the app's
    connection; the packet reader goes on."""
    kernel, end = tun
    dialed: list[int] = []

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        dialed.append(destination.port)
        await trio.lowlevel.checkpoint()
        if len(dialed) == 3:
            raise TunnelError(ResetReason.INTERNAL, "no tunnel: the link broke")
        return trio.testing.memory_stream_pair()[0]  # type: ignore[return-value]

    config = StackConfig(subnets=SUBNETS, early_accept=10.0)
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=config, early_opener=opener)
    await nursery.start(stack.serve)
    for sport in (40001, 40002, 40003):
        kernel.send(bytes(App(sport=sport).syn(mss=1460)))
        await trio.sleep(0.5)
        # The first waits for its dial; the others are answered at once, and the last reset
        # when its dial fails: the app never sees data from a tunnel that was not there.
        expected = [SYN | ACK, RST | ACK] if sport == 40003 else [SYN | ACK]
        assert _answers(kernel, sport) == expected
    assert len(dialed) == 3
    assert not stack._open_recently  # the next SYN waits for its dial


class _Early:
    """A stack with early accept on one side of a link pair, and its far end: connections to a
    destination seen open are relayed with no task of their own (`Stack._open_early`)."""

    def __init__(
        self,
        kernel: socket.socket,
        stack: Stack,
        scope: trio.CancelScope,
        link: H2Link,
        incoming: trio.MemoryReceiveChannel[H2Stream],
    ) -> None:
        self.kernel = kernel
        self.stack = stack
        self.scope = scope  # the stack's: cancel it to stop the VIF
        self.link = link
        self.incoming = incoming
        self.first: tuple[App, H2Stream] | None = None  # a connection dialed before its SYN-ACK

    @property
    def tasks(self) -> int:
        """The stack's tasks: the timer task, and a flow task per connection that has one."""
        assert self.stack._nursery is not None
        return len(self.stack._nursery.child_tasks)

    async def connect(self, sport: int, *, early: bool = True) -> tuple[App, H2Stream]:
        """The app's connection, ESTABLISHED, and the far end's stream (accepted)."""
        app = App(sport=sport)
        self.kernel.send(bytes(app.syn(mss=1460)))
        far = await self.incoming.receive()
        assert OpenRequest.from_headers(far.request_headers).early is early
        if not early:
            await far.send_response(Accept().to_headers())
        synack = await self.receive(app)
        assert [tcp(p).flags for p in synack] == [SYN | ACK]
        app.rcv_nxt = (tcp(synack[0]).seq + 1) & 0xFFFFFFFF
        self.kernel.send(bytes(app.packet(ACK)))
        return app, far

    async def receive(self, app: App) -> list[Packet]:
        """The next packets to the app (waits for at least one)."""
        with trio.fail_after(5):
            while True:
                await trio.lowlevel.wait_readable(self.kernel)
                packets = [p for p in map(parse_packet, pending(self.kernel))]
                mine = [p for p in packets if tcp(p).dport == app.sport]
                if mine:
                    return mine

    async def read_to_end(self, app: App) -> bytes:
        """What the app reads up to our FIN, as its kernel would: in order, each ACKed."""
        data = b""
        while True:
            fin = False
            for p in await self.receive(app):
                header = tcp(p)
                if header.flags & SYN or header.seq != app.rcv_nxt:
                    continue  # a resent SYN-ACK, or a segment resent
                data += bytes(p.payload)
                fin = bool(header.flags & FIN)
                app.rcv_nxt = (app.rcv_nxt + len(p.payload) + fin) & 0xFFFFFFFF
            self.kernel.send(bytes(app.packet(ACK)))
            if fin:
                return data


@pytest.fixture
async def early(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> AsyncIterator[_Early]:
    """`_Early` with the destination seen open (a first connection, dialed and accepted)."""
    kernel, end = tun
    link, incoming = await open_link_pair(nursery)

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        return await dial(link, destination, session="s")

    config = StackConfig(
        subnets=SUBNETS, early_accept=60.0, tcp=TCPConfig(time_wait=0, send_buffer=4096)
    )
    opener = functools.partial(open_now, link, session="s")
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=config, early_opener=opener)
    scope = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await stack.serve(task_status=task_status)

    await nursery.start(serve)
    side = _Early(kernel, stack, scope, link, incoming)
    side.first = await side.connect(40001, early=False)
    yield side


async def test_an_early_accepted_connection_is_relayed_with_no_task_of_its_own(
    early: _Early,
) -> None:
    tasks = early.tasks  # the timer task and the first connection's flow task
    app, far = await early.connect(40002)
    early.kernel.send(bytes(app.data(b"ping", ACK | PSH)))
    assert await far.receive_some() == b"ping"
    assert early.tasks == tasks  # none was started for it
    await far.send_all(b"pong")  # (with the far end's ACCEPT: :status 200)
    await far.send_eof()
    assert await early.read_to_end(app) == b"pong"
    assert early.tasks == tasks
    early.kernel.send(bytes(app.packet(ACK | FIN)))
    app.snd_nxt += 1
    assert await far.receive_some() == b""  # the app's EOF
    await trio.testing.wait_all_tasks_blocked()  # its ACK, then (no TIME-WAIT) the end
    assert early.tasks == tasks
    assert list(early.stack._tcp) == [(CLIENT4, 40001, DEST4, 8080)]
    assert early.stack.counters.refused == 0


async def test_a_task_less_connection_whose_app_reads_slowly_gets_a_task_and_every_byte(
    early: _Early,
) -> None:
    """More than the connection can take at once (its send buffer is 4 KiB here): the rest
    waits in the stream for a task, which relays it on in order."""
    app, far = await early.connect(40002)
    sent = b"".join(i.to_bytes(4, "big") for i in range(10_000))  # 40 KB
    await far.send_all(sent)
    await far.send_eof()
    assert await early.read_to_end(app) == sent


async def test_a_connection_reset_by_the_app_or_left_at_the_end_resets_its_stream(
    early: _Early,
) -> None:
    """Not END_STREAM, which the far end would take for all the app had to send."""
    app, far = await early.connect(40002)
    _other, far_other = await early.connect(40003)
    early.kernel.send(bytes(app.packet(RST | ACK)))
    with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
        await far.receive_some()
    assert (CLIENT4, 40002, DEST4, 8080) not in early.stack._tcp
    # The same for a connection with a flow task (dialed before its SYN was answered).
    assert early.first is not None
    first, far_first = early.first
    early.kernel.send(bytes(first.packet(RST | ACK)))
    with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
        await far_first.receive_some()
    # The VIF stops: the streams of its task-less connections are reset too.
    early.scope.cancel()
    with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
        await far_other.receive_some()


async def test_a_deadline_earlier_than_the_one_the_timers_sleep_for_fires_on_time(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    """The timer task is not woken to learn of an earlier deadline (its sleep's deadline moves):
    a SYN-ACK the app never acknowledges is still resent after the initial RTO (1 s) while the
    only other deadline is a UDP flow's idle end 30 s away."""
    kernel, end = tun

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        ours, _theirs = trio.testing.memory_stream_pair()
        return ours  # type: ignore[return-value]

    config = StackConfig(subnets=SUBNETS, udp_idle_timeout=30)
    stack = Stack(end.fileno(), dialer, vnet_header=False, config=config)
    await nursery.start(stack.serve)
    kernel.send(encode(CLIENT4, DEST4, UDPHeader(5353, 53, 0), b"question"))
    await trio.sleep(1)  # the timer task sleeps until the flow's idle end
    app = App()
    kernel.send(bytes(app.syn(mss=1460)))
    await trio.sleep(0.1)
    (synack,) = [parse_packet(p) for p in pending(kernel)]
    assert tcp(synack).flags == SYN | ACK
    await trio.sleep(1.0)
    (again,) = [parse_packet(p) for p in pending(kernel)]
    assert tcp(again).flags == SYN | ACK and tcp(again).seq == tcp(synack).seq
    assert len(stack._udp) == 1  # and the flow's own deadline is still ahead


async def test_app_bytes_beyond_the_tunnels_window_get_a_sender_and_keep_their_order(
    clock: trio.testing.MockClock, tun: tuple[socket.socket, socket.socket], nursery: trio.Nursery
) -> None:
    """The packet reader puts the app's bytes on the stream while the window allows; beyond
    it the flow's task leaves its wait for the tunnel and relays on with a sender task: every
    byte arrives once, in order, and the tunnel's answer still reaches the app."""
    kernel, end = tun
    link, incoming = await open_link_pair(nursery, settings=LinkSettings(stream_window=1000))

    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        return await dial(link, destination, session="s")

    stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS))
    await nursery.start(stack.serve)
    app = App(sport=40001)
    kernel.send(bytes(app.syn(mss=1460)))
    server = await incoming.receive()
    await server.send_response(Accept().to_headers())
    await trio.sleep(0.01)
    (synack,) = [parse_packet(p) for p in pending(kernel)]
    app.rcv_nxt = tcp(synack).seq + 1
    sent = b"".join(i.to_bytes(2, "big") for i in range(2000))  # 4,000 bytes, 4 windows
    for start in range(0, len(sent), 500):
        kernel.send(bytes(app.data(sent[start : start + 500], flags=ACK | PSH)))
    await trio.sleep(0.01)
    received = b""
    with trio.fail_after(5):
        while len(received) < len(sent):
            received += await server.receive_some()  # returns the window's credit as it reads
    assert received == sent
    await server.send_all(b"got it")
    await trio.sleep(0.01)
    assert b"got it" in [bytes(p.payload) for p in map(parse_packet, pending(kernel))]


async def test_a_task_less_connection_whose_link_breaks_is_reset(early: _Early) -> None:
    """The link's failure wakes the connection's stream: a task takes over and resets the
    app's connection (an app never waits on a tunnel that is gone)."""
    app, far = await early.connect(40002)
    early.kernel.send(bytes(app.data(b"request", ACK | PSH)))
    assert await far.receive_some() == b"request"  # the app now waits for the answer
    early.link.close("the manager went away")
    with trio.fail_after(5):
        while not any(tcp(p).flags & RST for p in await early.receive(app)):
            pass  # (the request's ACK may come first)
    await trio.testing.wait_all_tasks_blocked()
    assert (CLIENT4, 40002, DEST4, 8080) not in early.stack._tcp
