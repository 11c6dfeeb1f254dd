"""Micro-benchmarks of tele.net, the sans-IO userspace TCP/IP core (no TUN, no trio).

Measures: parsing an IPv4+TCP packet, building 1460-byte and 64 KiB segments with the Python
checksum and with the checksum and segmentation left to the kernel (virtio-net NEEDS_CSUM +
GSO_TCPV4), and the TCP state machine driven in memory for a bulk transfer each way.

    .venv/bin/python bench/netstack.py [--seconds 1.0]

Prints a table and one JSON line (`{"bench": "netstack", ...}`). With tele.net's mypyc build
in use (`scripts/build_native.py`), each figure as Python (a run with TELE_NATIVE=0) and
native side by side; the JSON's top level is Python's, its "native" key the build's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import tele.net
from tele.net.packet import TCPFlowEncoder, fast_tcp, parse_packet
from tele.net.tcp import ACK, FIN, PSH, SYN, TCPHeader
from tele.net.tcpstate import DataReceived, TCPConfig, TCPConnection

CLIENT = socket.inet_aton("10.0.0.1")
DEST = socket.inet_aton("10.96.0.10")
MASK = 0xFFFFFFFF


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of `fn`, run in growing batches for about `seconds`."""
    fn()
    batch = 1
    calls = 0
    start = time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed
        batch *= 2


def bench_codecs(seconds: float) -> dict[str, float]:
    app = TCPFlowEncoder(CLIENT, DEST, 40000, 80)
    segment_1460 = app.segment(1, 2, ACK | PSH, 500, bytes(1460))
    tele_plain = TCPFlowEncoder(DEST, CLIENT, 80, 40000)
    tele_vnet = TCPFlowEncoder(DEST, CLIENT, 80, 40000, vnet_header=True, offload_checksum=True)
    payload_64k_mtu = bytes(65535 - 40)  # one segment at MTU 65535
    payload_gso = bytes(44 * 1460)  # what fits one GSO super-segment at MSS 1460
    payload_1460 = bytes(1460)
    results = {
        "parse_ipv4_tcp_1460_pps": rate(lambda: parse_packet(segment_1460), seconds),
        "parse_ipv4_tcp_1460_nocsum_pps": rate(
            lambda: parse_packet(segment_1460, verify_checksum=False), seconds
        ),
        "fast_tcp_1460_pps": rate(lambda: fast_tcp(segment_1460), seconds),
        "fast_tcp_1460_nocsum_pps": rate(
            lambda: fast_tcp(segment_1460, verify_checksum=False), seconds
        ),
        "build_1460_python_csum_pps": rate(
            lambda: tele_plain.segment(1, 2, ACK, 500, payload_1460), seconds
        ),
        "build_64k_python_csum_pps": rate(
            lambda: tele_plain.segment(1, 2, ACK, 500, payload_64k_mtu), seconds
        ),
        "build_64k_gso_offload_pps": rate(
            lambda: tele_vnet.segment(1, 2, ACK, 500, payload_gso, b"", 1460), seconds
        ),
    }
    results["build_1460_python_csum_MBps"] = results["build_1460_python_csum_pps"] * 1460 / 1e6
    results["build_64k_python_csum_MBps"] = (
        results["build_64k_python_csum_pps"] * len(payload_64k_mtu) / 1e6
    )
    results["build_64k_gso_offload_MBps"] = (
        results["build_64k_gso_offload_pps"] * len(payload_gso) / 1e6
    )
    return results


def _connect(config: TCPConfig) -> tuple[TCPConnection, TCPFlowEncoder, int]:
    app = TCPFlowEncoder(CLIENT, DEST, 40000, 80)
    mss = config.mtu - 40
    syn = app.segment(
        1000, 0, SYN, 65535, b"", TCPHeader(0, 0, 0, 0, 0, 0, mss=mss, wscale=7).options_bytes()
    )
    conn = TCPConnection(parse_packet(syn), config=config)
    conn.accept(iss=0)
    conn.data_to_send(0.0)
    conn.receive_packet(parse_packet(app.segment(1001, 1, ACK, 65535, b"")), 0.0)
    conn.events()
    return conn, app, mss


def bench_receive(seconds: float, *, size: int, verify: bool) -> dict[str, float]:
    """The app sends bulk data: tele reads it (fast path), delivers, consumes, acks per 16.

    size 1460 is a plain MTU-1500 TUN; 64,240 is a GSO super-segment from an IFF_VNET_HDR
    TUN with TSO, whose checksum the kernel left undone (NEEDS_CSUM), so it is not verified.
    """
    conn, app, _mss = _connect(TCPConfig(receive_buffer=4 << 20))
    chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
    seq = 1001
    segments = 0
    busy = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        # The kernel's side (not timed): 64 segments ready to read from the TUN.
        wires = []
        for _ in range(64):
            wires.append(app.segment(seq & MASK, 1, ACK, 65535, chunk))
            seq += size
        start = time.perf_counter()
        for index, wire in enumerate(wires):
            view = fast_tcp(wire, verify_checksum=verify)
            assert view is not None
            conn.receive_view(view, 0.0)
            for event in conn.events():
                if isinstance(event, DataReceived):
                    conn.consume(len(event.data))
            if index % 16 == 15:
                conn.data_to_send(0.0)
        busy += time.perf_counter() - start
        segments += len(wires)
    key = f"rx_{size}" + ("" if verify else "_nocsum")
    return {
        f"{key}_segments_per_s": segments / busy,
        f"{key}_MBps": segments * size / busy / 1e6,
    }


