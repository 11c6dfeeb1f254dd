"""Flood benchmark: the manager's RPC server while one peer floods it with streams.

A server process (this script with `--serve`) runs the manager's RPC serving exactly as the
manager does (tele.rpc.server.serve_connection behind PeerConnections, its client links'
LinkSettings with TUNNEL_STREAMS, the process's handler budget shared per identity) with an
echo method, on loopback TCP; the other user logs in first (a share of its own, as an
authenticated user has on the manager), the flooder never does. The client measures another
user's unary round trips (p50/p99, on a link of its own) three times: before, while a
flooding peer holds `--links` connections each sending `--streams` HEADERS that never get a
body (ignoring SETTINGS_MAX_CONCURRENT_STREAMS, as a hostile peer would), and after the
flooder is gone; with the server's RSS each time.
Bounded: about 30 s (two minutes at most). Prints a table and one JSON line.
Usage: python bench/flood.py [--links 1] [--streams 10000] [--calls 500]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import trio

from tele.rpc.client import Client, open_client
from tele.rpc.h2link import TUNNEL_STREAMS, LinkSettings
from tele.rpc.method import Unary
from tele.rpc.server import CALLER, HandlerShares, PeerConnections, Router, serve_connection


class Echo(msgspec.Struct):
    text: str


ECHO = Unary("/bench.v1/Echo", Echo, Echo)
LOGIN = Unary("/bench.v1/Login", Echo, Echo)

FLOODER = """
import socket, sys, threading
import h2.config, h2.connection, h2.events, h2.exceptions
port, links, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def flood(results):
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    lock = threading.Lock()
    state = {"refused": 0, "sent": 0}
    def read():
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            with lock:  # (never writes: the sender does, outside the lock)
                try:
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.StreamReset):
                            state["refused"] += 1
                except h2.exceptions.ProtocolError:
                    return
    threading.Thread(target=read, daemon=True).start()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
               (":path", "/bench.v1/Echo"), ("content-type", "application/json")]
    try:
        for n in range(count):
            with lock:
                conn.remote_settings.max_concurrent_streams = 2**31 - 1
                conn.send_headers(conn.get_next_available_stream_id(), headers)
                state["sent"] += 1
                data = conn.data_to_send() if n % 500 == 0 else b""
            sock.sendall(data)
        with lock:
            data = conn.data_to_send()
        sock.sendall(data)
    except (h2.exceptions.ProtocolError, OSError):
        pass
    results.append((state, sock))
results = []
threads = [threading.Thread(target=flood, args=(results,)) for _ in range(links)]
for t in threads: t.start()
for t in threads: t.join()
sent = sum(s["sent"] for s, _ in results)
print("flooded", sent, sum(s["refused"] for s, _ in results), flush=True)
sys.stdin.read()
"""


async def echo(request: Echo) -> Echo:
    return request


async def login(request: Echo) -> Echo:
    connection = CALLER.get()
    if connection is not None:
        connection.principal = request.text  # the manager's authenticator, minus the review
    return request


async def serve() -> None:
    router = Router()
    router.unary(ECHO, echo)
    router.unary(LOGIN, login)
    peers = PeerConnections()
    links = LinkSettings(max_concurrent_streams=TUNNEL_STREAMS)
    shares = HandlerShares()

    async def one(stream: trio.SocketStream) -> None:
        await serve_connection(stream, router, name="manager", settings=links, shares=shares)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, lambda s: peers.serve(s, one), 0, host="127.0.0.1")
        )
        print(listeners[0].socket.getsockname()[1], flush=True)


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20


async def latencies(client: Client, calls: int) -> tuple[float, float]:
    times = []
    for n in range(calls):
        started = time.perf_counter()
        await client.call(ECHO, Echo(str(n)), timeout=10)
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99) - 1] * 1e6


async def main(links: int, streams: int, calls: int) -> None:
    server = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    try:
        port = int((await server.stdout.receive_some(100)).split()[0])
        rows: list[tuple[str, float, float, float, int | str, int | str]] = []
        async with open_client(await trio.open_tcp_stream("127.0.0.1", port)) as user:
            await user.call(LOGIN, Echo("user"))
            await latencies(user, 200)  # warm-up
            rows.append(("before", rss_mib(server.pid), *await latencies(user, calls), "", ""))
            flooder = await trio.lowlevel.open_process(
                [sys.executable, "-c", FLOODER, str(port), str(links), str(streams)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            assert flooder.stdin is not None and flooder.stdout is not None
            with trio.fail_after(120):
                line = b""
                while not line.endswith(b"\n"):
                    line += await flooder.stdout.receive_some(100)
            _, sent, refused = line.split()
            during = await latencies(user, calls)
            rows.append(("flooding", rss_mib(server.pid), *during, int(sent), int(refused)))
            await flooder.stdin.aclose()
            await flooder.wait()
            await trio.sleep(1)  # the server notices the closed links
            rows.append(("after", rss_mib(server.pid), *await latencies(user, calls), "", ""))
    finally:
        server.kill()
        await server.wait()
    print(f"one peer, {links} links x {streams} bodiless streams; another user's echo calls")
    head = f"{'phase':10} {'server RSS MiB':>15} {'p50 µs':>8} {'p99 µs':>8}"
    print(f"{head} {'sent':>7} {'refused':>8}")
    for phase, rss, p50, p99, sent_, refused_ in rows:
        print(f"{phase:10} {rss:>15.1f} {p50:>8.0f} {p99:>8.0f} {sent_!s:>7} {refused_!s:>8}")
    print(json.dumps({
        "bench": "flood", "links": links, "streams_per_link": streams,
        **{f"{r[0]}_rss_mib": round(r[1], 1) for r in rows},
        **{f"{r[0]}_p99_us": round(r[3]) for r in rows},
    }))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--links", type=int, default=1)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve)
    else:
        trio.run(main, args.links, args.streams, args.calls)
