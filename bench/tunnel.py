#!/usr/bin/env python3
"""Tunnel transport bench: throughput (1 and 8 streams), CPU, 1 KiB request/response latency and
new streams/s through each kind of TCP relay pair, on loopback and between two network
namespaces joined by a veth. Prints a table and a JSON line; writes JSON + PNG to bench/results/.

Rows (the same client tools and target servers for each):
  a      direct TCP to the target (iperf3 / echo server): the limit
  b      socat relay pair (client socat -> server socat -> target), 256 KiB buffers
  b'     plain trio relay pair, 256 KiB reads: the Python floor per hop
  c-tcp  tele: client relay -> h2 tunnel link over TCP -> tunnel server -> target
  c-ws   tele: the same link inside the port-forward websocket framing (no TLS)

Run as root (network namespaces):  sudo .venv/bin/python bench/tunnel.py [--duration 3]
With TELE_BENCH_OPTIMISTIC=1 the c rows open tunnel streams optimistically (DATA right behind
OPEN, no wait for ACCEPT; see `tele.rpc.tunnel.dial`).
The namespaces are named tele-bench-<random>-{a,b} and are always deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
PY = sys.executable
KIB = 1024
READ_SIZE = 256 * KIB

EFF_HEADER = "eff/b'"  # MB per relay CPU-second relative to the trio relay pair
RATIO_HEADER = "x1/b'"  # 1-stream throughput relative to the trio relay pair
OVER_FLOOR_HEADER = "+p50/b'"  # p50 added over the trio relay pair
HEADER = (
    f"{'env':8} {'row':6} {'MB/s x1':>9} {'MB/s x8':>9} {'CPU%':>6} {'p50 µs':>8} "
    f"{'p99 µs':>8} {'new/s':>9} {'opens/s':>9}"
)
ROWS = ("a", "b", "b'", "c-tcp", "c-ws")
ENVS = ("loopback", "veth")


# ===================================================================== helper roles (processes)


def role_echo(listen: str) -> None:
    """Echo server (target for latency and stream-rate)."""
    import trio

    host, port = _split(listen)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(trio.serve_tcp, handle, port, host=host, backlog=4096)
            )
            _ready()

    trio.run(main)


async def _pump(src: object, dst: object, read_size: int) -> None:
    import trio

    try:
        while data := await src.receive_some(read_size):  # type: ignore[attr-defined]
            await dst.send_all(data)  # type: ignore[attr-defined]
        await dst.send_eof()  # type: ignore[attr-defined]
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def role_relay(listen: str, connect: str, read_size: int) -> None:
    """(b') a plain trio TCP relay: accept, dial `connect`, copy both ways, half-close."""
    import trio

    host, port = _split(listen)
    target = _split(connect)

    async def handle(downstream: trio.SocketStream) -> None:
        async with downstream:
            try:
                upstream = await trio.open_tcp_stream(*target)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, downstream, upstream, read_size)
                nursery.start_soon(_pump, upstream, downstream, read_size)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(trio.serve_tcp, handle, port, host=host, backlog=4096)
            )
            _ready()

    trio.run(main)


