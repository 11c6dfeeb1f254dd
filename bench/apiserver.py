"""Benchmark the sandbox API server: creates/s over one HTTP/2 connection, list latency with
10,000 objects, and watch event latency to 100 concurrent watchers (p50/p99).

The server runs as its own process (`python -m tele.sandbox run`, as `tele sandbox up` starts
it) under a temporary state directory; the client is httpx with HTTP/2 under trio.
Prints a table and one JSON line. Targets (issue 4): >= 500 creates/s, list of 10,000 <= 0.5 s,
watch p99 <= 100 ms.

    .venv/bin/python bench/apiserver.py [--objects 10000] [--watchers 100] [--events 200]
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
import yaml

TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class H2Client:
    """A minimal HTTP/2 client over one TLS connection: many concurrent streams, no pooling.

    (httpx's HTTP/2 loses responses that arrive before it has registered a new stream, which
    a fast server triggers when many watches open at once.)
    """

    def __init__(
        self, stream: trio.SSLStream[trio.SocketStream], token: str, authority: str
    ) -> None:
        self.stream = stream
        self.token = token
        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.channels: dict[int, trio.MemorySendChannel[h2.events.Event]] = {}
        self.lock = trio.Lock()
        self.window_open = trio.Event()

    @classmethod
    async def connect(
        cls, server: str, ca_pem: bytes, token: str, nursery: trio.Nursery
    ) -> H2Client:
        host, port = server.removeprefix("https://").rsplit(":", 1)
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
        ctx.set_alpn_protocols(["h2"])
        stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=ctx)
        client = cls(stream, token, f"{host}:{port}")
        client.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20,
            },
        )
        client.conn.initiate_connection()
        # h2 applies a raised MAX_FRAME_SIZE only once the server acks it; accept big frames now.
        client.conn.max_inbound_frame_size = 1 << 20
        client.conn.increment_flow_control_window(1 << 30)
        await client.flush()
        nursery.start_soon(client._reader)
        return client

    async def flush(self) -> None:
        async with self.lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def _reader(self) -> None:
        while True:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                if isinstance(event, h2.events.WindowUpdated):
                    self.window_open.set()
                    self.window_open = trio.Event()
                channel = self.channels.get(getattr(event, "stream_id", 0) or 0)
                if channel is not None:
                    channel.send_nowait(event)
            await self.flush()

    async def _open(
        self, method: str, path: str, body: bytes | None, accept: str = "application/json"
    ) -> tuple[int, trio.MemoryReceiveChannel[h2.events.Event]]:
        sid = self.conn.get_next_available_stream_id()
        send, recv = trio.open_memory_channel[h2.events.Event](math.inf)
        self.channels[sid] = send
        headers = [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", self.authority),
            ("authorization", f"Bearer {self.token}"),
            ("accept", accept),
        ]
        if body is not None:
            headers.append(("content-type", "application/json"))
        self.conn.send_headers(sid, headers, end_stream=body is None)
        view = memoryview(body or b"")
        while view:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                await self.flush()
                await self.window_open.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(sid, chunk.tobytes(), end_stream=not view)
        await self.flush()
        return sid, recv

    async def request(
        self, method: str, path: str, obj: Any = None, accept: str = "application/json"
    ) -> tuple[int, Any]:
        body = None if obj is None else json.dumps(obj).encode()
        sid, recv = await self._open(method, path, body, accept)
        status, chunks = 0, []
        async for event in recv:
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                chunks.append(event.data)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                break
        del self.channels[sid]
        return status, json.loads(b"".join(chunks)) if chunks else None

    async def lines(self, path: str, on_headers: Any) -> Any:
        """Yield each line of a streamed response (a watch)."""
        sid, recv = await self._open("GET", path, None)
        buffer = b""
        try:
            async for event in recv:
                if isinstance(event, h2.events.ResponseReceived):
                    on_headers()
                elif isinstance(event, h2.events.DataReceived):
                    buffer += event.data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        yield line
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return
        finally:
            self.channels.pop(sid, None)


async def _create_ns(client: H2Client, name: str) -> None:
    status, body = await client.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    if status != 201:
        raise RuntimeError(f"creating namespace {name}: {status} {body}")


def _cm(name: str, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"bench": "yes"}, "annotations": annotations},
        "data": {"key": "value-" + name},
    }


async def bench_creates(client: H2Client, count: int, concurrency: int) -> float:
    ns = f"creates-{concurrency}"
    await _create_ns(client, ns)
    url = f"/api/v1/namespaces/{ns}/configmaps"
    limiter = trio.CapacityLimiter(concurrency)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with limiter:
            status, _ = await client.request("POST", url, _cm(f"cm-{i}"))
            if status != 201:
                failures += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{failures} creates failed")
    return count / elapsed


async def bench_list(client: H2Client, objects: int, rounds: int = 5) -> dict[str, float]:
    ns = "listing"
    await _create_ns(client, ns)
    url = f"/api/v1/namespaces/{ns}/configmaps"
    limiter = trio.CapacityLimiter(64)

    async def one(i: int) -> None:
        async with limiter:
            status, _ = await client.request("POST", url, _cm(f"obj-{i:05d}"))
            if status != 201:
                raise RuntimeError(f"create failed: {status}")

    async with trio.open_nursery() as nursery:
        for i in range(objects):
            nursery.start_soon(one, i)
    out: dict[str, float] = {}
    for label in ("json", "table"):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            accept = "application/json" if label == "json" else TABLE
            _, body = await client.request("GET", url, accept=accept)
            times.append(time.perf_counter() - start)
            count = len(body["items"] if label == "json" else body["rows"])
            if count != objects + 1:  # and the namespace's kube-root-ca.crt
                raise RuntimeError(f"list returned {count} objects, expected {objects + 1}")
        out[label] = statistics.median(times)
    return out


async def bench_watch(client: H2Client, watchers: int, events: int) -> dict[str, float]:
    ns = "watching"
    await _create_ns(client, ns)
    url = f"/api/v1/namespaces/{ns}/configmaps"
    rv = (await client.request("GET", url))[1]["metadata"]["resourceVersion"]
    sent: dict[str, float] = {}
    latencies: list[float] = []
    ready = trio.Semaphore(0)

    async def watcher() -> None:
        seen = 0
        path = f"{url}?watch=true&resourceVersion={rv}&timeoutSeconds=120"
        async for line in client.lines(path, ready.release):
            if True:
                if not line:
                    continue
                arrived = time.perf_counter()
                event = json.loads(line)
                name = event["object"]["metadata"]["name"]
                latencies.append(arrived - sent[name])
                seen += 1
                if seen == events:
                    return

    async with trio.open_nursery() as nursery:
        for _ in range(watchers):
            nursery.start_soon(watcher)
        for _ in range(watchers):
            await ready.acquire()
        for i in range(events):
            name = f"ev-{i}"
            sent[name] = time.perf_counter()
            status, _ = await client.request("POST", url, _cm(name))
            if status != 201:
                raise RuntimeError(f"create failed: {status}")
            await trio.sleep(0.005)
    return {
        "p50": _percentile(latencies, 50),
        "p99": _percentile(latencies, 99),
        "max": max(latencies),
        "deliveries": float(len(latencies)),
    }


def _cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process (Linux /proc), to tell cost from contention."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tele.sandbox import instance

    with tempfile.TemporaryDirectory(prefix="tele-bench-") as tmp:
        os.environ["XDG_STATE_HOME"] = str(Path(tmp) / "state")
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        name = "bench"
        status = await trio.to_thread.run_sync(lambda: instance.start(name, timeout=60))
        try:
            config = yaml.safe_load(await trio.Path(status.kubeconfig).read_text())
            ca = base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"])
            token = config["users"][0]["user"]["token"]
            async with trio.open_nursery() as nursery:
                client = await H2Client.connect(status.server, ca, token, nursery)
                await client.request("GET", "/version")
                seq = await bench_creates(client, args.creates, 1)
                _progress(f"creates/s, 1 in flight: {seq:.0f}")
                assert status.pid is not None
                cpu_before = _cpu_seconds(status.pid)
                par = await bench_creates(client, args.creates, 32)
                server_cpu_ms = (_cpu_seconds(status.pid) - cpu_before) / args.creates * 1000
                _progress(f"creates/s, 32 in flight: {par:.0f}")
                listing = await bench_list(client, args.objects)
                _progress(f"list: {listing}")
                watching = await bench_watch(client, args.watchers, args.events)
                http_version = "HTTP/2"
                nursery.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(lambda: instance.stop(name))
    return {
        "http_version": http_version,
        "creates_per_s_sequential": round(seq, 1),
        "creates_per_s_32_in_flight": round(par, 1),
        "server_cpu_ms_per_create": round(server_cpu_ms, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "list_objects": args.objects,
        "list_json_s": round(listing["json"], 4),
        "list_table_s": round(listing["table"], 4),
        "watchers": args.watchers,
        "watch_events": args.events,
        "watch_p50_ms": round(watching["p50"] * 1000, 2),
        "watch_p99_ms": round(watching["p99"] * 1000, 2),
        "watch_max_ms": round(watching["max"] * 1000, 2),
        "watch_deliveries": int(watching["deliveries"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--creates", type=int, default=2000)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    result = trio.run(run, args)
    rows = [
        ("protocol", result["http_version"], ""),
        ("ConfigMap creates/s, 1 in flight", f"{result['creates_per_s_sequential']:.0f}", ">= 500"),
        (
            "ConfigMap creates/s, 32 in flight",
            f"{result['creates_per_s_32_in_flight']:.0f}",
            ">= 500",
        ),
        ("server CPU per create", f"{result['server_cpu_ms_per_create']:.2f} ms", ""),
        ("machine load average (1 min)", f"{result['load_average_1m']:.1f}", ""),
        (
            f"list {result['list_objects']} (JSON)",
            f"{result['list_json_s'] * 1000:.0f} ms",
            "<= 500 ms",
        ),
        (f"list {result['list_objects']} (Table)", f"{result['list_table_s'] * 1000:.0f} ms", ""),
        (f"watch p50, {result['watchers']} watchers", f"{result['watch_p50_ms']:.1f} ms", ""),
        (
            f"watch p99, {result['watchers']} watchers",
            f"{result['watch_p99_ms']:.1f} ms",
            "<= 100 ms",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric'.ljust(width)}  {'value':>10}  target")
    for label, value, target in rows:
        print(f"{label.ljust(width)}  {value:>10}  {target}")
    print(json.dumps({"bench": "apiserver", **result}))


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
