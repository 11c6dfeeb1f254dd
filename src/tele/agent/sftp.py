"""The agent's SFTP server for one connection, confined by the kernel: `python -m tele.agent.sftp`.

The file server (tele.agent.files) starts one of these processes per accepted connection, with
the socket as its stdin and stdout. Before it reads a byte from the peer the process
`chroot`s into the container's export directory (/tel_app_mounts/<container>) and drops to a
non-root user (the app container's, else tele's image user 65532) with no supplementary groups
but the pod's fsGroup: from then on `..`, absolute paths and symlinks pointing out all resolve
inside that directory (the kernel does it, not a path check of ours), /proc, the agent's own
token and the rest of the agent's filesystem do not exist for it, and having given up root it
cannot leave the chroot again. The agent container keeps the default capabilities
(CAP_SYS_CHROOT, CAP_SETUID, CAP_SETGID) for this one step; nothing else runs as root.

Why not OpenSSH's sftp-server: it has no chroot of its own (sshd does it, for internal-sftp),
and a dynamically linked program cannot be exec'ed inside a directory that holds none of its
libraries, while this process imports everything first and chroots afterwards. The protocol is
SFTP version 3 (draft-ietf-secsh-filexfer-02) with the OpenSSH extensions sshfs uses
(posix-rename, statvfs, fstatvfs, hardlink, fsync).

Writes: none at all with `--read-only` (every export of the container is RemoteReadOnly, or the
agent was told so); otherwise only below the `--writable` paths (the Remote mounts), while
RemoteReadOnly volumes are read-only bind mounts the kernel enforces anyway. Only regular files
and directories are opened (a FIFO or device would block or reach a device). Every length the
peer sends is bounded (MAX_PACKET, MAX_HANDLES, MAX_READ); a malformed request is answered
BAD_MESSAGE, a malformed frame ends the connection.
"""

from __future__ import annotations

import argparse
import errno
import os
import posixpath
import socket
import ssl
import stat
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Packet types (draft-ietf-secsh-filexfer-02).
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE, MKDIR, RMDIR = 9, 10, 11, 12, 13, 14, 15
REALPATH, STAT, RENAME, READLINK, SYMLINK = 16, 17, 18, 19, 20
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
EXTENDED, EXTENDED_REPLY = 200, 201

OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8

ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8
ATTR_EXTENDED = 0x80000000

FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 1, 2, 4, 8, 0x10, 0x20

MAX_PACKET = 256 * 1024 + 1024
"""Largest request accepted (OpenSSH's limit); a longer frame ends the connection."""
MAX_READ = 256 * 1024
MAX_HANDLES = 256
READDIR_BATCH = 100
HANDSHAKE_TIMEOUT = 10.0
DEFAULT_USER = 65532
"""tele's image user: who the server is when the app container names no non-root user."""
EXTENSIONS = (
    (b"posix-rename@openssh.com", b"1"),
    (b"statvfs@openssh.com", b"2"),
    (b"fstatvfs@openssh.com", b"2"),
    (b"hardlink@openssh.com", b"1"),
    (b"fsync@openssh.com", b"1"),
)
_WRITE_FLAGS = FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC


class BadMessage(Exception):
    """The request does not parse."""


class Refused(Exception):
    """A status to answer with (code, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise BadMessage("truncated request")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.u32())

    def path(self) -> bytes:
        path = self.string()
        if b"\x00" in path:
            raise BadMessage("a path with a NUL byte")
        return path or b"."

    def attrs(self) -> dict[str, int]:
        flags = self.u32()
        found: dict[str, int] = {}
        if flags & ATTR_SIZE:
            found["size"] = self.u64()
        if flags & ATTR_UIDGID:
            found["uid"], found["gid"] = self.u32(), self.u32()
        if flags & ATTR_PERMISSIONS:
            found["mode"] = self.u32()
        if flags & ATTR_ACMODTIME:
            found["atime"], found["mtime"] = self.u32(), self.u32()
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string(), self.string()
        return found


def u32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def string(value: bytes) -> bytes:
    return u32(len(value)) + value


def encode_attrs(st: os.stat_result | None) -> bytes:
    if st is None:
        return u32(0)
    return (
        u32(ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME)
        + struct.pack(">Q", max(st.st_size, 0))
        + u32(st.st_uid)
        + u32(st.st_gid)
        + u32(st.st_mode)
        + u32(int(st.st_atime))
        + u32(int(st.st_mtime))
    )


def longname(name: bytes, st: os.stat_result) -> bytes:
    """`ls -l`'s line, as SFTP v3 clients show it (sshfs ignores it)."""
    return b"%s %3d %-8d %-8d %8d %s" % (
        stat.filemode(st.st_mode).encode(),
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        name,
    )


