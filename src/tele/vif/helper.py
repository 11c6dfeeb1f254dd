"""The privileged helper: `python -m tele.vif.helper`, started by `tele connect` through sudo
when the daemon lacks CAP_NET_ADMIN.

It connects to the daemon's `helper.sock` (checking that the socket belongs to the daemon's
pid), detaches from the terminal once the daemon has welcomed it, and then does only what needs
privilege, on the daemon's request: create and address the TUN device, add and remove routes,
bind the DNS sockets, point the resolver at tele's DNS server. Descriptors go to the daemon
(SCM_RIGHTS) and the helper closes its own copies: no packet is ever read or written as root.
When the daemon says Finish, closes the connection or dies, the helper undoes every change and
exits. Its changes are journaled apart from the daemon's (one journal per user in root's own
state directory), so a helper killed with `kill -9` is cleaned up after by the next one, which
leaves a live helper's entries alone.

Trust: the helper runs as root for whoever sudo let start it, and believes nothing else.
- The user is the one sudo names (`SUDO_UID`; `PKEXEC_UID`, `DOAS_USER` likewise), never an
  argument. The daemon socket is connected with that user's permissions and its peer must run
  as that user: descriptors go only to that user's daemon. `--socket` and `--daemon-pid` only
  say where to look.
- It opens no file at a path from its command line or environment: the log is the descriptor
  the CLI (running as the user) passes as standard output; the journal and resolv.conf backups
  live in root's own state directory, found through the password database.
- Routes and the device address must lie inside ALLOWED_SUBNETS (private and reserved ranges),
  narrowed further by an administrator in ALLOWED_SUBNETS_FILE (root's file). The helper cannot
  ask the cluster which subnets are real (that needs the user's credentials, and the user drives
  the daemon that would tell it), so the bound is one the caller cannot widen: default-like
  routes (0.0.0.0/1, 128.0.0.0/1, ::/1) or public ranges are refused whatever the daemon asks.
  DNS is bound and pointed only at the device's own address.

Blocking and single-threaded on purpose: one request at a time, no event loop to get wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import pwd
import re
import signal
import socket
import stat
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn

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
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

ALLOWED_SUBNETS: Final = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",  # RFC 1918: where clusters put pods and Services
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # RFC 6598 (shared address space; some clusters use it)
        "198.18.0.0/15",  # RFC 2544 benchmarking: tele's own device and DNS address
        "240.0.0.0/4",  # RFC 1112 reserved, never routed on the internet: VNAT's virtual IPs
        "fc00::/7",  # IPv6 unique local addresses
    )
)
"""Where the helper lets routes and the device address go, unless ALLOWED_SUBNETS_FILE says
otherwise. Never anything default-like: a caller must not be able to route the internet (or
one public host) into a TUN device it reads."""
ALLOWED_SUBNETS_FILE: Final = Path("/etc/tele/helper-subnets")
"""One CIDR a line (`#` comments): replaces ALLOWED_SUBNETS when it exists and only root can
change it (owned by root, not writable by group or others, nor its directory)."""


@dataclass(frozen=True, slots=True)
class Invoker:
    """The user on whose behalf the helper runs, as the elevating command reported it."""

    uid: int
    gid: int
    home: Path

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Invoker:
        """`SUDO_UID`/`SUDO_GID` (sudo sets them after cleaning the environment), `PKEXEC_UID`,
        `DOAS_USER`; without them the real uid (root starting the helper itself)."""
        env = os.environ if environ is None else environ
        uid: int | None = None
        try:
            if env.get("SUDO_UID"):
                uid = int(env["SUDO_UID"])
            elif env.get("PKEXEC_UID"):
                uid = int(env["PKEXEC_UID"])
            elif env.get("DOAS_USER"):
                uid = pwd.getpwnam(env["DOAS_USER"]).pw_uid
        except (ValueError, KeyError) as exc:
            raise HelperError(f"cannot tell who started the helper: {exc}") from None
        if uid is None:
            uid = os.getuid()
        try:
            entry = pwd.getpwuid(uid)
            gid, home = entry.pw_gid, Path(entry.pw_dir)
        except KeyError:  # a user without a passwd entry (containers): no home to look in
            gid, home = uid, Path("/nonexistent")
        return cls(uid, gid, home)

    def default_socket(self) -> Path:
        """The daemon's helper.sock where a daemon of this user puts it by default (the
        runtime directory of systemd-logind, else the cache directory)."""
        run = Path(f"/run/user/{self.uid}")
        if run.is_dir():
            return run / "tele" / proto.SOCKET_NAME
        return self.home / ".cache" / "tele" / "run" / proto.SOCKET_NAME

    @contextlib.contextmanager
    def permissions(self) -> Iterator[None]:
        """Run the block with this user's file permissions (effective uid, gid, no groups), so
        that a path the user names reaches nothing the user could not reach."""
        if os.geteuid() != 0 or self.uid == 0:
            yield
            return
        groups = os.getgroups()
        os.setgroups([])
        os.setegid(self.gid)
        os.seteuid(self.uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups(groups)


def state_dir() -> Path:
    """Root's (the helper's own user's) state directory, from the password database: never
    from the environment, which the caller may have passed through sudo."""
    return Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".local" / "state" / "tele" / "helper"


def journal_file(uid: int) -> Path:
    return state_dir() / f"journal-{uid}.json"


def allowed_subnets(path: Path = ALLOWED_SUBNETS_FILE) -> list[Network]:
    """ALLOWED_SUBNETS, or the administrator's list when root alone can change it."""
    try:
        info = path.lstat()
        parent = path.parent.lstat()
    except OSError:
        return list(ALLOWED_SUBNETS)
    if not stat.S_ISREG(info.st_mode) or any(
        i.st_uid != 0 or i.st_mode & 0o022 for i in (info, parent)
    ):
        log.warning("ignoring %s: it must be root's and writable only by root", path)
        return list(ALLOWED_SUBNETS)
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    try:
        return parse_networks(line for line in lines if line)
    except ValueError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return list(ALLOWED_SUBNETS)


