"""Issue 19's engagements on the sandbox with a node (one sandbox for the module): `tele
wiretap` (copies reach local handlers while the app answers every request; an absent handler's
copies are dropped and counted in `tele status`), UDP intercepts of named and numeric ports
(l4-echo), and a headless Service's named port (callers dial the pod IP)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemon.util import DaemonGuard, run_tele, single_error_line
from tests.e2e import (
    HAND_APP,
    call,
    caller_pod,
    connect,
    deployment,
    echo_container,
    env_list,
    genyaml,
    hand_injected,
    installed_with,
    kubectl,
    laptop_http,
    manifest,
    service,
    wait_rolled,
)
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APPS = manifest(
    deployment("echo", echo_container()),
    service("echo"),
    deployment(
        "l4",
        {
            "name": "named",
            "image": "tele-sandbox/l4-echo",
            "env": env_list(PORT="9000"),
            "ports": [{"name": "dgram", "containerPort": 9000, "protocol": "UDP"}],
        },
        {
            "name": "numeric",
            "image": "tele-sandbox/l4-echo",
            "env": env_list(PORT="9001"),
            "ports": [{"containerPort": 9001, "protocol": "UDP"}],
        },
    ),
    service(
        "l4",
        {"name": "named", "port": 53, "targetPort": "dgram", "protocol": "UDP"},
        {"name": "numeric", "port": 54, "targetPort": 9001, "protocol": "UDP"},
    ),
    deployment("db", echo_container(name="db")),
    service("db", {"name": "http", "port": 8080, "targetPort": "http"}, headless=True),
    caller_pod(),
)

# Runs in the caller pod: one datagram to HOST:PORT (sent again if unanswered), prints the
# answer or "timeout".
UDP_ASK = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(3)
for attempt in range(3):
    sock.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(sock.recvfrom(65535)[0].decode())
        break
    except socket.timeout:
        pass
else:
    print("timeout")
"""


def udp_ask(sandbox: NodeSandbox, host: str, port: int, payload: str) -> str:
    return kubectl(
        sandbox, "exec", "caller", "--", "python3", "-c", UDP_ASK, host, str(port), payload
    ).strip()


@contextmanager
def udp_handler(prefix: bytes) -> Iterator[int]:
    """A UDP echo on this machine answering `prefix + datagram`; yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
                if peer is None:  # shut down
                    return
                sock.sendto(prefix + data, peer)
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        thread.join(5)


def pod_ip(sandbox: NodeSandbox, app: str) -> str:
    pods = json.loads(kubectl(sandbox, "get", "pods", "-l", f"app={app}", "-o", "json"))
    live = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, [p["metadata"]["name"] for p in live]
    return str(live[0]["status"]["podIP"])


class Recorder:
    """A local handler that keeps every byte it is sent (one entry per connection)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            conn.sendall(b"HTTP/1.1 418 ignored\r\ncontent-length: 0\r\n\r\n")
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except OSError:
                pass
        with self.lock:
            self.received.append(data)

    def seen(self, marker: bytes) -> bool:
        with self.lock:
            return any(marker in data for data in self.received)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the thread
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


@contextmanager
def recorder() -> Iterator[Recorder]:
    handler = Recorder()
    try:
        yield handler
    finally:
        handler.close()


