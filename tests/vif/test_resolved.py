"""DNS set-up through a real systemd-resolved: with resolved running, `tele connect` gives the
TUN link tele's DNS server and routing domains (`resolvectl dns/domain`), programs that ask the
stub resolver (127.0.0.53) get cluster names, and after `tele quit` the link and its settings
are gone; no resolv.conf is touched.

The "laptop" is a network namespace of this test plus a private mount namespace held by a
`sleep` process, in which tmpfs mounts over /run/systemd and /run/dbus hold a D-Bus system bus
and systemd-resolved (the binary of the distribution's package, extracted by scripts/setup.sh
without installing it: installing it would take over this machine's /etc/resolv.conf). resolved
runs in the network namespace; /etc/passwd gets its `systemd-resolve` user, and /etc/resolv.conf
its stub file, only inside the private mount namespace. The daemon runs in the host network
namespace (the API server and the manager listen on its loopback) but in the private mount
namespace, and puts its VIF into the test's network namespace (TELE_VIF_NETNS). Everything is
removed at the end, also on failure: processes by pid, the namespace, the temporary home.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tele.sandbox.testing import threaded_cluster
from tests.conftest import VENV_BIN
from tests.daemon.test_connect import ManagerProcess
from tests.daemon.util import DaemonGuard, private_home

ROOT = Path(__file__).resolve().parents[2]
EXTRACTED = ROOT / ".cache" / "systemd-resolved"  # scripts/setup.sh puts the package here
SERVICE_CIDR = "10.96.0.0/16"
TUN_ADDRESS = "198.18.0.53"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Runs in a new mount namespace (unshare -m: private propagation, nothing reaches the host).
HOLDER = """set -e
mount -t tmpfs -o mode=755 tmpfs /run/systemd
mount -t tmpfs -o mode=755 tmpfs /run/dbus
mkdir /run/systemd/resolve
mount --bind "$D/passwd" /etc/passwd
mount --bind "$D/group" /etc/group
dbus-daemon --config-file="$D/bus.conf" --fork --print-pid > "$D/dbus.pid"
NOTIFY_SOCKET="$D/notify" SYSTEMD_LOG_TARGET=console \\
    nsenter --net="/run/netns/$NS" "$RESOLVED" > "$D/resolved.log" 2>&1 &
