#!/usr/bin/env python3
"""VIF bench: MB/s (1 and 8 streams, iperf3), daemon CPU%, 1 KiB request/response latency and
new connections/s from a "laptop" namespace to a "cluster" namespace, over each path:

  a         direct: iperf3 over the veth joining the namespaces (no tele): the limit
  b         socat relay chain with tele's hops (laptop socat -> veth -> cluster socat -> server)
  c         tele: app -> TUN (vnet header + TSO, MTU 1500) -> userspace TCP -> h2 tunnel link
            -> TunnelServer (a process in the cluster namespace) -> server
  c-plain   tele without offloads, MTU 1500 (one 1500-byte packet per read and write)
  c-65535   tele without offloads, MTU 65535
  d         sshuttle (nft method) in the laptop namespace, over ssh to an sshd of this run in
            the cluster namespace; CPU% is sshuttle's and its ssh's (skipped, with the reason,
            when sshuttle, sshd or ssh-keygen is missing or it does not connect)

Columns: CPU% is the daemon's during the iperf3 runs (for c this process: it is the daemon;
relay% is the cluster side's); p50/p99 of 1 KiB request/response on one connection; conn/s is
one client connecting, echoing a byte and closing in a loop (latency-bound); conn/s32 the same
with 32 connections in flight (a throughput figure), and µs/conn the daemon's CPU per connection
during it; 1st µs the p50 of the sequential loop's connect() (the SYN) to the echo's first
byte; wr/conn the TUN writes per connection during conn/s32 (rows c*); relay µs the cluster
side's CPU per connection during it (the tunnel server; for d sshd and sshuttle's server);
refused ms the p50 of connect() to a port nothing listens on until it fails (-1: never; acc/20
how many of 20 such connects were accepted instead, as if something listened); RSS MiB is the
daemon's after the rest of the row, and @1000 while 1,000 idle
connections (each echoed a byte, so fully set up) are open through it; GC ms is how long one
full garbage collection stalls the daemon then (row c: the longest pause the GC can cause).
With --keepalive N: req/sN is 100-byte request/answers per second on N kept-open connections
(TCP_NODELAY, one request in flight on each, for up to 2 s), p50 N µs their p50, µs/req the
daemon's CPU (user+sys) per request and relay µs/req the cluster side's (JSON: ka_req_s,
ka_reqs, ka_failed, ka_p50, cpu_us_per_req, relay_us_per_req; absent without --keepalive).
For d, CPU%, µs/conn and RSS are sshuttle's client's. In every row the servers (iperf3, a trio
echo server) are processes of their own, as a pod's would be.

Run as root:  .venv/bin/python bench/vif.py [--duration 3] [--rows a,b,c]
  --conn-only: latency and connection figures only (no iperf3, no held connections): A/B runs.
  --tcp FIELD=VALUE: rows c* with a TCPConfig field changed (e.g. fin_ack_delay=0).
  --keepalive N: also small requests on N kept-open connections (req/sN, µs/req), e.g. 50.
  --rtt 10,40: rows c* and d again with that round trip added between the tunnel's two ends
            (bench/delay_relay.py between the daemon and the tunnel server, or between
            sshuttle's ssh and sshd): rows named c@10 ...; `RTT ms` is the round trip the relay
            really adds (measured through it alone) and `+setup` the SYN -> first byte p50 above
            it (the target at 40 ms: <= 2 ms). Fewer 1 KiB samples, no held connections.
Namespaces are named tele-vifbench-<random>-{l,c} and always deleted. Prints a table and a
JSON line; writes the JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import delay_relay  # bench/delay_relay.py (this script's directory is on sys.path)

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
PY = sys.executable
LAPTOP_IP, CLUSTER_IP = "10.99.0.1", "10.99.0.2"
POD_IP = "10.244.1.5"
IPERF_PORT, ECHO_PORT = 5201, 7000
TELE_ECHO_PORT = 7011
SOCAT_LAPTOP, SOCAT_CLUSTER = 6001, 6002


def _native() -> bool:
    """Is tele.net's mypyc build in use (`scripts/build_native.py`; TELE_NATIVE=0: not)?"""
    import tele.net

    return tele.net.NATIVE


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    tag = secrets.token_hex(3)
    laptop, cluster = f"tele-vifbench-{tag}-l", f"tele-vifbench-{tag}-c"
    made: list[str] = []
    try:
        for name in (laptop, cluster):
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", laptop, "link", "add", "veth0", "type", "veth", "peer", "veth1", "netns", cluster)
        ip("-n", laptop, "addr", "add", f"{LAPTOP_IP}/30", "dev", "veth0")
        ip("-n", cluster, "addr", "add", f"{CLUSTER_IP}/30", "dev", "veth1")
        ip("-n", laptop, "link", "set", "veth0", "up")
        ip("-n", cluster, "link", "set", "veth1", "up")
        ip("-n", cluster, "addr", "add", f"{POD_IP}/32", "dev", "lo")
        yield laptop, cluster
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


