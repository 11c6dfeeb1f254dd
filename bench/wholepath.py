#!/usr/bin/env python3
"""Whole-path bench: a program on the laptop -> TUN (VIF) -> the daemon -> port-forward through
the sandbox's API server -> the traffic manager's pod -> a Service -> an echo pod, as a user's
traffic goes (bench/vif.py's row c skips the port-forward and the manager). Per hop, the CPU
each process spent (/proc/PID/stat before and after each measurement), as µs per request.

Rows, each against the same echo pod (tele-sandbox/l4-echo) by its Service address:
  req C      C connections, each with one small request (64 B) in flight: req/s, p50, p99
  new        sequential new connections (connect, 1 KiB request/response, close): conn/s and
             time from connect() to the first response byte (p50)
  bulk 1/8   1 and 8 connections streaming 64 KiB writes to the echo and reading it back: MB/s
             each way
  up/down 1/8  one way at a time, as iperf3 measures: 1 and 8 connections sending to (up) or
             receiving from (down) a sink/source pod (`bulk`, the worker image): MB/s
CPU columns: % of one core per hop during the row, above the hop's idle rate (measured first:
the sandbox's controllers and kubelet, keepalives); for `req` rows also µs of CPU per request,
for `bulk` rows ms of CPU per MB moved (each echoed MB crosses every hop twice: counted as 2;
once for up/down).
With `--rtt 10,40` the same rows again with a round trip added between the laptop and the API
server: a delay relay in the laptop namespace (bench/delay_relay.py: it keeps reading and
releases each chunk after RTT/2, so it adds latency without limiting bandwidth) that the
daemon's kubeconfig points at; the relay's own round trip is measured and each row's p50 or
first byte is also given above it.

Run as root:  .venv/bin/python bench/wholepath.py [--seconds 3] [--rtt 10,40] [--name SANDBOX]
A sandbox `tele-wp-<random>` is started (`tele sandbox up`) and removed at the end; `--name`
uses a running one instead (and leaves it). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import delay_relay  # bench/delay_relay.py (this script's directory is on sys.path)

VENV_BIN = Path(sys.executable).parent
TELE = str(VENV_BIN / "tele")
PY = sys.executable
ECHO_PORT = 9000
BULK_PORT = 5201
HOPS = ("daemon", "sandbox", "manager", "echo pod", "bulk pod")
# One-way bulk (as iperf3 measures; the worker image has no iperf3): a connection's first byte
# says which way: "u" the pod reads to EOF and answers with the count, "d" the pod sends for
# the seconds that follow the byte, then closes.
BULK_POD = """# tele-wp-bulk
import socket, struct, threading, time
server = socket.create_server(("0.0.0.0", 5201), backlog=64)
def serve(conn):
    with conn:
        way = conn.recv(1)
        if way == b"u":
            got = 0
            while data := conn.recv(1 << 20):
                got += len(data)
            conn.sendall(struct.pack(">Q", got))
        elif way == b"d":
            text = b""
            while len(text) < 15 and (more := conn.recv(15 - len(text))):
                text += more
            seconds = min(float(text.decode()), 60.0)
            chunk, stop = bytes(1 << 18), time.monotonic() + seconds
            while time.monotonic() < stop:
                conn.sendall(chunk)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""
APPS = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/l4-echo
        env: [{{name: PORT, value: "{ECHO_PORT}"}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: bulk, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: bulk}}}}
  template:
    metadata: {{labels: {{app: bulk}}}}
    spec:
      containers:
      - name: bulk
        image: tele-sandbox/worker
        command: {json.dumps(["python3", "-c", BULK_POD])}
