"""Benchmark an engagement on the sandbox (issue 9): how soon `tele intercept` brings the first
request to this machine, and what an http intercept costs the requests passing through it.

A node sandbox comes up (its own name and tele home), the traffic manager is installed, an
echo Deployment, its Service and a caller pod are deployed, and this machine connects.

Ready time: a caller in the cluster sends a request with the intercept's header every 5 ms;
the time from starting `tele intercept` to the first of them reaching the local handler, cold
(the agent is injected first: the pod is rolled) and warm (the agent is there). Target: <= 3 s.

Latency: from the caller pod, sequential requests on one keep-alive connection (p50/p99 and
requests/s) to the app directly (pod IP, the app's own port), through the Service to the idle
agent, through the agent with an http intercept that does not match them, and matching ones
answered on this machine. Target: non-matching requests add <= 1 ms at p50.

Wiretap (issue 19): requests on one connection (one copy stream carries them all), and on a new
connection each (every one is a copy stream of its own: the worst case), through the idle
agent and with a wiretap whose local handler is fast (reads everything), slow (reads 1 KiB per
100 ms) or absent (nothing listens); then with a fast handler and a --response-port handler
fast, slow or absent. Target: a fast handler adds <= 0.3 ms at p50; an absent one leaves the
app's p99 unchanged.

    .venv/bin/python bench/engage.py [--requests 500] [--auth-mode enforcing|disabled] [--docker]
    .venv/bin/python bench/engage.py --auth-compare 2
    .venv/bin/python bench/engage.py --wiretap-compare 2 [--requests 200]

--wiretap-compare ROUNDS measures only the wiretap rows, the idle agent and each setup in turn
every round (the order reversed every other round), with the CPU per request of the agent, the
manager and the daemon; what a setup adds is the median of its differences to the idle agent
of the same round.

--auth-compare ROUNDS measures only what authentication costs: `tele connect` (through the
port-forward) and the warm ready time with the manager's authentication enforcing and disabled,
switching the mode (helm upgrade) before every measurement, the first mode of each pair swapping
every round (ABBA ...) so that order does not bias the difference.

--docker (issue 21) adds a private dockerd and a handler container (`--docker-run`, the same
Python handler as the process one, from tele's image loaded into that engine): ready time with
the image built by `--docker-build` first (cold) and already there (warm), the agent already
injected in both; the latency of a tcp intercept answered by the container next to the one
answered by the process handler; and under `tele connect --docker`, the ready time of a
--docker-run handler of a workload with a Secret volume, mounted and not (--mount=false), and
what mounting adds (the median of ABBA-paired differences).

Prints a table and one JSON line. Needs root, iproute2, nftables and kubectl, like the sandbox.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: caller, namespace: default}
spec:
  containers: [{name: c, image: tele-sandbox/worker}]
"""

VOLUME_APP = """
apiVersion: v1
kind: Secret
metadata: {name: vol-creds, namespace: default}
data: {password: czNjcjN0}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vol, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: vol}}
  template:
    metadata: {labels: {app: vol}}
    spec:
      containers:
      - name: vol
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}]
        volumeMounts: [{name: creds, mountPath: /etc/creds}]
      volumes: [{name: creds, secret: {secretName: vol-creds}}]
---
apiVersion: v1
kind: Service
metadata: {name: vol, namespace: default}
spec:
  selector: {app: vol}
  ports: [{name: http, port: 80, targetPort: http}]
"""
"""--docker: a workload with a Secret volume, for the connect --docker volume rows."""

# Runs in the caller pod: requests with the header every 5 ms until one is answered by the
# laptop (or 60 s pass).
KNOCK = """
import time, urllib.request
request = urllib.request.Request("http://echo.default/", headers={"x-bench": "me"})
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        if b"laptop" in urllib.request.urlopen(request, timeout=2).read():
            break
    except Exception:
        pass
    time.sleep(0.005)
"""

