"""RPC benchmark: unary round trips over a unix socket against the h2 PING floor.

A server process (this script with `--serve`) answers an echo method on a unix socket in a
temporary directory; the client measures, on one connection:
  - h2 PING round trips (the floor: one frame each way, no stream, no JSON);
  - sequential unary calls (p50/p99 latency, calls/s);
  - unary calls from 64 concurrent tasks (calls/s).
Targets (issue 3): p50 unary round trip <= 3x the PING floor; >= 5,000 sequential calls/s.
Prints a table and one JSON line. Usage: python bench/rpc.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import trio

from tele.rpc.client import Client, open_client
from tele.rpc.method import Unary
from tele.rpc.server import Router, serve_connection


class Echo(msgspec.Struct):
    text: str


ECHO = Unary("/bench.v1/Echo", Echo, Echo)


async def serve(path: str) -> None:
    async def echo(request: Echo) -> Echo:
        return request

    router = Router()
    router.unary(ECHO, echo)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    print("ready", flush=True)
    await trio.serve_listeners(lambda s: serve_connection(s, router), [listener])


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_loop(seconds: float, step: object) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        await step()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return samples


async def measure(path: str, seconds: float) -> dict[str, float]:
    stream = await trio.open_unix_socket(path)
    async with open_client(stream) as client:
        request = Echo("x" * 64)
        for _ in range(200):  # warm up
            await client.call(ECHO, request)
            await client.link.ping()
        pings = await timed_loop(seconds, client.link.ping)
        calls = await timed_loop(seconds, lambda: client.call(ECHO, request))
        concurrent = await concurrent_rate(client, request, seconds)
    return {
        "ping_p50_us": statistics.median(pings) * 1e6,
        "ping_p99_us": percentile(pings, 0.99) * 1e6,
        "unary_p50_us": statistics.median(calls) * 1e6,
        "unary_p99_us": percentile(calls, 0.99) * 1e6,
        "sequential_calls_per_s": len(calls) / sum(calls),
        "concurrent64_calls_per_s": concurrent,
    }


async def concurrent_rate(client: Client, request: Echo, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await client.call(ECHO, request)
            done += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(worker)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve)
        return
    with tempfile.TemporaryDirectory(prefix="tele-bench-") as tmp:
        path = str(Path(tmp) / "rpc.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", path],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise SystemExit("bench/rpc.py: the server process did not start")
            result = trio.run(measure, path, args.seconds)
        finally:
            server.terminate()
            server.wait(timeout=10)
    ratio = result["unary_p50_us"] / result["ping_p50_us"]
    rows = [
        (
            "h2 PING round trip (floor)",
            f"{result['ping_p50_us']:.0f}",
            f"{result['ping_p99_us']:.0f}",
            "-",
        ),
        (
            "unary call, sequential",
            f"{result['unary_p50_us']:.0f}",
            f"{result['unary_p99_us']:.0f}",
            f"{result['sequential_calls_per_s']:.0f}",
        ),
        ("unary call, 64 concurrent", "-", "-", f"{result['concurrent64_calls_per_s']:.0f}"),
    ]
    print(f"{'path (unix socket, one connection)':34} {'p50 µs':>8} {'p99 µs':>8} {'calls/s':>9}")
    for name, p50, p99, rate in rows:
        print(f"{name:34} {p50:>8} {p99:>8} {rate:>9}")
    print(
        f"unary p50 / PING p50 = {ratio:.2f} (target <= 3); sequential calls/s "
        f"{result['sequential_calls_per_s']:.0f} (target >= 5000)"
    )
    print(
        json.dumps(
            {
                "bench": "rpc",
                **{k: round(v, 1) for k, v in result.items()},
                "ratio": round(ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
