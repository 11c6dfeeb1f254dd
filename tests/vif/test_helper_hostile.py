"""The privileged helper started by a hostile user: as sudo would start it for `nobody`
(SUDO_UID=65534), with a fake daemon of nobody's that asks for what the attack of issue 16 got —
routes 0.0.0.0/1 + 128.0.0.0/1 (and ::/1) into a TUN it reads, DNS on other addresses, a resolver
pointing anywhere — and with command-line arguments and an environment that name files for
root to create. The helper refuses each, serves only what lies inside its allowed subnets, and
creates nothing outside root's own state directory.

Everything happens in a network namespace of this test; the helper runs in a mount namespace
where /etc/passwd names a temporary directory as root's home (its state directory), so the
host's files are never touched. Needs root, setpriv, unshare, /dev/net/tun and /usr/bin/python3
(the fake daemon runs as nobody with the system interpreter: this one may live under /root).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tele.vif import helper_proto as proto

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

FAKE_DAEMON = """
import array, json, os, socket, sys
path, requests = sys.argv[1], json.loads(sys.argv[2])
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(path)
listener.listen(1)
print("listening", flush=True)
listener.settimeout(30)
conn, _ = listener.accept()
conn.settimeout(30)
hello = json.loads(conn.recv(65536))
conn.send(json.dumps({"type": "Welcome"}).encode())
replies = []
for request in requests:
    conn.send(request.encode())
    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    for fd in fds:
        os.close(fd)
    replies.append([json.loads(data), len(fds)])
print(json.dumps({"hello": hello, "replies": replies}), flush=True)
"""


@dataclass
class Scene:
    netns: str
    base: Path
    """nobody's directory: the fake daemon's socket is here."""
    root_home: Path
    """Root's home as the helper sees it (its state directory lives below)."""
    passwd: Path

    def helper(self, *args: str, env: dict[str, str] | None = None) -> list[str]:
        """The helper command as sudo runs it, in a mount namespace with our /etc/passwd."""
        mount = 'mount --bind "$0" /etc/passwd && exec "$@"'
        return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", mount,
                str(self.passwd), sys.executable, "-m", "tele.vif.helper", *args]  # fmt: skip

    def routes(self) -> list[str]:
        out = subprocess.run(
            ["ip", "-n", self.netns, "-j", "route"], capture_output=True, text=True, check=True
        ).stdout
        return [r["dst"] for r in json.loads(out or "[]")]