def check_inside(kind: str, networks: list[Network], allowed: list[Network]) -> None:
    """Refuse any network that is not inside one of `allowed`."""
    for net in networks:
        if not any(net.version == a.version and net.subnet_of(a) for a in allowed):  # type: ignore[arg-type]
            raise HelperError(
                f"refusing the {kind} {net}: the helper only routes inside "
                f"{', '.join(map(str, allowed))} (see {ALLOWED_SUBNETS_FILE})"
            )


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

    def __init__(self, sock: socket.socket, allowed: list[Network] | None = None) -> None:
        self.sock = sock
        self.changes = Changes()
        self.allowed = list(ALLOWED_SUBNETS) if allowed is None else allowed
        self._netns_set = False
        self._addresses: set[str] = set()
        """The device's addresses: the only ones DNS may be bound on and pointed at."""

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
            check_inside("route", config.subnets, self.allowed)
            addresses = [config.address, config.address6]
            check_inside(
                "device address", [ipaddress.ip_network(a) for a in addresses if a], self.allowed
            )
            self._addresses = {str(a) for a in addresses if a}
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
            check_inside("route", add, self.allowed)
            remove = parse_networks(request.remove)
            allow = parse_networks(request.allow_conflicting)
            added = change_routes(changes.netns, changes.device, add, remove, allow)
            changes.routes = [n for n in changes.routes if n not in remove] + added
            changes.journal_device()
            log.info("routes of %s: added %s, removed %s", changes.device, added, remove)
            return proto.RoutesChanged(added=[str(n) for n in added]), []
        if isinstance(request, proto.BindDns):
            netns = self._use_netns(changes.netns if self._netns_set else None)
            self._check_dns_address(request.address)
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
            self._check_dns_address(request.server)
            for domain in request.search:
                _check_name("search domain", domain)
            path = system.resolv_conf_for(changes.netns)
            # Root's state dir, never beside the file: /etc may be shared with other namespaces.
            backup = state_dir() / f"resolv.conf.{changes.netns or 'host'}.tele-orig"
            paths.ensure_private_dir(backup.parent)
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

    def _check_dns_address(self, address: str) -> None:
        """DNS belongs on the device this helper made, nowhere else (port 53 of any address,
        or a resolver pointing anywhere, would be the caller's to choose)."""
        canonical = str(ipaddress.ip_address(address))
        if canonical not in self._addresses:
            raise HelperError(f"refusing DNS on {address}: not an address of this helper's device")


