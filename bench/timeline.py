#!/usr/bin/env python3
"""Where a new connection's time goes: the sequential-connection loop of bench/vif.py (connect,
send a byte, read the echo, close) traced with `perf record` on every process of the path, for
tele and sshuttle side by side in one run.

  c         tele: app -> TUN -> the VIF's userspace TCP -> h2 link -> tunnel server -> echo
  c-kernel  a what-if: tele's link and tunnel server, but the app's connections end in the
            kernel's TCP instead of the VIF's (nft REDIRECT in the laptop namespace to a
            listener of the daemon, as sshuttle does; a destination already known open)
  d         sshuttle (nft method) over ssh to an sshd in the cluster namespace
  floor     the floor of tele's design (bench/tunfloor.py): a trio process behind a TUN device
            that speaks just enough TCP for this loop, a TCP connection per app connection to
            a bare trio relay in the cluster namespace, which dials the echo (no HTTP/2, no
            multiplexing, no retransmission or windows, no policy)

For each row: `1st µs` the p50 from connect() to the echo's first byte (untraced, then under
perf), `connect µs` the p50 of connect() alone, and per process of the path its median busy time
per connection (wall time outside epoll/poll/select waits: CPU, plus time it was runnable but
had no core) and its wake-ups per connection (waits that returned). With two cores and four to
six processes, a connection's first byte is roughly the busy time of the processes on its path
plus the wake-up latency of each hand-off; the table shows which process and how many hand-offs.

Run as root: .venv/bin/python bench/timeline.py [--rows c,c-kernel,d,floor] [--conns 1000]
Needs perf (linux-perf). Prints a table and a JSON line; writes the JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import vif  # bench/vif.py: namespaces, the rows' set-ups, the echo server
from wholepath import cpu_seconds  # CPU seconds of a process so far

RESULTS = Path(__file__).resolve().parent / "results"
REDIRECT_PORT = 7777

CLIENT = r"""
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 10
while True:  # the echo server may still be starting; this also teaches tele the port is open
    try:
        c = socket.create_connection((host, port)); c.sendall(b"y"); c.recv(10); c.close()
        break
    except (ConnectionRefusedError, ConnectionResetError):  # a relay not yet listening: RST
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
first, handshake = [], []
for _ in range(count):
    t = time.perf_counter()
    c = socket.create_connection((host, port))
    handshake.append(time.perf_counter() - t)
    c.sendall(b"y")
    c.recv(10)
    first.append(time.perf_counter() - t)
    c.close()