# ------------------------------------------------------------------------- cluster-side role


def role_cluster(fd: int) -> None:
    """Tunnel server on the h2 link over socket `fd`, plus a trio echo server on POD_IP (for
    probes that run this role alone; the bench's rows use an echo server process of their own,
    as the pod is, so that relay% is the tunnel server's alone)."""
    import trio

    from tele.rpc.server import Router, serve_connection
    from tele.rpc.tunnel import TunnelServer

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    _raise_nofile()

    async def main() -> None:
        router = Router()
        tunnels = TunnelServer()
        router.raw(TunnelServer.matches, tunnels.handle, prepare=tunnels.prepare)
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(trio.serve_tcp, echo, ECHO_PORT, host=POD_IP))
            await serve_connection(trio.SocketStream(sock), router)
            nursery.cancel_scope.cancel()

    from tunnel import _run_profiled  # bench/tunnel.py: TELE_BENCH_PROFILE=<dir> profiles it

    _run_profiled(lambda: trio.run(main), "vif-cluster")


def _raise_nofile() -> None:
    """Room for HELD connections (and their sockets in the echo servers) above the default."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * HELD if hard == resource.RLIM_INFINITY else min(4 * HELD, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ---------------------------------------------------------------------------- measurements

LATENCY_CLIENT = """
import socket, time, json, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 10
while True:  # the echo server (a process of its own) may still be starting
    try:
        s = socket.create_connection((host, port))
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 1024
samples = []
for _ in range(count):
    t = time.perf_counter()
    s.sendall(msg)
    got = 0
    while got < 1024:
        got += len(s.recv(4096))
    samples.append(time.perf_counter() - t)
s.close()
start = time.perf_counter()
n = 0
first = []  # connect() called (the SYN) -> the first byte of the answer
handshake = []  # connect() called -> it returned (the SYN-ACK came)
while time.perf_counter() - start < 2:
    t = time.perf_counter()
    c = socket.create_connection((host, port))
    handshake.append(time.perf_counter() - t)
    c.sendall(b"y")
    c.recv(10)
    first.append(time.perf_counter() - t)
    c.close()
    n += 1
rate = n / (time.perf_counter() - start)
refused, accepted = [], 0  # a port nothing listens on: refused how fast, or accepted (wrongly)
for _ in range(20):
    c = socket.socket()
    c.settimeout(5)
    t = time.perf_counter()
    try:
        c.connect((host, port + 100))
        accepted += 1
    except OSError:
        refused.append(time.perf_counter() - t)
    c.close()
