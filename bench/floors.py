#!/usr/bin/env python3
"""Floors: what one Python process that only relays costs per small request, measured on this
machine in the same run, to judge the whole path's hops by (bench/wholepath.py gives each hop's
CPU per request: the daemon, the sandbox's API server, the traffic manager, the echo pod).

Each row: a client with C kept-open connections and one 64-byte request in flight on each
(bench/wholepath.py's epoll client) -> a RELAY process -> an echo server process, on loopback;
the figures are the relay's: CPU (user+sys) per request and its share of a core, with the
client's req/s and p50. Rows:
  trio       the relay is trio: accept, connect, then `receive_some` / `send_all` both ways in
             two tasks per connection (what a tele hop does at the least per message)
  trio-sock  the same with trio's raw sockets (no Stream wrapper)
  epoll      the relay is a plain epoll loop (no trio): the floor of any Python hop
  none       no relay (the client talks to the echo server): the echo server's and the
             client's own cost, for reference
The echo server is a plain epoll loop in every row (not measured).

With --new: new connections instead (bench/wholepath.py's sequential client: connect, a 1 KiB
request, its echo, close) through a chain of HOPS relays of the row's kind (2: as tele's daemon
and tunnel server, or sshuttle's client and server, with no TCP stack, h2 or ssh in them):
conn/s, the first byte's p50 and all relays' CPU per connection. Each trio relay connects with
a raw trio socket (no resolver, no happy-eyeballs nursery) and pumps in two tasks.

With --wake: what a wake-up costs on this machine after the process slept for a while (as
every process of a new connection's path does with a round trip of 40 ms between events): a
1-byte ping-pong between two processes over a socketpair, idle for GAP ms before each ping;
the p50 round trip (two wake-ups: the echoing process's and the pinging one's), with the
echoing process a plain blocking loop or trio.

    .venv/bin/python bench/floors.py [--seconds 2] [--conns 1,50]
    .venv/bin/python bench/floors.py --new [--hops 2]
    .venv/bin/python bench/floors.py --wake [--gaps 0,1,10,40]

Prints a table and one JSON line; writes the JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from wholepath import NEW_CLIENT, REQ_CLIENT, cpu_seconds  # its clients (on loopback), CPU

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
PY = sys.executable

ECHO = """
import select, socket, sys
server = socket.create_server(("127.0.0.1", 0), backlog=1024)
print(server.getsockname()[1], flush=True)
ep = select.epoll()
ep.register(server.fileno(), select.EPOLLIN)
conns = {}
while True:
    for fd, _ in ep.poll():
        if fd == server.fileno():
            c, _ = server.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.setblocking(False)
            conns[c.fileno()] = c
            ep.register(c.fileno(), select.EPOLLIN)
            continue
        c = conns[fd]
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        if data:
            c.sendall(data)
        else:
            ep.unregister(fd)
            del conns[fd]
            c.close()
"""

RELAY_TRIO = """
import sys, trio
target = int(sys.argv[1])
raw = sys.argv[2] == "sock"
async def pump(src, dst):
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except trio.BrokenResourceError:
        pass
async def pump_sock(src, dst):
    try:
        while data := await src.recv(65536):
            view = memoryview(data)
            while view:
                view = view[await dst.send(view):]
    except OSError:
        pass
async def open_raw(port):
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    return trio.SocketStream(sock)
async def handle(client):
    async with client, await open_raw(target) as server:
        async with trio.open_nursery() as nursery:
            if raw:
                nursery.start_soon(pump_sock, client.socket, server.socket)
                await pump_sock(server.socket, client.socket)
            else:
                nursery.start_soon(pump, client, server)
                await pump(server, client)
async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)
trio.run(main)
"""

RELAY_EPOLL = """
import select, socket, sys
target = int(sys.argv[1])
server = socket.create_server(("127.0.0.1", 0), backlog=1024)
print(server.getsockname()[1], flush=True)
ep = select.epoll()
ep.register(server.fileno(), select.EPOLLIN)
peer = {}
while True:
    for fd, _ in ep.poll():
        if fd == server.fileno():
            c, _ = server.accept()
            s = socket.create_connection(("127.0.0.1", target))
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                x.setblocking(False)
                ep.register(x.fileno(), select.EPOLLIN)
            peer[c.fileno()], peer[s.fileno()] = (c, s), (s, c)
            continue
        src, dst = peer[fd]
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if data:
            dst.setblocking(True)
            dst.sendall(data)
            dst.setblocking(False)
        else:
            for x in (src, dst):
                ep.unregister(x.fileno())
                del peer[x.fileno()]
                x.close()
