"""`tele connect`, `status`, `list` and `quit` as a user runs them, against the sandbox API
server (in a thread) and a traffic manager process reached by address. (With sandbox pods, the
manager runs as a pod and is reached through a port-forward; see the e2e tests.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tele.sandbox.testing import ThreadedCluster, threaded_cluster
from tests.daemon.util import DaemonGuard, run_tele, single_error_line, wait_exit


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ThreadedCluster, Path]]:
    kubeconfig = tmp_path / "kubeconfig"
    with threaded_cluster(kubeconfig) as cluster:
        yield cluster, kubeconfig


class ManagerProcess:
    """`python -m tele.manager` with its stderr collected, on a free loopback port."""

    def __init__(
        self,
        kubeconfig: Path,
        lease: str,
        auth_mode: str = "enforcing",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {
            **os.environ,
            "TELE_MANAGER_NAMESPACE": "default",
            "TELE_API_PORT": str(self.port),
            "TELE_SESSION_LEASE": lease,
            "TELE_AUTH_MODE": auth_mode,
            **(extra_env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tele.manager", "--kubeconfig", str(kubeconfig)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for_log("serving on port")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_log(self, text: str, timeout: float = 20) -> str:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.process.poll() is not None,
                timeout,
            )
            matches = [line for line in self.lines if text in line]
        if not found or not matches:
            raise AssertionError(f"manager never logged {text!r}:\n{''.join(self.lines)}")
        return matches[-1]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def manager(cluster: tuple[ThreadedCluster, Path]) -> Iterator[ManagerProcess]:
    process = ManagerProcess(cluster[1], lease="2s")
    try:
        yield process
    finally:
        process.stop()


def test_connect_status_list_quit(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    manager: ManagerProcess,
) -> None:
    kubeconfig = cluster[1]
    address = f"127.0.0.1:{manager.port}"
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "tele-sandbox/echo"}]},
            },
        },
    }
    manifest = kubeconfig.parent / "web.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", str(manifest)],
        check=True,
        capture_output=True,
    )

    connected = run_tele(
        tele_env,
        "connect",
        "--no-vif",
        "--kubeconfig",
        str(kubeconfig),
        "--manager-address",
        address,
    )
    assert connected.returncode == 0, connected.stderr
    assert "Connected to context" in connected.stdout
    assert "Managed namespaces:" in connected.stdout and "default" in connected.stdout
    arrived = manager.wait_for_log("arrived")
    session_id = arrived.split("session ")[1].split(" ")[0]

    status = run_tele(tele_env, "status", "-o", "json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["connection"] == "connected"
    assert data["session"]["session_id"] == session_id
    assert data["session"]["service_subnets"] == ["10.96.0.0/16"]
    assert "default" in data["session"]["managed_namespaces"]

    again = run_tele(
        tele_env,
        "connect",
        "--no-vif",
        "--kubeconfig",
        str(kubeconfig),
        "--manager-address",
        address,
    )
    assert again.returncode == 0, again.stderr  # already connected there: a no-op
    namespaces = run_tele(tele_env, "list-namespaces", "-o", "json")
    assert json.loads(namespaces.stdout) == sorted(data["session"]["managed_namespaces"])
    assert "default" in namespaces.stdout
    version = run_tele(tele_env, "version", "-o", "json")
    assert json.loads(version.stdout)["traffic_manager"] == {
        "version": data["session"]["manager_version"]
    }
    assert data["session"]["manager_version"]
    other = run_tele(
        tele_env, "connect", "--no-vif", "--kubeconfig", str(kubeconfig), "-n", "other"
    )
    assert other.returncode == 1
    assert single_error_line(other) == (
        f"tele: Already connected to context {data['session']['kube_context']} in namespace "
        "default, not other; name another namespace per command with -n, or run `tele quit` "
        "and connect again."
    )

    routed = run_tele(
        tele_env, "connect", "--kubeconfig", str(kubeconfig), "--proxy-via", "10.9.0.0/16=web"
    )
    assert routed.returncode == 1  # the session has no such route: connecting again won't add it
    assert single_error_line(routed) == (
        "tele: Already connected without --proxy-via; run `tele quit` and connect again to "
        "route 10.9.0.0/16=web."
    )

    listed = run_tele(tele_env, "list", "-n", "default", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [(w["name"], w["kind"]) for w in json.loads(listed.stdout)] == [("web", "Deployment")]
    as_text = run_tele(tele_env, "list", "-n", "default")
    assert as_text.returncode == 0, as_text.stderr
    assert "web" in as_text.stdout and "Deployment" in as_text.stdout

    # Heartbeats keep the 2 s lease alive across several lease periods.
    manager.wait_for_log("client 0.1.0")
    quit_ = run_tele(tele_env, "quit")
    assert quit_.returncode == 0, quit_.stderr
    manager.wait_for_log(f"session {session_id} departed")
    assert not any("expired" in line for line in manager.lines)


def test_killed_daemon_loses_its_session_after_the_lease(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    manager: ManagerProcess,
) -> None:
    address = f"127.0.0.1:{manager.port}"
    result = run_tele(
        tele_env,
        "connect",
        "--no-vif",
        "--kubeconfig",
        str(cluster[1]),
        "--manager-address",
        address,
    )
    assert result.returncode == 0, result.stderr
    session_id = manager.wait_for_log("arrived").split("session ")[1].split(" ")[0]
    pid = guard.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_exit(pid)
    manager.wait_for_log(f"session {session_id} expired")


def test_no_manager_installed_is_one_clear_sentence(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    result = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(cluster[1]))
    assert result.returncode == 1
    line = single_error_line(result)
    assert "No traffic manager is installed in namespace ambassador" in line
    assert "tele helm install" in line


def test_unreachable_cluster_is_a_connection_error(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    config = yaml.safe_load(cluster[1].read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:9"
    broken = cluster[1].parent / "broken-kubeconfig"
    broken.write_text(yaml.safe_dump(config))
    result = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(broken))
    assert result.returncode == 3
    assert (
        "tele: Cannot reach the Kubernetes API server at https://127.0.0.1:9"
        in single_error_line(result)
    )


def test_list_without_connect_connects_first(
    tele_env: dict[str, str], guard: DaemonGuard, tmp_path: Path
) -> None:
    """`tele list` (and intercept, leave) connect as `tele connect` would, as Telepresence's
    do: here with a KUBECONFIG that is not there, which the error names with the OS's reason."""
    missing = tmp_path / "no-kubeconfig"
    for command in (["list"], ["leave", "echo"]):
        result = run_tele({**tele_env, "KUBECONFIG": str(missing)}, *command)
        assert result.returncode == 1
        assert single_error_line(result) == (
            f"tele: Cannot read the kubeconfig {missing}: no such file or directory."
        )
    text = run_tele({**tele_env, "KUBECONFIG": "apiVersion: v1\nkind: Config\n"}, "list")
    assert single_error_line(text) == (
        "tele: The kubeconfig (--kubeconfig or KUBECONFIG) is YAML text, not a path: "
        "save it to a file and give the file's path."
    )