samples.sort()
first.sort()
handshake.sort()
refused.sort()
print(json.dumps({"p50": samples[len(samples) // 2] * 1e6,
                  "p99": samples[int(len(samples) * 0.99)] * 1e6, "conn_s": rate,
                  "first_p50": first[len(first) // 2] * 1e6,
                  "connect_p50": handshake[len(handshake) // 2] * 1e6,
                  "refused_ms": refused[len(refused) // 2] * 1e3 if refused else -1,
                  "closed_accepted": accepted}))
"""

RATE_CLIENT = """
# A lean epoll loop (a trio client gave row a fewer connections/s than one blocking client).
import errno, json, select, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
duration, concurrency = float(sys.argv[3]), int(sys.argv[4])
ep = select.epoll()
socks = {}  # fd -> (socket, phase): 0 connecting, 1 waiting for the echo
done = failed = 0
def start():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((host, port))
    socks[s.fileno()] = (s, 0)
    ep.register(s.fileno(), select.EPOLLOUT)
def finish(fd, ok):
    global done, failed
    s, _ = socks.pop(fd)
    ep.unregister(fd)
    s.close()
    if ok:
        done += 1
    else:
        failed += 1
t0 = time.perf_counter()
deadline = t0 + duration
for _ in range(concurrency):
    start()
while socks:
    for fd, ev in ep.poll(1.0):
        s, phase = socks[fd]
        if phase == 0:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                finish(fd, False)
            else:
                s.send(b"y")
                socks[fd] = (s, 1)
                ep.modify(fd, select.EPOLLIN)
                continue
        else:
            try:
                finish(fd, s.recv(1) == b"y")
            except OSError:
                finish(fd, False)
        if time.perf_counter() < deadline:
            start()
print(json.dumps({"conn_s_par": done / (time.perf_counter() - t0), "conns": done,
                  "conn_failed": failed}))
"""

KEEPALIVE_CLIENT = """
# N kept-open connections, each with one 100-byte request in flight (TCP_NODELAY), for a while.
import json, selectors, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
duration, count = float(sys.argv[3]), int(sys.argv[4])
msg = b"x" * 100
sel = selectors.DefaultSelector()
for _ in range(count):
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, [0, 0.0])  # bytes of the answer so far, sent at
done, failed, samples = 0, 0, []
t0 = time.perf_counter()
for key in sel.get_map().values():
    key.data[1] = time.perf_counter()
    key.fileobj.send(msg)
deadline = t0 + duration
while sel.get_map() and time.perf_counter() < deadline:
    for key, _ in sel.select(0.5):
        s, state = key.fileobj, key.data
        try:
            got = s.recv(65536)
        except OSError:
            got = b""
        if not got:  # the path broke a kept-open connection
            failed += 1
            sel.unregister(s)
            s.close()
            continue
        state[0] += len(got)
        if state[0] >= len(msg):
            now = time.perf_counter()
            samples.append(now - state[1])
            done += 1
            state[0] -= len(msg)
            state[1] = now
            s.send(msg)
elapsed = time.perf_counter() - t0
for key in list(sel.get_map().values()):
    key.fileobj.close()
samples.sort()
print(json.dumps({"ka_req_s": done / elapsed, "ka_reqs": done, "ka_failed": failed,
                  "ka_p50": samples[len(samples) // 2] * 1e6 if samples else 0.0}))
"""

HOLD_CLIENT = """
import resource, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, count + 64))
held = []
for _ in range(count):
    s = socket.create_connection((host, port))
    s.sendall(b"y")
    s.recv(1)  # echoed: the whole path of this connection is up
    held.append(s)
print("held", flush=True)
sys.stdin.readline()
for s in held:
    s.close()
"""


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def iperf(laptop: str, host: str, port: int, streams: int, duration: float) -> float:
    try:
        out = subprocess.run(
            in_ns(laptop, "iperf3", "-c", host, "-p", str(port), "-P", str(streams),
                  "-t", str(duration), "-J"),
            capture_output=True, text=True, timeout=duration + 30, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        # A slow path (sshuttle with a round trip: ~1 MB/s) may not drain what iperf3 queued
        # in time for its closing exchange: no figure rather than no bench.
        print(f"iperf3 to {host}:{port} ({streams} streams) did not finish in {duration + 30:g} s")
        return 0.0
    try:
        data = json.loads(out.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 8e6
    except (ValueError, KeyError):
        print(f"iperf3 to {host}:{port} failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        return 0.0


def latency(laptop: str, host: str, port: int) -> dict[str, float]:
    count = "2000" if not RTT_MS else "50"  # 2,000 round trips of 40 ms would take 80 s
    out = subprocess.run(
        in_ns(laptop, PY, "-c", LATENCY_CLIENT, host, str(port), count),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    try:
        return dict(json.loads(out.stdout))
    except ValueError:
        print(f"latency client failed: {out.stderr[-300:]}")
        return {"p50": 0.0, "p99": 0.0, "conn_s": 0.0, "first_p50": 0.0}


def rate(laptop: str, host: str, port: int, duration: float) -> dict[str, float]:
    """New connections/s with CONCURRENCY in flight (a throughput figure, unlike `conn_s`)."""
    out = subprocess.run(
        in_ns(laptop, PY, "-c", RATE_CLIENT, host, str(port), str(duration), str(CONCURRENCY)),
        capture_output=True, text=True, timeout=duration + 60, check=False,
    )  # fmt: skip
    try:
        return dict(json.loads(out.stdout))
    except ValueError:
        print(f"rate client failed: {out.stderr[-300:]}")
        return {"conn_s_par": 0.0, "conn_failed": 0}


def keepalive(laptop: str, host: str, port: int, duration: float) -> dict[str, float]:
    """Small requests on KEEPALIVE kept-open connections (none when KEEPALIVE is 0)."""
    if not KEEPALIVE:
        return {}
    out = subprocess.run(
        in_ns(laptop, PY, "-c", KEEPALIVE_CLIENT, host, str(port), str(duration), str(KEEPALIVE)),
        capture_output=True, text=True, timeout=duration + 60, check=False,
    )  # fmt: skip
    try:
        return dict(json.loads(out.stdout))
    except ValueError:
        print(f"keepalive client failed: {out.stderr[-300:]}")
        return {"ka_req_s": 0.0, "ka_reqs": 0, "ka_failed": KEEPALIVE, "ka_p50": 0.0}


CONCURRENCY = 32
KEEPALIVE = 0
"""--keepalive N: N kept-open connections with one small request each in flight."""
HELD = 1000
CONN_ONLY = False
NO_EARLY = False
RTT_MS = 0.0
KERNEL_LISTENER: Callable[..., None] | None = None
"""bench/timeline.py's row c-kernel: called with (laptop, link, nursery) once the VIF runs."""
"""--rtt: the round trip (ms) added between the tunnel's two ends for the rows being run."""
"""--no-early: rows c* never accept a SYN before its dial (tele.vif.runtime's early accept)."""
"""--conn-only: the connection figures alone (no iperf3, no 1,000 held connections)."""


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hold(laptop: str, host: str, port: int, pid: int | str = "self") -> dict[str, float]:
    """RSS of process `pid` before and while HELD idle connections are open through it."""
    import gc

    if CONN_ONLY or RTT_MS:
        return {}
    gc.collect()
    before = rss_mib(pid)
    client = subprocess.Popen(
        in_ns(laptop, PY, "-c", HOLD_CLIENT, host, str(port), str(HELD)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    try:
        if client.stdout.readline().strip() != "held":
            print(f"hold client failed (exit {client.wait()})")
            return {"rss_base": before, "rss_held": 0.0, "gc_ms_held": 0.0}
        held = rss_mib(pid)
        gc_ms = 0.0
        if pid == "self":  # this process is the daemon: how long a full collection stalls it
            start = time.perf_counter()
            gc.collect()
            gc_ms = (time.perf_counter() - start) * 1e3
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return {"rss_base": before, "rss_held": held, "gc_ms_held": gc_ms}


def _proc_cpu(pid: int) -> float:
    """CPU seconds of a process and its children so far (the cluster side runs under `ip`)."""
    total = 0.0
    for child in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            found += [kid, *_children(kid)]
    return found


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    row: str,
    laptop: str,
    host: str,
    iperf_port: int,
    echo_port: int,
    duration: float,
    cpu_of: Callable[[], float] = cpu_seconds,
    packets_out: Callable[[], int] | None = None,
    relay_of: Callable[[], float] | None = None,
) -> dict[str, float | str]:
    """All figures of one row; `cpu_of` gives the CPU seconds of the daemon (or its stand-in),
    `relay_of` those of the cluster side's relay (the tunnel server, sshuttle's server)."""
    wall, cpu = time.perf_counter(), cpu_of()
    one = 0.0 if CONN_ONLY else iperf(laptop, host, iperf_port, 1, duration)
    eight = 0.0 if CONN_ONLY else iperf(laptop, host, iperf_port, 8, duration)
    cpu_pct = 100 * (cpu_of() - cpu) / (time.perf_counter() - wall)
    lat = latency(laptop, host, echo_port)
    cpu, writes = cpu_of(), packets_out() if packets_out else 0
    relay = relay_of() if relay_of else 0.0
    par = rate(laptop, host, echo_port, min(duration, 2.0))
    # CPU per connection hardly moves with the load of other work on the machine, unlike conn/s.
    conns = max(par.get("conns", 0), 1)
    cpu_us = 1e6 * (cpu_of() - cpu) / conns
    extra = {"tun_writes_per_conn": (packets_out() - writes) / conns} if packets_out else {}
    if relay_of:
        extra["relay_us_per_conn"] = 1e6 * (relay_of() - relay) / conns
    cpu, relay = cpu_of(), relay_of() if relay_of else 0.0
    ka = keepalive(laptop, host, echo_port, min(duration, 2.0))
    if ka:
        reqs = max(ka["ka_reqs"], 1)
        ka["cpu_us_per_req"] = 1e6 * (cpu_of() - cpu) / reqs
        if relay_of:
            ka["relay_us_per_req"] = 1e6 * (relay_of() - relay) / reqs
    return {"row": row, "mbs_1": one, "mbs_8": eight, "cpu_pct": cpu_pct, **lat, **par,
            "cpu_us_per_conn": cpu_us, **extra, **ka}  # fmt: skip


# ---------------------------------------------------------------------------------- rows


def run_tele(laptop: str, cluster: str, duration: float, *, offload: bool, mtu: int) -> dict:
    import trio

    from tele import gctune
    from tele.rpc.client import open_client
    from tele.rpc.tunnel import dial, open_now
    from tele.vif.service import VifSettings, serve_vif

    results: dict = {}

    async def main() -> None:
        ours, theirs = socket.socketpair()
        delay = None
        if RTT_MS:  # the link goes through a delay relay: ours <-> relay <-> theirs
            theirs.close()
            ours, relay_near = socket.socketpair()
            relay_far, theirs = socket.socketpair()
            delay = delay_relay.start_fds(RTT_MS, (relay_near.fileno(), relay_far.fileno()))
            relay_near.close()
            relay_far.close()
        proc = await trio.lowlevel.open_process(
            in_ns(cluster, PY, str(HERE), "--role-cluster", str(theirs.fileno())),
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        try:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            async with open_client(stream) as client, trio.open_nursery() as nursery:

                async def dialer(destination):  # type: ignore[no-untyped-def]
                    return await dial(client.link, destination, session="bench")

                settings = VifSettings(
                    cluster_subnets=["10.244.0.0/16"], netns=laptop, offload=offload, mtu=mtu
                )
                early = (
                    None if NO_EARLY else functools.partial(open_now, client.link, session="bench")
                )
                info = await nursery.start(
                    functools.partial(serve_vif, settings, dialer, early_opener=early)
                )
                if KERNEL_LISTENER is not None:  # bench/timeline.py's row c-kernel
                    KERNEL_LISTENER(laptop, client.link, nursery)
                gctune.settle()  # as the daemon's session does once connected
                # The servers, as the pod's processes, in the cluster namespace.
                server = await trio.lowlevel.open_process(
                    in_ns(cluster, "iperf3", "-s", "-B", POD_IP, "-p", str(IPERF_PORT + 1)),
                    stdout=subprocess.DEVNULL,
                )
                echo = await trio.lowlevel.open_process(
                    in_ns(cluster, PY, "-c", ECHO_SERVER, POD_IP, str(TELE_ECHO_PORT))
                )
                try:
                    await trio.sleep(0.3)  # iperf3 has no readiness signal
                    relay_cpu = _proc_cpu(proc.pid)
                    wall = time.perf_counter()
                    results.update(
                        await trio.to_thread.run_sync(
                            functools.partial(
                                measure,
                                "",
                                laptop,
                                POD_IP,
                                IPERF_PORT + 1,
                                TELE_ECHO_PORT,
                                duration,
                                packets_out=lambda: info.counters.packets_out,
                                relay_of=functools.partial(_proc_cpu, proc.pid),
                            )
                        )
                    )
                    results["relay_cpu_pct"] = (
                        100 * (_proc_cpu(proc.pid) - relay_cpu) / (time.perf_counter() - wall)
                    )
                    # After the load above, as a daemon would be: this process is the daemon.
                    results.update(
                        await trio.to_thread.run_sync(hold, laptop, POD_IP, TELE_ECHO_PORT)
                    )
                finally:
                    for process in (server, echo):
                        process.kill()
                        await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            proc.terminate()  # SIGTERM: a profiled cluster side (TELE_BENCH_PROFILE) dumps
            with trio.move_on_after(5):
                await proc.wait()
            proc.kill()
            await proc.wait()
            if delay is not None:
                delay.kill()
                await trio.to_thread.run_sync(delay.wait)

    trio.run(main)
    return results


SSHD_PORT = 2222
SSHUTTLE_ECHO_PORT = 7010


def run_sshuttle(laptop: str, cluster: str, duration: float) -> dict | None:
    """Row d: sshuttle routes the pod subnet over ssh; None (reason printed) if it cannot."""
    import shutil
    import tempfile

    missing = [t for t in ("sshuttle", "sshd", "ssh-keygen") if not shutil.which(t)]
    if missing:
        print(f"row d skipped: {', '.join(missing)} not installed (apt-get install sshuttle)")
        return None
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation dir
    made_privsep = not privsep.exists()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tele-vifbench-ssh-") as tmp:
        d = Path(tmp)
        try:
            for key in ("host", "client"):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                               check=True, capture_output=True)  # fmt: skip
            (d / "authorized_keys").write_text((d / "client.pub").read_text())
            (d / "sshd_config").write_text(
                f"Port {SSHD_PORT}\nListenAddress {CLUSTER_IP}\nHostKey {d / 'host'}\n"
                f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                f"StrictModes no\nPidFile {d / 'sshd.pid'}\n"
            )
            if made_privsep:
                privsep.mkdir(mode=0o755)
            procs.append(
                subprocess.Popen(
                    in_ns(
                        cluster,
                        shutil.which("sshd") or "sshd",
                        "-D",
                        "-e",
                        "-f",
                        str(d / "sshd_config"),
                    ),
                    stderr=subprocess.DEVNULL,
                )
            )
            procs.append(
                subprocess.Popen(
                    in_ns(cluster, PY, "-c", ECHO_SERVER, POD_IP, str(SSHUTTLE_ECHO_PORT))
                )
            )
            procs.append(
                subprocess.Popen(
                    in_ns(cluster, "iperf3", "-s", "-B", POD_IP, "-p", str(IPERF_PORT + 2)),
                    stdout=subprocess.DEVNULL,
                )
            )
            ssh = (
                f"ssh -i {d / 'client'} -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
            )
            # sshuttle redirects in nft's output hook, which a packet only reaches once routed;
            # a laptop has a default route, this namespace has none. Via lo, a packet that
            # sshuttle did not take goes nowhere, so the row cannot measure a direct path.
            ip("-n", laptop, "route", "add", "10.244.0.0/16", "dev", "lo")
            time.sleep(0.5)  # sshd has no readiness signal
            remote = f"{CLUSTER_IP}:{SSHD_PORT}"
            if RTT_MS:  # ssh reaches sshd through a delay relay in the laptop namespace
                relay = subprocess.Popen(
                    in_ns(laptop, PY, delay_relay.__file__, "tcp", str(RTT_MS),
                          str(SSHD_PORT + 1), remote),
                    stdout=subprocess.PIPE,
                )  # fmt: skip
                procs.append(relay)
                assert relay.stdout is not None
                if relay.stdout.readline().strip() != b"ready":
                    print("row d skipped: the delay relay did not start")
                    return None
                remote = f"127.0.0.1:{SSHD_PORT + 1}"
            client = subprocess.Popen(
                in_ns(laptop, "sshuttle", "--method", "nft", "-e", ssh,
                      "-r", f"root@{remote}", "10.244.0.0/16"),
                stderr=subprocess.PIPE,
            )  # fmt: skip
            procs.append(client)
            assert client.stderr is not None
            os.set_blocking(client.stderr.fileno(), False)
            deadline, seen = time.monotonic() + 20, b""
            while b"Connected" not in seen and time.monotonic() < deadline:
                if client.poll() is not None:
                    break
                time.sleep(0.1)  # a bench, not a test: polling the log is good enough
                seen += client.stderr.read() or b""
            if b"Connected" not in seen:
                print(f"row d skipped: sshuttle did not connect: {seen.decode()[-300:]!r}")
                return None
            server = procs[0].pid  # sshd, its session and sshuttle's server (python)
            before, wall = _proc_cpu(client.pid), time.perf_counter()
            relay_before = _proc_cpu(server)
            result = measure(
                "d", laptop, POD_IP, IPERF_PORT + 2, SSHUTTLE_ECHO_PORT, duration,
                functools.partial(_proc_cpu, client.pid),
                relay_of=functools.partial(_proc_cpu, server),
            )  # fmt: skip
            elapsed = time.perf_counter() - wall
            result["cpu_pct"] = 100 * (_proc_cpu(client.pid) - before) / elapsed
            result["relay_cpu_pct"] = 100 * (_proc_cpu(server) - relay_before) / elapsed
            result.update(hold(laptop, POD_IP, SSHUTTLE_ECHO_PORT, client.pid))
            return result
        finally:
            for proc in reversed(procs):
                proc.terminate()  # sshuttle removes its nft rules on SIGTERM
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if made_privsep:
                with contextlib.suppress(OSError):
                    privsep.rmdir()
            subprocess.run(["ip", "-n", laptop, "route", "del", "10.244.0.0/16", "dev", "lo"],
                           capture_output=True, check=False)  # fmt: skip


def _override_tcp(fields: dict[str, str]) -> None:
    """Rows c*: the VIF's TCPConfig with `fields` changed (values as the field's type)."""
    import dataclasses

    from tele.net.tcpstate import TCPConfig
    from tele.vif import service

    made = service._tcp_config
    kinds = {f.name: type(getattr(TCPConfig(), f.name)) for f in dataclasses.fields(TCPConfig)}
    values = {name: kinds[name](value) for name, value in fields.items()}
    service._tcp_config = lambda settings: dataclasses.replace(made(settings), **values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rows", default="a,b,c,c-plain,c-65535,d")
    parser.add_argument(
        "--conn-only",
        action="store_true",
        help="only latency and new-connection figures (quick, for A/B runs)",
    )
    parser.add_argument(
        "--tcp",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="rows c*: set a TCPConfig field (A/B runs), e.g. fin_ack_delay=0",
    )
    parser.add_argument(
        "--no-early",
        action="store_true",
        help="rows c*: every SYN waits for its dial (A/B of the early accept)",
    )
    parser.add_argument(
        "--keepalive",
        type=int,
        default=0,
        metavar="N",
        help="also N kept-open connections (1-1000) with 100-byte requests: req/s, µs/req",
    )
    parser.add_argument(
        "--rtt",
        default="",
        metavar="MS,...",
        help="rows c* and d again with each round trip added between the tunnel's ends",
    )
    parser.add_argument("--role-cluster", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp:
        _override_tcp(dict(item.split("=", 1) for item in args.tcp))
    if not 0 <= args.keepalive <= 1000:
        parser.error("--keepalive takes 0 to 1000 connections")
    global CONN_ONLY, NO_EARLY, KEEPALIVE, RTT_MS
    CONN_ONLY, NO_EARLY, KEEPALIVE = args.conn_only, args.no_early, args.keepalive
    if args.role_cluster is not None:
        role_cluster(args.role_cluster)
        return
    try:
        rtts = [0.0] + [float(ms) for ms in args.rtt.split(",") if ms]
    except ValueError:
        parser.error("--rtt takes milliseconds separated by commas, e.g. 10,40")
    if any(not 0 < ms <= 1000 for ms in rtts[1:]):
        parser.error("--rtt takes round trips from 0 to 1000 ms")
    runs = [(row, 0.0) for row in args.rows.split(",")]
    runs += [(row, ms) for ms in rtts[1:] for row in args.rows.split(",") if row[0] in "cd"]
    measured = {ms: delay_relay.measured_rtt(ms) for ms in rtts[1:]}
    table: list[dict] = []
    with namespaces() as (laptop, cluster):
        procs = [
            subprocess.Popen(in_ns(cluster, "iperf3", "-s", "-p", str(IPERF_PORT)),
                             stdout=subprocess.DEVNULL),
            subprocess.Popen(in_ns(cluster, "socat", f"TCP-LISTEN:{SOCAT_CLUSTER},fork,reuseaddr",
                                   f"TCP:127.0.0.1:{IPERF_PORT}"), stdout=subprocess.DEVNULL),
            subprocess.Popen(in_ns(laptop, "socat", f"TCP-LISTEN:{SOCAT_LAPTOP},fork,reuseaddr",
                                   f"TCP:{CLUSTER_IP}:{SOCAT_CLUSTER}"),
                             stdout=subprocess.DEVNULL),
            subprocess.Popen(in_ns(cluster, PY, "-c", ECHO_SERVER, CLUSTER_IP, str(ECHO_PORT))),
            subprocess.Popen(in_ns(cluster, "socat", "TCP-LISTEN:7002,fork,reuseaddr",
                                   f"TCP:{CLUSTER_IP}:{ECHO_PORT}"), stdout=subprocess.DEVNULL),
            subprocess.Popen(in_ns(laptop, "socat", "TCP-LISTEN:7001,fork,reuseaddr",
                                   f"TCP:{CLUSTER_IP}:7002"), stdout=subprocess.DEVNULL),
        ]  # fmt: skip
        try:
            time.sleep(0.5)  # the servers have no readiness signal
            for row, RTT_MS in runs:
                if row == "a":
                    result = measure(row, laptop, CLUSTER_IP, IPERF_PORT, ECHO_PORT, args.duration)
                    result["cpu_pct"] = result["cpu_us_per_conn"] = 0.0  # no daemon
                    result.pop("cpu_us_per_req", None)
                elif row == "b":
                    result = measure(row, laptop, "127.0.0.1", SOCAT_LAPTOP, 7001, args.duration)
                    result["cpu_pct"] = 0.0  # socat's CPU is not the daemon's
                    result["cpu_us_per_conn"] = 0.0
                    result.pop("cpu_us_per_req", None)
                elif row == "d":
                    sshuttle = run_sshuttle(laptop, cluster, args.duration)
                    if sshuttle is None:
                        continue
                    result = sshuttle
                else:
                    offload = row == "c"
                    mtu = 65535 if row == "c-65535" else 1500
                    result = run_tele(laptop, cluster, args.duration, offload=offload, mtu=mtu)
                    result["row"] = row
                if RTT_MS:
                    result["row"] = f"{row}@{RTT_MS:g}"
                    result["rtt_ms"] = measured[RTT_MS]
                    result["setup_over_rtt_ms"] = result["first_p50"] / 1e3 - measured[RTT_MS]
                table.append(result)
                print(_line(result), flush=True)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    print()
    print(HEADER)
    for result in table:
        print(_line(result))
    record = {
        "bench": "vif",
        "time": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "duration": args.duration,
        "load": os.getloadavg()[0],
        "native": _native(),
        "rows": table,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"vif-{record['time']}.json").write_text(json.dumps(record, indent=1))
    _chart(table, RESULTS / f"vif-{record['time']}.png", record)
    print(json.dumps(record))


def _chart(table: list[dict], path: Path, record: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r["row"] for r in table]
    x = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar([i - 0.2 for i in x], [r["mbs_1"] for r in table], 0.4, label="1 stream")
    left.bar([i + 0.2 for i in x], [r["mbs_8"] for r in table], 0.4, label="8 streams")
    left.set_xticks(list(x), rows)
    left.set_ylabel("MB/s")
    left.legend()
    left.set_title("throughput laptop -> cluster")
    right.bar(list(x), [r["p50"] for r in table], 0.6, label="p50")
    right.set_xticks(list(x), rows)
    right.set_ylabel("µs (1 KiB request/response)")
    right.set_title("latency p50")
    fig.suptitle(f"bench/vif.py {record['time']} (load {record['load']:.1f})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


ECHO_SERVER = """
import sys, trio, functools, resource
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
async def echo(stream):
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
trio.run(functools.partial(trio.serve_tcp, echo, int(sys.argv[2]), host=sys.argv[1]))
"""

HEADER = (
    f"{'row':10} {'MB/s x1':>9} {'MB/s x8':>9} {'CPU%':>6} {'relay%':>7} {'p50 µs':>8} "
    f"{'p99 µs':>8} {'conn/s':>8} {'conn/s32':>9} {'µs/conn':>8} {'1st µs':>7} {'wr/conn':>7} "
    f"{'relay µs':>8} {'refused ms':>10} {'acc/20':>6} "
    f"{'RSS MiB':>8} {'@1000':>7} "
    f"{'GC ms':>6} {'req/sN':>7} {'p50 N µs':>8} {'µs/req':>6} {'relay µs/req':>12} "
    f"{'RTT ms':>6} {'+setup':>6}"
)


def _line(r: dict) -> str:
    return (
        f"{r['row']:10} {r['mbs_1']:9.0f} {r['mbs_8']:9.0f} {r['cpu_pct']:6.0f} "
        f"{r.get('relay_cpu_pct', 0):7.0f} "
        f"{r['p50']:8.0f} {r['p99']:8.0f} {r['conn_s']:8.0f} {r.get('conn_s_par', 0):9.0f} "
        f"{r.get('cpu_us_per_conn', 0):8.0f} {r.get('first_p50', 0):7.0f} "
        f"{r.get('tun_writes_per_conn', 0):7.2f} {r.get('relay_us_per_conn', 0):8.0f} "
        f"{r.get('refused_ms', 0):10.1f} {r.get('closed_accepted', 0):6d} "
        f"{r.get('rss_base', 0):8.0f} {r.get('rss_held', 0):7.0f} {r.get('gc_ms_held', 0):6.0f}"
        f" {r.get('ka_req_s', 0):7.0f} {r.get('ka_p50', 0):8.0f} {r.get('cpu_us_per_req', 0):6.0f}"
        f" {r.get('relay_us_per_req', 0):12.0f} {r.get('rtt_ms', 0):6.2f}"
        f" {r.get('setup_over_rtt_ms', 0):6.2f}"
    )


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