"""


def start(script: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([PY, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def row(kind: str, conns: int, seconds: float, echo_port: int) -> dict[str, float | str]:
    relay = None
    port = echo_port
    if kind == "epoll":
        relay, port = start(RELAY_EPOLL, str(echo_port))
    elif kind in ("trio", "trio-sock"):
        relay, port = start(RELAY_TRIO, str(echo_port), "sock" if kind == "trio-sock" else "")
    try:
        before = cpu_seconds(relay.pid) if relay else 0.0
        wall = time.perf_counter()
        out = subprocess.run(
            [PY, "-c", REQ_CLIENT, "127.0.0.1", str(port), str(conns), str(seconds), "64"],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
        elapsed = time.perf_counter() - wall
        result = json.loads(out.stdout)
        used = cpu_seconds(relay.pid) - before if relay else 0.0
        result.update(
            row=kind,
            conns=conns,
            relay_us_per_req=used / max(result["requests"], 1) * 1e6,
            relay_cpu_pct=100 * used / elapsed,
        )
        return result
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()


def new_row(kind: str, hops: int, seconds: float, echo_port: int) -> dict[str, float | str]:
    """Sequential new connections through `hops` relays of `kind` (none: straight to echo)."""
    relays: list[subprocess.Popen[str]] = []
    port = echo_port
    try:
        for _ in range(hops if kind != "none" else 0):
            if kind == "epoll":
                relay, port = start(RELAY_EPOLL, str(port))
            else:
                relay, port = start(RELAY_TRIO, str(port), "sock" if kind == "trio-sock" else "")
            relays.append(relay)
        before = sum(cpu_seconds(r.pid) for r in relays)
        out = subprocess.run(
            [PY, "-c", NEW_CLIENT, "127.0.0.1", str(port), str(seconds)],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
        result = json.loads(out.stdout)
        used = sum(cpu_seconds(r.pid) for r in relays) - before
        conns = result["conn_s"] * seconds
        result.update(row=kind, hops=len(relays), relays_us_per_conn=used / max(conns, 1) * 1e6)
        return result
    finally:
        for relay in relays:
            relay.kill()
            relay.wait()


PONG = """
import os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
if sys.argv[2] == "trio":
    import trio
    async def main():
        s = trio.socket.from_stdlib_socket(sock)
        while data := await s.recv(1):
            await s.send(data)
    trio.run(main)
else:
    while data := sock.recv(1):
        sock.send(data)
"""


def wake_row(kind: str, gap_ms: float, samples: int) -> dict[str, float | str]:
    """Round trips of one byte to a process of `kind` after `gap_ms` of idleness each."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    pong = subprocess.Popen([PY, "-c", PONG, str(fd), kind], pass_fds=[fd])
    theirs.close()
    try:
        times = []
        for n in range(samples + 5):
            time.sleep(gap_ms / 1e3)
            started = time.perf_counter()
            ours.send(b"p")
            ours.recv(1)
            if n >= 5:  # the first ones import and warm up
                times.append(time.perf_counter() - started)
        times.sort()
        return {"row": kind, "gap_ms": gap_ms, "rtt_p50_us": times[len(times) // 2] * 1e6,
                "rtt_p90_us": times[int(len(times) * 0.9)] * 1e6}  # fmt: skip
    finally:
        ours.close()
        pong.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--conns", default="1,50")
    parser.add_argument("--rows", default="none,epoll,trio-sock,trio")
    parser.add_argument("--new", action="store_true", help="new connections through relays")
    parser.add_argument("--hops", type=int, default=2, help="relays in a chain (--new)")
    parser.add_argument("--wake", action="store_true", help="wake-up cost after idle gaps")
    parser.add_argument("--gaps", default="0,1,10,40", help="idle ms before each ping (--wake)")
    args = parser.parse_args()
    if args.wake:
        try:
            gaps = [float(g) for g in args.gaps.split(",")]
        except ValueError:
            parser.error("--gaps takes milliseconds separated by commas, e.g. 0,10,40")
        if any(not 0 <= g <= 200 for g in gaps):
            parser.error("--gaps takes 0 to 200 ms")
        table = [
            wake_row(kind, gap, 200 if gap <= 10 else 60)
            for gap in gaps
            for kind in ("plain", "trio")
        ]
        print(f"{'row':6} {'idle ms':>7} {'RTT p50 µs':>10} {'p90 µs':>8}")
        for r in table:
            print(
                f"{r['row']:6} {r['gap_ms']:>7g} {r['rtt_p50_us']:>10.0f} {r['rtt_p90_us']:>8.0f}"
            )
        _record(table)
        return
    echo, echo_port = start(ECHO)
    table = []
    if args.new:
        if not 1 <= args.hops <= 4:
            parser.error("--hops takes 1 to 4")
        try:
            table = [new_row(k, args.hops, args.seconds, echo_port) for k in args.rows.split(",")]
        finally:
            echo.kill()
            echo.wait()
        print(f"{'row':10} {'hops':>4} {'conn/s':>8} {'1st µs':>8} {'relays µs/conn':>14}")
        for r in table:
            print(
                f"{r['row']:10} {r['hops']:>4} {r['conn_s']:>8.0f} {r['first_byte_p50_us']:>8.0f} "
                f"{r['relays_us_per_conn']:>14.0f}"
            )
        _record(table)
        return
    try:
        for conns in (int(c) for c in args.conns.split(",")):
            for kind in args.rows.split(","):
                table.append(row(kind, conns, args.seconds, echo_port))
    finally:
        echo.kill()
        echo.wait()
    print(f"{'row':10} {'conns':>5} {'req/s':>8} {'p50 µs':>8} {'relay µs/req':>12} {'relay %':>8}")
    for r in table:
        print(
            f"{r['row']:10} {r['conns']:>5} {r['req_s']:>8.0f} {r['p50_us']:>8.0f} "
            f"{r['relay_us_per_req']:>12.1f} {r['relay_cpu_pct']:>8.0f}"
        )
    _record(table)


def _record(table: list[dict[str, float | str]]) -> None:
    record = {
        "bench": "floors",
        "time": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "load": os.getloadavg()[0],
        "rows": table,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"floors-{record['time']}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
