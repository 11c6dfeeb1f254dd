"""A private Docker Engine for tests: its own socket, data root, exec root, containerd
namespace and pid file under one `tele-dk-*` directory; no bridge, no iptables, no IP forwarding
or masquerading, so the host's routes and firewall stay as they were. Stopped by its PID and
removed with everything it made (containers, mounts, files), also when the test failed.
Used by tests (tests/docker/conftest.py skips on `Missing`) and bench/engage.py --docker."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tele.docker.engine import Engine

READY_TIMEOUT = 60.0


class Missing(Exception):
    """What this machine lacks for a private dockerd (one sentence)."""


@dataclass(frozen=True)
class PrivateDockerd:
    root: Path
    pid: int

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def engine(self) -> Engine:
        return Engine(self.host, "the test's private dockerd")

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with DOCKER_HOST pointing at this engine."""
        return {**base, "DOCKER_HOST": self.host}

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this engine."""
        return subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def missing() -> str | None:
    """Why no private dockerd can start here, or None."""
    for program in ("dockerd", "containerd", "runc"):
        if shutil.which(program) is None:
            return f"{program} is not installed (Debian's docker.io; scripts/setup.sh installs it)"
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    return None


def _answers(socket_path: Path) -> bool:
    import socket

    if not socket_path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(socket_path))
            probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return probe.recv(64).startswith(b"HTTP/1.0 200") or False
        except OSError:
            return False


def _mounts_under(root: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4]
        if point == str(root) or point.startswith(f"{root}/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _stop(process: subprocess.Popen[bytes], pid_file: Path) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    # dockerd stops the containerd it started; after a SIGKILL that one is still ours to end.
    try:
        containerd = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(containerd, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def private_dockerd() -> Iterator[PrivateDockerd]:
    """Start a dockerd of the caller's own; Missing (saying what) where none can run."""
    reason = missing()
    if reason:
        raise Missing(reason)
    # A short path: the socket's must fit sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="tele-dk-", dir="/tmp"))
    # containerd's namespaces take [A-Za-z0-9] runs joined by single '.', '_' or '-' (mkdtemp's
    # suffix may put '_' next to '-'): a hex suffix of its own.
    tag = f"tele-dk-{secrets.token_hex(4)}"
    (root / "daemon.json").write_text("{}\n")  # not /etc/docker/daemon.json
    log = (root / "dockerd.log").open("wb")
    command = [
        "dockerd",
        f"--config-file={root / 'daemon.json'}",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        f"--host=unix://{root / 'docker.sock'}",
        f"--containerd-namespace={tag}",
        f"--containerd-plugins-namespace={tag}-plugins",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--userland-proxy=false",
        "--log-level=warn",
    ]
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    engine = PrivateDockerd(root, process.pid)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _answers(engine.socket):
            if process.poll() is not None:
                tail = (root / "dockerd.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"the private dockerd exited: {tail}")
            assert time.monotonic() < deadline, "the private dockerd did not answer in time"
            time.sleep(0.05)  # no event to wait on: the socket appears when dockerd is ready
        yield engine
    finally:
        try:
            if process.poll() is None:
                listed = engine.docker("ps", "-aq", timeout=30).stdout.split()
                if listed:
                    engine.docker("rm", "-f", *listed, timeout=60)
        finally:
            _stop(process, root / "exec" / "containerd" / "containerd.pid")
            for point in _mounts_under(root):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
            shutil.rmtree(root, ignore_errors=True)


BUSYBOX_APPLETS = (
    "sh", "cat", "env", "echo", "httpd", "nc", "kill", "printf", "ls", "sleep", "wget",
    "nslookup", "grep", "tail", "awk",
)  # fmt: skip


def busybox_image(engine: PrivateDockerd, tag: str = "tele-test/busybox:1") -> str:
    """A small base image made here (Debian's static busybox, as `docker import` takes a root
    file system); its tag."""
    import io
    import tarfile

    busybox = shutil.which("busybox")
    if busybox is None:
        raise Missing("busybox is not installed (busybox-static; scripts/setup.sh installs it)")
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for directory in ("bin", "tmp", "etc", "www"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    imported = subprocess.run(
        ["docker", "-H", engine.host, "import", "-c", "ENV PATH=/bin", "-", tag],
        input=data.getvalue(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    return tag