---
apiVersion: v1
kind: Service
metadata: {{name: bulk, namespace: default}}
spec:
  selector: {{app: bulk}}
  ports: [{{name: tcp, port: {BULK_PORT}, targetPort: {BULK_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  ports: [{{name: tcp, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}]
"""

# C connections, one small request in flight on each (an epoll loop: the client must not be
# the bottleneck).
REQ_CLIENT = """
import json, select, socket, sys, time
host, port, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds, size = float(sys.argv[4]), int(sys.argv[5])
msg = b"r" * size
ep = select.epoll()
conns = {}
for _ in range(conc):
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    conns[s.fileno()] = [s, 0, 0.0]
    ep.register(s.fileno(), select.EPOLLIN)
samples = []
t0 = time.perf_counter()
deadline = t0 + seconds
for c in conns.values():
    c[2] = time.perf_counter()
    c[0].send(msg)
while True:
    now = time.perf_counter()
    if now >= deadline:
        break
    for fd, _ in ep.poll(0.5):
        c = conns[fd]
        data = c[0].recv(65536)
        if not data:
            raise SystemExit("the echo closed a connection")
        c[1] += len(data)
        if c[1] >= size:
            c[1] -= size
            now = time.perf_counter()
            samples.append(now - c[2])
            c[2] = now
            c[0].send(msg)
elapsed = time.perf_counter() - t0
samples.sort()
print(json.dumps({"req_s": len(samples) / elapsed, "p50_us": samples[len(samples) // 2] * 1e6,
                  "p99_us": samples[int(len(samples) * 0.99)] * 1e6, "requests": len(samples)}))
"""

NEW_CLIENT = """
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
msg = b"n" * 1024
first = []
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    started = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(msg)
    got = len(s.recv(4096))
    first.append(time.perf_counter() - started)
    while got < 1024:
        got += len(s.recv(4096))
    s.close()
elapsed = time.perf_counter() - t0
first.sort()
print(json.dumps({"conn_s": len(first) / elapsed,
                  "first_byte_p50_us": first[len(first) // 2] * 1e6}))
"""

ONEWAY_CLIENT = """
import json, socket, struct, sys, threading, time
host, port, streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds, way = float(sys.argv[4]), sys.argv[5]
moved = [0] * streams
def up(n):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"u")
    chunk, stop = bytes(1 << 18), time.perf_counter() + seconds
    while time.perf_counter() < stop:
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while len(got) < 8:
        data = s.recv(8 - len(got))
        if not data:
            raise SystemExit("the pod closed before it said how much it got")
        got += data
    moved[n] = struct.unpack(">Q", got)[0]
    s.close()
def down(n):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"d" + f"{seconds:<15}".encode())
    while data := s.recv(1 << 20):
        moved[n] += len(data)
    s.close()
threads = [threading.Thread(target=up if way == "up" else down, args=(n,)) for n in range(streams)]
t0 = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"mbs": sum(moved) / (time.perf_counter() - t0) / 1e6}))
"""

BULK_CLIENT = """
import json, socket, sys, threading, time
host, port, streams, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
chunk = b"b" * 65536
received = [0] * streams
def one(n):
    s = socket.create_connection((host, port), timeout=10)
    stop = time.perf_counter() + seconds
    def write():
        try:
            while time.perf_counter() < stop:
                s.sendall(chunk)
        except OSError:
            pass
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    writer = threading.Thread(target=write)
    writer.start()
    while time.perf_counter() < stop:
        data = s.recv(1 << 20)
        if not data:
            break
        received[n] += len(data)
    s.close()
    writer.join()
threads = [threading.Thread(target=one, args=(n,)) for n in range(streams)]
t0 = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"mbs": sum(received) / (time.perf_counter() - t0) / 1e6}))
"""


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])}... failed: {result.stderr[-800:]}")
    return result.stdout


class Sandbox:
    """A sandbox with the manager, the echo pod and a connected laptop daemon."""

    def __init__(self, name: str, home: Path) -> None:
        self.name = name
        self.laptop = f"{name}-laptop"
        status = json.loads(run(TELE, "sandbox", "status", "-n", name, "-o", "json"))[0]
        self.pid = int(status["pid"])
        self.kubeconfig = Path(status["kubeconfig"])
        self.home = home
        self.bulk_host = ""  # the one-way bulk Service's address (`deploy`)
        for sub in ("config", "cache", "state", "runtime"):
            (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.env = {
            **os.environ,
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_RUNTIME_DIR": str(home / "runtime"),
            "KUBECONFIG": str(self.kubeconfig),
        }

    def in_laptop(self, *args: str, timeout: float = 120, kubeconfig: Path | None = None) -> str:
        env = dict(self.env)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        return run("ip", "netns", "exec", self.laptop, *args, env=env, timeout=timeout)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"kubectl {args[0]} failed: {result.stderr[-500:]}")
        return result.stdout

    def deploy(self) -> str:
        installed = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), "get", "deploy", "-n",
             "ambassador", "traffic-manager"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if installed.returncode != 0:
            self.in_laptop(TELE, "helm", "install", timeout=180)
        self.kubectl("apply", "-f", "-", stdin=APPS)
        self.kubectl("wait", "--for=condition=Ready", "pod", "--all", "--timeout=120s")
        self.kubectl(
            "wait", "-n", "ambassador", "--for=condition=Ready", "pod", "--all", "--timeout=120s"
        )
        self.bulk_host = self.kubectl(
            "get", "svc", "bulk", "-o", "jsonpath={.spec.clusterIP}"
        ).strip()
        return self.kubectl("get", "svc", "echo", "-o", "jsonpath={.spec.clusterIP}").strip()

    def connect(self, kubeconfig: Path | None = None) -> None:
        self.in_laptop(TELE, "connect", timeout=120, kubeconfig=kubeconfig)

    def quit(self) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.laptop, TELE, "quit"],
            env=self.env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    def hops(self) -> dict[str, int]:
        """The PIDs of the processes on the path, by hop."""
        found = {"sandbox": self.pid}
        for ns in run("ip", "netns", "list").split():
            if not ns.startswith(f"{self.name}-"):
                continue
            for pid in run("ip", "netns", "pids", ns).split():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                if b"tele daemon run" in cmdline:
                    found["daemon"] = int(pid)
                elif b"tele-entrypoint manager" in cmdline or b"tele.manager" in cmdline:
                    found["manager"] = int(pid)
                elif b"# tele-wp-bulk" in cmdline:
                    found["bulk pod"] = int(pid)
                elif b"/app/main.py" in cmdline and ns != self.laptop:
                    found.setdefault("echo pod", int(pid))
        return found


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_rates(hops: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second each hop spends with no traffic (the sandbox's controllers and
    kubelet, keepalives): subtracted from every row's figures."""
    before = {hop: cpu_seconds(pid) for hop, pid in hops.items()}
    time.sleep(seconds)
    return {hop: (cpu_seconds(pid) - before[hop]) / seconds for hop, pid in hops.items()}


def measured(
    sandbox: Sandbox, hops: dict[str, int], idle: dict[str, float], script: str, *args: str
) -> dict[str, Any]:
    """Run a client script in the laptop; its JSON plus each hop's CPU seconds meanwhile
    (above its idle rate)."""
    before = {hop: cpu_seconds(pid) for hop, pid in hops.items()}
    started = time.perf_counter()
    out = sandbox.in_laptop(PY, "-c", script, *args, timeout=300)
    wall = time.perf_counter() - started
    result: dict[str, Any] = json.loads(out)
    result["cpu_s"] = {
        hop: max(0.0, cpu_seconds(pid) - before[hop] - idle[hop] * wall)
        for hop, pid in hops.items()
    }
    result["wall_s"] = wall
    return result


def rows(
    sandbox: Sandbox, hops: dict[str, int], host: str, seconds: float, concurrency: list[int]
) -> list[dict[str, Any]]:
    table = []
    port = str(ECHO_PORT)
    idle = idle_rates(hops, seconds)
    for conc in concurrency:
        r = measured(sandbox, hops, idle, REQ_CLIENT, host, port, str(conc), str(seconds), "64")
        r["row"] = f"req {conc}"
        r["us_per_req"] = {h: s / r["requests"] * 1e6 for h, s in r["cpu_s"].items()}
        table.append(r)
    r = measured(sandbox, hops, idle, NEW_CLIENT, host, port, str(seconds))
    r["row"] = "new"
    table.append(r)
    for streams in (1, 8):
        r = measured(sandbox, hops, idle, BULK_CLIENT, host, port, str(streams), str(seconds))
        r["row"] = f"bulk {streams}"
        # Each echoed byte crosses every hop twice (up and back): CPU per MB moved.
        moved_mb = max(r["mbs"] * r["wall_s"] * 2, 1e-9)
        r["ms_per_mb"] = {h: s / moved_mb * 1e3 for h, s in r["cpu_s"].items()}
        table.append(r)
    for way in ("up", "down"):  # one way at a time, as iperf3 measures
        for streams in (1, 8):
            r = measured(
                sandbox, hops, idle, ONEWAY_CLIENT, sandbox.bulk_host, str(BULK_PORT),
                str(streams), str(seconds), way,
            )  # fmt: skip
            r["row"] = f"{way} {streams}"
            moved_mb = max(r["mbs"] * r["wall_s"], 1e-9)
            r["ms_per_mb"] = {h: s / moved_mb * 1e3 for h, s in r["cpu_s"].items()}
            table.append(r)
    return table


def show(label: str, table: list[dict[str, Any]], hops: list[str]) -> None:
    print(f"\n{label}")
    cpu_head = " ".join(f"{h + ' %':>11}" for h in hops)
    print(f"{'row':8} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8} {'MB/s':>7} {'conn/s':>7} "
          f"{'1st µs':>7} {cpu_head}   µs/req or ms/MB moved by hop")  # fmt: skip
    for r in table:
        cpu = " ".join(f"{r['cpu_s'].get(h, 0) / r['wall_s'] * 100:>11.0f}" for h in hops)
        per = ""
        if "us_per_req" in r:
            per = " ".join(f"{r['us_per_req'][h]:.0f}" for h in hops)
        elif "ms_per_mb" in r:
            per = " ".join(f"{r['ms_per_mb'][h]:.2f}" for h in hops)
        print(
            f"{r['row']:8} {r.get('req_s', 0):>8.0f} {r.get('p50_us', 0):>8.0f} "
            f"{r.get('p99_us', 0):>8.0f} {r.get('mbs', 0):>7.1f} {r.get('conn_s', 0):>7.0f} "
            f"{r.get('first_byte_p50_us', 0):>7.0f} {cpu}   {per}"
        )


def delayed_kubeconfig(sandbox: Sandbox, listen_port: int, path: Path) -> Path:
    config = yaml.safe_load(sandbox.kubeconfig.read_text())
    for cluster in config["clusters"]:
        server = cluster["cluster"]["server"]
        host, _, _ = server.rpartition(":")
        cluster["cluster"]["server"] = f"{host}:{listen_port}"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,8,50")
    parser.add_argument("--rtt", default="", help="RTTs in ms to add, e.g. 10,40")
    parser.add_argument("--name", help="a running sandbox to use (left running)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the sandbox's node and laptop are network namespaces")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rtts = [float(r) for r in args.rtt.split(",") if r]
    name = args.name or f"tele-wp-{secrets.token_hex(3)}"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tele-wp-") as tmp:
        if not args.name:
            run(TELE, "sandbox", "up", "-n", name, timeout=120)
        sandbox = Sandbox(name, Path(tmp) / "home")
        relay: subprocess.Popen[str] | None = None
        try:
            host = sandbox.deploy()
            sandbox.connect()
            hops = sandbox.hops()
            order = [h for h in HOPS if h in hops]
            print(f"sandbox {name}: echo at {host}:{ECHO_PORT}; hops {hops}")
            results["0 ms"] = rows(sandbox, hops, host, args.seconds, concurrency)
            show("whole path (no added RTT)", results["0 ms"], order)
            server = yaml.safe_load(sandbox.kubeconfig.read_text())["clusters"][0]["cluster"]
            api_port = int(server["server"].rpartition(":")[2])
            for rtt in rtts:
                sandbox.quit()
                listen = 20000 + secrets.randbelow(20000)
                relay = subprocess.Popen(
                    ["ip", "netns", "exec", sandbox.laptop, PY, delay_relay.__file__, "tcp",
                     str(rtt), str(listen), f"127.0.0.1:{api_port}"],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                assert relay.stdout is not None
                if relay.stdout.readline().strip() != "ready":
                    raise SystemExit("the delay relay did not start")
                kubeconfig = delayed_kubeconfig(sandbox, listen, Path(tmp) / f"kc-{rtt:g}")
                sandbox.connect(kubeconfig)
                hops = sandbox.hops()
                label = f"{rtt:g} ms"
                results[label] = rows(sandbox, hops, host, args.seconds, concurrency[:1])
                real = delay_relay.measured_rtt(rtt)
                for r in results[label]:
                    r["rtt_ms"] = real
                    if "first_byte_p50_us" in r:
                        r["setup_over_rtt_ms"] = r["first_byte_p50_us"] / 1e3 - real
                    if r["row"].startswith("req"):
                        r["p50_over_rtt_ms"] = r["p50_us"] / 1e3 - real
                show(f"whole path, {rtt:g} ms RTT added (laptop <-> API server; the relay's own "
                     f"round trip measured: {real:.2f} ms)", results[label], order)  # fmt: skip
                over = {
                    r["row"]: r.get("setup_over_rtt_ms", r.get("p50_over_rtt_ms"))
                    for r in results[label]
                    if "setup_over_rtt_ms" in r or "p50_over_rtt_ms" in r
                }
                print("above that round trip, ms:", json.dumps(over))  # fmt: skip
                sandbox.quit()
                relay.terminate()
                relay.wait(10)
                relay = None
                sandbox.connect()
        finally:
            sandbox.quit()
            if relay is not None:
                relay.kill()
                relay.wait()
            if not args.name:
                subprocess.run(
                    [TELE, "sandbox", "down", "-n", name], capture_output=True, timeout=120,
                    check=False,
                )  # fmt: skip
    import tele.net  # its mypyc build in use (scripts/build_native.py), as by tele's processes

    print(json.dumps({"bench": "wholepath", "native": tele.net.NATIVE, "results": results}))


if __name__ == "__main__":
    main()