def bench_send(seconds: float, *, gso: bool) -> dict[str, float]:
    """tele sends bulk data to the app, which acks everything each round (acks not timed)."""
    config = TCPConfig(
        send_buffer=4 << 20,
        vnet_header=gso,
        offload_checksum=gso,
        gso=gso,
    )
    conn, app, _mss = _connect(config)
    chunk = bytes(256 * 1024)
    skip = 10 if gso else 0
    sent_bytes = 0
    frames = 0
    busy = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        conn.send(chunk)
        out = conn.data_to_send(0.0)
        busy += time.perf_counter() - start
        frames += len(out)
        # The kernel's side (not timed): one cumulative ACK for everything written.
        last = parse_packet(out[-1][skip:], verify_checksum=not gso)
        header = last.transport
        assert isinstance(header, TCPHeader)
        ack = (header.seq + len(last.payload)) & MASK
        ack_wire = app.segment(1001, ack, ACK, 65535, b"")
        start = time.perf_counter()
        conn.receive_packet(parse_packet(ack_wire), 0.0)
        conn.events()
        busy += time.perf_counter() - start
        sent_bytes += len(chunk)
    key = "tx_gso" if gso else "tx_1460"
    return {
        f"{key}_segments_per_s": frames / busy,
        f"{key}_MBps": sent_bytes / busy / 1e6,
    }


def receive(conn: TCPConnection, wire: bytes) -> None:
    """What the runtime does per packet: the fast path, else the full parser."""
    view = fast_tcp(wire)
    if view is not None:
        conn.receive_view(view, 0.0)
    else:
        conn.receive_packet(parse_packet(wire), 0.0)


def bench_lifecycle(seconds: float) -> dict[str, float]:
    """Whole short connections: SYN, accept, ACK, request, response, FIN both ways.

    Counts tele's side only (reading every app packet included, through `fast_tcp` where the
    runtime would); the app's packets are built beforehand. This bounds the connections/s the
    stack itself can take.
    """
    app_syn_options = TCPHeader(0, 0, 0, 0, 0, 0, mss=1460, wscale=7).options_bytes()
    count = 0
    busy = 0.0
    deadline = time.perf_counter() + seconds
    sport = 1024
    while time.perf_counter() < deadline:
        sport = sport + 1 if sport < 65000 else 1024
        app = TCPFlowEncoder(CLIENT, DEST, sport, 80)
        syn = app.segment(1000, 0, SYN, 65535, b"", app_syn_options)
        ack = app.segment(1001, 1, ACK, 65535, b"")
        request = app.segment(1001, 1, ACK | PSH, 65535, b"GET / HTTP/1.1\r\n\r\n")
        ack_response = app.segment(1019, 1 + 100, ACK, 65535, b"")
        fin = app.segment(1019, 1 + 101, ACK | FIN, 65535, b"")
        start = time.perf_counter()
        conn = TCPConnection(parse_packet(syn))
        conn.events()
        conn.accept(iss=0)
        conn.data_to_send(0.0)
        receive(conn, ack)
        receive(conn, request)
        for event in conn.events():
            if isinstance(event, DataReceived):
                conn.consume(len(event.data))
        conn.send(bytes(100))
        conn.close()
        conn.data_to_send(0.0)
        receive(conn, ack_response)
        receive(conn, fin)
        conn.data_to_send(0.0)
        conn.events()
        busy += time.perf_counter() - start
        count += 1
    return {"connections_per_s": count / busy}


def bench_memory(connections: int = 1000) -> dict[str, float]:
    """Python heap per established, idle connection (tracemalloc)."""
    app_syn_options = TCPHeader(0, 0, 0, 0, 0, 0, mss=1460, wscale=7).options_bytes()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = {}
    for index in range(connections):
        app = TCPFlowEncoder(CLIENT, DEST, 1024 + index, 80)
        conn = TCPConnection(parse_packet(app.segment(1000, 0, SYN, 65535, b"", app_syn_options)))
        conn.accept(iss=0)
        conn.data_to_send(0.0)
        conn.receive_packet(parse_packet(app.segment(1001, 1, ACK, 65535, b"")), 0.0)
        conn.events()
        table[conn.flow] = conn
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"bytes_per_idle_connection": (after - before) / connections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    results: dict[str, float] = {}
    results.update(bench_codecs(args.seconds))
    results.update(bench_receive(args.seconds, size=1460, verify=True))
    results.update(bench_receive(args.seconds, size=1460, verify=False))
    results.update(bench_receive(args.seconds, size=44 * 1460, verify=False))
    results.update(bench_send(args.seconds, gso=False))
    results.update(bench_send(args.seconds, gso=True))
    results.update(bench_lifecycle(args.seconds))
    results.update(bench_memory())
    if args.json_only:
        print(json.dumps(results))
        return
    # With tele.net's mypyc build in use, the same figures as Python (TELE_NATIVE=0) beside them.
    python = results
    native: dict[str, float] = {}
    if tele.net.NATIVE:
        native = results
        out = subprocess.run(
            [sys.executable, __file__, "--seconds", str(args.seconds), "--json-only"],
            env={**os.environ, "TELE_NATIVE": "0"}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        python = json.loads(out.stdout.splitlines()[-1])
    width = max(len(name) for name in results)
    print(f"tele.net micro-benchmarks (Python {platform.python_version()})")
    print(f"  {'':<{width}}  {'Python':>14}  {'native (mypyc)':>14}")
    for name, value in python.items():
        other = f"{native[name]:>14,.0f}  {native[name] / value:5.2f}x" if native else f"{'-':>14}"
        print(f"  {name:<{width}}  {value:>14,.0f}  {other}")
    record = {"bench": "netstack", **{k: round(v, 1) for k, v in python.items()}}
    record["native"] = {k: round(v, 1) for k, v in native.items()} or None
    print(json.dumps(record))


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