def status_of(exc: OSError) -> Refused:
    code = {
        errno.ENOENT: NO_SUCH_FILE,
        errno.ENOTDIR: NO_SUCH_FILE,
        errno.ELOOP: NO_SUCH_FILE,
        errno.EACCES: PERMISSION_DENIED,
        errno.EPERM: PERMISSION_DENIED,
        errno.EROFS: PERMISSION_DENIED,
    }.get(exc.errno or 0, FAILURE)
    return Refused(code, exc.strerror or "failure")


@dataclass
class Handle:
    path: bytes
    fd: int = -1
    entries: Iterator[bytes] | None = None


@dataclass
class Server:
    """SFTP v3 requests -> replies against the process's (already confined) filesystem."""

    read_only: bool = False
    writable: tuple[bytes, ...] = ()
    """Paths below which writes are allowed (lexically; the kernel judges the rest)."""
    handles: dict[bytes, Handle] = field(default_factory=dict)
    next_handle: int = 0

    def handle_packet(self, packet: bytes) -> bytes:
        """One request (type byte onwards) -> one reply (type byte onwards)."""
        reader = Reader(packet)
        kind = reader.take(1)[0]
        if kind == INIT:
            reader.u32()
            return (
                bytes([VERSION]) + u32(3) + b"".join(string(n) + string(v) for n, v in EXTENSIONS)
            )
        request_id = reader.u32()
        try:
            return self._dispatch(kind, request_id, reader)
        except BadMessage as exc:
            return self._status(request_id, BAD_MESSAGE, str(exc))
        except Refused as exc:
            return self._status(request_id, exc.code, exc.message)
        except OSError as exc:
            refused = status_of(exc)
            return self._status(request_id, refused.code, refused.message)

    def close_all(self) -> None:
        for handle in self.handles.values():
            if handle.fd >= 0:
                os.close(handle.fd)
        self.handles.clear()

    # --- replies ------------------------------------------------------------------------------

    @staticmethod
    def _status(request_id: int, code: int, message: str = "") -> bytes:
        text = message or ("Success" if code == OK else "Failure")
        return bytes([STATUS]) + u32(request_id) + u32(code) + string(text.encode()) + string(b"")

    @staticmethod
    def _names(request_id: int, entries: list[tuple[bytes, bytes, bytes]]) -> bytes:
        body = b"".join(string(n) + string(long) + attrs for n, long, attrs in entries)
        return bytes([NAME]) + u32(request_id) + u32(len(entries)) + body

    # --- checks -------------------------------------------------------------------------------

    def _may_write(self, path: bytes) -> None:
        if self.read_only:
            raise Refused(PERMISSION_DENIED, "these volumes are exported read-only")
        where = posixpath.normpath(posixpath.join(b"/", path))
        if not any(where == w or where.startswith(w.rstrip(b"/") + b"/") for w in self.writable):
            raise Refused(PERMISSION_DENIED, "not inside a volume exported read-write")

    def _new_handle(self, handle: Handle) -> bytes:
        if len(self.handles) >= MAX_HANDLES:
            if handle.fd >= 0:
                os.close(handle.fd)
            raise Refused(FAILURE, "too many open handles")
        self.next_handle += 1
        key = str(self.next_handle).encode()
        self.handles[key] = handle
        return key

    def _handle(self, reader: Reader, *, directory: bool) -> Handle:
        handle = self.handles.get(reader.string())
        if handle is None or (handle.entries is not None) != directory:
            raise Refused(FAILURE, "no such handle")
        return handle

    # --- requests -----------------------------------------------------------------------------

    def _dispatch(self, kind: int, request_id: int, reader: Reader) -> bytes:
        ok = self._status(request_id, OK)
        if kind == OPEN:
            path, pflags, attrs = reader.path(), reader.u32(), reader.attrs()
            if pflags & _WRITE_FLAGS:
                self._may_write(path)
            access = pflags & (FXF_READ | FXF_WRITE)
            flags = {FXF_WRITE: os.O_WRONLY, FXF_READ | FXF_WRITE: os.O_RDWR}.get(access, 0)
            flags |= os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
            flags |= os.O_CREAT if pflags & FXF_CREAT else 0
            flags |= os.O_TRUNC if pflags & FXF_TRUNC else 0
            flags |= os.O_EXCL if pflags & FXF_EXCL else 0
            flags |= os.O_APPEND if pflags & FXF_APPEND else 0
            fd = os.open(path, flags, attrs.get("mode", 0o666) & 0o7777)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise Refused(PERMISSION_DENIED, "only regular files can be opened")
            os.set_blocking(fd, True)
            return bytes([HANDLE]) + u32(request_id) + string(self._new_handle(Handle(path, fd)))
        if kind == CLOSE:
            key = reader.string()
            handle = self.handles.pop(key, None)
            if handle is None:
                raise Refused(FAILURE, "no such handle")
            if handle.fd >= 0:
                os.close(handle.fd)
            return ok
        if kind == READ:
            handle, offset, length = (
                self._handle(reader, directory=False),
                reader.u64(),
                reader.u32(),
            )
            data = os.pread(handle.fd, min(length, MAX_READ), offset)
            if not data:
                raise Refused(EOF, "end of file")
            return bytes([DATA]) + u32(request_id) + string(data)
        if kind == WRITE:
            handle, offset, data = (
                self._handle(reader, directory=False),
                reader.u64(),
                reader.string(),
            )
            while data:
                written = os.pwrite(handle.fd, data, offset)
                data, offset = data[written:], offset + written
            return ok
        if kind in (LSTAT, STAT):
            path = reader.path()
            st = os.lstat(path) if kind == LSTAT else os.stat(path)
            return bytes([ATTRS]) + u32(request_id) + encode_attrs(st)
        if kind == FSTAT:
            handle = self._handle(reader, directory=False)
            return bytes([ATTRS]) + u32(request_id) + encode_attrs(os.fstat(handle.fd))
        if kind == SETSTAT:
            path, attrs = reader.path(), reader.attrs()
            self._may_write(path)
            self._setstat(path, attrs)
            return ok
        if kind == FSETSTAT:
            handle, attrs = self._handle(reader, directory=False), reader.attrs()
            self._may_write(handle.path)
            self._setstat(handle.fd, attrs)
            return ok
        if kind == OPENDIR:
            path = reader.path()
            if not stat.S_ISDIR(os.stat(path).st_mode):
                raise Refused(NO_SUCH_FILE, "not a directory")
            names = [b".", b"..", *sorted(os.listdir(path))]
            return (
                bytes([HANDLE])
                + u32(request_id)
                + string(self._new_handle(Handle(path, entries=iter(names))))
            )
        if kind == READDIR:
            handle = self._handle(reader, directory=True)
            assert handle.entries is not None
            entries = []
            for name in handle.entries:
                try:
                    st = os.lstat(posixpath.join(handle.path, name))
                except OSError:
                    continue  # gone meanwhile
                entries.append((name, longname(name, st), encode_attrs(st)))
                if len(entries) >= READDIR_BATCH:
                    break
            if not entries:
                raise Refused(EOF, "end of directory")
            return self._names(request_id, entries)
        if kind == REMOVE:
            path = reader.path()
            self._may_write(path)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise Refused(FAILURE, "is a directory")
            os.unlink(path)
            return ok
        if kind == MKDIR:
            path, attrs = reader.path(), reader.attrs()
            self._may_write(path)
            os.mkdir(path, attrs.get("mode", 0o777) & 0o7777)
            return ok
        if kind == RMDIR:
            path = reader.path()
            self._may_write(path)
            os.rmdir(path)
            return ok
        if kind == REALPATH:
            path = reader.path()
            resolved = posixpath.realpath(posixpath.join(b"/", path))
            return self._names(request_id, [(resolved, resolved, encode_attrs(None))])
        if kind == RENAME:
            old, new = reader.path(), reader.path()
            self._may_write(old)
            self._may_write(new)
            if os.path.lexists(new):
                raise Refused(FAILURE, "the target exists")
            os.rename(old, new)
            return ok
        if kind == READLINK:
            target = os.readlink(reader.path())
            return self._names(request_id, [(target, target, encode_attrs(None))])
        if kind == SYMLINK:
            # OpenSSH's order (which sshfs follows): target first, then the link's path.
            target, link = reader.path(), reader.path()
            self._may_write(link)
            os.symlink(target, link)
            return ok
        if kind == EXTENDED:
            return self._extended(request_id, reader.string(), reader)
        raise Refused(OP_UNSUPPORTED, "operation not supported")

    def _extended(self, request_id: int, name: bytes, reader: Reader) -> bytes:
        ok = self._status(request_id, OK)
        if name == b"posix-rename@openssh.com":
            old, new = reader.path(), reader.path()
            self._may_write(old)
            self._may_write(new)
            os.rename(old, new)
            return ok
        if name == b"hardlink@openssh.com":
            old, new = reader.path(), reader.path()
            self._may_write(new)
            os.link(old, new, follow_symlinks=False)
            return ok
        if name == b"fsync@openssh.com":
            os.fsync(self._handle(reader, directory=False).fd)
            return ok
        if name in (b"statvfs@openssh.com", b"fstatvfs@openssh.com"):
            if name.startswith(b"f"):
                vfs = os.fstatvfs(self._handle(reader, directory=False).fd)
            else:
                vfs = os.statvfs(reader.path())
            values = (
                vfs.f_bsize,
                vfs.f_frsize,
                vfs.f_blocks,
                vfs.f_bfree,
                vfs.f_bavail,
                vfs.f_files,
                vfs.f_ffree,
                vfs.f_favail,
                vfs.f_fsid,
                (1 if self.read_only else 0) | (vfs.f_flag & 1),
                vfs.f_namemax,
            )
            return bytes([EXTENDED_REPLY]) + u32(request_id) + struct.pack(">11Q", *values)
        raise Refused(OP_UNSUPPORTED, "extension not supported")

    @staticmethod
    def _setstat(target: bytes | int, attrs: dict[str, int]) -> None:
        if "size" in attrs:
            os.truncate(target, attrs["size"])
        if "mode" in attrs:
            os.chmod(target, attrs["mode"] & 0o7777)
        if "atime" in attrs:
            os.utime(target, (attrs["atime"], attrs["mtime"]))
        if "uid" in attrs:
            os.chown(target, attrs["uid"], attrs["gid"])