# Runs in the caller pod: N sequential requests on one connection; prints p50/p99 (ms), req/s.
LATENCY = """
import http.client, json, statistics, sys, time
host, port, count, header = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fresh = len(sys.argv) > 5 and sys.argv[5] == "fresh"
headers = {"x-bench": "me"} if header == "yes" else {}
conn = http.client.HTTPConnection(host, port, timeout=10)
times = []
for i in range(count + 20):
    started = time.perf_counter()
    if fresh:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/", headers=headers)
    body = conn.getresponse().read()
    if fresh:
        conn.close()
    if i >= 20:
        times.append(time.perf_counter() - started)
times.sort()
print(json.dumps({
    "p50_ms": statistics.median(times) * 1000,
    "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
    "rps": len(times) / sum(times),
    "laptop": b"laptop" in body,
}))
"""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle's algorithm holds the body
    # until the headers' delayed ACK (40 ms), which would be measured as tele's latency.
    disable_nagle_algorithm = True
    first: float | None = None

    def do_GET(self) -> None:
        if Handler.first is None:
            Handler.first = time.monotonic()
        body = b"hello from the laptop"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


# The container handler: the same answers as Handler above (keep-alive, no Nagle), in tele's
# image's Python. argv[1]: the port.
CONTAINER_HANDLER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        body = b"hello from the laptop"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


IDLE_FRESH = "Service, idle agent, new connection each"
WIRETAP_KEEP = "Service, wiretap, one connection,"
WIRETAP_ROW = "Service, wiretap, new connection each,"


