"""Issue 21 on the sandbox with a real (private) Docker Engine: `tele intercept --docker-build
DIR -- IMAGE ...` builds a handler image from a small base made in the test, engages, and runs
it as a container that receives the intercepted request and sees the pod's environment
variable and its mounted Secret at the pod's path; the container's exit ends the intercept,
its status is tele's, and neither the container nor the engagement is left."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tele.daemon.mounts import mount_problem
from tele.docker import run
from tele.sandbox.network import netns
from tele.sandbox.testing import threaded_cluster
from tests.conftest import VENV_BIN
from tests.daemon.util import DaemonGuard, run_tele
from tests.docker.dockerd import (
    PrivateDockerd,
    busybox_image,
    mounts_under,
    private_dockerd,
    shared_mount,
)
from tests.e2e import install_manager, kubectl
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(mount_problem() is not None, reason=f"no FUSE mounts: {mount_problem()}"),
]

SECRET = "s3cr3t-from-the-cluster"

APP = f"""
apiVersion: v1
kind: Secret
metadata: {{name: creds, namespace: default}}
data: {{password: {base64.b64encode(SECRET.encode()).decode()}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: app, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: app}}}}
  template:
    metadata: {{labels: {{app: app}}}}
    spec:
      containers:
      - name: app
        image: tele-sandbox/echo
        ports: [{{name: http, containerPort: 8080}}]
        env: [{{name: GREETING, value: hello-from-the-pod}}]
        volumeMounts: [{{name: creds, mountPath: /etc/creds}}]
      volumes: [{{name: creds, secret: {{secretName: creds}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: app, namespace: default}}
spec:
  selector: {{app: app}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: caller, namespace: default}}
spec:
  containers: [{{name: c, image: tele-sandbox/worker}}]
"""

APP2 = (
    "---".join(APP.split("---")[1:3])
    .replace("{name: app, namespace: default}", "{name: app2, namespace: default}")
    .replace("{app: app}", "{app: app2}")
)
"""The app's Deployment and Service again, as app2 (the same Secret mounted)."""

# busybox httpd runs it for /cgi-bin/seen, then it ends httpd: one answer, then exit 7.
CGI = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo "greeting=$GREETING"
echo "password=$(cat /etc/creds/password)"
echo "mounts=$TELEPRESENCE_MOUNTS root=$TELEPRESENCE_ROOT"
kill "$(cat /tmp/httpd.pid)"
"""

CALL = """
import urllib.error, urllib.request
try:
    print(urllib.request.urlopen("http://app.default/cgi-bin/seen", timeout=10).read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError as exc:  # the pod being replaced when the agent is injected
    print(type(exc).__name__)
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[PrivateDockerd]:
    with private_dockerd() as dockerd:
        yield dockerd


def _kill_group(process: subprocess.Popen[str]) -> tuple[str, str]:
    """End `tele` and what it started (the docker CLI holds its pipes); what tele printed."""

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.communicate(timeout=30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_handler_container_built_here_answers_the_intercept_with_the_pods_env_and_secret(
    node_sandbox: NodeSandbox,  # noqa: F811
    engine: PrivateDockerd,
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    base = busybox_image(engine)
    context = tmp_path / "handler"
    context.mkdir()
    (context / "seen").write_text(CGI)
    (context / "Dockerfile").write_text(
        f"FROM {base}\nCOPY seen /www/cgi-bin/seen\nRUN chmod 755 /www/cgi-bin/seen\n"
    )
    env = engine.env(tele_env)
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, env)
    handler: subprocess.Popen[str] | None = None
    try:
        kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
        kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
        connected = run_tele(env, "connect", "--no-vif", "--kubeconfig", kubeconfig, timeout=120)
        assert connected.returncode == 0, connected.stderr

        port = _free_port()
        serve = f"httpd -f -p 127.0.0.1:{port} -h /www & echo $! > /tmp/httpd.pid; wait; exit 7"
        intercept = ["intercept", "app", "--port", str(port), "--docker-build", str(context)]
        intercept += ["--docker-build-opt", "tag=tele-test/handler:1", "--"]
        handler = subprocess.Popen(
            [str(VENV_BIN / "tele"), *intercept, "IMAGE", "sh", "-c", serve],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a failed test ends the docker CLI too (it holds the pipes)
        )
        answers: list[str] = []
        deadline = time.monotonic() + 180
        while not answers or "greeting=" not in answers[-1]:
            assert handler.poll() is None, handler.communicate()
            if time.monotonic() > deadline:
                pods = kubectl(node_sandbox, "get", "pods", "-o", "wide")
                listed = run_tele(env, "list").stdout
                out, err = _kill_group(handler)
                raise AssertionError(
                    f"no answer from the container: {answers[-2:]}\n{pods}\n"
                    f"{listed}\ntele: {out}\n{err}"
                )
            time.sleep(0.5)  # polling a cluster call's answer: no event to wait on from here
            answers.append(kubectl(node_sandbox, "exec", "caller", "--", "python3", "-c", CALL))
        seen = answers[-1]
        assert "greeting=hello-from-the-pod\n" in seen
        assert f"password={SECRET}\n" in seen
        assert "mounts=/etc/creds root=/\n" in seen

        out, err = handler.communicate(timeout=60)
        assert handler.returncode == 7, err
        assert "Building the image in" in err
        assert "Intercept name         : app" in out
        # The container is gone, and so is the intercept: the app answers again.
        left = engine.docker("ps", "-aq", "--filter", f"label={run.LABEL}")
        assert left.returncode == 0 and left.stdout == ""
        assert "app: intercepted" not in run_tele(env, "list").stdout
        again = kubectl(node_sandbox, "exec", "caller", "--", "python3", "-c", CALL)
        assert "greeting=" not in again
    finally:
        if handler is not None and handler.poll() is None:
            _kill_group(handler)
        run_tele(env, "quit")
        run_tele(env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


def _host_network() -> list[bytes]:
    """This machine's routes (all tables, v4 and v6), links and resolver configuration."""
    commands = (
        ["ip", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
        ["ip", "-o", "link"],
    )
    shown = [subprocess.run(c, capture_output=True, check=True).stdout for c in commands]
    return [*shown, Path("/etc/resolv.conf").read_bytes()]


# From a container in the daemon's network: the app's name looked up (the daemon container's
# DNS), then its address called (its routes); the echo app answers with JSON. (The static
# busybox's wget crashes resolving names, and with -T.)
WGET = (
    "ip=$(nslookup app.default | grep '^Address' | tail -1 | awk '{print $2}'); echo ip=$ip; "
    "wget -qO- http://$ip:80/ || echo failed-$?"
)


def test_connect_docker_keeps_this_machine_as_it_was_and_containers_join_its_network(
    node_sandbox: NodeSandbox,  # noqa: F811
    engine: PrivateDockerd,
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    """connect --docker: this machine's routes and resolver stay as they were; a --docker-run
    handler joins the daemon container's network and gets the pod's volumes at the pod's paths
    (mounted by the daemon in its container, passed on through a shared directory of the
    user's runtime directory); without --docker-run nothing is mounted, and one sentence says
    so; after quit no mount and no directory is left."""
    base = busybox_image(engine)
    context = tmp_path / "handler"
    context.mkdir()
    (context / "seen").write_text(CGI)
    (context / "Dockerfile").write_text(
        f"FROM {base}\nCOPY seen /www/cgi-bin/seen\nRUN chmod 755 /www/cgi-bin/seen\n"
    )
    env = engine.env(tele_env)
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, env)
    before = _host_network()
    runtime = Path(env["XDG_RUNTIME_DIR"])
    with shared_mount(runtime):  # as systemd makes every mount
        try:
            kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
            kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
            connect = ("connect", "--docker", "--kubeconfig", kubeconfig)
            connected = run_tele(env, *connect, timeout=300)
            logs = Path(env["XDG_CACHE_HOME"]) / "tele" / "logs"
            shown = "".join(p.read_text()[-3000:] for p in logs.glob("*.log"))
            assert connected.returncode == 0, connected.stderr + shown
            assert _host_network() == before
            status = run_tele(env, "status")
            assert status.returncode == 0 and "connected" in status.stdout.lower(), status.stdout
            running = engine.docker(
                "ps", "--format", "{{.Names}}", "--filter", "label=io.tele.connection"
            )
            assert sorted(running.stdout.split()) == ["tele-daemon-default", "tele-relay-default"]

            reached = run_tele(env, "docker-run", "--", "--rm", base, "sh", "-c", WGET, timeout=60)
            assert reached.returncode == 0, reached.stderr
            assert '"pod": "app-' in reached.stdout, reached.stdout

            port = _free_port()
            # Without --docker-run: nothing mounted (here or in the daemon's container).
            engaged = run_tele(env, "intercept", "app", "--port", str(port), timeout=120)
            assert engaged.returncode == 0, engaged.stderr
            assert (
                "tele: The pod's volumes (/etc/creds) are not mounted on this machine: with tele "
                "connect --docker they go only into a --docker-run container, at the pod's paths."
            ) in engaged.stderr
            assert "Volume Mount" not in engaged.stdout
            assert mounts_under(runtime) == [str(runtime)]
            left = run_tele(env, "leave", "app")
            assert left.returncode == 0, left.stderr

            serve = f"httpd -f -p 127.0.0.1:{port} -h /www & echo $! > /tmp/httpd.pid; wait; exit 7"
            built = engine.docker("build", "-t", "tele-test/handler:2", str(context))
            assert built.returncode == 0, built.stderr
            handler = subprocess.Popen(
                [str(VENV_BIN / "tele"), "intercept", "app", "--port", str(port),
                 "--docker-run", "--", "--user", "65534", "tele-test/handler:2", "sh", "-c",
                 serve],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,  # a failed test ends the docker CLI too (it holds pipes)
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 180
                while "tele-app-" not in engine.docker("ps", "--format", "{{.Names}}").stdout:
                    assert handler.poll() is None, handler.communicate()
                    assert time.monotonic() < deadline, "the handler container never ran"
                    time.sleep(0.2)  # no event to wait on from here
                # While the container runs (it ends after one answer): the mount, here too.
                fuse = [p for p in mounts_under(runtime) if "/telfs-" in p]
                assert len(fuse) == 1, mounts_under(runtime)
                # Status names the path on this machine (what the container binds), not the
                # daemon container's, and that it is for the --docker-run container only.
                shown = run_tele(env, "status").stdout
                assert "Not seen here" not in shown, shown
                assert "/tele/mounts" not in shown, shown
                assert f"  Socket:    {runtime}/tele/daemon.sock" in shown.splitlines(), shown
                assert f"volumes at {fuse[0]} (for its --docker-run container)" in shown, shown
                assert (
                    f"  Volumes:            app's at {fuse[0]}, mounted only for its "
                    "--docker-run container (at the pod's paths in there)"
                ) in shown.splitlines(), shown
                shown_json = json.loads(run_tele(env, "status", "-o", "json").stdout)
                [engaged_now] = shown_json["session"]["engagements"]
                assert engaged_now["local_mount"] == fuse[0], engaged_now
                assert engaged_now["mounted_for"] == "docker-run", engaged_now
                listed = json.loads(run_tele(env, "list", "-o", "json").stdout)
                [listed_engagement] = [e for w in listed for e in w["engagements"]]
                assert listed_engagement["local_mount"] == fuse[0], listed_engagement
                answer = _handler_answer(node_sandbox, handler, deadline)
                # The pod's variable and its Secret at the pod's path, read by another user
                # than the daemon's.
                assert "greeting=hello-from-the-pod\n" in answer
                assert f"password={SECRET}\n" in answer
                assert "mounts=/etc/creds root=/\n" in answer
                _, err = handler.communicate(timeout=60)
                assert handler.returncode == 7, err
                assert "tele: The pod's volumes" not in err, err
            finally:
                if handler.poll() is None:
                    _kill_group(handler)
            assert _host_network() == before

            quit_ = run_tele(env, "quit", timeout=60)
            assert quit_.returncode == 0, quit_.stderr
            left_ = engine.docker("ps", "-aq", "--filter", "label=io.tele.connection")
            deadline = time.monotonic() + 30
            while left_.stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)  # the relay ends when it sees the daemon's process gone
                left_ = engine.docker("ps", "-aq", "--filter", "label=io.tele.connection")
            assert left_.stdout.strip() == ""
            assert _host_network() == before
            assert mounts_under(runtime) == [str(runtime)]  # only the test's own
            # Nothing of connect --docker is left: its directories, its marker (the daemon's
            # flock()ed file stays, as after any daemon: unlinking it would race the next one).
            assert sorted(os.listdir(runtime / "tele")) == ["daemon.lock"]
        finally:
            run_tele(env, "quit")
            run_tele(env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


@contextlib.contextmanager
def _second_sandbox(tmp_path: Path) -> Iterator[NodeSandbox]:
    """Another cluster with its node, beside the module's: its own API server, network and DNS
    (the same service and pod ranges, so only the connection tells them apart)."""
    name = f"t3{uuid.uuid4().hex[:6]}"
    base = tmp_path / "second"
    (base / "home").mkdir(parents=True)
    try:
        with threaded_cluster(
            base / "kubeconfig",
            name=name,
            nodes=True,
            state_dir=base / "state",
            node_options={"backoff_base": 0.2},
        ) as cluster:
            yield NodeSandbox(cluster, name, base / "kubeconfig", base / "home")
    finally:
        left = [n for n in netns.list_netns() if n.startswith(f"{name}-")]
        for n in left:
            netns.delete_sync(n)
        assert not left, f"network namespaces left behind: {left}"


def _app_pod(sandbox: NodeSandbox) -> str:
    """The name of the app's one pod in `sandbox` (the echo app answers with it)."""
    names = kubectl(sandbox, "get", "pods", "-l", "app=app", "-o", "name").split()
    assert len(names) == 1, names
    return names[0].removeprefix("pod/")


def test_two_named_docker_connections_each_reach_their_own_cluster(
    node_sandbox: NodeSandbox,  # noqa: F811
    engine: PrivateDockerd,
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    """Two sandboxes at once, the same app (same names, same ranges) in each: connection `one`
    reaches the first cluster's pod, `two` the second's, at the same time."""
    base = busybox_image(engine)
    env = engine.env(tele_env)
    before = _host_network()
    with _second_sandbox(tmp_path) as other:
        clusters = {"one": node_sandbox, "two": other}
        try:
            pods: dict[str, str] = {}
            for sandbox in clusters.values():
                install_manager(sandbox, env)
                kubectl(sandbox, "apply", "-f", "-", stdin=APP)
            for name, sandbox in clusters.items():
                kubectl(sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
                pods[name] = _app_pod(sandbox)
            assert pods["one"] != pods["two"]
            for name, sandbox in clusters.items():
                connect = ("connect", "--docker", "--name", name)
                connected = run_tele(
                    env, *connect, "--kubeconfig", str(sandbox.kubeconfig), timeout=300
                )
                assert connected.returncode == 0, connected.stderr
            running = engine.docker(
                "ps", "--format", "{{.Names}}", "--filter", "label=io.tele.connection"
            )
            assert sorted(running.stdout.split()) == [
                "tele-daemon-one", "tele-daemon-two", "tele-relay-one", "tele-relay-two"
            ]  # fmt: skip
            sessions = set()
            for name in clusters:
                status = run_tele(env, "--use", name, "status")
                assert status.returncode == 0, status.stderr
                assert "Session:" in status.stdout, status.stdout
                sessions.add(status.stdout.split("Session:")[1].split()[0])
            assert len(sessions) == 2
            # Asked in turn, twice: each connection keeps to its own cluster while both run.
            for name in [*clusters, *clusters]:
                reached = run_tele(
                    env, "--use", name, "docker-run", "--", "--rm", base, "sh", "-c", WGET
                )
                answered = reached.stdout + reached.stderr
                assert f'"pod": "{pods[name]}"' in reached.stdout, (name, pods, answered)
            assert "not running" in run_tele(env, "status").stdout.lower()
            assert _host_network() == before

            for name in clusters:
                quit_ = run_tele(env, "--use", name, "quit", timeout=60)
                assert quit_.returncode == 0, quit_.stderr
            left = engine.docker("ps", "-aq", "--filter", "label=io.tele.connection")
            deadline = time.monotonic() + 30
            while left.stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)  # each relay ends when it sees its daemon's process gone
                left = engine.docker("ps", "-aq", "--filter", "label=io.tele.connection")
            assert left.stdout.strip() == ""
            assert _host_network() == before
        finally:
            for name, sandbox in clusters.items():
                run_tele(env, "--use", name, "quit")
                uninstall = ("helm", "uninstall", "--kubeconfig", str(sandbox.kubeconfig))
                run_tele(env, *uninstall, timeout=120)


def test_leaving_from_elsewhere_removes_the_handler_container(
    node_sandbox: NodeSandbox,  # noqa: F811
    engine: PrivateDockerd,
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    base = busybox_image(engine)
    env = engine.env(tele_env)
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, env)
    handler: subprocess.Popen[str] | None = None
    try:
        kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
        kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
        connected = run_tele(env, "connect", "--no-vif", "--kubeconfig", kubeconfig, timeout=120)
        assert connected.returncode == 0, connected.stderr
        port = _free_port()
        handler = subprocess.Popen(
            [str(VENV_BIN / "tele"), "intercept", "app", "--port", str(port), "--mount=false",
             "--docker-run", "--", base, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while "tele-app-" not in engine.docker("ps", "--format", "{{.Names}}").stdout:
            assert handler.poll() is None, handler.communicate()
            assert time.monotonic() < deadline, "the handler container never ran"
            time.sleep(0.2)  # no event to wait on from here
        left = run_tele(env, "leave", "app")
        assert left.returncode == 0, left.stderr
        _, err = handler.communicate(timeout=60)
        assert "app has ended; removing its container" in err
        assert "Traceback" not in err
        gone = engine.docker("ps", "-aq", "--filter", f"label={run.LABEL}")
        assert gone.returncode == 0 and gone.stdout == ""
    finally:
        if handler is not None and handler.poll() is None:
            _kill_group(handler)
        run_tele(env, "quit")
        run_tele(env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


NOBODY = 65534


@contextlib.contextmanager
def _nobodys_home(engine: PrivateDockerd, sandbox: NodeSandbox) -> Iterator[dict[str, str]]:
    """The environment of an unprivileged user (nobody) running tele: a home, XDG dirs and a
    kubeconfig of its own, the private engine's socket open to its group (that socket's
    directory only), and a copy of the image cache's layers the daemon's image is made of
    (root's cache is not readable by others; building them anew needs mmdebstrap's root). The
    daemon's image is loaded into the engine first (its Python packages come from root's pip,
    which the nobody user may not run here: it lives in root's home)."""

    import shutil
    import tempfile

    from tele.docker import engine as engines
    from tele.docker.image import ensure_daemon_image
    from tele.image.build import CACHE_ENV, build_daemon_image, cache_root

    client = engines.connect(engine.engine)
    try:
        ensure_daemon_image(client, lambda line: None)
    finally:
        client.close()
    home = Path(tempfile.mkdtemp(prefix="tele-test-nobody-"))
    os.chmod(home, 0o755)
    socket_mode = engine.socket.stat()
    try:
        built = build_daemon_image()
        cache = home / "images"
        (cache / "blobs" / "sha256").mkdir(parents=True)
        shutil.copytree(cache_root() / "layers", cache / "layers")
        for result in built.layers:
            shutil.copy(result.layer.path, cache / "blobs" / "sha256" / result.layer.path.name)
        for name in ("config", "cache", "state", "runtime"):
            (home / name).mkdir(mode=0o700)
        shutil.copy(sandbox.kubeconfig, home / "kubeconfig")
        for path in [home, *home.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        os.chmod(engine.root, 0o711)
        os.chown(engine.socket, 0, NOBODY)
        os.chmod(engine.socket, 0o660)
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_RUNTIME_DIR": str(home / "runtime"),
            "DOCKER_HOST": engine.host,
            CACHE_ENV: str(cache),
            "TELE_VIF": "0",
        }
        yield env
    finally:
        os.chmod(engine.root, 0o700)
        os.chown(engine.socket, socket_mode.st_uid, socket_mode.st_gid)
        os.chmod(engine.socket, socket_mode.st_mode & 0o7777)
        shutil.rmtree(home, ignore_errors=True)


def _handler_answer(sandbox: NodeSandbox, handler: subprocess.Popen[str], deadline: float) -> str:
    """The app's answer from the caller pod once the --docker-run handler gives it (with the
    pod's greeting), asked again while the handler runs, until `deadline`."""
    answers: list[str] = []
    while not answers or "greeting=" not in answers[-1]:
        assert handler.poll() is None, handler.communicate()
        assert time.monotonic() < deadline, f"no answer: {answers[-3:]}"
        time.sleep(0.5)  # polling a cluster call's answer: no event to wait on
        answers.append(kubectl(sandbox, "exec", "caller", "--", "python3", "-c", CALL))
    return answers[-1]


def _as_nobody(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         str(VENV_BIN / "tele"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # a failed test ends the docker CLI too (it holds the pipes)
    )  # fmt: skip


def _tele_as_nobody(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    process = _as_nobody(env, *args)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _kill_group(process)
        raise AssertionError(f"tele {' '.join(args)} took over {timeout}s: {out}\n{err}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_a_user_who_is_not_root_connects_with_docker_and_runs_a_handler_container(
    node_sandbox: NodeSandbox,  # noqa: F811
    engine: PrivateDockerd,
    guard: DaemonGuard,
    tele_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Docker mode's promise: no root. The CLI runs as nobody (only the engine's socket is
    open to it): connect --docker, status, intercept --docker-run (the handler answers with the
    pod's variable and Secret file) and quit work, and this machine's routes and resolver stay
    byte-identical; nothing is left."""
    # nobody runs this checkout's tele: every directory above it must let others through
    # (a `mktemp -d` parent is 0700, as in tests/vif/test_helper.py).
    closed = [d for d in VENV_BIN.parents if not d.stat().st_mode & 0o001]
    if closed:
        pytest.skip(f"nobody cannot reach this checkout: {closed[0]} is not searchable by others")
    base = busybox_image(engine)
    context = tmp_path / "handler"
    context.mkdir()
    (context / "seen").write_text(CGI)
    (context / "Dockerfile").write_text(
        f"FROM {base}\nCOPY seen /www/cgi-bin/seen\nRUN chmod 755 /www/cgi-bin/seen\n"
    )
    built = engine.docker("build", "-t", "tele-test/handler:3", str(context))
    assert built.returncode == 0, built.stderr
    root_env = engine.env(tele_env)
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, root_env)
    try:
        before = _host_network()
        kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
        kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
        with _nobodys_home(engine, node_sandbox) as env:
            runtime = Path(env["XDG_RUNTIME_DIR"])
            handler: subprocess.Popen[str] | None = None
            with shared_mount(runtime):
                try:
                    connect = ("connect", "--docker", "--kubeconfig", f"{env['HOME']}/kubeconfig")
                    connected = _tele_as_nobody(env, *connect, timeout=300)
                    assert connected.returncode == 0, connected.stderr
                    assert (runtime / "tele" / "daemon.sock").stat().st_uid == NOBODY
                    status = _tele_as_nobody(env, "status")
                    assert status.returncode == 0, status.stderr
                    assert "Session:" in status.stdout, status.stdout

                    port = _free_port()
                    serve = f"httpd -f -p 127.0.0.1:{port} -h /www & echo $! > /tmp/httpd.pid; wait"
                    handler = _as_nobody(
                        env, "intercept", "app", "--port", str(port), "--docker-run", "--",
                        "tele-test/handler:3", "sh", "-c", f"{serve}; exit 7",
                    )  # fmt: skip
                    deadline = time.monotonic() + 180
                    answer = _handler_answer(node_sandbox, handler, deadline)
                    assert "greeting=hello-from-the-pod\n" in answer
                    assert f"password={SECRET}\n" in answer
                    _, err = handler.communicate(timeout=60)
                    assert handler.returncode == 7, err
                    assert "Traceback" not in err

                    quit_ = _tele_as_nobody(env, "quit")
                    assert quit_.returncode == 0, quit_.stderr
                    assert "Stopped the daemon" in quit_.stdout, quit_.stdout
                    left = engine.docker("ps", "-aq", "--filter", "label=io.tele.connection")
                    deadline = time.monotonic() + 30
                    while left.stdout.strip() and time.monotonic() < deadline:
                        time.sleep(0.2)  # the relay ends when it sees the daemon's process gone
                        left = engine.docker("ps", "-aq", "--filter", "label=io.tele.connection")
                    assert left.stdout.strip() == ""
                    assert mounts_under(runtime) == [str(runtime)]
                    assert _host_network() == before
                    # Every file it made is its own (none root's in its home).
                    roots = [p for p in Path(env["HOME"]).rglob("*") if p.stat().st_uid != NOBODY]
                    assert roots == [], roots
                finally:
                    if handler is not None and handler.poll() is None:
                        _kill_group(handler)
                    _tele_as_nobody(env, "quit")
                    engine.docker("rm", "-f", "tele-daemon-default", "tele-relay-default")
    finally:
        run_tele(root_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


def test_the_mounts_of_a_killed_daemon_container_are_removed_by_the_next_connect(
    node_sandbox: NodeSandbox,  # noqa: F811
    engine: PrivateDockerd,
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    """The daemon's container killed while a --docker-run handler has the volumes: the
    handler's container goes (its engagement is gone), the mount on this machine stays, dead
    (its sshfs died with the container, and the user may not unmount root's mount); the next
    connect --docker unmounts it and removes its directory. Killed again: `tele quit` does it
    (no daemon to do it), and nothing is left."""
    base = busybox_image(engine)
    env = engine.env(tele_env)
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, env)
    runtime = Path(env["XDG_RUNTIME_DIR"])
    shared = runtime / "tele" / "docker-mounts"
    handler: subprocess.Popen[str] | None = None

    def crash(workload: str) -> None:
        """A --docker-run intercept with the volumes, then every process of the daemon's
        container killed; its dead mount is left on this machine."""
        nonlocal handler
        port = _free_port()
        handler = subprocess.Popen(
            [str(VENV_BIN / "tele"), "intercept", workload, "--port", str(port), "--docker-run",
             "--", base, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while f"tele-{workload}-" not in engine.docker("ps", "--format", "{{.Names}}").stdout:
            assert handler.poll() is None, handler.communicate()
            assert time.monotonic() < deadline, "the handler container never ran"
            time.sleep(0.2)  # no event to wait on from here
        assert len([p for p in mounts_under(runtime) if "/telfs-" in p]) == 1
        # A crash: every process of the container (the daemon, its sshfs) killed at once,
        # none of them unmounting (the container shares this machine's PID namespace).
        top = engine.docker("top", "tele-daemon-default", "-eo", "pid")
        pids = [int(word) for word in top.stdout.split() if word.isdigit()]
        assert len(pids) >= 3, top.stdout  # the relay, the daemon, sshfs
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = handler.communicate(timeout=60)
        assert f"{workload} has ended; removing its container" in err, err
        assert "Traceback" not in err
        dead = [p for p in mounts_under(runtime) if "/telfs-" in p]
        assert len(dead) == 1, mounts_under(runtime)

    with shared_mount(runtime):
        try:
            kubectl(node_sandbox, "apply", "-f", "-", stdin=APP)
            kubectl(node_sandbox, "apply", "-f", "-", stdin=APP2)
            kubectl(node_sandbox, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
            connect = ("connect", "--docker", "--kubeconfig", kubeconfig)
            connected = run_tele(env, *connect, timeout=300)
            assert connected.returncode == 0, connected.stderr
            crash("app")
            again = run_tele(env, *connect, timeout=300)
            assert again.returncode == 0, again.stderr
            log = (Path(env["XDG_CACHE_HOME"]) / "tele" / "logs" / "daemon.log").read_text()
            assert mounts_under(runtime) == [str(runtime)]
            assert list(shared.iterdir()) == [], log[-3000:]
            crash("app2")  # (app stays engaged by the killed session until its lease ends)
            quit_ = run_tele(env, "quit", timeout=60)
            assert quit_.returncode == 0, quit_.stderr
            assert "Cleaned up after a stopped daemon: unmounted " in quit_.stdout, quit_.stdout
            assert mounts_under(runtime) == [str(runtime)]
            # The dead daemon's mount removed, its directory and marker go too.
            assert not shared.exists()
            assert not (shared.parent / "docker-daemon.json").exists()
            assert "The daemon is not running." in run_tele(env, "quit").stdout
        finally:
            if handler is not None and handler.poll() is None:
                _kill_group(handler)
            run_tele(env, "quit")
            engine.docker("rm", "-f", "tele-daemon-default", "tele-relay-default")
            kubectl(node_sandbox, "delete", "deployment,service", "app2", "--ignore-not-found")
            run_tele(env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
