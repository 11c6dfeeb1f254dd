"""Property: whatever packets reach the TUN (any bytes, mangled TCP/UDP/ICMP), the packet loop
answers or drops each and keeps running: a SYN after them is still answered."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tele.net.packet import parse_packet
from tele.net.tcp import RST, TCPHeader
from tele.net.tunnel import Destination, ResetReason
from tele.rpc.tunnel import TunnelError
from tele.vif.runtime import Stack, StackConfig

from ..net.tcp_script import App
from .test_stack import SUBNETS, pending

valid = [bytes(App().syn(mss=1460)), bytes(App().syn())]


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(st.sampled_from(valid)))
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(packet) - 1))
        packet[where] = draw(st.integers(0, 255))
    return bytes(packet[: draw(st.integers(0, len(packet)))])


packets = st.lists(st.one_of(st.binary(max_size=120), mangled()), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets)
def test_any_packets_are_answered_or_dropped_and_the_loop_goes_on(sent: list[bytes]) -> None:
    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        raise TunnelError(ResetReason.REFUSED, f"{destination} refused")

    async def main() -> None:
        kernel, end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with kernel, end:
            kernel.setblocking(False)
            end.setblocking(False)
            async with trio.open_nursery() as nursery:
                stack = Stack(
                    end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS)
                )
                await nursery.start(stack.serve)
                for packet in sent:
                    if packet:
                        kernel.send(packet)
                await trio.testing.wait_all_tasks_blocked()
                pending(kernel)
                kernel.send(valid[0])
                with trio.fail_after(5):
                    while True:
                        await trio.lowlevel.wait_readable(kernel)
                        answers = [parse_packet(p) for p in pending(kernel)]
                        if any(
                            a.transport.flags & RST
                            for a in answers
                            if isinstance(a.transport, TCPHeader)
                        ):
                            break
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_bug_on_one_packet_drops_it_and_logs_its_traceback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def dialer(destination: Destination) -> trio.abc.HalfCloseableStream:
        raise TunnelError(ResetReason.REFUSED, f"{destination} refused")

    kernel, end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with kernel, end:
        kernel.setblocking(False)
        end.setblocking(False)
        stack = Stack(end.fileno(), dialer, vnet_header=False, config=StackConfig(subnets=SUBNETS))
        original = Stack._on_tcp
        calls = 0

        def buggy(self: Stack, *args: object) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise TypeError("a bug")
            original(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(Stack, "_on_tcp", buggy)
        await nursery.start(stack.serve)
        kernel.send(valid[0])
        kernel.send(valid[1])
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(kernel)
        answers = [parse_packet(p).transport for p in pending(kernel)]
        assert any(isinstance(a, TCPHeader) and a.flags & RST for a in answers)
        assert stack.counters.dropped == 1
        assert any(r.exc_info and r.exc_info[0] is TypeError for r in caplog.records)
        nursery.cancel_scope.cancel()