def role_latency(connect: str, count: int) -> None:
    """p50/p99 of a 1 KiB request/response on one connection (blocking socket, TCP_NODELAY)."""
    host, port = _split(connect)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = os.urandom(KIB)
    buffer = bytearray(KIB)
    view = memoryview(buffer)
    samples: list[int] = []
    for i in range(count + count // 10):
        start = time.perf_counter_ns()
        sock.sendall(message)
        got = 0
        while got < KIB:
            n = sock.recv_into(view[got:])
            if not n:
                raise SystemExit("latency: connection closed")
            got += n
        if i >= count // 10:  # the first tenth warms up caches and the relays' code paths
            samples.append(time.perf_counter_ns() - start)
        if bytes(buffer) != message:
            raise SystemExit("latency: echo mismatch")
    sock.close()
    samples.sort()
    print(
        json.dumps(
            {
                "p50_us": samples[len(samples) // 2] / 1000,
                "p99_us": samples[int(len(samples) * 0.99)] / 1000,
            }
        )
    )


def role_rate(connect: str, duration: float, concurrency: int) -> None:
    """New streams/s: connect, 1-byte echo (so the whole path is up), close; `concurrency`
    connections at a time."""
    import trio

    host, port = _split(connect)
    done = 0
    failed = 0

    async def worker(deadline: float) -> None:
        nonlocal done, failed
        while trio.current_time() < deadline:
            try:
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(b"x")
                    if await stream.receive_some(1) != b"x":
                        raise OSError("no echo")
                done += 1
            except (OSError, trio.BrokenResourceError):
                failed += 1
                await trio.sleep(0.001)

    async def main() -> None:
        deadline = trio.current_time() + duration
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, deadline)

    start = time.perf_counter()
    trio.run(main)
    elapsed = time.perf_counter() - start
    print(json.dumps({"rate": done / elapsed, "failed": failed}))


def role_tele(
    side: str, listen: str, peer: str, *, target: str, websocket: bool, open_rate: float = 0
) -> None:
    """(c) tele's tunnel. `server`: accept links (TCP, or port-forward websockets) and serve
    tunnel OPENs on them. `client`: one link to `peer`; every TCP connection accepted on `listen`
    becomes a tunnel stream to `target`, spliced both ways."""

    import trio
    import trio_websocket

    from tele.k8s import portforward
    from tele.k8s.config import ClusterConnection
    from tele.net.tunnel import Destination, Protocol
    from tele.rpc.h2link import H2Link, LinkSettings, open_link, serve_link
    from tele.rpc.tunnel import TunnelServer, dial, splice

    host, port = _split(listen) if listen != "-" else ("", 0)
    # Knobs for tuning runs (defaults: LinkSettings' and splice's own).
    tuning = {
        k: int(v)
        for k in (
            "max_frame_size",
            "read_size",
            "stream_window",
            "connection_window",
            "write_high_water",
        )
        if (v := os.environ.get(f"TELE_BENCH_{k.upper()}"))
    }
    settings = LinkSettings(**tuning)
    relay_read = int(os.environ.get("TELE_BENCH_RELAY_READ", READ_SIZE))
    # TELE_BENCH_OPTIMISTIC=1: the client opens tunnel streams without waiting for ACCEPT.
    optimistic = os.environ.get("TELE_BENCH_OPTIMISTIC") == "1"

    async def server_main() -> None:
        tunnels = TunnelServer(read_size=relay_read)
        async with trio.open_nursery() as nursery:
            if websocket:

                async def on_request(request: trio_websocket.WebSocketRequest) -> None:
                    stream = await portforward.accept_portforward(request, 1)
                    await serve_link(
                        stream, tunnels.handle, settings=settings, prepare=tunnels.prepare
                    )

                await nursery.start(
                    functools.partial(
                        trio_websocket.serve_websocket,
                        on_request,
                        host,
                        port,
                        None,
                        receive_buffer_size=portforward.RECEIVE_BUFFER_SIZE,
                        max_message_size=portforward.MAX_RECEIVE_MESSAGE,
                        message_queue_size=portforward.MESSAGE_QUEUE_SIZE,
                    )
                )
            else:

                async def on_connection(stream: trio.SocketStream) -> None:
                    await serve_link(
                        stream, tunnels.handle, settings=settings, prepare=tunnels.prepare
                    )

                await nursery.start(
                    functools.partial(trio.serve_tcp, on_connection, port, host=host)
                )
            _ready()

    async def client_main() -> None:
        target_host, target_port = _split(target)
        destination = Destination(Protocol.TCP, ipaddress.ip_address(target_host), target_port)
        async with contextlib.AsyncExitStack() as stack:
            if websocket:
                cluster = ClusterConnection(f"http://{peer}", "bench", "bench", None)
                transport: trio.abc.Stream = await stack.enter_async_context(
                    portforward.open_portforward(cluster, "bench", "tunnel", 1)
                )
            else:
                transport = await trio.open_tcp_stream(*_split(peer))
            link = await stack.enter_async_context(
                open_link(transport, client_side=True, settings=settings)
            )

            if open_rate:
                await _open_rate(link, destination, open_rate)
                return

            async def on_connection(local: trio.SocketStream) -> None:
                async with local:
                    tunnel = await dial(link, destination, session="bench", optimistic=optimistic)
                    async with tunnel:
                        await splice(tunnel, local, read_size=relay_read)

            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(trio.serve_tcp, on_connection, port, host=host, backlog=4096)
                )
                _ready()

    async def _open_rate(link: H2Link, destination: Destination, duration: float) -> None:
        # Tunnel streams opened per second on one link: OPEN, ACCEPT (the server dialed the
        # echo server), 1-byte echo, close; 64 at a time. No kernel accept on the client side.
        done = 0

        async def worker(deadline: float) -> None:
            nonlocal done
            while trio.current_time() < deadline:
                tunnel = await dial(link, destination, session="bench", optimistic=optimistic)
                async with tunnel:
                    await tunnel.send_all(b"x")
                    await tunnel.send_eof()
                    while await tunnel.receive_some():
                        pass
                done += 1

        started = trio.current_time()
        cpu_started = time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(64):
                nursery.start_soon(worker, started + duration)
        rate = done / (trio.current_time() - started)
        # CPU per open of this (client) process: a figure a loaded machine disturbs less.
        cpu_us = (time.process_time() - cpu_started) / max(done, 1) * 1e6
        print(json.dumps({"rate": rate, "client_cpu_us": cpu_us}))

    _run_profiled(lambda: trio.run(server_main if side == "server" else client_main), side)


