"""Benchmark the engagement kinds on the sandbox with a node, as a user runs them (the `tele`
CLI, kubectl): how long each command takes until it returns ready, over a few rounds.

- intercept (cold): the first intercept of a workload (the pods are rolled to get the agent),
  then the first request from a cluster pod answered on this machine;
- intercept (warm) / leave: the agent is there already;
- replace / leave: the pods are rolled without the container, and back (the leave returns at
  once; "app back" is until the rollout is complete and the app answers a call again);
- ingest / leave; --to-pod: the first answer through a forwarded local port.

The cluster runs in this process (threaded) under a unique name; everything it creates is
removed at the end. Needs root, iproute2, nftables, kubectl. Prints a table and one JSON line.

    .venv/bin/python bench/engage_kinds.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from tele.sandbox.network import netns
from tele.sandbox.testing import threaded_cluster

VENV_BIN = Path(sys.executable).parent
APP_PORT = 18080
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
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: tele-sandbox/echo
        ports: [{{name: http, containerPort: {APP_PORT}}}]
        env: [{{name: PORT, value: "{APP_PORT}"}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: caller, namespace: default}}
spec:
  containers: [{{name: c, image: tele-sandbox/worker}}]
"""


class Run:
    def __init__(self, kubeconfig: Path, home: Path) -> None:
        self.kubeconfig = kubeconfig
        self.env = {**os.environ, "HOME": str(home), "TELE_VIF": "0"}
        self.env["PATH"] = f"{VENV_BIN}:{self.env.get('PATH', '')}"
        for var, sub in (
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_CACHE_HOME", "cache"),
            ("XDG_STATE_HOME", "state"),
            ("XDG_RUNTIME_DIR", "runtime"),
        ):
            (home / sub).mkdir(mode=0o700)
            self.env[var] = str(home / sub)

    def tele(self, *args: str) -> float:
        """Seconds `tele ARGS` took; exits the benchmark if it failed."""
        start = time.monotonic()
        done = subprocess.run(
            [str(VENV_BIN / "tele"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if done.returncode:
            sys.exit(f"tele {' '.join(args)} failed: {done.stderr.strip()}")
        return time.monotonic() - start

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=120,
            check=False,
        )
        if done.returncode:
            sys.exit(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def call(self) -> str:
        script = (
            "import urllib.request; "
            "print(urllib.request.urlopen('http://echo.default/', timeout=10).read().decode())"
        )
        return self.kubectl("exec", "caller", "--", "python3", "-c", script).strip()


def laptop() -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "6")
            self.end_headers()
            self.wfile.write(b"laptop")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def measure(run: Run, rounds: int, port: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}

    def note(what: str, seconds: float) -> None:
        times.setdefault(what, []).append(seconds)

    for round_ in range(rounds):
        start = time.monotonic()
        took = run.tele("intercept", "echo", "-p", f"{port}:http", "--to-pod", str(APP_PORT))
        note("intercept (cold)" if round_ == 0 else "intercept (warm)", took)
        answer = run.call()
        assert answer == "laptop", answer
        if round_ == 0:
            note("intercept (cold) -> first request", time.monotonic() - start)
        start = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{APP_PORT}/", timeout=10) as reply:
            assert b'"pod": "echo-' in reply.read()
        note("--to-pod first answer", time.monotonic() - start)
        note("leave intercept", run.tele("leave", "echo"))

        note("replace", run.tele("replace", "echo", "-p", f"{port}:http"))
        assert run.call() == "laptop"
        start = time.monotonic()
        note("leave replace", run.tele("leave", "echo"))
        run.kubectl("rollout", "status", "deployment/echo", "--timeout=90s")
        run.kubectl("wait", "--for=condition=Ready", "pod", "-l", "app=echo", "--timeout=90s")
        assert run.call().startswith('{"pod": "echo-')
        note("leave replace -> app back", time.monotonic() - start)

        note("ingest", run.tele("ingest", "echo"))
        note("leave ingest", run.tele("leave", "echo/echo"))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    name = f"be{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "home").mkdir()
        server, port = laptop()
        try:
            with threaded_cluster(
                base / "kubeconfig", name=name, nodes=True, state_dir=base / "state"
            ):
                run = Run(base / "kubeconfig", base / "home")
                run.tele("helm", "install", "--kubeconfig", str(run.kubeconfig))
                run.kubectl(
                    "wait", "-n", "ambassador", "--for=condition=Ready", "pod", "-l",
                    "app=traffic-manager", "--timeout=90s",
                )  # fmt: skip
                run.kubectl("apply", "-f", "-", stdin=APPS)
                run.kubectl("wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
                run.tele("connect", "--no-vif", "--kubeconfig", str(run.kubeconfig))
                try:
                    times = measure(run, args.rounds, port)
                finally:
                    subprocess.run(
                        [str(VENV_BIN / "tele"), "quit"], env=run.env, timeout=30, check=False
                    )
        finally:
            server.shutdown()
            for left in [n for n in netns.list_netns() if n.startswith(f"{name}-")]:
                netns.delete_sync(left)
    print(f"{'step':<36} {'n':>3} {'p50 s':>8} {'max s':>8}")
    summary = {}
    for what, values in times.items():
        p50, top = statistics.median(values), max(values)
        summary[what] = {"n": len(values), "p50_s": round(p50, 3), "max_s": round(top, 3)}
        print(f"{what:<36} {len(values):>3} {p50:>8.2f} {top:>8.2f}")
    print(json.dumps({"bench": "engage_kinds", "rounds": args.rounds, "steps": summary}))


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