@contextmanager
def _sink(read_pause: float) -> Iterator[int]:
    """A local wiretap handler that reads what it gets (1 KiB per `read_pause` s when > 0)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(1024 if read_pause else 65536):
                    if read_pause:
                        time.sleep(read_pause)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        thread.join(5)


def fast_sink() -> AbstractContextManager[int]:
    return _sink(0)


def slow_sink() -> AbstractContextManager[int]:
    return _sink(0.1)


_TICKS = os.sysconf("SC_CLK_TCK")
IDLE = "idle agent"
TAP_SETUPS = ("fast", "slow", "absent", "fast+fast", "fast+slow", "fast+absent")
"""Wiretap setups compared with the idle agent: the request handler, and after a '+' the
--response-port handler (fast, slow or absent)."""


def _handler(kind: str) -> AbstractContextManager[int]:
    return {"fast": fast_sink, "slow": slow_sink}.get(kind, absent_port)()


def _row_label(setup: str) -> str:
    """A TAP_SETUPS name in the table: 'fast handler', 'fast handler, slow response handler'."""
    request, _, response = setup.partition("+")
    return f"{request} handler" + (f", {response} response handler" if response else "")


def _common(rows: list[dict[str, float]]) -> set[str]:
    """The keys every row has."""
    keys = set(rows[0])
    for row in rows[1:]:
        keys &= set(row)
    return keys


@contextmanager
def absent_port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port  # closed: nothing listens there


class Bench:
    def __init__(self, requests: int, auth_mode: str = "enforcing", docker: bool = False) -> None:
        self.docker = docker
        self.auth_mode = auth_mode
        self.requests = requests
        self.name = f"tele-bench-{secrets.token_hex(3)}"
        self.home = Path(tempfile.mkdtemp(prefix="tele-bench-engage-"))
        self.env = dict(os.environ, TELE_VIF="0")
        for sub in ("config", "cache", "state", "runtime"):
            (self.home / sub).mkdir(mode=0o700)
            self.env[f"XDG_{sub.upper()}_HOME" if sub != "runtime" else "XDG_RUNTIME_DIR"] = str(
                self.home / sub
            )
        self.kubeconfig = ""
        self.tap_counters: dict[str, dict[str, int]] = {}

    def tele(self, *args: str, timeout: float = 180) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "tele", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"tele {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def up(self) -> None:
        out = self.tele("sandbox", "up", "--name", self.name, "-o", "json")
        self.kubeconfig = str(json.loads(out)["kubeconfig"])
        self.tele(
            "helm",
            "install",
            "--kubeconfig",
            self.kubeconfig,
            "--set",
            f"security.authentication.mode={self.auth_mode}",
        )
        self.kubectl("apply", "-f", "-", stdin=APP)
        for target in ("-n", "ambassador", "deployment/traffic-manager"), ("deployment/echo",):
            self.kubectl("rollout", "status", *target, "--timeout=120s")
        self.kubectl("wait", "--for=condition=Ready", "pod/caller", "--timeout=120s")
        self.tele("connect", "--kubeconfig", self.kubeconfig)

    def down(self) -> None:
        for args, timeout in ((["quit"], 60), (["sandbox", "down", "--name", self.name], 120)):
            subprocess.run(
                [sys.executable, "-m", "tele", *args],
                env=self.env,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        shutil.rmtree(self.home, ignore_errors=True)

    def ready_time(self, port: int) -> tuple[float, float]:
        """(seconds until `tele intercept` returned, seconds until the first request came)."""
        Handler.first = None
        argv = ["kubectl", "--kubeconfig", self.kubeconfig, "exec", "caller", "--"]
        knock = subprocess.Popen(
            [*argv, "python3", "-c", KNOCK],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            started = time.monotonic()
            self.tele("intercept", "echo", "--port", str(port), "--http-header", "x-bench=me")
            returned = time.monotonic() - started
            knock.wait(70)
        finally:
            if knock.poll() is None:
                knock.kill()
                knock.wait()
        if Handler.first is None:
            raise SystemExit("no request reached the local handler")
        return returned, Handler.first - started

    def docker_ready(
        self,
        port: int,
        build: Path | None,
        image: str,
        workload: str = "echo",
        flags: tuple[str, ...] = (),
    ) -> tuple[float, object]:
        """Seconds from starting `tele intercept --docker-run` (or --docker-build `build`) to
        the first request answered by the container, and the running tele (leave it with
        stop_docker_handler)."""
        argv = ["kubectl", "--kubeconfig", self.kubeconfig, "exec", "caller", "--"]
        knock = KNOCK.replace("echo.default", f"{workload}.default")
        docker = ["--docker-run", "--"]
        if build:
            docker = ["--docker-build", str(build), "--docker-build-opt", f"tag={image}", "--"]
        run = [
            "--entrypoint", "/usr/bin/python3.11",
            "IMAGE" if build else image, "-c", CONTAINER_HANDLER, str(port),
        ]  # fmt: skip
        started = time.monotonic()
        handler = subprocess.Popen(
            [sys.executable, "-m", "tele", "intercept", workload, "--port", str(port),
             "--http-header", "x-bench=me", *flags, *docker, *run],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        knock = subprocess.run(
            [*argv, "python3", "-c", knock + "else:\n    raise SystemExit(1)\n"],
            capture_output=True,
            timeout=90,
            check=False,
        )
        ready = time.monotonic() - started
        if knock.returncode != 0 or handler.poll() is not None:
            self.stop_docker_handler(handler)
            raise SystemExit(f"the container handler did not answer: {handler.stderr}")
        return ready, handler

    def stop_docker_handler(self, handler: object) -> None:
        """Ctrl-C to the `tele intercept --docker-run`: it removes the container and leaves."""
        import signal

        assert isinstance(handler, subprocess.Popen)
        if handler.poll() is None:
            handler.send_signal(signal.SIGINT)
            try:
                handler.wait(60)
            except subprocess.TimeoutExpired:
                handler.kill()
                handler.wait()

    def docker_rows(self, port: int) -> dict[str, object]:
        """With a private dockerd: ready times (cold: built first; warm: the image is there)
        and the latency of a tcp intercept answered by a container."""
        from tele.image.archive import write_archive
        from tele.image.build import build_tele_image
        from tele.testing.dockerd import private_dockerd

        with private_dockerd() as engine:
            self.env["DOCKER_HOST"] = engine.host
            try:
                result = build_tele_image()
                archive = self.home / "tele-image.tar"
                write_archive(archive, [(result.image, result.tag)])
                loaded = engine.docker("load", "-i", str(archive), timeout=300)
                if loaded.returncode != 0:
                    raise SystemExit(f"docker load failed: {loaded.stderr}")
                context = self.home / "handler"
                context.mkdir()
                (context / "Dockerfile").write_text(
                    f"FROM {result.tag}\nLABEL bench={secrets.token_hex(4)}\n"
                )
                tag = f"tele-bench/handler:{secrets.token_hex(3)}"
                cold, handler = self.docker_ready(port, context, tag)
                self.stop_docker_handler(handler)
                warm, handler = self.docker_ready(port, None, tag)
                self.stop_docker_handler(handler)
                _, handler = self.docker_ready(port, None, tag)
                try:
                    row = self.latency("echo.default", 80, True)
                finally:
                    self.stop_docker_handler(handler)
                volumes = self.docker_volume_rows(port, tag)
            finally:
                del self.env["DOCKER_HOST"]
        return {"cold": cold, "warm": warm, "row": row, **volumes}

    def docker_volume_rows(self, port: int, tag: str, rounds: int = 2) -> dict[str, float]:
        """Under `tele connect --docker`: the --docker-run ready time (agent there) of a
        workload with a Secret volume, with the volumes mounted (sshfs in the daemon's
        container, bound into the handler's) and with --mount=false, in ABBA order; what the
        volumes add is the median of the paired differences. The runtime directory is made a
        shared mount first, as systemd makes every mount (Docker passes the container's mounts
        on only from one); the host daemon is quit for the container's."""
        self.tele("quit")
        self.kubectl("apply", "-f", "-", stdin=VOLUME_APP)
        self.kubectl("rollout", "status", "deployment/vol", "--timeout=120s")
        runtime = str(self.home / "runtime")
        subprocess.run(["mount", "--bind", runtime, runtime], check=True)
        try:
            subprocess.run(["mount", "--make-shared", runtime], check=True)
            self.tele("connect", "--docker", "--kubeconfig", self.kubeconfig, timeout=300)
            _, handler = self.docker_ready(port, None, tag, "vol", ("--mount=false",))
            self.stop_docker_handler(handler)  # the agent is injected: warm from here on
            times: dict[str, list[float]] = {"true": [], "false": []}
            for round_ in range(rounds):
                order = ("false", "true") if round_ % 2 == 0 else ("true", "false")
                for mount in order:
                    ready, handler = self.docker_ready(
                        port, None, tag, "vol", (f"--mount={mount}",)
                    )
                    self.stop_docker_handler(handler)
                    times[mount].append(ready)
            self.tele("quit")
        finally:
            subprocess.run(["umount", "-l", runtime], check=False, capture_output=True)
        added = [m - n for m, n in zip(times["true"], times["false"], strict=True)]
        return {
            "volumes_ready": statistics.median(times["true"]),
            "no_volumes_ready": statistics.median(times["false"]),
            "volumes_added": statistics.median(added),
        }

    def set_auth_mode(self, mode: str) -> float:
        """Reinstall the manager with `mode` and reconnect; seconds `tele connect` took."""
        self.tele("quit")
        self.tele(
            "helm", "upgrade", "--kubeconfig", self.kubeconfig,
            "--set", f"security.authentication.mode={mode}",
        )  # fmt: skip
        self.kubectl("rollout", "status", "-n", "ambassador", "deployment/traffic-manager",
                     "--timeout=120s")  # fmt: skip
        deadline = time.monotonic() + 120
        while len(self.kubectl("get", "pods", "-n", "ambassador", "-l", "app=traffic-manager",
                               "-o", "name").split()) != 1:  # fmt: skip
            if time.monotonic() > deadline:
                raise SystemExit("the old traffic manager pod did not go")
            time.sleep(0.5)  # the old pod's end: no event to wait on from here
        self.tele("connect", "--kubeconfig", self.kubeconfig)  # a new manager's first: warm-up
        self.tele("quit")
        started = time.monotonic()
        self.tele("connect", "--kubeconfig", self.kubeconfig)
        return time.monotonic() - started

    def compare_auth(self, port: int, rounds: int) -> dict[str, dict[str, float]]:
        """Connect and warm intercept-ready time with the manager's authentication enforcing
        and disabled, switching modes every measurement with the first of each pair swapping
        every round (ABBA ABBA ...), so that neither gets the warmer or quieter moments."""
        found: dict[str, dict[str, list[float]]] = {
            mode: {"connect_s": [], "ready_s": []} for mode in ("enforcing", "disabled")
        }
        for round_ in range(rounds):
            order = ["enforcing", "disabled"] if round_ % 2 == 0 else ["disabled", "enforcing"]
            for mode in order:
                found[mode]["connect_s"].append(self.set_auth_mode(mode))
                found[mode]["ready_s"].append(self.ready_time(port)[1])
                self.tele("leave", "echo")
        summary = {
            mode: {k: statistics.median(v) for k, v in values.items()}
            for mode, values in found.items()
        }
        summary["paired"] = {
            f"{k}_diff": statistics.median(
                e - d for e, d in zip(found["enforcing"][k], found["disabled"][k], strict=True)
            )
            for k in ("connect_s", "ready_s")
        }
        return summary

    def latency(
        self, host: str, port: int, header: bool, *, fresh: bool = False
    ) -> dict[str, float]:
        out = self.kubectl(
            "exec", "caller", "--", "python3", "-c", LATENCY, host, str(port),
            str(self.requests), "yes" if header else "no", "fresh" if fresh else "keep",
        )  # fmt: skip
        result: dict[str, float] = json.loads(out)
        return result

    def run_auth_compare(self, rounds: int) -> dict[str, dict[str, float]]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        try:
            self.up()
            self.ready_time(port)  # the agent is injected once: the rounds measure warm
            self.tele("leave", "echo")
            return self.compare_auth(port, rounds)
        finally:
            server.shutdown()
            self.down()

    def wiretap_rows(self) -> dict[str, dict[str, float]]:
        """The idle agent, then each wiretap setup (TAP_SETUPS: the request handler fast, slow
        or absent; then with a fast request handler, a --response-port handler fast, slow or
        absent), on one connection and on a new connection per request."""
        rows = {IDLE_FRESH: self.latency("echo.default", 80, False, fresh=True)}
        for setup in TAP_SETUPS:
            request, _, response = setup.partition("+")
            with _handler(request) as port, _handler(response or "none") as answers:
                extra = ["--response-port", str(answers)] if response else []
                self.tele("wiretap", "tap", "-w", "echo", "-p", f"{port}:http", *extra)
                rows[f"{WIRETAP_KEEP} {_row_label(setup)}"] = self.latency(
                    "echo.default", 80, False
                )
                rows[f"{WIRETAP_ROW} {_row_label(setup)}"] = self.latency(
                    "echo.default", 80, False, fresh=True
                )
                # The counters reach tele status within seconds (agent -> manager -> daemon).
                seen = self._tap_counters(self.requests + 21)
                self.tele("leave", "tap")
            self.tap_counters[setup] = {k: int(v) for k, v in seen.items()}
        return rows

    def compare_wiretaps(self, rounds: int) -> dict[str, dict[str, float]]:
        """The idle agent and each wiretap setup (TAP_SETUPS), measured in turn every round,
        the order reversed every other round (ABBA ...): what each adds is the median of its
        differences to the idle agent of the same round, on one connection and on a new
        connection per request."""
        found: dict[str, list[dict[str, float]]] = {s: [] for s in (IDLE, *TAP_SETUPS)}
        for round_ in range(rounds):
            order = [IDLE, *TAP_SETUPS]
            if round_ % 2:
                order.reverse()
            for setup in order:
                found[setup].append(self.measure_setup(setup))
        summary: dict[str, dict[str, float]] = {}
        for setup, values in found.items():
            keys = _common(values)
            row: dict[str, float] = {k: statistics.median(v[k] for v in values) for k in keys}
            if setup != IDLE:
                for k in keys & _common(found[IDLE]):
                    if not k.endswith("_ms"):
                        continue
                    row[f"added_{k}"] = statistics.median(
                        v[k] - i[k] for v, i in zip(values, found[IDLE], strict=True)
                    )
            summary[setup] = row
        return summary

    def measure_setup(self, setup: str) -> dict[str, float]:
        """One measurement of `setup`: the wiretap made (handlers as it says), the requests
        on one connection and on new connections, the counters read, the wiretap left."""
        if setup == IDLE:
            return self._both()
        request, _, response = setup.partition("+")
        with _handler(request) as port, _handler(response or "none") as answers:
            extra = ["--response-port", str(answers)] if response else []
            self.tele("wiretap", "tap", "-w", "echo", "-p", f"{port}:http", *extra)
            try:
                found = self._both()
                found.update(self._tap_counters(self.requests + 21))
            finally:
                self.tele("leave", "tap")
        return found

    def _both(self) -> dict[str, float]:
        keep = self.latency("echo.default", 80, False)
        before = self._cpu()
        fresh = self.latency("echo.default", 80, False, fresh=True)
        after = self._cpu()
        found = {
            "keep_p50_ms": keep["p50_ms"],
            "keep_p99_ms": keep["p99_ms"],
            "fresh_p50_ms": fresh["p50_ms"],
            "fresh_p99_ms": fresh["p99_ms"],
        }
        for name, ticks in after.items():  # CPU per request on a new connection each
            found[f"{name}_cpu_ms"] = (
                (ticks - before.get(name, ticks)) * 1000 / _TICKS / (self.requests + 20)
            )
        return found

    def _cpu(self) -> dict[str, int]:
        """User + system CPU ticks so far of the agent, the manager and the daemon (the
        sandbox's containers are processes of this machine)."""
        containers = self.home / "state" / "tele" / "sandbox" / self.name / "node" / "containers"
        pid_files = {
            "agent": sorted(containers.glob("*.traffic-agent.*/pid")),
            "manager": sorted(containers.glob("*.traffic-manager.*/pid")),
            "daemon": [self.home / "runtime" / "tele" / "daemon.pid"],
        }
        ticks: dict[str, int] = {}
        for name, files in pid_files.items():
            try:
                pid = files[-1].read_text().split()[0]
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (IndexError, OSError):
                continue
            ticks[name] = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks

    def _tap_counters(self, connections: int) -> dict[str, float]:
        """The wiretap's counters once tele status shows `connections` (or 15 s passed)."""
        deadline = time.monotonic() + 15
        while True:
            status = json.loads(self.tele("status", "-o", "json"))
            taps = [
                e.get("wiretap") or {}
                for e in status["session"]["engagements"]
                if e["name"] == "tap"
            ]
            seen = taps[0] if taps else {}
            if seen.get("connections", 0) >= connections or time.monotonic() > deadline:
                return {k: float(v) for k, v in seen.items() if isinstance(v, int)}
            time.sleep(1)

    def run_wiretap_compare(self, rounds: int) -> dict[str, dict[str, float]]:
        try:
            self.up()
            self.tele("wiretap", "tap", "-w", "echo", "-p", "1:http")  # the agent injected
            self.tele("leave", "tap")
            self._both()  # warm-up
            return self.compare_wiretaps(rounds)
        finally:
            self.down()

    def run(self) -> dict[str, object]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        try:
            self.up()
            cold = self.ready_time(port)
            pod_ip = self.kubectl(
                "get", "pods", "-l", "app=echo", "-o", "jsonpath={.items[0].status.podIP}"
            ).strip()
            rows = {
                "app directly (pod IP:8080)": self.latency(pod_ip, 8080, False),
                "Service, http intercept, not matching": self.latency("echo.default", 80, False),
                "Service, http intercept, matching (laptop)": self.latency(
                    "echo.default", 80, True
                ),
            }
            self.tele("leave", "echo")
            rows["Service, idle agent"] = self.latency("echo.default", 80, False)
            rows.update(self.wiretap_rows())
            self.tele("intercept", "echo", "--port", str(port), "--mechanism", "tcp")
            rows["Service, tcp intercept (laptop)"] = self.latency("echo.default", 80, False)
            self.tele("leave", "echo")
            warm = self.ready_time(port)
            self.tele("leave", "echo")
            docker: dict[str, object] = {}
            if self.docker:
                self.tele("intercept", "echo", "--port", str(port), "--http-header", "x-bench=me")
                rows["Service, http intercept, matching (process)"] = self.latency(
                    "echo.default", 80, True
                )
                self.tele("leave", "echo")
                server.shutdown()
                server.server_close()  # the container's handler takes the port
                docker = self.docker_rows(port)
                row = docker["row"]
                assert isinstance(row, dict)
                rows["Service, http intercept, matching (container)"] = row
        finally:
            server.shutdown()
            self.down()
        return {
            "cold": cold,
            "warm": warm,
            "rows": rows,
            "docker": docker,
            "taps": self.tap_counters,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument(
        "--auth-mode",
        choices=["enforcing", "permissive", "disabled"],
        default="enforcing",
        help="the manager's security.authentication.mode (compare enforcing with disabled)",
    )
    parser.add_argument(
        "--docker",
        action="store_true",
        help="also a handler container (--docker-run) on a private dockerd: ready and latency",
    )
    parser.add_argument(
        "--auth-compare",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only compare enforcing with disabled: connect and warm ready time, the modes "
        "alternating (ABBA) for ROUNDS rounds",
    )
    parser.add_argument(
        "--wiretap-compare",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only the wiretap rows: the idle agent and every wiretap setup (handlers fast, "
        "slow, absent; with a --response-port handler too) in turn, ABBA, for ROUNDS rounds",
    )
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("kubectl"):
        raise SystemExit("bench/engage.py needs root (the sandbox's namespaces) and kubectl")
    if args.wiretap_compare:
        taps = Bench(args.requests).run_wiretap_compare(args.wiretap_compare)
        print(
            f"{'wiretap (request+response)':26} {'keep p50':>8} {'p99':>6} {'fresh p50':>9} "
            f"{'p99':>6} {'+keep p50':>9} {'+p99':>6} {'+fresh p50':>10} {'+p99':>6} "
            f"{'+CPU agent':>10} {'manager':>7} {'daemon':>7}"
        )
        for setup, row in taps.items():
            print(
                f"{setup:26} {row['keep_p50_ms']:8.2f} {row['keep_p99_ms']:6.2f} "
                f"{row['fresh_p50_ms']:9.2f} {row['fresh_p99_ms']:6.2f} "
                f"{row.get('added_keep_p50_ms', 0):+9.2f} "
                f"{row.get('added_keep_p99_ms', 0):+6.2f} "
                f"{row.get('added_fresh_p50_ms', 0):+10.2f} "
                f"{row.get('added_fresh_p99_ms', 0):+6.2f} "
                f"{row.get('added_agent_cpu_ms', 0):+10.3f} "
                f"{row.get('added_manager_cpu_ms', 0):+7.3f} "
                f"{row.get('added_daemon_cpu_ms', 0):+7.3f}"
            )
        print("(ms; keep: one connection, fresh: a new connection per request; + columns: the")
        print(" median of paired differences to the idle agent of the same round; CPU: ms per")
        print(" fresh request. Target: a fast handler adds <= 0.3 ms p50, an absent one leaves")
        print(" the app's p99 unchanged)")
        print(
            json.dumps(
                {
                    "bench": "engage-wiretap",
                    "rounds": args.wiretap_compare,
                    "requests": args.requests,
                    "setups": {s: {k: round(v, 3) for k, v in r.items()} for s, r in taps.items()},
                }
            )
        )
        return
    if args.auth_compare:
        compared = Bench(args.requests).run_auth_compare(args.auth_compare)
        print(f"{'authentication mode':22} {'connect s':>10} {'ready s':>9}")
        for mode in ("enforcing", "disabled"):
            row = compared[mode]
            print(f"{mode:22} {row['connect_s']:10.2f} {row['ready_s']:9.2f}")
        paired = compared["paired"]
        print(
            f"{'enforcing - disabled':22} {paired['connect_s_diff'] * 1000:+9.0f}ms "
            f"{paired['ready_s_diff'] * 1000:+7.0f}ms  (median of paired runs; target <= +50 ms)"
        )
        print(json.dumps({"bench": "engage-auth", "rounds": args.auth_compare, **compared}))
        return
    result = Bench(args.requests, args.auth_mode, args.docker).run()
    cold, warm = result["cold"], result["warm"]
    rows = result["rows"]
    assert isinstance(cold, tuple) and isinstance(warm, tuple) and isinstance(rows, dict)
    print(f"{'ready (tele intercept -> first request here)':46} {'CLI s':>7} {'first s':>8}")
    print(f"{'cold (agent injected, pod rolled)':46} {cold[0]:7.2f} {cold[1]:8.2f}")
    print(f"{'warm (agent already there)':46} {warm[0]:7.2f} {warm[1]:8.2f}")
    docker = result["docker"]
    assert isinstance(docker, dict)
    if docker:
        print(
            f"{'--docker-build, image built first (agent there)':46} {'':7} {docker['cold']:8.2f}"
        )
        print(f"{'--docker-run, image there (agent there)':46} {'':7} {docker['warm']:8.2f}")
        print(
            f"{'connect --docker, --docker-run with volumes':46} {'':7} "
            f"{docker['volumes_ready']:8.2f}"
        )
        print(
            f"{'connect --docker, --docker-run --mount=false':46} {'':7} "
            f"{docker['no_volumes_ready']:8.2f}"
        )
        print(
            f"{'  what mounting the volumes adds (median)':46} {'':7} "
            f"{docker['volumes_added']:+8.2f}"
        )
    print()
    direct = rows["app directly (pod IP:8080)"]["p50_ms"]
    fresh = rows[IDLE_FRESH]
    idle = rows["Service, idle agent"]
    width = max(46, *(len(label) for label in rows))
    heading = "requests from a pod"
    print(f"{heading:{width}} {'p50 ms':>7} {'p99 ms':>8} {'req/s':>8} {'+p50 ms':>8}")
    for label, row in rows.items():
        # Wiretap rows are compared with the idle agent used the same way.
        base = direct
        if label.startswith(WIRETAP_ROW):
            base = fresh["p50_ms"]
        elif label.startswith(WIRETAP_KEEP):
            base = rows["Service, idle agent"]["p50_ms"]
        added = row["p50_ms"] - base
        print(
            f"{label:{width}} {row['p50_ms']:7.2f} {row['p99_ms']:8.2f} {row['rps']:8.0f} "
            f"{added:8.2f}"
        )
    for label, counters in result["taps"].items():  # type: ignore[attr-defined]
        print(f"wiretap, {_row_label(label)}: {counters}")
    print(
        json.dumps(
            {
                "bench": "engage",
                "auth_mode": args.auth_mode,
                "ready_cold_s": round(cold[1], 3),
                "ready_warm_s": round(warm[1], 3),
                "cli_cold_s": round(cold[0], 3),
                "cli_warm_s": round(warm[0], 3),
                "latency": {
                    k: {m: round(float(v), 3) for m, v in r.items()} for k, r in rows.items()
                },
                "docker_ready_cold_s": round(float(docker["cold"]), 3) if docker else None,
                "docker_ready_warm_s": round(float(docker["warm"]), 3) if docker else None,
                "docker_connect_volumes_ready_s": round(float(docker["volumes_ready"]), 3)
                if docker
                else None,
                "docker_connect_volumes_added_s": round(float(docker["volumes_added"]), 3)
                if docker
                else None,
                "docker_added_p50_ms": round(
                    rows["Service, http intercept, matching (container)"]["p50_ms"]
                    - rows["Service, http intercept, matching (process)"]["p50_ms"],
                    3,
                )
                if docker
                else None,
                "added_p50_ms_not_matching": round(
                    rows["Service, http intercept, not matching"]["p50_ms"] - direct, 3
                ),
                "wiretap": {
                    label: {
                        "one_connection_added_p50_ms": round(
                            rows[f"{WIRETAP_KEEP} {_row_label(label)}"]["p50_ms"] - idle["p50_ms"],
                            3,
                        ),
                        "one_connection_added_p99_ms": round(
                            rows[f"{WIRETAP_KEEP} {_row_label(label)}"]["p99_ms"] - idle["p99_ms"],
                            3,
                        ),
                        "added_p50_ms": round(
                            rows[f"{WIRETAP_ROW} {_row_label(label)}"]["p50_ms"] - fresh["p50_ms"],
                            3,
                        ),
                        "added_p99_ms": round(
                            rows[f"{WIRETAP_ROW} {_row_label(label)}"]["p99_ms"] - fresh["p99_ms"],
                            3,
                        ),
                        "counters": result["taps"].get(label, {}),  # type: ignore[attr-defined]
                    }
                    for label in TAP_SETUPS
                },
            }
        )
    )


if __name__ == "__main__":
    main()