def sudo_env(**extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SUDO_UID": str(NOBODY)}
    env["SUDO_GID"] = str(NOBODY)
    env.update(extra)
    return env


@pytest.fixture
def scene() -> Iterator[Scene]:
    missing = [t for t in ("setpriv", "unshare", SYSTEM_PYTHON) if shutil.which(t) is None]
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists() or missing:
        pytest.skip(f"needs root and /dev/net/tun, {', '.join(missing) or 'and tools'}")
    netns = f"tele-{secrets.token_hex(4)}"
    base = Path(tempfile.mkdtemp(prefix="tele-hostile-"))
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        nobody_dir = base / "nobody"
        nobody_dir.mkdir()
        os.chown(nobody_dir, NOBODY, NOBODY)
        os.chmod(base, 0o755)
        root_home = base / "root-home"
        root_home.mkdir(mode=0o700)
        passwd = base / "passwd"
        lines = Path("/etc/passwd").read_text().splitlines()
        fixed = [
            ":".join([*f[:5], str(root_home), *f[6:]]) if f[0] == "root" else line
            for line, f in ((line, line.split(":")) for line in lines)
        ]
        passwd.write_text("\n".join(fixed) + "\n")
        yield Scene(netns, nobody_dir, root_home, passwd)
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def encode(message: proto.Message) -> str:
    return proto.encode(message).decode()


def open_device(netns: str, subnets: list[str], address: str = "198.18.0.53") -> str:
    return encode(
        proto.OpenDevice(
            name="tele0",
            offload=False,
            address=address,
            address6="fd7e:1e00::53",
            mtu=1500,
            subnets=subnets,
            netns=netns,
        )
    )


Report = dict[str, Any]


def run_attack(
    scene: Scene, requests: list[str], *helper_args: str
) -> tuple[Report, subprocess.CompletedProcess[str]]:
    """The fake daemon (nobody) serves `requests` to a helper started for nobody."""
    sock = scene.base / "helper.sock"
    daemon = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         SYSTEM_PYTHON, "-c", FAKE_DAEMON, str(sock), json.dumps(requests)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline().strip() == "listening"
        helper = subprocess.run(
            scene.helper("--foreground", "--socket", str(sock), "--daemon-pid", str(daemon.pid),
                         *helper_args),
            env=sudo_env(XDG_STATE_HOME=str(scene.base / "state"), HOME=str(scene.base)),
            capture_output=True, text=True, timeout=60, cwd="/", check=False,
        )  # fmt: skip
        out, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        return json.loads(out), helper
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.communicate()


def test_a_hostile_caller_gets_no_default_like_routes_and_no_dns_elsewhere(scene: Scene) -> None:
    attacks = [
        open_device(scene.netns, ["0.0.0.0/1", "128.0.0.0/1"]),
        open_device(scene.netns, ["10.96.0.0/16", "::/1"]),
        open_device(scene.netns, ["10.96.0.0/16"], address="8.8.8.8"),
        encode(proto.BindDns(address="127.0.0.1", port=53)),
        open_device(scene.netns, ["10.96.0.0/16"]),  # inside the allowed subnets: served
        encode(proto.ChangeRoutes(add=["0.0.0.0/0"], remove=[])),
        encode(proto.ChangeRoutes(add=["128.0.0.0/1", "10.97.0.0/16"], remove=[])),
        encode(proto.SetResolver(resolved=False, server="192.0.2.1", search=[], domains=[])),
        encode(proto.BindDns(address="0.0.0.0", port=53)),
    ]
    finish = encode(proto.Finish())
    report, helper = run_attack(scene, [*attacks, finish])
    assert helper.returncode == 0, helper.stderr
    replies = [reply for reply, _ in report["replies"]]
    kinds = [r["type"] for r in replies]
    assert kinds == ["Failed", "Failed", "Failed", "Failed", "DeviceOpened", "Failed", "Failed",
                     "Failed", "Failed", "Done"], replies  # fmt: skip
    assert "refusing the route 0.0.0.0/1" in replies[0]["message"]
    assert "refusing the route ::/1" in replies[1]["message"]
    assert "refusing the device address 8.8.8.8/32" in replies[2]["message"]
    assert "refusing DNS on 127.0.0.1" in replies[3]["message"]
    assert replies[4]["routes"] == ["10.96.0.0/16"]
    assert report["replies"][4][1] == 1  # the TUN descriptor went to nobody's daemon
    assert "0.0.0.0/0" in replies[5]["message"] and "128.0.0.0/1" in replies[6]["message"]
    # Finish undid the one device that was allowed; nothing default-like ever existed.
    assert [r for r in scene.routes() if r.startswith(("10.", "0.", "128.", "default"))] == []
    # The helper's state is in root's home (as /etc/passwd says), nothing in the caller's.
    assert not (scene.base / "state").exists()
    assert (scene.root_home / ".local/state/tele/helper/journal-65534.json").exists()


def test_arguments_and_environment_naming_files_for_root_are_not_obeyed(scene: Scene) -> None:
    # The helper of issue 16 created --log-file as root (O_EXCL, then chowned it to the caller):
    # /etc/ld.so.preload, say. It also kept its journal under $XDG_STATE_HOME.
    preload = scene.base / "ld.so.preload"
    sock = scene.base / "helper.sock"
    daemon = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         SYSTEM_PYTHON, "-c", FAKE_DAEMON, str(sock), "[]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline().strip() == "listening"
        subprocess.run(
            scene.helper("--foreground", "--socket", str(sock), "--daemon-pid", str(daemon.pid),
                         "--log-file", str(preload)),
            env=sudo_env(XDG_STATE_HOME=str(scene.base / "state")),
            capture_output=True, text=True, timeout=60, cwd="/", check=False,
        )  # fmt: skip
    finally:
        daemon.kill()
        daemon.communicate()
    assert not preload.exists()
    assert not (scene.base / "state").exists()


def test_a_socket_of_another_user_is_never_spoken_to(scene: Scene) -> None:
    # root listens in a directory nobody may enter, and in one everybody may: the helper
    # started for nobody connects with nobody's permissions and checks the listener's uid.
    private = scene.base.parent / "root-only"  # (in the test's own directory, 0755, root's)
    private.mkdir(mode=0o700)
    public = scene.base / "root.sock"
    listeners = []
    try:
        for path in (private / "helper.sock", public):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(str(path))
            os.chmod(path, 0o777)
            listener.listen(1)
            listener.setblocking(False)
            listeners.append(listener)
        for path, why in ((private / "helper.sock", "Permission denied"),
                          (public, "not to the daemon of the user")):  # fmt: skip
            helper = subprocess.run(
                scene.helper("--foreground", "--socket", str(path)),
                env=sudo_env(), capture_output=True, text=True, timeout=30, cwd="/", check=False,
            )  # fmt: skip
            assert helper.returncode == 1
            assert why in helper.stderr
        conn, _ = listeners[1].accept()  # the helper connected to the public one ...
        with conn:
            conn.setblocking(True)
            assert conn.recv(100) == b""  # ... said nothing to root's listener, and hung up
    finally:
        for listener in listeners:
            listener.close()
