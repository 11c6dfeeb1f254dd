"""Network namespaces: run `ip`/`nft` inside them and open sockets that live in them.

A socket belongs to the namespace of the thread that created it, so `socket_in` switches one
worker thread into the namespace with setns(2), creates the socket, and switches back; the trio
code then uses the socket as any other. Nothing here touches the host namespace's configuration.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import socket
import subprocess
from pathlib import Path

import trio

from .errors import NodeError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
"""Per-namespace files `ip netns exec` mounts over /etc (the sandbox laptop's resolv.conf)."""
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = _CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


async def run(*argv: str, stdin: bytes | None = None, check: bool = True) -> str:
    """Run a command (ip, nft, ...); a failure becomes NodeError with its stderr."""
    result = await trio.run_process(
        list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
    )
    if check and result.returncode != 0:
        err = result.stderr.decode(errors="replace").strip()
        raise NodeError(f"`{' '.join(argv[:6])}` failed: {err}")
    return result.stdout.decode(errors="replace")


async def ip_batch(netns: str | None, commands: list[str]) -> None:
    """Run several `ip` commands in one process (`ip -batch`), optionally inside `netns`."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    await run(*argv, stdin=("\n".join(commands) + "\n").encode())


async def add(name: str) -> None:
    await run("ip", "netns", "add", name)


async def delete(name: str) -> None:
    """Kill what still runs inside `name` (processes we started there) and delete it."""
    if not exists(name):
        return
    pids = await run("ip", "netns", "pids", name, check=False)
    for pid in pids.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    await run("ip", "netns", "delete", name, check=False)


def delete_sync(name: str) -> None:
    """Blocking `delete` for cleanup paths outside trio (CLI `down`, crash recovery)."""
    if not exists(name):
        return
    pids = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def _socket_in_sync(name: str, family: int, kind: int) -> socket.socket:
    with open("/proc/thread-self/ns/net", "rb") as home, open(netns_path(name), "rb") as target:
        setns(target.fileno())
        try:
            return socket.socket(family, kind)
        finally:
            setns(home.fileno())


async def socket_in(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> trio.socket.SocketType:
    """A new trio socket living in network namespace `name`."""
    try:
        sock = await trio.to_thread.run_sync(_socket_in_sync, name, family, kind)
    except OSError as exc:
        raise NodeError(f"cannot open a socket in network namespace {name}: {exc}") from exc
    return trio.socket.from_stdlib_socket(sock)


async def connect_in(name: str, host: str, port: int) -> trio.SocketStream:
    """A TCP connection made from inside network namespace `name`."""
    sock = await socket_in(name)
    try:
        await sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return trio.SocketStream(sock)


# --- one mount namespace for everything that runs in a network namespace --------------------

MOUNT_NS_PREFIX = "/run/tele-mntns-"
"""`<prefix><netns name>/mnt` pins that network namespace's mount namespace (a bind mount of
/proc/PID/ns/mnt). Its directory is a private bind mount of its own, made and removed with it:
a namespace file may only be bound where the mount does not propagate, and a directory shared
by several sandboxes could be bound over again by one of them, hiding the others' pins."""


def mount_ns_path(name: str) -> Path:
    return Path(MOUNT_NS_PREFIX + name) / "mnt"


def pin_mount_namespace_sync(name: str) -> Path:
    """A mount namespace for network namespace `name`, kept alive by a bind mount at
    `mount_ns_path(name)`: set up as `ip netns exec` sets up its own for each command (a slave
    of the host's mounts, /sys of that network namespace, /etc/netns/NAME/* over /etc/*), but
    one for every process entered into it, so mounts made by one (a tele daemon's volumes)
    are seen by all the others. Blocking (a few short commands)."""

    def run_sync(*argv: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NodeError(f"`{' '.join(argv[:6])}` failed: {result.stderr.strip()}")

    unpin_mount_namespace_sync(name)
    pin = mount_ns_path(name)
    directory = pin.parent
    directory.mkdir(mode=0o755)
    try:
        run_sync("mount", "--bind", str(directory), str(directory))
        run_sync("mount", "--make-private", str(directory))
        pin.touch()
        etc_dir = ETC_NETNS / name
        etc = [
            f"mount --bind {f} /etc/{f.name}"
            for f in (sorted(etc_dir.iterdir()) if etc_dir.is_dir() else [])
            if (Path("/etc") / f.name).exists()
        ]
        script = " && ".join(["umount -l /sys", f"mount -t sysfs {name} /sys", *etc])
        run_sync(
            "unshare",
            f"--mount={pin}",
            "--propagation",
            "slave",
            "--",
            "nsenter",
            f"--net={netns_path(name)}",
            "--",
            "sh",
            "-c",
            script,
        )
    except (NodeError, OSError):
        unpin_mount_namespace_sync(name)
        raise
    return pin


def _mount_points() -> set[str]:
    """The mount points of this process's mount namespace (octal escapes decoded)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as lines:
        return {
            re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split(" ")[4])
            for line in lines
            if line.count(" ") >= 5
        }


def unpin_mount_namespace_sync(name: str) -> None:
    """Let the mount namespace of `name` go (it ends with the last process in it), and remove
    its directory."""
    pin = mount_ns_path(name)
    for path in (pin, pin.parent):
        for _ in range(8):  # a path bound more than once has a mount per bind
            if str(path) not in _mount_points():
                break
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
    try:
        pin.unlink(missing_ok=True)
        pin.parent.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:  # still a mount point somewhere: leave it, not the rest
        log.warning("could not remove %s: %s", pin, exc.strerror or exc)


def enter_command(name: str, command: list[str], cwd: str) -> list[str]:
    """argv that runs `command` in network namespace `name`, in its pinned mount namespace
    when there is one (else in a new one of its own, as `ip netns exec` does)."""
    pin = mount_ns_path(name)
    if not os.path.ismount(pin):
        return ["ip", "netns", "exec", name, *command]
    # Entering a mount namespace moves to its root: --wd keeps the directory the user is in.
    return [
        "nsenter",
        f"--mount={pin}",
        f"--net={netns_path(name)}",
        f"--wd={cwd}",
        "--",
        *command,
    ]
