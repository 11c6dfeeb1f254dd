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

    .venv/bin/python bench/floors.py [--seconds 2] [--conns 1,50]

Prints a table and one JSON line; writes the JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from wholepath import REQ_CLIENT, cpu_seconds  # its client (on loopback here), CPU per pid

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
async def handle(client):
    async with client, await trio.open_tcp_stream("127.0.0.1", target) as server:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--conns", default="1,50")
    parser.add_argument("--rows", default="none,epoll,trio-sock,trio")
    args = parser.parse_args()
    echo, echo_port = start(ECHO)
    table = []
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
