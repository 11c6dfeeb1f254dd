"""Least privilege: the daemon runs as an unprivileged user (nobody) without CAP_NET_ADMIN;
`tele connect --vif` starts the privileged helper, which creates the TUN device, routes and
resolver settings inside a network namespace of this test and hands the descriptors over.

The CLI runs as nobody too, with only CAP_SETUID/SETGID (ambient) so that its helper command
(`setpriv --reuid=0`, standing in for sudo, which this machine lacks) can become root. The daemon
is started beforehand without any capability. The API server and the traffic manager run in the
host namespace on loopback; every network change happens in the namespace `tele-<random>`, and
everything (processes by pid, the namespace, /etc/netns/<name>, the temporary home) is removed
at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tele.sandbox.testing import threaded_cluster
from tele.vif.caps import CAP_NET_ADMIN, effective_capabilities
from tests.conftest import VENV_BIN
from tests.daemon.test_connect import ManagerProcess
from tests.daemon.util import DaemonGuard, private_home, wait_exit

NOBODY = 65534
SETPRIV_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
MAY_SETUID = ["--inh-caps=+setuid,+setgid", "--ambient-caps=+setuid,+setgid"]
# The interpreter may live under root's home (pyenv), which nobody cannot enter: such a
# process gets a mount namespace of its own where /root is an empty tmpfs holding just that
# tree (bind-mounted, read as before). Nothing changes for any other process.
_INTERPRETER = os.path.realpath(sys.executable)
_HIDDEN_TREE = "/root/" + _INTERPRETER.split("/")[2] if _INTERPRETER.startswith("/root/") else ""
_SHOW_TREE = (
    'mount --bind "$1" "$0/tree" && mount -t tmpfs -o mode=755,size=1m tmpfs /root && '
    'mkdir "$1" && mount --move "$0/tree" "$1" && shift && exec "$@"'
)
# sudo's part: become root and say who asked (SUDO_UID is all the helper believes about that).
AS_ROOT = f"setpriv --reuid=0 --regid=0 --clear-groups -- env SUDO_UID={NOBODY} SUDO_GID={NOBODY}"
SERVICE_CIDR = "10.96.0.0/16"
ORIGINAL_RESOLV = "# the laptop's own\nnameserver 192.0.2.53\nsearch example.test\n"


def _ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def as_nobody(home: Path, argv: list[str], *, caps: bool = False) -> list[str]:
    command = [*SETPRIV_NOBODY, *(MAY_SETUID if caps else []), *argv]
    if not _HIDDEN_TREE:
        return command
    (home / "mnt" / "tree").mkdir(parents=True, exist_ok=True)
    return ["unshare", "-m", "--", "sh", "-c", _SHOW_TREE, str(home / "mnt"), _HIDDEN_TREE,
            *command]  # fmt: skip


@dataclass
class World:
    netns: str
    home: Path
    env: dict[str, str]
    kubeconfig: Path
    manager: ManagerProcess
    resolv_conf: Path

    def tele(
        self, *args: str, caps: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`tele ARGS` as nobody (`caps`: allowed to become root, for the helper command)."""
        return subprocess.run(
            as_nobody(self.home, [str(VENV_BIN / "tele"), *args], caps=caps),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )

    def kubectl(self, *args: str, stdin: str = "") -> str:
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    def routes(self) -> list[str]:
        return [r["dst"] for r in json.loads(_ip("-n", self.netns, "-j", "route") or "[]")]

    def links(self) -> list[str]:
        return [link["ifname"] for link in json.loads(_ip("-n", self.netns, "-j", "link"))]

    def helper_pids(self) -> list[int]:
        """Helpers of this test's daemon (found by the socket path on their command line)."""
        marker = str(self.home / "runtime").encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"tele.vif.helper" in cmdline and marker in cmdline:
                found.append(int(entry.name))
        return found


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists() or not shutil.which("setpriv"):
        pytest.skip("needs root, /dev/net/tun and setpriv")
    # nobody runs this checkout's tele: every directory above it must let others through
    # (only root's home is dealt with, see _SHOW_TREE; e.g. a `mktemp -d` parent is 0700).
    closed = [d for d in VENV_BIN.parents if not d.stat().st_mode & 0o001]
    closed = [d for d in closed if d != Path("/root")]
    if closed:
        pytest.skip(f"nobody cannot reach this checkout: {closed[0]} is not searchable by others")
    netns = f"tele-{secrets.token_hex(4)}"
    home = Path(tempfile.mkdtemp(prefix="tele-helper-"))
    etc = Path("/etc/netns") / netns
    guard: DaemonGuard | None = None
    manager: ManagerProcess | None = None
    try:
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        etc.mkdir(parents=True)
        resolv_conf = etc / "resolv.conf"
        resolv_conf.write_text(ORIGINAL_RESOLV)
        env = private_home(home, f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(TELE_VIF_NETNS=netns, TELE_VIF_HELPER=AS_ROOT)
        guard = DaemonGuard(env)
        kubeconfig = home / "kubeconfig"
        with threaded_cluster(kubeconfig):
            for path in [home, *home.rglob("*")]:
                os.chown(path, NOBODY, NOBODY)
            os.chmod(home, 0o700)
            monkeypatch.setenv("TELE_SERVICE_CIDRS", SERVICE_CIDR)
            manager = ManagerProcess(kubeconfig, lease="5s")
            started = subprocess.run(
                as_nobody(home, [str(VENV_BIN / "tele"), "daemon", "start"]),
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
                check=False,
            )
            assert started.returncode == 0, started.stderr
            yield World(netns, home, env, kubeconfig, manager, resolv_conf)
    finally:
        if guard is not None:
            guard.kill_all()  # the daemon and any helper (they run with this test's env)
        if manager is not None:
            manager.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _daemon_pid(world: World) -> int:
    return int((world.home / "runtime" / "tele" / "daemon.pid").read_text())


def _connect_args(world: World) -> list[str]:
    address = f"127.0.0.1:{world.manager.port}"
    return ["--kubeconfig", str(world.kubeconfig), "--manager-address", address]


def test_unprivileged_daemon_gets_the_network_from_the_helper(world: World) -> None:
    daemon = _daemon_pid(world)
    status = Path(f"/proc/{daemon}/status").read_text()
    assert f"Uid:\t{NOBODY}" in status
    assert not effective_capabilities(daemon) >> CAP_NET_ADMIN & 1

    world.kubectl("create", "service", "clusterip", "web", "--tcp=80:80")
    connected = world.tele("connect", "--vif", *_connect_args(world), caps=True)
    assert connected.returncode == 0, connected.stderr
    assert "Network:            tele0 198.18.0.53" in connected.stdout

    # The device, its route and the resolver exist in the test's namespace...
    assert "tele0" in world.links()
    assert SERVICE_CIDR in world.routes()
    assert "nameserver 198.18.0.53" in world.resolv_conf.read_text()
    # ...and the daemon, which reads and writes the packets, never gained the capability.
    assert not effective_capabilities(daemon) >> CAP_NET_ADMIN & 1
    (helper,) = world.helper_pids()
    assert Path(f"/proc/{helper}/status").read_text().count("Uid:\t0\t") == 1
    assert f"Set up by:          privileged helper (pid {helper})" in connected.stdout

    # The DNS sockets the helper bound on port 53 answer through the unprivileged daemon.
    ip = world.kubectl("get", "service", "web", "-o", "jsonpath={.spec.clusterIP}")
    resolved = subprocess.run(
        ["ip", "netns", "exec", world.netns, "getent", "hosts", "web.default"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert resolved.stdout.split()[:1] == [ip], resolved
    status = world.tele("status")
    assert "DNS:                198.18.0.53 for " in status.stdout, status.stdout
    assert "TCP connections" in status.stdout and "queries" in status.stdout
    found = re.search(r"DNS: .*; (\d+) queries", status.stdout)
    assert found is not None and int(found.group(1)) >= 1, status.stdout

    # A pod in a new subnet: the manager's cluster info grows, and the route follows.
    with subprocess.Popen(
        ["ip", "-n", world.netns, "monitor", "route"], stdout=subprocess.PIPE, text=True
    ) as monitor:
        try:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "far", "namespace": "default"},
                "spec": {"containers": [{"name": "app", "image": "tele-sandbox/echo"}]},
            }
            world.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))
            world.kubectl(
                "patch", "pod", "far", "--subresource=status", "--type=merge", "-p",
                json.dumps({"status": {"podIP": "10.250.3.4", "podIPs": [{"ip": "10.250.3.4"}]}}),
            )  # fmt: skip
            assert _wait_for_line(monitor, "10.250.0.0/16 dev tele0")
        finally:
            monitor.kill()
    assert "10.250.0.0/16" in world.routes()

    # kill -9 of the daemon: the helper sees its connection end, undoes everything, exits.
    os.kill(daemon, signal.SIGKILL)
    assert wait_exit(helper, timeout=20)
    assert "tele0" not in world.links()
    assert [r for r in world.routes() if r.startswith(("10.96.", "10.250."))] == []
    assert world.resolv_conf.read_text() == ORIGINAL_RESOLV
    # root's journal is root's: nothing of the helper's lands in the user's directories
    home_files = [p.name for p in world.home.rglob("*")]
    assert [n for n in home_files if n.startswith(("journal-", "helper-journal"))] == []
    log = world.home / "cache" / "tele" / "logs" / "helper.log"
    assert log.stat().st_uid == NOBODY  # the user's log, opened by the CLI, written by root
    assert "the daemon closed the connection (or died); undoing" in log.read_text()