def _run_profiled(run: Callable[[], None], name: str) -> None:
    """Run `run`; with TELE_BENCH_PROFILE=<dir>, under cProfile, stats dumped when stopped."""
    directory = os.environ.get("TELE_BENCH_PROFILE")
    if not directory:
        run()
        return
    import cProfile

    profile = cProfile.Profile()

    def stop(*_: object) -> None:
        profile.disable()
        profile.dump_stats(f"{directory}/{name}-{os.getpid()}.prof")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    profile.runcall(run)
    stop()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _ready() -> None:
    print("ready", flush=True)


# ===================================================================== orchestration


@dataclass
class Env:
    name: str
    client_ns: str | None  # where the client tools and the client-side relay run
    server_ns: str | None  # where the server-side relay and the targets run
    server_ip: str  # how the client side reaches the server side
    target_bind: str  # where targets listen inside the server side


@dataclass
class Row:
    env: str
    row: str
    mbps_1: float | None = None
    mbps_8: float | None = None
    cpu_pct: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    streams_per_s: float | None = None
    opens_per_s: float | None = None  # c rows: tunnel streams opened per second on one link
    mb_per_cpu_s: float | None = None  # relay rows: 1-stream MB per CPU-second of the pair
    notes: list[str] = field(default_factory=list)


