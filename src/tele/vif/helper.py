"""The privileged helper: `python -m tele.vif.helper`, started by `tele connect` through sudo
when the daemon lacks CAP_NET_ADMIN.

It connects to the daemon's `helper.sock` (checking that the socket belongs to the daemon's
pid), detaches from the terminal once the daemon has welcomed it, and then does only what needs
privilege, on the daemon's request: create and address the TUN device, add and remove routes,
bind the DNS sockets, point the resolver at tele's DNS server. Descriptors go to the daemon
(SCM_RIGHTS) and the helper closes its own copies: no packet is ever read or written as root.
When the daemon says Finish, closes the connection or dies, the helper undoes every change and
exits. Its changes are journaled apart from the daemon's (`helper-journal.json` in root's state
directory), so a helper killed with `kill -9` is cleaned up after by the next one.

Blocking and single-threaded on purpose: one request at a time, no event loop to get wrong.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn

import tele
from tele import paths
from tele.dns import system
from tele.dns.server import bind_sockets
from tele.errors import TeleError
from tele.vif import helper_proto as proto
from tele.vif import journal
from tele.vif.errors import RouteConflict, VifError
from tele.vif.netns import NETNS_DIR, call_in_netns
from tele.vif.routing import (
    DeviceConfig,
    Network,
    change_routes,
    configure,
    delete_link,
    parse_networks,
    remove_routes,
)
from tele.vif.tun import open_tun

log = logging.getLogger("tele.vif.helper")

HANDSHAKE_TIMEOUT = 10.0
JOURNAL_FILE = "helper-journal.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class HelperError(TeleError):
    """The helper cannot start (wrong socket, daemon gone) or cannot do what was asked."""


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise HelperError(f"refusing the {kind} name {name!r}")
    return name


@dataclass(slots=True)
class Changes:
    """What this helper changed, to undo in reverse."""

    netns: str | None = None
    device: str = ""
    routes: list[Network] = field(default_factory=list)
    resolv_conf: Path | None = None
    resolv_backup: Path | None = None

    def journal_device(self) -> None:
        journal.record(
            journal.Entry(self.netns, device=self.device, routes=[str(n) for n in self.routes])
        )

    def undo(self) -> None:
        """Put everything back; each step on its own (one failing does not stop the rest)."""
        if self.resolv_conf is not None and self.resolv_backup is not None:
            try:
                system.restore_resolv_conf(self.resolv_conf, self.resolv_backup)
                journal.forget(self.netns, resolv_conf=str(self.resolv_conf))
                log.info("restored %s", self.resolv_conf)
            except OSError as exc:
                log.error("could not restore %s: %s", self.resolv_conf, exc)
            self.resolv_conf = self.resolv_backup = None
        if self.device:
            try:
                remove_routes(self.netns, self.device, self.routes)
                if delete_link(self.netns, self.device):
                    log.info("removed device %s", self.device)
                journal.forget(self.netns, self.device)
            except VifError as exc:
                log.error("could not remove %s: %s", self.device, exc)
            self.device = ""
            self.routes = []


class Helper:
    """Answers the daemon's requests on a connected SOCK_SEQPACKET socket (blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.changes = Changes()
        self._netns_set = False

    # --- transport ----------------------------------------------------------------------

    def receive(self) -> proto.Message | None:
        """The next request, or None at end of file (the daemon closed or died)."""
        try:
            data, _, _, _ = self.sock.recvmsg(proto.MAX_MESSAGE)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not data:
            return None
        return proto.decode(data)

    def send(self, message: proto.Message, fds: list[int] | None = None) -> None:
        self.sock.sendmsg([proto.encode(message)], proto.fds_ancillary(fds or []))

    # --- requests -----------------------------------------------------------------------

    def serve(self) -> None:
        """Answer until Finish or end of file; undo everything either way."""
        try:
            while True:
                request = self.receive()
                if request is None:
                    log.info("the daemon closed the connection (or died); undoing")
                    return
                if isinstance(request, proto.Finish):
                    self.changes.undo()
                    self.send(proto.Done())
                    log.info("finished")
                    return
                self._answer(request)
        finally:
            self.changes.undo()

    def _answer(self, request: proto.Message) -> None:
        fds: list[int] = []
        try:
            reply, fds = self._handle(request)
        except RouteConflict as exc:
            log.warning("%s", exc)
            self.send(proto.Failed(message=str(exc), conflict=True))
            return
        except (TeleError, OSError, ValueError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("%s failed: %s", type(request).__name__, message)
            self.send(proto.Failed(message=message))
            return
        try:
            self.send(reply, fds)
        finally:
            for fd in fds:
                os.close(fd)  # the daemon has its own copies now

    def _use_netns(self, netns: str | None) -> str | None:
        """The namespace of this helper's changes: fixed by the first request."""
        if netns is not None:
            _check_name("network namespace", netns)
            if not (NETNS_DIR / netns).exists():
                raise HelperError(f"network namespace {netns} does not exist")
        if self._netns_set and netns != self.changes.netns:
            raise HelperError("one helper serves one network namespace")
        self._netns_set = True
        self.changes.netns = netns
        return netns

    def _handle(self, request: proto.Message) -> tuple[proto.Message, list[int]]:
        changes = self.changes
        if isinstance(request, proto.OpenDevice):
            if changes.device:
                raise HelperError(f"this helper already made {changes.device}")
            netns = self._use_netns(request.netns)
            name = _check_name("device", request.name)
            config = DeviceConfig(
                name,
                ipaddress.ip_address(request.address),
                request.mtu,
                parse_networks(request.subnets),
                parse_networks(request.allow_conflicting),
                ipaddress.IPv6Address(request.address6),
            )
            tun = call_in_netns(netns, lambda: open_tun(name, offload=request.offload))
            try:
                changes.device = config.name = tun.name
                changes.journal_device()
                changes.routes = configure(netns, config)
                changes.journal_device()
            except BaseException:
                tun.close()
                changes.undo()
                raise
            log.info("device %s routes %s", tun.name, ", ".join(map(str, changes.routes)))
            reply = proto.DeviceOpened(
                name=tun.name, vnet_header=tun.vnet_header, routes=[str(n) for n in changes.routes]
            )
            return reply, [tun.fd]
        if isinstance(request, proto.ChangeRoutes):
            if not changes.device:
                raise HelperError("there is no device to route to")
            add = parse_networks(request.add)
            remove = parse_networks(request.remove)
            allow = parse_networks(request.allow_conflicting)
            added = change_routes(changes.netns, changes.device, add, remove, allow)
            changes.routes = [n for n in changes.routes if n not in remove] + added
            changes.journal_device()
            log.info("routes of %s: added %s, removed %s", changes.device, added, remove)
            return proto.RoutesChanged(added=[str(n) for n in added]), []
        if isinstance(request, proto.BindDns):
            netns = self._use_netns(changes.netns if self._netns_set else None)
            ipaddress.ip_address(request.address)
            socks = call_in_netns(netns, lambda: bind_sockets(request.address, request.port))
            fds = [os.dup(s.fileno()) for s in socks]
            for s in socks:
                s.close()
            return proto.DnsBound(), fds
        if isinstance(request, proto.SetResolver):
            if request.resolved:
                if not changes.device:
                    raise HelperError("there is no device to set DNS for")
                system.resolved_set_link(
                    changes.device, request.server, request.domains, netns=changes.netns
                )
                return proto.Done(), []
            ipaddress.ip_address(request.server)
            for domain in request.search:
                _check_name("search domain", domain)
            path = system.resolv_conf_for(changes.netns)
            # Root's state dir, never beside the file: /etc may be shared with other namespaces.
            backup = paths.state_dir() / f"resolv.conf.{changes.netns or 'host'}.tele-orig"
            changes.resolv_conf, changes.resolv_backup = path, backup
            journal.record(
                journal.Entry(changes.netns, resolv_conf=str(path), resolv_backup=str(backup))
            )
            system.override_resolv_conf(path, backup, request.server, request.search)
            log.info("%s points at %s", path, request.server)
            return proto.Done(), []
        if isinstance(request, proto.RestoreResolver):
            if changes.resolv_conf is not None and changes.resolv_backup is not None:
                system.restore_resolv_conf(changes.resolv_conf, changes.resolv_backup)
                journal.forget(changes.netns, resolv_conf=str(changes.resolv_conf))
                changes.resolv_conf = changes.resolv_backup = None
            return proto.Done(), []
        raise HelperError(f"unexpected request {type(request).__name__}")


def connect(path: Path, daemon_pid: int) -> socket.socket:
    """Connect to the daemon's helper socket, checking that the daemon listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise HelperError(f"cannot reach the daemon at {path}: {exc.strerror}") from exc
        from tele.unixsock import peer_credentials

        peer = peer_credentials(sock)
        if peer.pid != daemon_pid:
            raise HelperError(
                f"{path} belongs to process {peer.pid}, not to the daemon (pid {daemon_pid})"
            )
        sock.sendmsg(
            [proto.encode(proto.Hello(pid=os.getpid(), uid=os.getuid(), version=tele.__version__))]
        )
        data = sock.recv(proto.MAX_MESSAGE)
        if not isinstance(proto.decode(data) if data else None, proto.Welcome):
            raise HelperError("the daemon did not accept the helper (see the daemon's log)")
        sock.settimeout(None)
    except (OSError, proto.ProtocolError) as exc:
        sock.close()
        raise HelperError(f"the handshake with the daemon failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_uid(sock: socket.socket) -> int:
    from tele.unixsock import peer_credentials

    return peer_credentials(sock).uid


def _on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through Helper.serve's undo


def _open_log(path: str, owner: int) -> int | None:
    """The log file, opened as root on the user's behalf without trusting the path: a new
    file becomes the user's; an existing one must be the user's own regular file (never a
    symlink, never someone else's file that a chown would hand over)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            fd = os.open(path, flags)
        except OSError:
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != owner:
            os.close(fd)
            return None
        return fd
    except OSError:
        return None
    os.fchown(fd, owner, -1)
    return fd


def _setup_logging(log_file: str, owner: int) -> None:
    handlers: list[logging.Handler] = []
    fd = _open_log(log_file, owner) if log_file else None
    if fd is not None:
        handlers.append(logging.StreamHandler(os.fdopen(fd, "a", buffering=1)))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s helper[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        handlers=handlers or [logging.NullHandler()],
    )


def _detach_and_connect(args: argparse.Namespace) -> socket.socket:
    """Fork: the child connects and reports over a pipe; the parent (what sudo waits for)
    exits 0 once the daemon has welcomed the child, or 1 with the reason on stderr."""
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read().decode(errors="replace").strip()
        if report == "ok":
            os._exit(0)
        print(f"tele helper: {report or 'the helper died while starting'}", file=sys.stderr)
        os._exit(1)
    os.close(read_fd)
    os.setsid()  # no terminal: closing it (or Ctrl-C there) must not stop the helper
    try:
        sock = connect(Path(args.socket), args.daemon_pid)
    except HelperError as exc:
        os.write(write_fd, str(exc).encode())
        os._exit(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.write(write_fd, b"ok")
    os.close(write_fd)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tele.vif.helper", description=__doc__)
    parser.add_argument("--socket", required=True, help="The daemon's helper.sock.")
    parser.add_argument("--daemon-pid", type=int, required=True)
    parser.add_argument("--log-file", default="")
    parser.add_argument(
        "--foreground", action="store_true", help="Do not detach (print 'ready' instead)."
    )
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    if args.foreground:
        try:
            sock = connect(Path(args.socket), args.daemon_pid)
        except HelperError as exc:
            print(f"tele helper: {exc}", file=sys.stderr)
            return 1
        print("ready", flush=True)
    else:
        sock = _detach_and_connect(args)
    _setup_logging(args.log_file, _peer_uid(sock))
    log.info("serving daemon pid %d on %s", args.daemon_pid, args.socket)
    journal.use_file_name(JOURNAL_FILE)
    try:
        for line in journal.recover():
            log.info("cleaned up after an earlier helper: %s", line)
        Helper(sock).serve()
    except SystemExit:
        log.info("stopped by a signal")
    except Exception:
        log.exception("the helper failed")
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