def test_a_failed_setup_leaves_nothing_behind(world: World) -> None:
    # A local route that overlaps the cluster's Service subnet: the helper must refuse.
    _ip("-n", world.netns, "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn1")
    _ip("-n", world.netns, "link", "set", "vpn0", "up")
    _ip("-n", world.netns, "route", "add", "10.96.0.0/12", "dev", "vpn0")
    failed = world.tele("connect", "--vif", *_connect_args(world), caps=True)
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr
    assert "overlaps the route 10.96.0.0/12 on interface vpn0" in failed.stderr
    assert "tele0" not in world.links()
    assert world.resolv_conf.read_text() == ORIGINAL_RESOLV
    assert world.helper_pids() == [] or all(wait_exit(p, 10) for p in world.helper_pids())

    # Without --vif the same conflict only costs the interface: connected, with a note.
    connected = world.tele("connect", *_connect_args(world), caps=True)
    assert connected.returncode == 0, connected.stderr
    assert "connected without the virtual network interface" in connected.stderr
    assert "vpn0" in connected.stderr
    assert "tele0" not in world.links()
    assert all(wait_exit(p, 10) for p in world.helper_pids())
    assert world.tele("quit").returncode == 0


def test_the_network_is_the_default_and_quit_removes_it(world: World) -> None:
    connected = world.tele("connect", *_connect_args(world), caps=True)  # no --vif
    assert connected.returncode == 0, connected.stderr
    assert connected.stderr == ""
    assert "tele0" in world.links()
    (helper,) = world.helper_pids()
    assert world.tele("quit").returncode == 0
    assert wait_exit(helper, timeout=20)
    assert "tele0" not in world.links()
    assert SERVICE_CIDR not in world.routes()
    assert world.resolv_conf.read_text() == ORIGINAL_RESOLV


def _wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 20) -> bool:
    """Read `process`'s output until a line contains `text` (False at end or after timeout)."""
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        import time

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                return False
            line = process.stdout.readline()
            if not line:
                return False
            if text in line:
                return True
    return False
