"""Scripted tests of the TCP state machine with plain bytes (no trio, no sockets)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.net.icmp import ICMPV4_HOST_UNREACHABLE, ICMPV4_UNREACHABLE, ICMPv4Header
from tele.net.packet import fast_tcp, parse_packet, rst_for
from tele.net.tcp import ACK, FIN, PSH, RST, SYN, URG
from tele.net.tcpstate import (
    Closed,
    DataReceived,
    Established,
    PeerClosed,
    RefuseReason,
    Reset,
    SynReceived,
    TCPConfig,
    TCPConnection,
    TCPState,
    Writable,
    seq_le,
    seq_lt,
    unwrap,
)
from tele.net.vnet import GSO_TCPV4, VirtioNetHeader

from .tcp_script import CLIENT4, CLIENT6, DEST4, DEST6, MASK, App, establish, parse_all, tcp

# --- sequence arithmetic ------------------------------------------------------------------


def test_sequence_helpers_wrap() -> None:
    assert seq_lt(0xFFFFFFF0, 0x10)
    assert not seq_lt(0x10, 0xFFFFFFF0)
    assert seq_le(5, 5) and not seq_lt(5, 5)
    assert unwrap(0x10, 0xFFFFFFF0) == 0x1_0000_0010
    assert unwrap(0xFFFFFFF0, 0x1_0000_0010) == 0xFFFFFFF0
    assert unwrap(7, 7) == 7


@given(st.integers(0, 2**40), st.integers(-(2**31) + 1, 2**31 - 1))
def test_unwrap_recovers_nearby_numbers(reference: int, delta: int) -> None:
    absolute = reference + delta
    assert unwrap(absolute & MASK, reference) == absolute


# --- handshake ----------------------------------------------------------------------------


def test_handshake_negotiates_mss_and_window_scale() -> None:
    app = App()
    syn = app.syn(mss=1460, wscale=7, sack_permitted=True, timestamps=(1, 0))
    conn = TCPConnection(syn, config=TCPConfig(receive_buffer=1 << 20))
    assert conn.events() == [SynReceived(CLIENT4, 40000, DEST4, 8080)]
    assert conn.data_to_send(0.0) == []  # nothing until the runtime's dial succeeded
    conn.accept(iss=5000)
    (syn_ack,) = parse_all(conn.data_to_send(0.0))
    header = tcp(syn_ack)
    assert (syn_ack.ip.src, syn_ack.ip.dst) == (DEST4, CLIENT4)
    assert (header.sport, header.dport) == (8080, 40000)
    assert header.flags == SYN | ACK
    assert (header.seq, header.ack) == (5000, 1001)
    assert header.mss == 1460
    assert header.wscale == 5  # 1 MiB >> 5 is the first to fit the 16-bit field
    assert not header.sack_permitted and header.timestamps is None
    assert header.window == 65535  # a SYN's window is never scaled
    assert conn.state is TCPState.SYN_RECEIVED
    app.rcv_nxt = 5001
    conn.receive_packet(app.packet(ACK, window=100), 0.01)
    assert conn.events() == [Established()]
    assert conn.state is TCPState.ESTABLISHED
    assert conn.snd_wnd == 100 << 7
    assert conn.mss == 1460


def test_no_window_scale_when_the_app_offers_none() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(receive_buffer=1 << 20), mss=1000)
    assert conn.rcv_wscale == 0 and conn.snd_wscale == 0
    assert conn.mss == 1000
    conn.receive_packet(app.data(b"x"), 0.1)
    (ack,) = parse_all(conn.data_to_send(0.1))
    assert tcp(ack).window == 65535  # capped, unscaled


def test_mss_defaults_to_536_without_the_option() -> None:
    conn = TCPConnection(App().syn(wscale=2))
    assert conn.mss == 536


def test_retransmitted_syn_is_ignored_until_accept_then_answered() -> None:
    app = App()
    conn = TCPConnection(app.syn(mss=1460))
    assert conn.receive_packet(app.syn(mss=1460), 0.5)
    assert conn.data_to_send(0.5) == []
    conn.accept(iss=1)
    assert len(conn.data_to_send(0.6)) == 1
    conn.receive_packet(app.syn(mss=1460), 0.7)  # our SYN-ACK was lost
    (again,) = parse_all(conn.data_to_send(0.7))
    assert tcp(again).flags == SYN | ACK and tcp(again).seq == 1


def test_syn_ack_is_retransmitted_with_back_off_then_given_up() -> None:
    app = App()
    conn = TCPConnection(app.syn(mss=1460), config=TCPConfig(max_retransmissions=2))
    conn.accept(iss=1)
    conn.data_to_send(0.0)
    assert conn.next_deadline() == 1.0
    conn.on_timer(1.0)
    (again,) = parse_all(conn.data_to_send(1.0))
    assert tcp(again).flags == SYN | ACK
    assert conn.next_deadline() == 3.0
    conn.on_timer(3.0)
    conn.data_to_send(3.0)
    assert conn.next_deadline() == 7.0
    conn.on_timer(7.0)
    (rst,) = parse_all(conn.data_to_send(7.0))
    assert tcp(rst).flags & RST
    events = conn.events()
    assert isinstance(events[-2], Reset) and not events[-2].by_peer
    assert events[-1] == Closed()


def test_refused_syn_gets_rst_at_once() -> None:
    app = App()
    conn = TCPConnection(app.syn(mss=1460))
    conn.events()
    conn.refuse(RefuseReason.REFUSED)
    (rst,) = parse_all(conn.data_to_send(0.0))
    assert (rst.ip.src, rst.ip.dst) == (DEST4, CLIENT4)
    assert tcp(rst).flags == RST | ACK
    assert tcp(rst).ack == 1001
    assert conn.events() == [Closed()]
    assert conn.state is TCPState.CLOSED
    assert conn.next_deadline() is None
    assert not conn.receive_packet(app.packet(ACK), 0.1)


def test_unreachable_destination_gets_icmp_quoting_the_syn() -> None:
    app = App()
    syn = app.syn(mss=1460)
    conn = TCPConnection(syn)
    conn.refuse(RefuseReason.HOST_UNREACHABLE)
    (error,) = parse_all(conn.data_to_send(0.0))
    assert isinstance(error.transport, ICMPv4Header)
    assert (error.transport.type, error.transport.code) == (
        ICMPV4_UNREACHABLE,
        ICMPV4_HOST_UNREACHABLE,
    )
    assert (error.ip.src, error.ip.dst) == (DEST4, CLIENT4)
    assert parse_packet(bytes(error.payload)) == syn
    assert conn.events()[-1] == Closed()


def test_app_reset_while_dialing() -> None:
    app = App()
    conn = TCPConnection(app.syn())
    conn.receive_packet(app.packet(RST, seq=1001, ack=0), 0.2)
    events = conn.events()
    assert isinstance(events[1], Reset) and events[1].by_peer
    assert events[2] == Closed()


def test_bad_ack_in_syn_received_gets_rst() -> None:
    app = App()
    conn = TCPConnection(app.syn())
    conn.accept(iss=5000)
    conn.data_to_send(0.0)
    conn.receive_packet(app.packet(ACK, ack=4242), 0.1)
    (rst,) = parse_all(conn.data_to_send(0.1))
    assert (tcp(rst).flags, tcp(rst).seq) == (RST, 4242)
    assert conn.state is TCPState.SYN_RECEIVED


def test_close_before_the_handshake_completes_sends_fin_after_it() -> None:
    app = App()
    conn = TCPConnection(app.syn(mss=1460))
    conn.accept(iss=5000)
    conn.data_to_send(0.0)
    conn.send(b"early")
    conn.close()  # the tunnel stream already ended
    assert conn.state is TCPState.SYN_RECEIVED
    app.rcv_nxt = 5001
    conn.receive_packet(app.packet(ACK), 0.1)
    assert conn.state is TCPState.FIN_WAIT_1
    (segment,) = parse_all(conn.data_to_send(0.1))
    assert tcp(segment).flags == ACK | PSH | FIN and bytes(segment.payload) == b"early"


def test_misuse_is_refused() -> None:
    app = App()
    conn = TCPConnection(app.syn())
    with pytest.raises(RuntimeError):
        conn.send(b"x")  # before accept()
    conn.accept(iss=1)
    with pytest.raises(RuntimeError):
        conn.accept()
    with pytest.raises(RuntimeError):
        conn.refuse()
    with pytest.raises(ValueError):
        TCPConnection(app.packet(ACK))  # not a SYN
    with pytest.raises(ValueError):
        TCPConfig(gso=True)
    conn.close()
    with pytest.raises(RuntimeError):
        conn.send(b"after close")


def test_abort_while_dialing_refuses() -> None:
    app = App()
    conn = TCPConnection(app.syn())
    conn.abort()
    (rst,) = parse_all(conn.data_to_send(0.0))
    assert tcp(rst).flags == RST | ACK and tcp(rst).ack == 1001
    conn.abort()  # idempotent
    assert conn.events()[-1] == Closed()


# --- data ---------------------------------------------------------------------------------


def test_data_path_through_fast_tcp() -> None:
    app = App(client=CLIENT6, dest=DEST6)
    conn = establish(app)
    wire = app._encoder.segment(app.snd_nxt, app.rcv_nxt, ACK | PSH, 1000, b"fast path")
    view = fast_tcp(wire)
    assert view is not None
    assert view[:4] == conn.flow  # the runtime's table key
    assert conn.receive_view(view, 0.1)
    assert conn.events() == [DataReceived(b"fast path")]


def test_data_from_the_app_is_delivered_and_acked() -> None:
    app = App()
    conn = establish(app)
    conn.receive_packet(app.data(b"hello ", ACK), 0.1)
    conn.receive_packet(app.data(b"world", ACK | PSH), 0.1)
    assert conn.events() == [DataReceived(b"hello "), DataReceived(b"world")]
    (ack,) = parse_all(conn.data_to_send(0.1))  # one ACK for the batch
    assert tcp(ack).flags == ACK
    assert tcp(ack).ack == app.snd_nxt
    assert conn.unconsumed == 11


def test_data_to_the_app_is_segmented_by_mss_and_window() -> None:
    app = App()
    conn = establish(app, mss=1000, wscale=0)
    conn.receive_packet(app.packet(ACK, window=2500), 0.0)
    assert conn.send(bytes(range(256)) * 20) == 5120
    segments = parse_all(conn.data_to_send(0.1))
    assert [len(s.payload) for s in segments] == [1000, 1000]  # 500 left < MSS: SWS rule
    assert [tcp(s).seq for s in segments] == [5001, 6001]
    assert all(tcp(s).ack == app.snd_nxt for s in segments)
    app_buffer = b"".join(bytes(s.payload) for s in segments)
    conn.receive_packet(app.packet(ACK, ack=7001, window=5000), 0.2)
    segments = parse_all(conn.data_to_send(0.2))
    assert [len(s.payload) for s in segments] == [1000, 1000, 1000, 120]
    assert tcp(segments[-1]).flags == ACK | PSH
    app_buffer += b"".join(bytes(s.payload) for s in segments)
    assert app_buffer == bytes(range(256)) * 20


def test_out_of_order_segments_are_reassembled() -> None:
    app = App()
    conn = establish(app)
    first = app.data(b"A" * 100)
    second = app.data(b"B" * 100)
    third = app.data(b"C" * 50, ACK | FIN)
    conn.receive_packet(third, 0.1)
    conn.receive_packet(second, 0.1)
    assert conn.events() == []
    (dup_ack,) = parse_all(conn.data_to_send(0.1))
    assert tcp(dup_ack).ack == (app.isn + 1) & MASK  # still waiting for the hole
    conn.receive_packet(first, 0.2)
    assert conn.events() == [DataReceived(b"A" * 100 + b"B" * 100 + b"C" * 50), PeerClosed()]
    (ack,) = parse_all(conn.data_to_send(0.2))
    assert tcp(ack).ack == (app.snd_nxt + 1) & MASK  # the FIN counts
    assert conn.state is TCPState.CLOSE_WAIT


def test_duplicate_and_overlapping_segments() -> None:
    app = App()
    conn = establish(app)
    seg = app.data(b"0123456789")
    conn.receive_packet(seg, 0.1)
    conn.receive_packet(seg, 0.1)  # exact duplicate: acked, not delivered again
    overlap = app.packet(ACK, b"56789abcde", seq=(app.snd_nxt - 5) & MASK)
    conn.receive_packet(overlap, 0.1)
    assert conn.events() == [DataReceived(b"0123456789"), DataReceived(b"abcde")]
    acks = parse_all(conn.data_to_send(0.1))
    assert tcp(acks[-1]).ack == (app.snd_nxt + 5) & MASK


def test_segment_spanning_the_whole_window_is_trimmed_both_ends() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(receive_buffer=4000), wscale=0)
    conn.receive_packet(app.data(b"0123456789"), 0.1)
    conn.consume(10)
    conn.events()
    conn.data_to_send(0.1)
    big = bytes(range(256)) * 20  # starts 10 bytes back, ends far beyond the window
    conn.receive_packet(app.packet(ACK, b"0123456789" + big, seq=app.snd_nxt - 10), 0.2)
    assert conn.events() == [DataReceived(big[:4000])]


def test_receive_window_closes_when_full_and_opens_on_consume() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(receive_buffer=4000), mss=1460, wscale=0)
    for chunk in (b"a" * 1460, b"b" * 1460, b"c" * 1080):
        conn.receive_packet(app.data(chunk), 0.1)
    assert sum(len(e.data) for e in conn.events() if isinstance(e, DataReceived)) == 4000
    (ack,) = parse_all(conn.data_to_send(0.1))
    assert tcp(ack).window == 0
    # Beyond the window: not delivered, answered with the closed window.
    conn.receive_packet(app.packet(ACK, b"x"), 0.2)
    assert conn.events() == []
    (ack,) = parse_all(conn.data_to_send(0.2))
    assert (tcp(ack).window, tcp(ack).ack) == (0, app.snd_nxt)
    assert not conn.consume(100)  # too small to announce (receiver SWS avoidance)
    assert conn.data_to_send(0.3) == []
    assert conn.consume(3900)
    (update,) = parse_all(conn.data_to_send(0.3))
    assert tcp(update).window == 4000
    conn.receive_packet(app.data(b"x"), 0.4)
    assert conn.events() == [DataReceived(b"x")]
    with pytest.raises(ValueError):
        conn.consume(2)


def test_zero_window_probe_from_the_app_is_answered() -> None:
    app = App()
    conn = establish(app)
    probe = app.packet(ACK, seq=(app.snd_nxt - 1) & MASK)
    conn.receive_packet(probe, 0.1)
    (ack,) = parse_all(conn.data_to_send(0.1))
    assert tcp(ack).ack == app.snd_nxt
    assert tcp(ack).window > 0


def test_we_probe_a_zero_window() -> None:
    app = App()
    conn = establish(app, wscale=0)  # handshake RTT 0: the RTO is min_rto, 0.2 s
    conn.receive_packet(app.packet(ACK, window=0), 0.0)
    conn.send(b"waiting")
    assert conn.data_to_send(0.0) == []
    deadline = conn.next_deadline()
    assert deadline == pytest.approx(0.2)
    conn.on_timer(0.2)
    (probe,) = parse_all(conn.data_to_send(0.2))
    assert tcp(probe).seq == 5000 and not probe.payload  # one below SND.UNA
    assert conn.next_deadline() == pytest.approx(0.6)  # backed off
    conn.receive_packet(app.packet(ACK, window=1000), 0.5)
    (data,) = parse_all(conn.data_to_send(0.5))
    assert bytes(data.payload) == b"waiting"


def test_send_buffer_is_bounded_and_reports_space() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(send_buffer=3000))
    assert conn.send(b"x" * 5000) == 3000
    assert conn.send(b"y") == 0
    segments = parse_all(conn.data_to_send(0.0))
    assert sum(len(s.payload) for s in segments) == 3000
    conn.receive_packet(app.packet(ACK, ack=5001 + 2000), 0.01)
    assert conn.events() == [Writable(2000)]
    assert conn.send(b"z" * 2500) == 2000


def test_first_rtt_sample_comes_from_the_handshake() -> None:
    app = App()
    conn = TCPConnection(app.syn(mss=1460))
    conn.accept(iss=5000)
    conn.data_to_send(0.0)
    assert conn.rto == 1.0  # RFC 6298's initial RTO
    app.rcv_nxt = 5001
    conn.receive_packet(app.packet(ACK), 0.1)
    assert conn.srtt == pytest.approx(0.1)
    assert conn.rto == pytest.approx(0.1 + 4 * 0.05)


def test_retransmission_after_rto_with_back_off() -> None:
    app = App()
    conn = establish(app)  # handshake RTT 0: the RTO is min_rto, 0.2 s
    conn.send(b"important")
    (first,) = parse_all(conn.data_to_send(0.0))
    assert conn.next_deadline() == pytest.approx(0.2)
    assert conn.data_to_send(0.1) == []
    conn.on_timer(0.2)
    (again,) = parse_all(conn.data_to_send(0.2))
    assert (tcp(again).seq, bytes(again.payload)) == (tcp(first).seq, b"important")
    deadline = conn.next_deadline()
    assert deadline == pytest.approx(0.6)  # doubled
    conn.on_timer(deadline)
    parse_all(conn.data_to_send(deadline))
    assert conn.next_deadline() == pytest.approx(1.4)  # doubled again
    conn.receive_packet(app.packet(ACK, ack=5001 + 9), 1.5)
    assert conn.next_deadline() is None
    assert conn.srtt == 0.0  # Karn: no sample from a retransmitted segment
    assert conn.rto == pytest.approx(0.2)  # back-off ends with new data acknowledged
    conn.send(b"more")
    conn.data_to_send(2.0)
    conn.receive_packet(app.packet(ACK, ack=5001 + 13), 2.05)
    assert conn.srtt == pytest.approx(0.125 * 0.05)


def test_retransmission_gives_up_with_reset() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(max_retransmissions=1))
    conn.send(b"lost")
    conn.data_to_send(0.0)
    conn.on_timer(1.0)
    conn.data_to_send(1.0)
    conn.on_timer(3.0)
    (rst,) = parse_all(conn.data_to_send(3.0))
    assert tcp(rst).flags == RST | ACK
    events = conn.events()
    assert isinstance(events[0], Reset) and not events[0].by_peer
    assert events[1] == Closed()


def test_fast_retransmit_after_three_duplicate_acks() -> None:
    app = App()
    conn = establish(app, mss=1000)
    conn.send(b"a" * 1000 + b"b" * 1000 + b"c" * 1000 + b"d" * 1000)
    assert len(conn.data_to_send(0.0)) == 4
    for _ in range(3):
        conn.receive_packet(app.packet(ACK, ack=5001), 0.01)
    (resent,) = parse_all(conn.data_to_send(0.01))  # only the segment at the hole
    assert tcp(resent).seq == 5001 and bytes(resent.payload) == b"a" * 1000
    conn.receive_packet(app.packet(ACK, ack=5001 + 4000), 0.02)
    assert conn.next_deadline() is None


def test_window_closed_during_retransmission_falls_back_to_probing() -> None:
    app = App()
    conn = establish(app, wscale=0)
    conn.send(b"x" * 100)
    conn.data_to_send(0.0)
    conn.receive_packet(app.packet(ACK, ack=5001, window=0), 0.1)  # nothing acked, window shut
    conn.on_timer(0.2)
    assert conn.data_to_send(0.2) == []  # go-back-N, but the window allows nothing
    deadline = conn.next_deadline()
    assert deadline == pytest.approx(0.6)  # the persist timer keeps it alive
    conn.on_timer(deadline)
    (probe,) = parse_all(conn.data_to_send(deadline))
    assert tcp(probe).seq == 5000
    conn.receive_packet(app.packet(ACK, ack=5001, window=1000), 0.7)
    (data,) = parse_all(conn.data_to_send(0.7))
    assert bytes(data.payload) == b"x" * 100


def test_small_window_is_used_after_the_persist_timeout() -> None:
    app = App()
    conn = establish(app, wscale=0)
    conn.receive_packet(app.packet(ACK, window=500), 0.0)
    conn.send(b"y" * 3000)
    assert conn.data_to_send(0.0) == []  # 500 < MSS and < half the largest window: wait
    conn.on_timer(conn.next_deadline() or 0.0)
    (segment,) = parse_all(conn.data_to_send(1.0))
    assert len(segment.payload) == 500


# --- closing ------------------------------------------------------------------------------


def test_app_closes_first_then_we_finish_sending() -> None:
    app = App()
    conn = establish(app)
    conn.receive_packet(app.data(b"request", ACK | FIN), 0.1)
    assert conn.events() == [DataReceived(b"request"), PeerClosed()]
    assert conn.state is TCPState.CLOSE_WAIT
    parse_all(conn.data_to_send(0.1))
    conn.send(b"response")  # half-close: we can still send
    conn.close()
    assert conn.state is TCPState.LAST_ACK
    (data,) = parse_all(conn.data_to_send(0.2))
    assert tcp(data).flags == ACK | PSH | FIN
    assert bytes(data.payload) == b"response"
    assert tcp(data).ack == (app.snd_nxt + 1) & MASK
    conn.receive_packet(app.packet(ACK, seq=app.snd_nxt + 1, ack=5001 + 9), 0.3)
    assert conn.events() == [Closed()]
    assert conn.state is TCPState.CLOSED


def test_the_ack_of_a_lone_fin_leaves_with_our_fin_or_after_the_delay() -> None:
    # Our FIN follows within the delay: one packet acknowledges the app's FIN and ends ours.
    app = App()
    conn = establish(app, config=TCPConfig(fin_ack_delay=0.04))
    conn.receive_packet(app.packet(ACK | FIN), 0.1)
    assert conn.events() == [PeerClosed()]
    assert conn.data_to_send(0.1) == []
    assert conn.next_deadline() == pytest.approx(0.14)
    conn.close()
    (fin,) = parse_all(conn.data_to_send(0.12))
    assert tcp(fin).flags == ACK | FIN and tcp(fin).ack == (app.snd_nxt + 1) & MASK
    assert conn.next_deadline() != pytest.approx(0.14)  # only the FIN's retransmission
    # No FIN of ours within the delay: the ACK goes alone when it runs out.
    app = App()
    conn = establish(app, config=TCPConfig(fin_ack_delay=0.04))
    conn.receive_packet(app.packet(ACK | FIN), 0.1)
    conn.on_timer(0.12)
    assert conn.data_to_send(0.12) == []
    conn.on_timer(0.14)
    (ack,) = parse_all(conn.data_to_send(0.14))
    assert tcp(ack).flags == ACK and tcp(ack).ack == (app.snd_nxt + 1) & MASK
    # A FIN with data, or a resent FIN, is acknowledged at once; 0 turns the delay off.
    app = App()
    conn = establish(app, config=TCPConfig(fin_ack_delay=0.04))
    conn.receive_packet(app.data(b"bye", ACK | FIN), 0.1)
    assert len(conn.data_to_send(0.1)) == 1
    conn.receive_packet(app.packet(ACK | FIN), 0.2)
    assert len(conn.data_to_send(0.2)) == 1
    app = App()
    conn = establish(app, config=TCPConfig(fin_ack_delay=0))
    conn.receive_packet(app.packet(ACK | FIN), 0.1)
    assert len(conn.data_to_send(0.1)) == 1


def test_a_request_after_an_answer_has_its_ack_delayed_onto_the_next_answer() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(ack_delay=0.04))
    # The connection's first request: ACKed at once (Linux's quick-ACK), we never answered.
    conn.receive_packet(app.data(b"GET 1", ACK | PSH), 0.1)
    assert conn.events() == [DataReceived(b"GET 1")]
    conn.consume(5, 0.1)
    (ack,) = parse_all(conn.data_to_send(0.1))
    assert tcp(ack).flags == ACK and tcp(ack).ack == app.snd_nxt
    conn.send(b"answer 1")
    (answer,) = parse_all(conn.data_to_send(0.1))
    app.rcv_nxt = (tcp(answer).seq + 8) & MASK
    conn.receive_packet(app.packet(ACK), 0.1)
    # The next request: its ACK (and the window update) waits, and leaves with the answer.
    conn.receive_packet(app.data(b"GET 2", ACK | PSH), 0.2)
    assert conn.events() == [DataReceived(b"GET 2")]
    conn.consume(5, 0.2)
    assert conn.data_to_send(0.2) == []
    assert conn.next_deadline() == pytest.approx(0.24)
    conn.send(b"answer 2")
    (answer,) = parse_all(conn.data_to_send(0.21))
    assert answer.payload == b"answer 2" and tcp(answer).ack == app.snd_nxt
    app.rcv_nxt = (tcp(answer).seq + 8) & MASK
    conn.receive_packet(app.packet(ACK), 0.21)
    assert conn.next_deadline() is None
    # No answer within the delay: the ACK goes alone when it runs out.
    conn.receive_packet(app.data(b"GET 3", ACK | PSH), 0.3)
    conn.on_timer(0.32)
    assert conn.data_to_send(0.32) == []
    conn.on_timer(0.34)
    (ack,) = parse_all(conn.data_to_send(0.34))
    assert tcp(ack).flags == ACK and tcp(ack).ack == app.snd_nxt
    # A second small segment before the ACK left, and a full-sized one: ACKed at once.
    conn.receive_packet(app.data(b"a", ACK | PSH), 0.4)
    assert conn.data_to_send(0.4) == []
    conn.receive_packet(app.data(b"b", ACK | PSH), 0.4)
    (ack,) = parse_all(conn.data_to_send(0.4))
    assert tcp(ack).ack == app.snd_nxt
    conn.receive_packet(app.data(b"x" * conn.mss_local, ACK), 0.5)
    (ack,) = parse_all(conn.data_to_send(0.5))
    assert tcp(ack).ack == app.snd_nxt
    # Out of order: the duplicate ACK at once (the app's fast retransmit needs it).
    conn.receive_packet(app.packet(ACK | PSH, b"late", seq=app.snd_nxt + 10), 0.6)
    (dup,) = parse_all(conn.data_to_send(0.6))
    assert tcp(dup).ack == app.snd_nxt
    # 0 turns the delay off.
    app = App()
    conn = establish(app, config=TCPConfig(ack_delay=0))
    conn.send(b"hello")
    conn.data_to_send(0.0)
    conn.receive_packet(app.data(b"GET", ACK | PSH), 0.1)
    assert len(conn.data_to_send(0.1)) == 1


def test_we_close_first_and_the_app_keeps_sending() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(time_wait=0.5))
    conn.close()
    (fin,) = parse_all(conn.data_to_send(0.0))
    assert tcp(fin).flags == ACK | FIN and tcp(fin).seq == 5001
    conn.receive_packet(app.packet(ACK, ack=5002), 0.1)
    assert conn.state is TCPState.FIN_WAIT_2
    conn.receive_packet(app.data(b"still talking"), 0.2)
    assert conn.events() == [DataReceived(b"still talking")]
    conn.receive_packet(app.packet(ACK | FIN, ack=5002), 0.3)
    assert conn.events() == [PeerClosed()]
    assert conn.state is TCPState.TIME_WAIT
    (ack,) = parse_all(conn.data_to_send(0.3))
    assert tcp(ack).ack == (app.snd_nxt + 1) & MASK
    # A resent FIN in TIME-WAIT is acknowledged again.
    conn.receive_packet(app.packet(ACK | FIN, ack=5002), 0.4)
    assert len(conn.data_to_send(0.4)) == 1
    assert conn.next_deadline() == pytest.approx(0.8)
    conn.on_timer(0.8)
    assert conn.events() == [Closed()]


def test_simultaneous_close() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(time_wait=0))
    conn.close()
    conn.data_to_send(0.0)
    conn.receive_packet(app.packet(ACK | FIN, ack=5001), 0.1)  # FIN before acking ours
    assert conn.state is TCPState.CLOSING
    conn.receive_packet(app.packet(ACK, seq=app.snd_nxt + 1, ack=5002), 0.2)
    assert conn.events() == [PeerClosed(), Closed()]


def test_fin_is_retransmitted() -> None:
    app = App()
    conn = establish(app)
    conn.send(b"bye")
    conn.close()
    (fin,) = parse_all(conn.data_to_send(0.0))
    assert tcp(fin).flags & FIN
    conn.receive_packet(app.packet(ACK, ack=5001 + 3), 0.1)  # data acked, FIN not
    assert conn.next_deadline() is not None
    conn.on_timer(conn.next_deadline() or 0)
    (again,) = parse_all(conn.data_to_send(2.0))
    assert tcp(again).flags == ACK | FIN and tcp(again).seq == 5001 + 3


def test_rst_from_the_app() -> None:
    app = App()
    conn = establish(app)
    conn.receive_packet(app.packet(RST, seq=app.snd_nxt + 10), 0.1)  # in window, not exact
    assert conn.state is TCPState.ESTABLISHED
    (challenge,) = parse_all(conn.data_to_send(0.1))
    assert tcp(challenge).flags == ACK
    conn.receive_packet(app.packet(RST | ACK), 0.2)
    events = conn.events()
    assert isinstance(events[0], Reset) and events[0].by_peer
    assert events[1] == Closed()
    assert conn.data_to_send(0.2) == []


def test_abort_resets_the_app() -> None:
    app = App()
    conn = establish(app)
    conn.abort()
    (rst,) = parse_all(conn.data_to_send(0.0))
    assert tcp(rst).flags == RST | ACK and tcp(rst).seq == 5001
    assert conn.events() == [Closed()]
    # The runtime answers further segments of a closed connection itself.
    stray = app.data(b"late")
    assert not conn.receive_packet(stray, 0.1)
    reply = rst_for(stray)
    assert reply is not None
    assert tcp(parse_packet(reply)).flags == RST


def test_new_syn_in_time_wait_ends_the_old_connection() -> None:
    app = App()
    conn = establish(app, config=TCPConfig(time_wait=30))
    conn.close()
    conn.data_to_send(0.0)
    conn.receive_packet(app.packet(ACK | FIN, ack=5002), 0.1)
    assert conn.state is TCPState.TIME_WAIT
    conn.events()
    new_syn = app.packet(SYN, seq=app.snd_nxt + 100000, ack=0)
    assert not conn.receive_packet(new_syn, 0.2)
    assert conn.events() == [Closed()]


# --- wrap-around, IPv6, GSO --------------------------------------------------------------


def test_sequence_numbers_wrap_both_ways() -> None:
    app = App(isn=2**32 - 3)
    conn = establish(app, iss=2**32 - 2)
    payload = bytes(range(200))
    for index in range(0, 200, 50):
        conn.receive_packet(app.data(payload[index : index + 50]), 0.1)
    received = b"".join(e.data for e in conn.events() if isinstance(e, DataReceived))
    assert received == payload
    (ack,) = parse_all(conn.data_to_send(0.1))
    assert tcp(ack).ack == (2**32 - 2 + 200) & MASK == 198
    conn.send(payload)
    (segment,) = parse_all(conn.data_to_send(0.2))
    assert tcp(segment).seq == 2**32 - 1
    conn.receive_packet(app.packet(ACK, ack=(2**32 - 1 + 200) & MASK), 0.3)
    assert conn.next_deadline() is None  # all acknowledged across the wrap
    assert conn.snd_una - conn.iss == 201


def test_ipv6_connection() -> None:
    app = App(client=CLIENT6, dest=DEST6)
    conn = TCPConnection(app.syn(mss=1440, wscale=7), config=TCPConfig(mtu=1500))
    assert conn.events()[0] == SynReceived(CLIENT6, 40000, DEST6, 8080)
    conn.accept(iss=9)
    (syn_ack,) = parse_all(conn.data_to_send(0.0))
    assert tcp(syn_ack).mss == 1440  # 1500 - 40 - 20
    app.rcv_nxt = 10
    conn.receive_packet(app.packet(ACK), 0.0)
    conn.send(b"six")
    frames = parse_all(conn.data_to_send(0.1))
    assert frames[0].ip.version == 6 and bytes(frames[0].payload) == b"six"


def test_gso_segments_left_to_the_kernel() -> None:
    app = App()
    config = TCPConfig(vnet_header=True, offload_checksum=True, gso=True, send_buffer=1 << 20)
    conn = TCPConnection(app.syn(mss=1460, wscale=7), config=config)
    conn.accept(iss=0)
    (syn_ack,) = conn.data_to_send(0.0)
    assert tcp(parse_packet(syn_ack[10:], verify_checksum=False)).flags == SYN | ACK
    app.rcv_nxt = 1
    conn.receive_packet(app.packet(ACK), 0.0)
    data = bytes(range(256)) * 800  # 204,800 bytes
    conn.send(data)
    frames = conn.data_to_send(0.0)
    sent = b""
    for frame in frames:
        vnet = VirtioNetHeader.from_bytes(frame)
        packet = parse_packet(frame[10:], verify_checksum=False)
        assert packet.ip.total_length <= 65535
        if len(packet.payload) > 1460:
            assert (vnet.gso_type, vnet.gso_size) == (GSO_TCPV4, 1460)
        sent += bytes(packet.payload)
    assert sent == data
    assert len(frames) == 4  # 44 MSS per super-segment


# --- a property: any arrival order of the app's segments reassembles -----------------------


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=6000), st.data())
def test_any_arrival_order_reassembles(data: bytes, draw: st.DataObject) -> None:
    app = App(isn=draw.draw(st.integers(0, MASK)))
    conn = establish(app, config=TCPConfig(receive_buffer=8192))
    cuts = (
        sorted(draw.draw(st.sets(st.integers(1, len(data) - 1), max_size=12)))
        if len(data) > 1
        else []
    )
    bounds = [0, *cuts, len(data)]
    segments = [app.data(data[a:b]) for a, b in itertools.pairwise(bounds)]
    order = draw.draw(st.permutations(segments))
    duplicates = draw.draw(st.lists(st.sampled_from(segments), max_size=4))
    received = b""
    for segment in [*order, *duplicates, *segments]:  # the kernel resends what was not acked
        conn.receive_packet(segment, 0.1)
        for event in conn.events():
            assert isinstance(event, DataReceived)
            received += event.data
            conn.consume(len(event.data))
        conn.data_to_send(0.1)
    assert received == data


# --- a property: bulk data to the app survives a lossy path ---------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.binary(min_size=1, max_size=20000),
    st.lists(st.booleans(), max_size=60),
    st.integers(0, MASK),
    st.integers(0, MASK),
)
def test_bulk_send_survives_loss(data: bytes, drops: list[bool], isn: int, iss: int) -> None:
    """tele sends `data` and FIN; the path drops segments and ACKs as `drops` says."""
    app = App(isn=isn)
    config = TCPConfig(send_buffer=4096, max_retransmissions=100)  # never give up here
    conn = establish(app, config=config, iss=iss, mss=1000, wscale=0)
    losses = iter(drops)
    pending = data
    received = b""
    fin_seen = False
    now = 0.0
    for _ in range(2000):
        taken = conn.send(pending) if pending else 0
        pending = pending[taken:]
        if not pending and conn.state is TCPState.ESTABLISHED:
            conn.close()
        frames = parse_all(conn.data_to_send(now))
        for frame in frames:
            if next(losses, False):
                continue  # lost on the way to the app
            header = tcp(frame)
            if header.seq == app.rcv_nxt and frame.payload:
                received += bytes(frame.payload)
                app.rcv_nxt = (app.rcv_nxt + len(frame.payload)) & MASK
            if header.flags & FIN and (header.seq + len(frame.payload)) & MASK == app.rcv_nxt:
                app.rcv_nxt = (app.rcv_nxt + 1) & MASK
                fin_seen = True
            if not next(losses, False):  # the app's cumulative ACK, which may be lost too
                conn.receive_packet(app.packet(ACK, window=3000), now)
        conn.events()
        if conn.state is TCPState.FIN_WAIT_2:
            break
        if not frames:
            deadline = conn.next_deadline()
            assert deadline is not None, "stalled with nothing scheduled"
            now = max(now, deadline)
            conn.on_timer(now)
    assert received == data
    assert fin_seen
    assert conn.state is TCPState.FIN_WAIT_2


# --- a property: any segment soup keeps the invariants ---------------------------------------


_FLAG_CHOICES = [ACK, ACK | PSH, ACK | FIN, FIN, RST, RST | ACK, SYN, SYN | ACK, 0]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_segments_and_calls_keep_invariants(data: st.DataObject) -> None:
    """Whatever the app sends and the runtime calls, the connection stays within its bounds."""
    app = App(isn=data.draw(st.integers(0, MASK)))
    config = TCPConfig(receive_buffer=3000, send_buffer=2000, max_out_of_order=4)
    conn = establish(app, config=config, iss=data.draw(st.integers(0, MASK)), mss=500)
    now = 0.0
    closed = 0
    for _ in range(data.draw(st.integers(1, 40))):
        action = data.draw(st.sampled_from(["segment", "send", "consume", "close", "timer"]))
        if action == "segment":
            seq = (app.snd_nxt + data.draw(st.integers(-3000, 6000))) & MASK
            ack = (conn.snd_una + data.draw(st.integers(-100, 3000))) & MASK
            flags = data.draw(st.sampled_from(_FLAG_CHOICES))
            payload = data.draw(st.binary(max_size=700))
            window = data.draw(st.integers(0, 4000))
            conn.receive_packet(app.packet(flags, payload, seq=seq, ack=ack, window=window), now)
        elif action == "send" and conn.state in (TCPState.ESTABLISHED, TCPState.CLOSE_WAIT):
            assert conn.send(data.draw(st.binary(max_size=3000))) <= 2000
        elif action == "consume" and conn.unconsumed:
            conn.consume(data.draw(st.integers(0, conn.unconsumed)))
        elif action == "close":
            conn.close()
        elif action == "timer":
            deadline = conn.next_deadline()
            if deadline is not None:
                now = max(now, deadline)
                conn.on_timer(now)
        for frame in conn.data_to_send(now):
            packet = parse_packet(frame)  # every frame is a valid packet of this flow
            assert (packet.ip.src, packet.ip.dst) == (DEST4, CLIENT4)
        events = conn.events()
        closed += events.count(Closed())
        if Closed() in events:
            assert events[-1] == Closed()
        # Bounds: what was delivered and not consumed never exceeds the buffer (plus the
        # rounding of one window-scale unit), nor does the send queue or the reordering list.
        assert conn.unconsumed <= config.receive_buffer + (1 << conn.rcv_wscale)
        assert len(conn._sndbuf) <= config.send_buffer
        assert len(conn._ooo) <= config.max_out_of_order
        deadline = conn.next_deadline()
        assert deadline is None or deadline >= now
        if conn.state is TCPState.CLOSED:
            assert deadline is None
    assert closed <= 1


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_header_prediction_matches_the_general_path(data: st.DataObject) -> None:
    """The same input through the fast path and the general path gives the same results."""
    isn = data.draw(st.integers(0, MASK))
    iss = data.draw(st.integers(0, MASK))
    apps = [App(isn=isn), App(isn=isn)]
    config = TCPConfig(receive_buffer=5000, max_out_of_order=2)
    conns = [establish(app, config=config, iss=iss, mss=500) for app in apps]
    conns[1].header_prediction = False
    for _ in range(data.draw(st.integers(1, 30))):
        in_order = data.draw(st.booleans())
        offset = 0 if in_order else data.draw(st.integers(-1000, 3000))
        ack_delta = 0 if data.draw(st.booleans()) else data.draw(st.integers(-10, 1000))
        flags = data.draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | URG, RST]))
        payload = data.draw(st.binary(max_size=800))
        window = data.draw(st.sampled_from([100, 1000, 0]))
        consume = data.draw(st.integers(0, 2000))
        send = data.draw(st.binary(max_size=600))
        results = []
        for app, conn in zip(apps, conns, strict=True):
            seq = (app.snd_nxt + offset) & MASK
            ack = (conn.snd_una + ack_delta) & MASK
            packet = app.packet(flags, payload, seq=seq, ack=ack, window=window)
            if in_order and flags & ACK and not flags & FIN:
                app.snd_nxt = (app.snd_nxt + len(payload)) & MASK
            conn.receive_packet(packet, 1.0)
            if conn.unconsumed:
                conn.consume(min(consume, conn.unconsumed))
            if conn.state in (TCPState.ESTABLISHED, TCPState.CLOSE_WAIT):
                conn.send(send)
            results.append(
                (
                    conn.events(),
                    conn.data_to_send(1.0),
                    conn.state,
                    conn.rcv_nxt,
                    conn.snd_una,
                    conn.snd_wnd,
                    conn.unconsumed,
                    conn.next_deadline(),
                )
            )
        assert results[0] == results[1]
