"""`tele demo`: the whole story on one machine, driven through the same commands a user types.

A sandbox cluster comes up, `tele helm install` puts the traffic manager in it, a demo backend
and a frontend calling it are deployed; the sandbox's laptop namespace connects (`tele connect
--vif`), calls the frontend by name, intercepts the backend with a personal (header-matched)
intercept served by a handler on the laptop — the header travels through the frontend's call —
leaves, replaces the backend's container with the laptop (every call comes here), leaves again,
and everything is torn down. Each step prints what ran, what came back and how
long it took; a failure names its step and still cleans up (also on Ctrl-C).
"""

from __future__ import annotations

import importlib.resources
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tele.errors import TeleError

APP = importlib.resources.files("tele") / "demo-app.yaml"
"""The demo's application (package data): a frontend that calls a backend."""

HANDLER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the laptop\\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class DemoFailed(TeleError):
    exit_code = 1


@dataclass
class Step:
    title: str
    seconds: float
    outcome: str


@dataclass
class Demo:
    name: str
    keep: bool
    say: Callable[[str], None]
    steps: list[Step] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tele-demo-")))
    kubeconfig: str = ""
    handler: subprocess.Popen[str] | None = None
    handler_port: int = 0

    # --- running commands ------------------------------------------------------------------

    def tele(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tele", *args]

    def laptop(self, *argv: str) -> list[str]:
        """`argv` run in the sandbox's laptop namespace, as a user there would."""
        return self.tele("sandbox", "shell", "--name", self.name, "--", *argv)

    def run(
        self, title: str, argv: list[str], check: Callable[[str], str], timeout: float = 180
    ) -> str:
        self.say(f"\n== {title}\n   $ {shlex.join(_shown(argv))}")
        started = time.monotonic()
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"step {title!r} did not finish within {timeout:g}s") from None
        seconds = time.monotonic() - started
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            last = output.splitlines()[-1] if output else f"exit status {result.returncode}"
            raise DemoFailed(f"step {title!r} failed: {last}")
        try:
            outcome = check(result.stdout)
        except AssertionError as exc:
            raise DemoFailed(f"step {title!r} gave an unexpected answer: {exc}") from None
        for line in result.stdout.strip().splitlines()[:8]:
            self.say(f"   | {line}")
        self.say(f"   -> {outcome} ({seconds:.2f}s)")
        self.steps.append(Step(title, seconds, outcome))
        return result.stdout

    # --- the story -------------------------------------------------------------------------

    def story(self) -> None:
        out = self.run(
            "Start a sandbox cluster",
            self.tele("sandbox", "up", "--name", self.name, "-o", "json"),
            lambda o: "API server ready",
        )
        import json

        self.kubeconfig = str(json.loads(out)["kubeconfig"])
        self.run(
            "Install the traffic manager",
            self.tele("helm", "install", "--kubeconfig", self.kubeconfig),
            lambda o: "installed",
        )
        manifest = self.workdir / "demo.yaml"
        manifest.write_text(APP.read_text())
        kubectl = ["kubectl", "--kubeconfig", self.kubeconfig]
        self.run(
            "Deploy the demo app (frontend calls backend)",
            [*kubectl, "apply", "-f", str(manifest)],
            lambda o: "applied",
        )
        for namespace, deployment in (
            ("ambassador", "traffic-manager"),
            ("demo", "backend"),
            ("demo", "frontend"),
        ):
            self.run(
                f"Wait for {deployment}",
                [
                    *kubectl,
                    "rollout",
                    "status",
                    "-n",
                    namespace,
                    f"deployment/{deployment}",
                    "--timeout=120s",
                ],
                _expect("successfully rolled out", "ready"),
            )
        self.run(
            "Connect the laptop to the cluster",
            self.laptop(*self.tele("connect", "--vif", "-n", "demo")),
            _expect("Connected to context", "connected"),
        )
        self.run(
            "Call the frontend by name from the laptop",
            self.curl(),
            _expect('"pod": "backend-', "the frontend pod called the backend pod"),
        )
        self.start_handler()
        assert self.handler is not None
        port = self.handler_port
        self.run(
            "Intercept the backend for requests with x-demo: me",
            self.laptop(
                *self.tele(
                    "intercept",
                    "backend",
                    "-n",
                    "demo",
                    "--port",
                    str(port),
                    "--http-header",
                    "x-demo=me",
                )
            ),
            _expect("ACTIVE", "engaged (the agent was injected by the webhook)"),
        )
        self.run(
            "With the header, the frontend's call reaches the laptop",
            self.curl("x-demo: me"),
            _expect("hello from the laptop", "the backend call was answered on the laptop"),
        )
        self.run(
            "Other requests still reach the cluster",
            self.curl(),
            _expect('"pod": "backend-', "answered by the cluster's backend pod"),
        )
        self.run(
            "Leave the intercept",
            self.laptop(*self.tele("leave", "backend")),
            _expect("Left backend", "left"),
        )
        self.run(
            "The header no longer matters",
            self.curl("x-demo: me"),
            _expect('"pod": "backend-', "answered by the cluster's backend pod"),
        )
        self.run(
            "Replace the backend container with the laptop",
            self.laptop(*self.tele("replace", "backend", "-n", "demo", "--port", f"{port}:8080")),
            _expect(
                "replaced: it does not run in the cluster", "replaced (the pod rolled without it)"
            ),
        )
        self.run(
            "Every call of the frontend now reaches the laptop",
            self.curl(),
            _expect("hello from the laptop", "the backend call was answered on the laptop"),
        )
        self.run(
            "Leave the replace",
            self.laptop(*self.tele("leave", "backend")),
            _expect("Left backend", "left (the container runs again)"),
        )
        self.run(
            "The cluster's backend answers again",
            self.curl(),
            _expect('"pod": "backend-', "answered by the cluster's backend pod"),
        )

    def curl(self, header: str = "") -> list[str]:
        """curl the frontend from the laptop (with `header` when given)."""
        extra = ["-H", header] if header else []
        return self.laptop("curl", "-s", "-m", "10", *extra, "http://frontend.demo/")

    def start_handler(self) -> None:
        self.say("\n== Start a handler on the laptop (127.0.0.1, a free port)")
        self.handler = subprocess.Popen(
            self.laptop(sys.executable, "-c", HANDLER), stdout=subprocess.PIPE, text=True
        )
        assert self.handler.stdout is not None
        line = self.handler.stdout.readline().strip()
        if not line.isdigit():
            raise DemoFailed("the laptop handler did not start")
        self.handler_port = int(line)
        self.say(f"   -> listening on 127.0.0.1:{self.handler_port}")

    def cleanup(self) -> None:
        if self.handler is not None:
            self.handler.terminate()
            try:
                self.handler.wait(5)
            except subprocess.TimeoutExpired:
                self.handler.kill()
        if self.keep:
            self.say(
                f"\nThe sandbox keeps running. Continue by hand:\n"
                f"  tele sandbox shell --name {self.name}      # a shell on the 'laptop'\n"
                f"  tele status; tele list -n demo; curl http://frontend.demo/\n"
                f"  tele sandbox down --name {self.name}       # when done"
            )
            return
        self.say("\n== Tear down")
        subprocess.run(
            self.laptop(*self.tele("quit")), capture_output=True, check=False, timeout=60
        )
        subprocess.run(
            self.tele("sandbox", "down", "--name", self.name),
            capture_output=True,
            check=False,
            timeout=120,
        )
        self.say("   -> the daemon stopped, the sandbox and its namespaces are gone")

    def table(self) -> str:
        width = max(len(s.title) for s in self.steps)
        lines = [f"{'step':{width}}  {'seconds':>7}  result"]
        lines += [f"{s.title:{width}}  {s.seconds:>7.2f}  {s.outcome}" for s in self.steps]
        lines.append(f"{'total':{width}}  {sum(s.seconds for s in self.steps):>7.2f}")
        return "\n".join(lines)


def _expect(text: str, outcome: str) -> Callable[[str], str]:
    def check(output: str) -> str:
        assert text in output, f"expected {text!r} in {output.strip()[:200]!r}"
        return outcome

    return check


def _shown(argv: list[str]) -> list[str]:
    """How a person would type it: `tele ...` rather than `python -m tele ...`."""
    shown: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == sys.executable and argv[i + 1 : i + 3] == ["-m", "tele"]:
            shown.append("tele")
            i += 3
        else:
            shown.append(argv[i])
            i += 1
    return shown


def run_demo(name: str | None, keep: bool, say: Callable[[str], None]) -> None:
    demo = Demo(name or f"tele-demo-{secrets.token_hex(3)}", keep, say)
    say(f"tele demo: sandbox {demo.name!r}; every step is a command you can type yourself.")
    try:
        demo.story()
    finally:
        demo.cleanup()
    say("\n" + demo.table())