first.sort(); handshake.sort()
print(json.dumps({"first": first[len(first) // 2] * 1e6,
                  "connect": handshake[len(handshake) // 2] * 1e6}))
"""

# syscall numbers (x86-64) of the waits, and of the connect that starts each connection
WAITS = {7: "poll", 23: "select", 232: "epoll_wait", 270: "pselect6", 271: "ppoll",
         281: "epoll_pwait"}  # fmt: skip
CONNECT = 42


def client(laptop: str, host: str, port: int, count: int) -> tuple[dict[str, float], int]:
    proc = subprocess.Popen(
        vif.in_ns(laptop, vif.PY, "-c", CLIENT, host, str(port), str(count)),
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=120)
    try:
        return dict(json.loads(out)), proc.pid
    except ValueError:
        print(f"client to {host}:{port} failed")
        return {"first": 0.0, "connect": 0.0}, proc.pid


def _netns_inode(pid: int | str) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return 0


def roles(laptop_pid: int, cluster_pid: int) -> dict[int, str]:
    """Every live process of the path by pid: its command name and where it runs."""
    where = {_netns_inode(laptop_pid): "laptop", _netns_inode(cluster_pid): "cluster"}
    here = _netns_inode("self")
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        ns = _netns_inode(pid)
        if pid == os.getpid():
            found[pid] = "tele daemon"
        elif "--role-cluster" in cmd:
            found[pid] = "tunnel server"
        elif "floor-relay" in cmd:
            found[pid] = "floor relay"
        elif "tunfloor.py" in cmd:
            found[pid] = "floor TUN side"
        elif "serve_tcp" in cmd:
            found[pid] = "echo (the pod)"
        elif comm == "sshuttle":
            found[pid] = "sshuttle"
        elif comm in ("ssh", "sshd") and ns in where:
            found[pid] = comm
        elif comm.startswith("python") and where.get(ns) == "cluster" and ns != here:
            found[pid] = "sshuttle server"  # started by sshd: `python3 -c <its bootstrap>`
    return found


@contextlib.contextmanager
def perf_record(path: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        ["perf", "record", "-q", "-a", "-k", "mono",
         "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit", "--exclude-perf", "-o", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # perf has no readiness signal; it needs ~0.3 s to open its events
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)")


def analyse(path: Path, names: dict[int, str], client_pid: int) -> dict:
    """Each process's wake-ups (waits that returned) per connection of the client (between its
    connect() calls), median over the connections after the first ten."""
    script = subprocess.run(
        ["perf", "script", "-i", str(path), "-F", "pid,tid,time,event,trace"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    events: list[tuple[float, int, bool, int]] = []
    for line in script.stdout.splitlines():
        m = LINE.match("x " + line)
        if m is None:
            continue
        _, pid, _tid, t, kind, nr = m.groups()
        if int(pid) == client_pid or int(pid) in names:
            events.append((float(t), int(pid), kind == "enter", int(nr)))
    events.sort()
    starts = [t for t, pid, enter, nr in events if pid == client_pid and enter and nr == CONNECT]
    if len(starts) < 20:
        return {}
    starts = starts[10:-1]  # the first ones warm up; the last has no end
    wakes: dict[str, list[int]] = defaultdict(list)
    i = 0
    for lo, hi in itertools.pairwise(starts):
        woke: dict[str, int] = defaultdict(int)
        while i < len(events) and events[i][0] < hi:
            t, pid, enter, nr = events[i]
            i += 1
            if t >= lo and pid != client_pid and not enter and nr in WAITS:
                woke[names[pid]] += 1
        for name in set(names.values()):
            wakes[name].append(woke.get(name, 0))
    return {
        "connections": len(starts) - 1,
        "processes": {name: {"wakes": statistics.median(w)} for name, w in wakes.items()},
    }


def trace_row(row: str, laptop: str, cluster: str, host: str, port: int, count: int) -> dict:
    laptop_pid, cluster_pid = _ns_holder(laptop), _ns_holder(cluster)
    try:
        names = roles(laptop_pid, cluster_pid)
        if row == "floor":  # this process is not on the path (bench/tunfloor.py is)
            names = {pid: n for pid, n in names.items() if n != "tele daemon"}
    finally:
        for holder in (laptop_pid, cluster_pid):
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
    before = {pid: cpu_seconds(pid) for pid in names}
    untraced, _ = client(laptop, host, port, count)
    cpu: dict[str, float] = defaultdict(float)
    for pid, name in names.items():
        cpu[name] += (cpu_seconds(pid) - before[pid]) * 1e6 / (count + 1)
    with tempfile.TemporaryDirectory(prefix="tele-timeline-") as tmp:
        data = Path(tmp) / "perf.data"
        with perf_record(data):
            traced, client_pid = client(laptop, host, port, count)
        result = analyse(data, names, client_pid)
    processes = result.setdefault("processes", {})
    for name, used in cpu.items():
        processes.setdefault(name, {"wakes": 0})["cpu_us"] = used
    for name in [n for n, p in processes.items() if not p["wakes"] and p.get("cpu_us", 0) < 1]:
        del processes[name]  # not on this row's path (this process in sshuttle's row)
    return {"row": row, "first_us": untraced["first"], "connect_us": untraced["connect"],
            "first_us_traced": traced["first"], **result}  # fmt: skip


def _ns_holder(ns: str) -> int:
    """A process sleeping in `ns` (to learn the namespace's inode from /proc)."""
    pid = subprocess.Popen(vif.in_ns(ns, "sleep", "60")).pid
    deadline = time.monotonic() + 5
    while _netns_inode(pid) == _netns_inode("self") and time.monotonic() < deadline:
        time.sleep(0.01)  # `ip netns exec` enters the namespace after the fork
    return pid


def kernel_listener(laptop: str, link, nursery) -> None:  # type: ignore[no-untyped-def]
    """Row c-kernel: nft REDIRECT of the echo's address to a listener of this process in the
    laptop namespace; each accepted connection is spliced onto an optimistic OPEN."""
    import trio

    from tele.net.tunnel import Destination, Protocol
    from tele.rpc.tunnel import dial, splice
    from tele.vif.netns import call_in_netns

    script = (
        "table ip tele_timeline {\n chain out {\n  type nat hook output priority -100;\n"
        f"  ip daddr {vif.POD_IP} tcp dport {vif.TELE_ECHO_PORT} redirect to :{REDIRECT_PORT}\n"
        " }\n}\n"
    )
    subprocess.run(vif.in_ns(laptop, "nft", "-f", "-"), input=script.encode(), check=True)

    def listen() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", REDIRECT_PORT))
        sock.listen(512)
        return sock

    listener = trio.socket.from_stdlib_socket(call_in_netns(laptop, listen))

    async def handle(sock: trio.socket.SocketType) -> None:
        raw = sock.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        port, address = struct.unpack_from("!H4s", raw, 2)
        destination = Destination(Protocol.TCP, ipaddress.ip_address(address), port)
        stream = await dial(link, destination, session="bench", optimistic=True)
        try:
            await splice(stream, trio.SocketStream(sock), read_size=65536)
        finally:
            stream.close()

    async def accept() -> None:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(handle, sock)

    nursery.start_soon(accept)


def run_floor(laptop: str, cluster: str, measure) -> None:  # type: ignore[no-untyped-def]
    """Row floor: bench/tunfloor.py's TUN side as a process in the laptop namespace, its relay
    and an echo server in the cluster namespace."""
    import tunfloor  # bench/tunfloor.py

    relay_port, device = 7100, "tele-floor0"
    procs = [
        subprocess.Popen(vif.in_ns(cluster, vif.PY, "-c", tunfloor.RELAY, vif.CLUSTER_IP,
                                   str(relay_port), vif.POD_IP, str(vif.TELE_ECHO_PORT))),
        subprocess.Popen(vif.in_ns(cluster, vif.PY, "-c", vif.ECHO_SERVER, vif.POD_IP,
                                   str(vif.TELE_ECHO_PORT))),
    ]  # fmt: skip
    try:
        side = subprocess.Popen(
            vif.in_ns(laptop, vif.PY, tunfloor.__file__, device, vif.CLUSTER_IP, str(relay_port)),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(side)
        assert side.stdout is not None
        if side.stdout.readline().strip() != "ready":
            raise RuntimeError("bench/tunfloor.py did not start")
        vif.ip("-n", laptop, "link", "set", device, "up")
        vif.ip("-n", laptop, "route", "add", f"{vif.POD_IP}/32", "dev", device)
        measure("", laptop, vif.POD_IP, 0, vif.TELE_ECHO_PORT)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="c,c-kernel,d,floor")
    parser.add_argument("--conns", type=int, default=1000)
    args = parser.parse_args()
    if not shutil.which("perf"):
        sys.exit("timeline: perf is not installed (apt-get install linux-perf)")
    # Each row's connections (twice: untraced, then traced) leave their dialing side's sockets
    # in TIME-WAIT for 60 s, all to the row's echo port. Beyond ~14,000 of them connect()
    # spends its time in the kernel looking for a free local port: at --conns 20000 the
    # tunnel server's CPU per connection tripled, all of it system time.
    if not 50 <= args.conns <= 5000:
        sys.exit("timeline: --conns takes 50 to 5000")
    vif.CONN_ONLY, vif.NO_EARLY, vif.KEEPALIVE, vif.RTT_MS = True, False, 0, 0.0
    table: list[dict] = []
    with vif.namespaces() as (laptop, cluster):
        for i, row in enumerate(args.rows.split(",")):
            # An echo port per row: a row's connections leave their dialing side's sockets in
            # TIME-WAIT, and a later row that dialed the same address and port would pay for
            # the search of a free local port among them (see --conns).
            vif.TELE_ECHO_PORT = vif.SSHUTTLE_ECHO_PORT = 7020 + i

            def measure(_row, lap, host, _iperf, port, *_a, row=row, **_k):  # type: ignore[no-untyped-def]
                table.append(trace_row(row, lap, cluster, host, port, args.conns))
                return {}

            vif.measure = measure  # the rows' set-ups below call it once everything runs
            if row in ("c", "c-kernel"):
                vif.KERNEL_LISTENER = kernel_listener if row == "c-kernel" else None
                vif.run_tele(laptop, cluster, 1.0, offload=True, mtu=1500)
                if row == "c-kernel":
                    subprocess.run(vif.in_ns(laptop, "nft", "delete", "table", "ip",
                                             "tele_timeline"), check=False)  # fmt: skip
            elif row == "d":
                vif.run_sshuttle(laptop, cluster, 1.0)
            elif row == "floor":
                run_floor(laptop, cluster, measure)
            else:
                parser.error(f"unknown row {row!r} (c, c-kernel, d, floor)")
    print(
        f"\n{'row':9} {'1st µs':>7} {'traced':>7} {'connect':>7}  "
        "process: CPU µs/conn, wake-ups/conn"
    )
    for r in table:
        procs = "; ".join(
            f"{name} {p['cpu_us']:.0f} µs, {p['wakes']:g}"
            for name, p in sorted(r.get("processes", {}).items(), key=lambda kv: -kv[1]["cpu_us"])
        )
        print(f"{r['row']:9} {r['first_us']:7.0f} {r['first_us_traced']:7.0f} "
              f"{r['connect_us']:7.0f}  {procs}")  # fmt: skip
    record = {
        "bench": "timeline",
        "time": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "load": os.getloadavg()[0],
        "native": vif._native(),
        "rows": table,
    }
    line = json.dumps(record)
    print(line)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"timeline-{record['time']}.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