# --- the process --------------------------------------------------------------------------------


def confine(root: str, uid: int, gid: int, groups: list[int]) -> None:
    """chroot into `root` and become `uid`:`gid` for good (OSError if not allowed)."""
    os.chroot(root)
    os.chdir("/")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.geteuid() == 0 or uid == 0:
        raise PermissionError(errno.EPERM, "the file server must not run as root")


class Peer:
    """The connection: the socket on fds 0/1, plain or (mutual) TLS."""

    def __init__(self, tls: ssl.SSLSocket | None = None) -> None:
        self.tls = tls

    def recv(self, n: int) -> bytes:
        return self.tls.recv(n) if self.tls is not None else os.read(0, n)

    def send_all(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.sendall(data)
            return
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]


def tls_context(directory: str) -> ssl.SSLContext:
    """The file server's side of mutual TLS: its key and the certificate the manager issued
    for it, and the manager's CA as the only issuer of acceptable client certificates.
    OSError when the agent has no certificate (yet): it has not arrived at the manager."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"))
    ctx.load_verify_locations(os.path.join(directory, "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED  # the client's chain must lead to the manager's CA
    return ctx


def accept_tls(ctx: ssl.SSLContext, peer_name: str) -> ssl.SSLSocket:
    """Handshake on fd 0 (bounded in time); the client must be `peer_name`."""
    sock = socket.socket(fileno=os.dup(0))
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    tls.settimeout(HANDSHAKE_TIMEOUT)
    tls.do_handshake()
    cert: dict[str, Any] = dict(tls.getpeercert() or {})
    names = [v for rdn in cert.get("subject", ()) for (k, v) in rdn if k == "commonName"]
    if names != [peer_name]:
        raise ssl.SSLError(f"the client certificate names {names}, not {peer_name}")
    tls.settimeout(None)
    return tls


def read_exactly(peer: Peer, n: int) -> bytes | None:
    chunks, want = [], n
    while want:
        chunk = peer.recv(min(want, 65536))
        if not chunk:
            return None
        chunks.append(chunk)
        want -= len(chunk)
    return b"".join(chunks)


def serve(server: Server, peer: Peer) -> None:
    """Requests from the peer, replies to it, until it closes or breaks the framing."""
    try:
        while True:
            head = read_exactly(peer, 4)
            if head is None:
                return
            length = struct.unpack(">I", head)[0]
            if not 1 <= length <= MAX_PACKET:
                sys.stderr.write(f"sftp: a frame of {length} bytes: closing\n")
                return
            packet = read_exactly(peer, length)
            if packet is None:
                return
            try:
                reply = server.handle_packet(packet)
            except BadMessage:
                sys.stderr.write("sftp: a request without an id: closing\n")
                return
            peer.send_all(u32(len(reply)) + reply)
    except OSError:
        return  # the peer went away
    finally:
        server.close_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tele.agent.sftp")
    parser.add_argument("--root", required=True)
    parser.add_argument("--uid", type=int, default=DEFAULT_USER)
    parser.add_argument("--gid", type=int, default=DEFAULT_USER)
    parser.add_argument("--group", type=int, action="append", default=[])
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--writable", action="append", default=[])
    parser.add_argument("--tls-dir", help="mutual TLS with this key, certificate and CA")
    parser.add_argument("--peer-name", default="", help="the client certificate's common name")
    args = parser.parse_args(argv)
    ctx = None
    if args.tls_dir:
        try:
            ctx = tls_context(args.tls_dir)  # before the chroot: the files are outside it
        except (OSError, ssl.SSLError) as exc:
            sys.stderr.write(
                "sftp: refusing a connection: the agent has no certificate from the traffic "
                f"manager ({exc.strerror if isinstance(exc, OSError) else exc})\n"
            )
            return 1
    try:
        confine(args.root, args.uid, args.gid, args.group)
    except OSError as exc:
        sys.stderr.write(
            f"sftp: cannot confine the file server to {args.root} as user {args.uid} "
            f"({exc.strerror or exc}); the agent container needs CAP_SYS_CHROOT, CAP_SETUID "
            "and CAP_SETGID (Kubernetes' defaults) and to start as root\n"
        )
        return 1
    for fd in (0, 1):  # the agent's socket is non-blocking (trio's); this process blocks
        os.set_blocking(fd, True)
    peer = Peer()
    if ctx is not None:
        try:
            peer = Peer(accept_tls(ctx, args.peer_name))
        except (OSError, ssl.SSLError) as exc:
            sys.stderr.write(f"sftp: refusing a connection: TLS: {exc}\n")
            return 1
    server = Server(read_only=args.read_only, writable=tuple(os.fsencode(w) for w in args.writable))
    serve(server, peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