def connect(path: Path, daemon_pid: int | None, invoker: Invoker) -> socket.socket:
    """Connect to the daemon's helper socket with the invoking user's permissions, and check
    that the process listening there runs as that user (and is `daemon_pid`, when given)
    before saying anything."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            with invoker.permissions():
                sock.connect(str(path))
        except OSError as exc:
            raise HelperError(f"cannot reach the daemon at {path}: {exc.strerror}") from exc
        from tele.unixsock import peer_credentials

        peer = peer_credentials(sock)
        if peer.uid != invoker.uid:
            raise HelperError(
                f"{path} belongs to a process of uid {peer.uid}, not to the daemon of the user "
                f"who started the helper (uid {invoker.uid})"
            )
        if daemon_pid is not None and peer.pid != daemon_pid:
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


def _on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through Helper.serve's undo


def _log_stream(fd: int, owner: int) -> int | None:
    """A copy of `fd` to log to when it is a regular file of the invoking user's (the CLI opens
    helper.log as the user and passes it as standard output); None otherwise. The helper
    itself never opens a log by path: as root, that would create or append to any file."""
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != owner:
        return None
    return os.dup(fd)


LOG_LEVELS = ("trace", "debug", "info", "warning", "error")


def _setup_logging(log_fd: int | None, level: str = "info") -> None:
    handlers: list[logging.Handler] = []
    if log_fd is not None:
        handlers.append(logging.StreamHandler(os.fdopen(log_fd, "a", buffering=1)))
    logging.basicConfig(
        level=logging.DEBUG if level == "trace" else level.upper(),
        format=f"%(asctime)s helper[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        handlers=handlers or [logging.NullHandler()],
    )


def _detach_and_connect(args: argparse.Namespace, invoker: Invoker) -> socket.socket:
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
        sock = connect(args.socket, args.daemon_pid, invoker)
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
    parser.add_argument(
        "--socket",
        type=Path,
        help="The daemon's helper.sock (default: in the invoking user's runtime directory); "
        "connected with that user's permissions, and its listener must run as that user.",
    )
    parser.add_argument("--daemon-pid", type=int, help="Refuse a socket of any other process.")
    parser.add_argument(
        "--foreground", action="store_true", help="Do not detach (print 'ready' instead)."
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="The helper log's level (the CLI passes config logLevels.rootDaemon).",
    )
    args = parser.parse_args(argv)
    try:
        invoker = Invoker.from_environment()
    except HelperError as exc:
        print(f"tele helper: {exc}", file=sys.stderr)
        return 1
    args.socket = args.socket or invoker.default_socket()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    log_fd = _log_stream(1, invoker.uid)  # before detaching points 1 at /dev/null
    if args.foreground:
        try:
            sock = connect(args.socket, args.daemon_pid, invoker)
        except HelperError as exc:
            print(f"tele helper: {exc}", file=sys.stderr)
            return 1
        print("ready", file=sys.stderr, flush=True)
    else:
        sock = _detach_and_connect(args, invoker)
    _setup_logging(log_fd, args.log_level)
    log.info("serving the daemon of uid %d on %s", invoker.uid, args.socket)
    journal.use_file(journal_file(invoker.uid))
    try:
        for line in journal.recover():
            log.info("cleaned up after an earlier helper: %s", line)
        Helper(sock, allowed_subnets()).serve()
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