@pytest.fixture
def manager_without_auth(cluster: tuple[ThreadedCluster, Path]) -> Iterator[ManagerProcess]:
    """For a stand-in agent, which has no pod and so no pod token (tests/manager/test_auth)."""
    process = ManagerProcess(cluster[1], lease="2s", auth_mode="disabled")
    try:
        yield process
    finally:
        process.stop()


async def test_intercept_sends_engaged_connections_to_the_local_handler(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    manager_without_auth: ManagerProcess,
    tmp_path: Path,
) -> None:
    manager = manager_without_auth
    import ipaddress

    import trio

    from tele.net.tunnel import Destination, Protocol
    from tele.rpc import agent_api as aapi
    from tele.rpc import manager_api as api
    from tele.rpc.client import open_client
    from tele.rpc.tunnel import dial

    kubeconfig = cluster[1]
    workload = tmp_path / "workload.yaml"
    template = {
        "metadata": {"labels": {"app": "api"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "tele-sandbox/echo",
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ]
        },
    }
    workload.write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "api", "namespace": "default"},
                    "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": template},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "api", "namespace": "default"},
                    "spec": {
                        "selector": {"app": "api"},
                        "ports": [{"name": "web", "port": 80, "targetPort": "http"}],
                    },
                },
            ]
        )
    )
    await trio.to_thread.run_sync(
        lambda: subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", str(workload)],
            check=True,
            capture_output=True,
        )
    )
    address = f"127.0.0.1:{manager.port}"
    connected = await trio.to_thread.run_sync(
        lambda: run_tele(
            tele_env,
            "connect",
            "--no-vif",
            "--kubeconfig",
            str(kubeconfig),
            "--manager-address",
            address,
        )
    )
    assert connected.returncode == 0, connected.stderr

    async def handler(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some():
            await stream.send_all(b"local:" + data)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        local_port = listeners[0].socket.getsockname()[1]
        # A stand-in for the agent process: arrives as the agent of the Deployment's pod.
        agent_link = await trio.open_tcp_stream("127.0.0.1", manager.port)
        async with open_client(agent_link) as agent:
            session = await agent.call(
                aapi.ARRIVE_AS_AGENT,
                aapi.AgentIdentity(
                    pod_name="api-xyz",
                    namespace="default",
                    pod_ip="10.244.0.9",
                    workload_name="api",
                    workload_kind="Deployment",
                    version="0.1.0",
                    environment={"app": {"GREETING": "hello world"}},
                ),
            )
            env_file = tmp_path / "api.env"
            result = await trio.to_thread.run_sync(
                lambda: run_tele(
                    tele_env, "intercept", "api", "--port", f"{local_port}:web", "-e", str(env_file)
                )
            )
            assert result.returncode == 0, result.stderr
            assert "Intercept name         : api" in result.stdout
            request = api.SessionRequest(session_id=session.session_id)
            async with agent.stream(aapi.WATCH_ENGAGEMENTS, request) as updates:
                engagement = next(iter((await anext(updates)).engagements))
            assert env_file.read_text() == (
                "GREETING=hello world\nTELEPRESENCE_CONTAINER=app\n"
                f"TELEPRESENCE_INTERCEPT_ID={engagement.id}\n"
            )
            stream = await dial(
                agent.link,
                Destination(Protocol.TCP, ipaddress.ip_address("10.244.0.9"), 8080),
                session=session.session_id,
                dial_id=aapi.AGENT_DIAL_PREFIX + engagement.id,
            )
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            await stream.send_eof()
            received = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some():
                    received += chunk
            assert received == b"local:GET / HTTP/1.0\r\n\r\n"
            shown = await trio.to_thread.run_sync(lambda: run_tele(tele_env, "status"))
            assert "Intercepts:         1 total" in shown.stdout
            assert (
                f"api: intercepted Deployment default/api -> 127.0.0.1:{local_port} (tcp)"
                in shown.stdout
            )
            left = await trio.to_thread.run_sync(lambda: run_tele(tele_env, "leave", "api"))
            assert left.returncode == 0, left.stderr
            missing = await trio.to_thread.run_sync(lambda: run_tele(tele_env, "leave", "api"))
            assert missing.returncode == 1
            assert single_error_line(missing) == (
                "tele: There is no engagement named api; `tele list` shows them."
            )
        nursery.cancel_scope.cancel()


def test_a_manager_that_never_gets_ready_is_named_with_its_state(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    kubeconfig = cluster[1]
    config_dir = Path(tele_env["XDG_CONFIG_HOME"]) / "tele"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.yml").write_text("timeouts:\n  trafficManagerConnect: 2s\n")
    manifest = kubeconfig.parent / "manager.yaml"
    labels = {"app": "traffic-manager", "telepresence": "manager"}
    manifest.write_text(
        yaml.safe_dump_all(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ambassador"}},
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "traffic-manager", "namespace": "ambassador"},
                    "spec": {
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {
                                "containers": [{"name": "m", "image": "tele/traffic-manager"}]
                            },
                        },
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": "traffic-manager-x",
                        "namespace": "ambassador",
                        "labels": labels,
                    },
                    "spec": {"containers": [{"name": "m", "image": "tele/traffic-manager"}]},
                },
            ]
        )
    )
    subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", str(manifest)],
        check=True,
        capture_output=True,
    )
    result = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(kubeconfig))
    assert result.returncode == 3
    line = single_error_line(result)
    assert "The traffic manager in namespace ambassador is not ready after 2s" in line
    assert "traffic-manager-x (Pending)" in line