echo $! > "$D/resolved.pid"
exec sleep infinity
"""


def _binary(*candidates: Path) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


RESOLVED = _binary(
    Path("/lib/systemd/systemd-resolved"),
    Path("/usr/lib/systemd/systemd-resolved"),
    EXTRACTED / "lib" / "systemd" / "systemd-resolved",
    EXTRACTED / "usr" / "lib" / "systemd" / "systemd-resolved",
)
RESOLVECTL = _binary(Path("/usr/bin/resolvectl"), EXTRACTED / "usr" / "bin" / "resolvectl")


@dataclass
class Laptop:
    netns: str
    holder: int  # the pid whose mount namespace is the laptop's
    env: dict[str, str]
    kubeconfig: Path
    manager: ManagerProcess

    def run(
        self, *argv: str, net: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`argv` in the laptop's mount namespace (and, with `net`, its network namespace)."""
        enter = ["nsenter", f"--mount=/proc/{self.holder}/ns/mnt"]
        if net:
            enter.append(f"--net=/run/netns/{self.netns}")
        return subprocess.run(
            [*enter, "--", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )

    def tele(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(VENV_BIN / "tele"), *args)

    def links(self) -> str:
        return subprocess.run(
            ["ip", "-n", self.netns, "link"], capture_output=True, text=True, check=True
        ).stdout


@pytest.fixture
def laptop(monkeypatch: pytest.MonkeyPatch) -> Iterator[Laptop]:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        pytest.skip("needs root and /dev/net/tun")
    missing = [
        name
        for name, found in (
            ("systemd-resolved", RESOLVED),
            ("resolvectl", RESOLVECTL),
            ("dbus-daemon", shutil.which("dbus-daemon")),
            ("nsenter", shutil.which("nsenter")),
        )
        if not found
    ]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup.sh extracts systemd-resolved)")
    if not (Path("/run/systemd").is_dir() and Path("/run/dbus").is_dir()):
        pytest.skip("needs /run/systemd and /run/dbus to mount over")
    assert RESOLVED is not None and RESOLVECTL is not None
    netns = f"tele-{secrets.token_hex(4)}"
    home = Path(tempfile.mkdtemp(prefix="tele-resolved-"))
    host_resolv = Path("/etc/resolv.conf")
    before = (host_resolv.stat().st_ino, host_resolv.read_bytes())
    holder: subprocess.Popen[bytes] | None = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    guard: DaemonGuard | None = None
    manager: ManagerProcess | None = None
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        (home / "bus.conf").write_text(BUS_CONFIG)
        (home / "passwd").write_text(
            Path("/etc/passwd").read_text() + "systemd-resolve:x:0:0::/:/usr/sbin/nologin\n"
        )
        (home / "group").write_text(Path("/etc/group").read_text() + "systemd-resolve:x:0:\n")
        notify.bind(str(home / "notify"))
        notify.settimeout(30)
        holder = subprocess.Popen(
            ["unshare", "-m", "--", "sh", "-c", HOLDER],
            env={**os.environ, "D": str(home), "NS": netns, "RESOLVED": str(RESOLVED)},
        )
        # resolved says READY=1 on the notify socket once it serves (sd_notify).
        while b"READY=1" not in notify.recv(4096):
            pass
        subprocess.run(
            ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--", "mount", "--bind",
             "/run/systemd/resolve/stub-resolv.conf", "/etc/resolv.conf"],
            check=True,
        )  # fmt: skip
        env = private_home(home, f"{VENV_BIN}:{RESOLVECTL.parent}:/usr/sbin:/usr/bin:/sbin:/bin")
        env["TELE_VIF_NETNS"] = netns
        guard = DaemonGuard(env)
        kubeconfig = home / "kubeconfig"
        with threaded_cluster(kubeconfig):
            monkeypatch.setenv("TELE_SERVICE_CIDRS", SERVICE_CIDR)
            manager = ManagerProcess(kubeconfig, lease="5s")
            yield Laptop(netns, holder.pid, env, kubeconfig, manager)
    finally:
        if guard is not None:
            guard.kill_all()
        if manager is not None:
            manager.stop()
        for name in ("resolved.pid", "dbus.pid"):
            try:
                os.kill(int((home / name).read_text()), 9)
            except (OSError, ValueError):
                pass
        if holder is not None:
            holder.kill()
            holder.wait()
        notify.close()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
        assert (host_resolv.stat().st_ino, host_resolv.read_bytes()) == before


def test_connect_sets_the_link_dns_in_resolved_and_quit_drops_it(laptop: Laptop) -> None:
    subprocess.run(
        ["kubectl", "--kubeconfig", str(laptop.kubeconfig), "create", "service", "clusterip",
         "web", "--tcp=80:80"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    ip = subprocess.run(
        ["kubectl", "--kubeconfig", str(laptop.kubeconfig), "get", "service", "web",
         "-o", "jsonpath={.spec.clusterIP}"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    address = f"127.0.0.1:{laptop.manager.port}"
    kubeconfig = str(laptop.kubeconfig)
    connected = laptop.tele("connect", "--vif", "--kubeconfig", kubeconfig, "--manager-address",
                            address)  # fmt: skip
    assert connected.returncode == 0, connected.stderr
    assert "tele0" in laptop.links()

    # resolved holds tele's server and routing domains for the link...
    status = laptop.run("resolvectl", "status", "tele0", net=True)
    assert status.returncode == 0, status.stderr
    assert TUN_ADDRESS in status.stdout
    assert "~cluster.local" in status.stdout and "~default" in status.stdout
    # ...and a program asking the stub resolver (127.0.0.53) gets the Service's address.
    resolved = laptop.run("getent", "hosts", "web.default", net=True)
    assert resolved.stdout.split()[:1] == [ip], (resolved, laptop.run("cat", "/etc/resolv.conf"))
    # No resolv.conf was rewritten: neither the namespace's nor (checked at the end) the host's.
    assert not (Path("/etc/netns") / laptop.netns).exists()

    quit_ = laptop.tele("quit")
    assert quit_.returncode == 0, quit_.stderr
    assert "tele0" not in laptop.links()
    after = laptop.run("resolvectl", "status", net=True)
    assert "tele0" not in after.stdout and TUN_ADDRESS not in after.stdout
    gone = laptop.run("getent", "hosts", "web.default", net=True)
    assert gone.returncode != 0