def eventually(predicate: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def installed(node_sandbox: NodeSandbox) -> Iterator[NodeSandbox]:  # noqa: F811
    """The traffic manager and the apps, once for the module."""
    with installed_with(node_sandbox, APPS, uninstall=False) as sandbox:
        yield sandbox


def test_two_wiretaps_get_copies_while_the_app_answers_and_drops_are_shown(
    installed: NodeSandbox, tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    sandbox = installed
    connect(tele_env, sandbox)
    # Bad input: a service port the workload does not have; nothing is left engaged.
    wrong = run_tele(tele_env, "wiretap", "echo", "-p", "9999:nope", timeout=120)
    assert wrong.returncode == 1
    assert single_error_line(wrong).startswith("tele: echo has no service port matching port nope")
    assert "Intercepts:         0 total" in run_tele(tele_env, "status").stdout

    same = run_tele(tele_env, "wiretap", "echo", "-p", "9998", "--response-port", "9998")
    assert same.returncode != 0
    assert "--response-port 9998 is also a --port" in single_error_line(same)

    with recorder() as one, recorder() as two, recorder() as answers:
        first = run_tele(
            tele_env, "wiretap", "echo", "-p", f"{one.port}:http",
            "--response-port", str(answers.port), timeout=120,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        assert "Wiretap name           : echo" in first.stdout
        assert f"Responses to           : 127.0.0.1:{answers.port}" in first.stdout
        second = run_tele(
            tele_env, "wiretap", "tap2", "-w", "echo", "-p", str(two.port), "-o", "json",
            timeout=120,
        )  # fmt: skip
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["kind"] == "wiretap"

        # The app answers every request itself; each handler gets a copy of each.
        bodies = []
        for index in range(3):
            answer = call(sandbox, f"http://echo.default/copied-{index}")
            assert json.loads(answer)["pod"].startswith("echo-")
            bodies.append(answer.encode())
        for index in range(3):
            marker = f"GET /copied-{index} HTTP/1.1".encode()
            eventually(lambda m=marker: one.seen(m) and two.seen(m), f"copy {index}")
            # The first wiretap also got the app's answer, as the caller received it.
            eventually(lambda b=bodies[index]: answers.seen(b), f"answer copy {index}")
        assert not two.seen(bodies[0])  # the second asked for requests only
        with answers.lock:
            assert all(data.startswith(b"HTTP/1.1 200") for data in answers.received)

        # An absent handler: the app still answers, and the dropped copies are counted.
        two.close()
        for index in range(3):
            answer = call(sandbox, f"http://echo.default/after-{index}")
            assert json.loads(answer)["pod"].startswith("echo-")
        eventually(lambda: one.seen(b"GET /after-2 HTTP/1.1"), "the live handler's copy")

        counters: dict[str, int] = {}

        def dropped() -> int:
            status = run_tele(tele_env, "status", "-o", "json")
            engagements = json.loads(status.stdout)["session"]["engagements"]
            tap2 = next(e for e in engagements if e["name"] == "tap2")
            counters.update(tap2["wiretap"])
            return counters["dropped_connections"]

        eventually(lambda: dropped() == 3, "three dropped copies in tele status")
        text = run_tele(tele_env, "status").stdout
        assert "tap2: wiretapped Deployment default/echo" in text
        assert "dropped" in text and "the local handler was absent or too slow" in text

        for name in ("echo", "tap2"):
            left = run_tele(tele_env, "leave", name, timeout=60)
            assert left.returncode == 0, left.stderr
    assert "Intercepts:         0 total" in run_tele(tele_env, "status").stdout
    assert run_tele(tele_env, "quit").returncode == 0


def test_udp_intercepts_of_named_and_numeric_ports_and_the_app_after_leave(
    installed: NodeSandbox, tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    sandbox = installed
    assert udp_ask(sandbox, "l4.default", 53, "before") == "before"
    connect(tele_env, sandbox)
    with udp_handler(b"laptop:") as port:
        engaged = run_tele(tele_env, "intercept", "l4", "-p", f"{port}:named", timeout=120)
        assert engaged.returncode == 0, engaged.stderr
        assert "all UDP datagrams" in engaged.stdout
        assert "nothing listens" not in engaged.stderr  # a UDP handler is not probed by TCP
        wait_rolled(sandbox, "l4")
        assert udp_ask(sandbox, "l4.default", 53, "named") == "laptop:named"
        # The numeric port, untouched by this intercept, still reaches its app.
        assert udp_ask(sandbox, "l4.default", 54, "other") == "other"
        assert run_tele(tele_env, "leave", "l4", timeout=60).returncode == 0

        # The agent stays: the named port's datagrams reach the app through it, none is lost.
        assert udp_ask(sandbox, "l4.default", 53, "after leave") == "after leave"

        numeric = run_tele(tele_env, "intercept", "l4", "-p", f"{port}:54", timeout=120)
        assert numeric.returncode == 0, numeric.stderr
        assert udp_ask(sandbox, "l4.default", 54, "numeric") == "laptop:numeric"
        assert udp_ask(sandbox, pod_ip(sandbox, "l4"), 9001, "by pod IP") == "laptop:by pod IP"
        assert run_tele(tele_env, "leave", "l4", timeout=60).returncode == 0
        assert udp_ask(sandbox, "l4.default", 54, "numeric again") == "numeric again"

    # Bad input: a UDP handler port where nothing is bound gets one warning line.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    absent = run_tele(tele_env, "intercept", "l4", "-p", f"{free}:named", timeout=120)
    assert absent.returncode == 0, absent.stderr
    assert single_error_line(absent) == (
        f"tele: nothing listens on 127.0.0.1:{free}/UDP yet: until something does, the engaged "
        "UDP datagrams are dropped"
    )
    assert udp_ask(sandbox, "l4.default", 53, "nobody") == "timeout"
    assert run_tele(tele_env, "leave", "l4", timeout=60).returncode == 0
    assert udp_ask(sandbox, "l4.default", 53, "back") == "back"
    assert run_tele(tele_env, "quit").returncode == 0


@contextmanager
def udp_recorder() -> Iterator[list[bytes]]:
    """A UDP socket on this machine that records what it gets (and answers nothing); yields
    the list, its port in `.port`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    received = _Received()
    received.port = sock.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                data, _ = sock.recvfrom(65535)
            except OSError:
                return
            if not data:
                return
            received.append(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        thread.join(5)


class _Received(list[bytes]):
    port = 0


def test_a_udp_wiretap_copies_the_datagrams_and_the_apps_replies(
    installed: NodeSandbox, tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    sandbox = installed
    connect(tele_env, sandbox)
    with udp_recorder() as requests, udp_recorder() as replies:
        tapped = run_tele(
            tele_env, "wiretap", "l4", "-p", f"{requests.port}:named",
            "--response-port", str(replies.port), timeout=120,
        )  # fmt: skip
        assert tapped.returncode == 0, tapped.stderr
        wait_rolled(sandbox, "l4")
        # The app answers every datagram itself; the handlers get a copy of each direction.
        for index in range(3):
            assert udp_ask(sandbox, "l4.default", 53, f"tapped-{index}") == f"tapped-{index}"
        expected = {f"tapped-{index}".encode() for index in range(3)}
        eventually(lambda: expected <= set(requests), "the datagrams' copies")
        eventually(lambda: expected <= set(replies), "the replies' copies")
        status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
        [tap] = [e for e in status["session"]["engagements"] if e["name"] == "l4"]
        assert tap["kind"] == "wiretap"
        assert run_tele(tele_env, "leave", "l4", timeout=60).returncode == 0
    assert udp_ask(sandbox, "l4.default", 53, "untapped") == "untapped"
    assert run_tele(tele_env, "quit").returncode == 0


def test_a_headless_services_named_port_is_intercepted_for_callers_of_the_pod_ip(
    installed: NodeSandbox, tele_env: dict[str, str], guard: DaemonGuard
) -> None:
    sandbox = installed
    connect(tele_env, sandbox)
    with laptop_http("the laptop answers") as port:
        engaged = run_tele(tele_env, "intercept", "db", "-p", str(port), timeout=120)
        assert engaged.returncode == 0, engaged.stderr
        wait_rolled(sandbox, "db")
        ip = pod_ip(sandbox, "db")
        # Which pod serves it (the one --to-pod and the volumes use) is said.
        pods = json.loads(kubectl(sandbox, "get", "pods", "-l", "app=db", "-o", "json"))
        [name] = [
            p["metadata"]["name"]
            for p in pods["items"]
            if not p["metadata"].get("deletionTimestamp")
        ]
        assert f"   Pod                    : {name} ({ip})" in engaged.stdout
        assert f", pod {name}" in run_tele(tele_env, "status").stdout
        assert call(sandbox, f"http://{ip}:8080/") == "the laptop answers"
        assert call(sandbox, "http://db.default:8080/") == "the laptop answers"  # DNS: pod IPs
        assert run_tele(tele_env, "leave", "db", timeout=60).returncode == 0
        assert json.loads(call(sandbox, f"http://{ip}:8080/"))["pod"].startswith("db-")
    assert run_tele(tele_env, "quit").returncode == 0


PICK = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: pick, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: pick}}
  template:
    metadata:
      labels: {app: pick}
      annotations:
        telepresence.io/inject-service-name: pick-b
        telepresence.io/inject-container-ports: metrics
    spec:
      containers:
      - name: pick
        image: tele-sandbox/echo
        ports: [{name: http, containerPort: 8080}, {name: metrics, containerPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: pick-a, namespace: default}
spec:
  selector: {app: pick}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: pick-b, namespace: default}
spec:
  selector: {app: pick}
  ports: [{name: http, port: 81, targetPort: http}]
"""


def pod_uids(sandbox: NodeSandbox, app: str) -> list[str]:
    pods = json.loads(kubectl(sandbox, "get", "pods", "-l", f"app={app}", "-o", "json"))
    return sorted(p["metadata"]["uid"] for p in pods["items"])


def test_a_hand_injected_agent_serves_without_a_roll_and_annotations_choose_ports(
    installed: NodeSandbox, tele_env: dict[str, str], guard: DaemonGuard, tmp_path: Path
) -> None:
    import yaml

    sandbox = installed
    app = tmp_path / "hand.yaml"
    app.write_text(HAND_APP)
    config = tmp_path / "config.yaml"
    genyaml(tele_env, "config", "-i", str(app), "-o", str(config))
    documents = hand_injected(tele_env, app, config)
    kubectl(sandbox, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
    wait_rolled(sandbox, "hand")
    before = pod_uids(sandbox, "hand")

    connect(tele_env, sandbox)
    with laptop_http("handled here") as port:
        engaged = run_tele(tele_env, "intercept", "hand", "-p", str(port), timeout=120)
        assert engaged.returncode == 0, engaged.stderr
        assert call(sandbox, "http://hand.default/") == "handled here"
        assert pod_uids(sandbox, "hand") == before  # its own agent: no pod was rolled
        refused = run_tele(tele_env, "replace", "hand", timeout=60)
        assert single_error_line(refused).startswith(
            "tele: The traffic agent of hand was injected by hand"
        )
        assert run_tele(tele_env, "leave", "hand", timeout=60).returncode == 0
    assert json.loads(call(sandbox, "http://hand.default/"))["pod"].startswith("hand-")

    kubectl(sandbox, "apply", "-f", "-", stdin=PICK)
    wait_rolled(sandbox, "pick")
    wrong = run_tele(tele_env, "intercept", "pick", "--service", "pick-a", timeout=120)
    assert single_error_line(wrong).startswith(
        "tele: pick has no service port matching service pick-a"
    )
    with laptop_http("metrics here") as port:
        engaged = run_tele(tele_env, "intercept", "pick", "-p", f"{port}:9090", timeout=120)
        assert engaged.returncode == 0, engaged.stderr
        wait_rolled(sandbox, "pick")
        ip = pod_ip(sandbox, "pick")
        assert call(sandbox, f"http://{ip}:9090/") == "metrics here"
        assert json.loads(call(sandbox, "http://pick-b.default:81/"))["pod"].startswith("pick-")
        assert run_tele(tele_env, "leave", "pick", timeout=60).returncode == 0
    assert run_tele(tele_env, "quit").returncode == 0