def test_a_bad_cidr_is_one_sentence(tele_env: dict[str, str], guard: DaemonGuard) -> None:
    result = run_tele(tele_env, "connect", "--no-vif", "--also-proxy", "10.0.0.0/8,not-a-net")
    assert result.returncode == 1
    assert (
        single_error_line(result) == "tele: --also-proxy 'not-a-net' is not a CIDR like 10.0.0.0/8."
    )
    assert guard.daemons() == []  # refused before a daemon was started


def test_connect_runs_a_command_while_connected_then_disconnects(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    manager: ManagerProcess,
    tmp_path: Path,
) -> None:
    """`tele connect -- COMMAND`, as Telepresence's: COMMAND runs connected, the session ends
    after it, and tele exits with COMMAND's status."""
    seen = tmp_path / "status.json"
    result = run_tele(
        tele_env,
        "connect",
        "--no-vif",
        "--kubeconfig",
        str(cluster[1]),
        "--manager-address",
        f"127.0.0.1:{manager.port}",
        "--",
        "sh",
        "-c",
        f"tele status -o json > {seen}; exit 3",
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[-1] == "Disconnected."
    assert json.loads(seen.read_text())["connection"] == "connected"
    after = run_tele(tele_env, "status", "-o", "json")
    assert json.loads(after.stdout)["connection"] == "not connected"
    assert run_tele(tele_env, "quit").returncode == 0


def test_current_cluster_id_is_the_kube_system_namespaces_uid(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    kubeconfig = str(cluster[1])
    uid = subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, "get", "namespace", "kube-system",
         "-o", "jsonpath={.metadata.uid}"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert len(uid) == 36
    shown = run_tele(tele_env, "current-cluster-id", "--kubeconfig", kubeconfig)
    assert (shown.returncode, shown.stdout) == (0, f"{uid}\n"), shown.stderr
    as_json = run_tele({**tele_env, "KUBECONFIG": kubeconfig}, "-o", "json", "current-cluster-id")
    context = yaml.safe_load(cluster[1].read_text())["current-context"]
    assert json.loads(as_json.stdout) == {"cluster_id": uid, "context": context}
    unknown = run_tele(tele_env, "current-cluster-id", "--kubeconfig", kubeconfig, "--context", "x")
    assert unknown.returncode == 1
    assert single_error_line(unknown).startswith("tele: ")
    assert guard.daemons() == []  # (no daemon: it reads the cluster itself)