class Procs:
    """Processes this bench started; ended by PID only, always."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, ns: str | None, argv: list[str], ready: str | None = "ready"
    ) -> subprocess.Popen[str]:
        """Start `argv` in `ns`; wait for a stdout line containing `ready` (None: don't wait)."""
        proc = subprocess.Popen(
            _in_ns(ns, argv),
            stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
            stderr=subprocess.PIPE if ready else subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(proc)
        if ready is None:
            return proc
        deadline = time.monotonic() + 15
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"{argv[:3]} exited before ready: {err.strip()[-500:]}")
            if ready in line:
                return proc
        raise RuntimeError(f"{argv[:3]} not ready within 15 s")

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def _in_ns(ns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def _run_json(ns: str | None, argv: list[str], timeout: float) -> dict[str, object]:
    out = subprocess.run(
        _in_ns(ns, argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0 and argv[0] != "iperf3":
        raise RuntimeError(f"{argv[:3]} failed: {(out.stderr or out.stdout).strip()[-400:]}")
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    # iperf3 -J prints one JSON document (also on errors, with "error"); our roles a last line.
    if argv[0] == "iperf3":
        return json.loads(out.stdout)  # type: ignore[no-any-return]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def _cpu_ticks(pids: list[int]) -> int:
    """utime+stime of the processes and all their descendants, plus reaped children's time."""
    total = 0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (OSError, ValueError):
            continue
        todo += [int(c) for c in children]
    return total


@contextlib.contextmanager
def _cpu_meter(pids: list[int]) -> Iterator[dict[str, float]]:
    result: dict[str, float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    start_ticks, start = _cpu_ticks(pids), time.monotonic()
    yield result
    result["cpu_pct"] = 100 * (_cpu_ticks(pids) - start_ticks) / hz / (time.monotonic() - start)


@contextlib.contextmanager
def _namespaces() -> Iterator[Env]:
    tag = secrets.token_hex(3)
    ns_a, ns_b = f"tele-bench-{tag}-a", f"tele-bench-{tag}-b"
    veth_a, veth_b = f"tb{tag}a", f"tb{tag}b"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            created.append(ns)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                veth_a,
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                veth_b,
                "netns",
                ns_b,
            ],
            check=True,
        )
        for ns, dev, addr in ((ns_a, veth_a, "10.250.0.1/24"), (ns_b, veth_b, "10.250.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield Env("veth", ns_a, ns_b, "10.250.0.2", "0.0.0.0")
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "delete", ns], check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_path(
    procs: Procs, env: Env, row: str, target_port: int
) -> tuple[str, list[subprocess.Popen[str]], str]:
    """Start the row's relay pair towards `target_port`; return the address the client tools
    connect to and the relay processes."""
    if row == "a":
        return f"{env.server_ip}:{target_port}", [], ""
    entry, hop = _free_port(), _free_port()
    server_listen = f"{env.server_ip}:{hop}"
    target = f"127.0.0.1:{target_port}"
    if row == "b":
        listen = "fork,reuseaddr,backlog=4096,nodelay"
        server = procs.start(
            env.server_ns,
            [
                "socat",
                f"-b{READ_SIZE}",
                f"TCP-LISTEN:{hop},bind={env.server_ip},{listen}",
                f"TCP:{target},nodelay",
            ],
            ready=None,
        )
        client = procs.start(
            env.client_ns,
            [
                "socat",
                f"-b{READ_SIZE}",
                f"TCP-LISTEN:{entry},bind=127.0.0.1,{listen}",
                f"TCP:{server_listen},nodelay",
            ],
            ready=None,
        )
        _wait_listening(env.server_ns, env.server_ip, hop)
        _wait_listening(env.client_ns, "127.0.0.1", entry)
    elif row == "b'":
        server = procs.start(env.server_ns, [PY, str(HERE), "relay", server_listen, target])
        client = procs.start(
            env.client_ns, [PY, str(HERE), "relay", f"127.0.0.1:{entry}", server_listen]
        )
    else:
        ws = ["--websocket"] if row == "c-ws" else []
        server = procs.start(env.server_ns, [PY, str(HERE), "tele", "server", server_listen, *ws])
        client = procs.start(
            env.client_ns,
            [
                PY,
                str(HERE),
                "tele",
                "client",
                f"127.0.0.1:{entry}",
                server_listen,
                "--target",
                target,
                *ws,
            ],
        )
    return f"127.0.0.1:{entry}", [server, client], server_listen


def _wait_listening(ns: str | None, host: str, port: int) -> None:
    probe = (
        "import socket, time\n"
        "for _ in range(300):\n"
        f"    try: socket.create_connection(({host!r}, {port}), 1).close(); break\n"
        "    except OSError: time.sleep(0.01)"
    )
    subprocess.run(_in_ns(ns, [PY, "-c", probe]), check=True, timeout=10)


def measure_env(
    env: Env, rows: list[str], duration: float, repeat: int, results: list[Row]
) -> None:
    """Measure every row `repeat` times, rows interleaved (a machine shared with other work
    then disturbs all rows alike); each metric is the median of its runs."""
    procs = Procs()
    runs: dict[str, list[Row]] = {row: [] for row in rows}
    try:
        iperf_port, echo_port = _free_port(), _free_port()

        def start_iperf() -> subprocess.Popen[str]:
            # A fresh one-test server per run: a run that times out cannot wedge the next one.
            return procs.start(
                env.server_ns,
                [
                    "iperf3",
                    "-s",
                    "-1",
                    "-B",
                    env.target_bind,
                    "-p",
                    str(iperf_port),
                    "--forceflush",
                ],
                ready="Server listening",
            )

        procs.start(env.server_ns, [PY, str(HERE), "echo", f"{env.target_bind}:{echo_port}"])
        for _ in range(repeat):
            for row in rows:
                result = Row(env.name, row)
                runs[row].append(result)
                started: list[subprocess.Popen[str]] = []
                try:
                    # One relay pair towards iperf3 (throughput, CPU), one towards the echo.
                    bulk_entry, bulk, _ = _start_path(procs, env, row, iperf_port)
                    started += bulk
                    echo_entry, echo, echo_link = _start_path(procs, env, row, echo_port)
                    started += echo
                    _measure_row(
                        env,
                        bulk_entry=bulk_entry,
                        echo_entry=echo_entry,
                        start_iperf=start_iperf,
                        stop=procs.stop,
                        relays=bulk,
                        duration=duration,
                        result=result,
                    )
                    if row.startswith("c-"):
                        # Tunnel opens/s straight on a link (no kernel accept on the client).
                        argv = [
                            PY,
                            str(HERE),
                            "tele",
                            "client",
                            "-",
                            echo_link,
                            "--target",
                            f"127.0.0.1:{echo_port}",
                            "--open-rate",
                            str(min(duration, 2)),
                        ]
                        if row == "c-ws":
                            argv.append("--websocket")
                        rate = _run_json(env.client_ns, argv, duration + 30)
                        result.opens_per_s = float(rate["rate"])  # type: ignore[arg-type]
                except (RuntimeError, subprocess.SubprocessError, KeyError, ValueError) as exc:
                    result.notes.append(f"failed: {exc}")
                    print(f"  {env.name} {row}: failed ({exc})", file=sys.stderr)
                finally:
                    for proc in started:
                        procs.stop(proc)
                print(f"{env.name:8} {row:6} {_fmt_row(result)}", file=sys.stderr)
    finally:
        procs.stop_all()
    for row in rows:
        results.append(_median_row(env.name, row, runs[row]))


def _median_row(env: str, row: str, runs: list[Row]) -> Row:
    def median(name: str) -> float | None:
        values = sorted(v for r in runs if (v := getattr(r, name)) is not None)
        return values[len(values) // 2] if values else None

    notes = sorted({note for r in runs for note in r.notes})
    return Row(
        env,
        row,
        mbps_1=median("mbps_1"),
        mbps_8=median("mbps_8"),
        cpu_pct=median("cpu_pct"),
        p50_us=median("p50_us"),
        p99_us=median("p99_us"),
        streams_per_s=median("streams_per_s"),
        opens_per_s=median("opens_per_s"),
        mb_per_cpu_s=median("mb_per_cpu_s"),
        notes=notes,
    )


def _measure_row(
    env: Env,
    *,
    bulk_entry: str,
    echo_entry: str,
    start_iperf: Callable[[], subprocess.Popen[str]],
    stop: Callable[[subprocess.Popen[str]], None],
    relays: list[subprocess.Popen[str]],
    duration: float,
    result: Row,
) -> None:
    """Each metric on its own: one that fails is noted and the others are still measured."""
    host, port = _split(bulk_entry)
    timeout = duration + 30
    for streams in (1, 8):
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-P", str(streams)]
        server = start_iperf()
        try:
            # CPU of the relay pair; for row a (no relays) of the iperf3 server, for reference.
            with _cpu_meter([p.pid for p in relays] or [server.pid]) as cpu:
                data = _run_json(env.client_ns, [*argv, "-J"], timeout)
            if "error" in data:
                raise RuntimeError(f"iperf3: {data['error']}")
            mbps = data["end"]["sum_received"]["bits_per_second"] / 8 / 1e6  # type: ignore[index]
        except (RuntimeError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            result.notes.append(f"{streams} stream(s): {exc}")
            continue
        finally:
            stop(server)
        if streams == 1:
            result.mbps_1, result.cpu_pct = mbps, cpu["cpu_pct"]
            if relays and cpu["cpu_pct"] > 0:
                result.mb_per_cpu_s = mbps / (cpu["cpu_pct"] / 100)
        else:
            result.mbps_8 = mbps
    try:
        lat = _run_json(env.client_ns, [PY, str(HERE), "latency", echo_entry, "5000"], timeout)
        result.p50_us, result.p99_us = float(lat["p50_us"]), float(lat["p99_us"])  # type: ignore[arg-type]
        rate_s = str(min(duration, 2.0))
        rate = _run_json(env.client_ns, [PY, str(HERE), "rate", echo_entry, rate_s, "32"], timeout)
        result.streams_per_s = float(rate["rate"])  # type: ignore[arg-type]
        if rate.get("failed"):
            result.notes.append(f"{rate['failed']} stream setups failed")
    except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        result.notes.append(f"latency/rate: {exc}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_row(r: Row) -> str:
    return (
        f"{_fmt(r.mbps_1, '9.0f')} {_fmt(r.mbps_8, '9.0f')} {_fmt(r.cpu_pct, '6.0f')} "
        f"{_fmt(r.p50_us, '8.1f')} {_fmt(r.p99_us, '8.1f')} {_fmt(r.streams_per_s, '9.0f')} "
        f"{_fmt(r.opens_per_s, '9.0f')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("echo").add_argument("listen")
    relay = sub.add_parser("relay")
    relay.add_argument("listen")
    relay.add_argument("connect")
    relay.add_argument("--read", type=int, default=READ_SIZE)
    latency = sub.add_parser("latency")
    latency.add_argument("connect")
    latency.add_argument("count", type=int)
    rate = sub.add_parser("rate")
    rate.add_argument("connect")
    rate.add_argument("duration", type=float)
    rate.add_argument("concurrency", type=int)
    tele = sub.add_parser("tele")
    tele.add_argument("side", choices=["client", "server"])
    tele.add_argument("listen")
    tele.add_argument("peer", nargs="?", default="")
    tele.add_argument("--target", default="")
    tele.add_argument("--websocket", action="store_true")
    tele.add_argument("--open-rate", type=float, default=0, help="measure opens/s for N s")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per throughput run")
    parser.add_argument("--envs", default=",".join(ENVS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; medians reported")
    args = parser.parse_args()

    if args.command == "echo":
        return role_echo(args.listen)
    if args.command == "relay":
        return role_relay(args.listen, args.connect, args.read)
    if args.command == "latency":
        return role_latency(args.connect, args.count)
    if args.command == "rate":
        return role_rate(args.connect, args.duration, args.concurrency)
    if args.command == "tele":
        return role_tele(
            args.side,
            args.listen,
            args.peer,
            target=args.target,
            websocket=args.websocket,
            open_rate=args.open_rate,
        )
    run_bench(args.envs.split(","), args.rows.split(","), args.duration, args.repeat)


def run_bench(envs: list[str], rows: list[str], duration: float, repeat: int) -> None:
    for tool in ("iperf3", "socat", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/tunnel.py needs {tool}: run scripts/setup.sh")
    if "veth" in envs and os.geteuid() != 0:
        raise SystemExit("bench/tunnel.py needs root for the veth environment (or --envs loopback)")
    # Terminate cleanly (finally blocks delete namespaces) on SIGTERM as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: list[Row] = []
    print(HEADER, file=sys.stderr)
    for name in envs:
        if name == "loopback":
            loopback = Env("loopback", None, None, "127.0.0.1", "127.0.0.1")
            measure_env(loopback, rows, duration, repeat, results)
        elif name == "veth":
            with _namespaces() as env:
                measure_env(env, rows, duration, repeat, results)
    print("medians:", file=sys.stderr)
    report(results, duration, repeat)


def report(results: list[Row], duration: float, repeat: int) -> None:
    floor = {r.env: r for r in results if r.row == "b'"}
    direct = {r.env: r for r in results if r.row == "a"}
    # MB per CPU-second of the relay pair: unlike MB/s it hardly moves when other work on the
    # machine takes CPU from the run, so it is the steadier ratio on a shared machine.
    # +p50: added over the direct path (a); +p50/b': added over the plain trio relay pair,
    # i.e. what the tunnel itself costs beyond two Python hops.
    lines = [
        f"{HEADER} {RATIO_HEADER:>7} {'+p50 µs':>8} {OVER_FLOOR_HEADER:>8} {'MB/cpu·s':>9} "
        f"{EFF_HEADER:>7}"
    ]
    summary = []
    for r in results:
        base = floor.get(r.env)
        ratio = r.mbps_1 / base.mbps_1 if base and base.mbps_1 and r.mbps_1 else None
        a = direct.get(r.env)
        added = r.p50_us - a.p50_us if a and a.p50_us is not None and r.p50_us is not None else None
        over_floor = (
            r.p50_us - base.p50_us
            if base and base.p50_us is not None and r.p50_us is not None
            else None
        )
        eff = (
            r.mb_per_cpu_s / base.mb_per_cpu_s
            if base and base.mb_per_cpu_s and r.mb_per_cpu_s
            else None
        )
        lines.append(
            f"{r.env:8} {r.row:6} {_fmt_row(r)} {_fmt(ratio, '7.2f')} {_fmt(added, '8.1f')} "
            f"{_fmt(over_floor, '8.1f')} {_fmt(r.mb_per_cpu_s, '9.0f')} {_fmt(eff, '7.2f')}"
        )
        summary.append(
            {
                **asdict(r),
                "ratio_to_trio_relay": ratio,
                "added_p50_us": added,
                "added_p50_over_trio_relay_us": over_floor,
                "eff_ratio": eff,
            }
        )
    print("\n".join(lines))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "bench": "tunnel",
        "time": stamp,
        "duration_s": duration,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "rows": summary,
    }
    print(json.dumps(record))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"tunnel-{stamp}.json").write_text(json.dumps(record, indent=1) + "\n")
    chart = RESULTS / f"tunnel-{stamp}.png"
    if _chart(results, chart):
        print(f"chart: {chart}", file=sys.stderr)


def _chart(results: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: pip install -e '.[bench]' for matplotlib", file=sys.stderr)
        return False
    envs = sorted({r.env for r in results}, key=ENVS.index)
    fig, axes = plt.subplots(len(envs), 3, figsize=(15, 4 * len(envs)), squeeze=False)
    for row_axes, env in zip(axes, envs, strict=True):
        rows = [r for r in results if r.env == env]
        names = [r.row for r in rows]
        x = range(len(rows))
        ax = row_axes[0]
        ax.bar([i - 0.2 for i in x], [r.mbps_1 or 0 for r in rows], 0.4, label="1 stream")
        ax.bar([i + 0.2 for i in x], [r.mbps_8 or 0 for r in rows], 0.4, label="8 streams")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("MB/s")
        ax.set_title(f"{env}: throughput")
        ax.legend()
        ax = row_axes[1]
        ax.bar([i - 0.2 for i in x], [r.p50_us or 0 for r in rows], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [r.p99_us or 0 for r in rows], 0.4, label="p99")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("µs")
        ax.set_title(f"{env}: 1 KiB request/response")
        ax.legend()
        ax = row_axes[2]
        ax.bar([i - 0.2 for i in x], [r.streams_per_s or 0 for r in rows], 0.4, label="via TCP")
        ax.bar([i + 0.2 for i in x], [r.opens_per_s or 0 for r in rows], 0.4, label="on link")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("new streams/s")
        ax.legend()
        ax.set_title(f"{env}: stream setup rate")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
