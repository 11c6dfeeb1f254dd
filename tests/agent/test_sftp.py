"""The agent's SFTP process (tele.agent.sftp) attacked as a hostile client would: the real
process, chrooted and non-root as the agent starts it (tele.agent.files.Export), driven over a
socket pair with hand-made SFTP requests. `..`, absolute paths, symlinks pointing out, the
agent's token next to the export, /proc: all refused; writes only where Remote; bounded."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tele.agent import sftp
from tele.agent.files import Export

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the file server chroots: needs root")

SECRET = b"the agent's token"


class Client:
    """A minimal SFTP v3 client that sends whatever a test asks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.next_id = 0

    def frame(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def reply(self) -> tuple[int, sftp.Reader]:
        head = self._exactly(4)
        body = self._exactly(struct.unpack(">I", head)[0])
        return body[0], sftp.Reader(body[1:])

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("the server closed the connection")
            data += chunk
        return data

    def call(self, kind: int, *fields: bytes) -> tuple[int, sftp.Reader]:
        self.next_id += 1
        self.frame(bytes([kind]) + sftp.u32(self.next_id) + b"".join(fields))
        kind, reader = self.reply()
        assert reader.u32() == self.next_id
        return kind, reader

    def status(self, kind: int, *fields: bytes) -> int:
        got, reader = self.call(kind, *fields)
        assert got == sftp.STATUS, got
        return reader.u32()

    def open(self, path: bytes, flags: int = sftp.FXF_READ) -> tuple[int, bytes]:
        """(STATUS code or -1, handle)."""
        got, reader = self.call(sftp.OPEN, sftp.string(path), sftp.u32(flags), sftp.u32(0))
        if got == sftp.HANDLE:
            return -1, reader.string()
        return reader.u32(), b""

    def read_file(self, path: bytes) -> bytes | int:
        code, handle = self.open(path)
        if code != -1:
            return code
        got, reader = self.call(
            sftp.READ, sftp.string(handle), struct.pack(">Q", 0), sftp.u32(4096)
        )
        self.status(sftp.CLOSE, sftp.string(handle))
        return reader.string() if got == sftp.DATA else reader.u32()

    def write_file(self, path: bytes, data: bytes) -> int:
        flags = sftp.FXF_WRITE | sftp.FXF_CREAT | sftp.FXF_TRUNC
        code, handle = self.open(path, flags)
        if code != -1:
            return code
        code = self.status(sftp.WRITE, sftp.string(handle), struct.pack(">Q", 0), sftp.string(data))
        self.status(sftp.CLOSE, sftp.string(handle))
        return code

    def stat(self, path: bytes) -> int:
        got, reader = self.call(sftp.STAT, sftp.string(path))
        return -1 if got == sftp.ATTRS else reader.u32()

    def listdir(self, path: bytes) -> list[bytes]:
        got, reader = self.call(sftp.OPENDIR, sftp.string(path))
        assert got == sftp.HANDLE
        handle = reader.string()
        names = []
        while True:
            got, reader = self.call(sftp.READDIR, sftp.string(handle))
            if got == sftp.STATUS:
                break
            for _ in range(reader.u32()):
                names.append(reader.string())
                reader.string(), reader.attrs()
        self.status(sftp.CLOSE, sftp.string(handle))
        return names


@pytest.fixture
def agent_fs(tmp_path: Path) -> Path:
    """An agent's filesystem in small: its token beside /tel_app_mounts, container `app` with a
    read-only Secret volume and a Remote emptyDir, symlinks planted in the emptyDir."""
    (tmp_path / "token").write_bytes(SECRET)
    app = tmp_path / "tel_app_mounts" / "app"
    (app / "etc" / "creds").mkdir(parents=True)
    (app / "etc" / "creds" / "password").write_bytes(b"app password")
    scratch = app / "scratch"
    scratch.mkdir()
    scratch.chmod(0o777)
    (scratch / "up").symlink_to("../../../token")
    (scratch / "abs").symlink_to(str(tmp_path / "token"))
    (scratch / "root").symlink_to("/")
    os.mkfifo(scratch / "fifo")
    return tmp_path


def _serve(export: Export) -> Iterator[Client]:
    ours, theirs = socket.socketpair()
    process = subprocess.Popen(export.command(), stdin=theirs, stdout=theirs)
    theirs.close()
    ours.settimeout(20)
    try:
        client = Client(ours)
        client.frame(bytes([sftp.INIT]) + sftp.u32(3))
        kind, reader = client.reply()
        assert kind == sftp.VERSION and reader.u32() == 3
        yield client
    finally:
        ours.close()
        try:
            process.wait(timeout=10)
        finally:
            if process.returncode is None:
                process.kill()
                process.wait()


@pytest.fixture
def client(agent_fs: Path) -> Iterator[Client]:
    root = str(agent_fs / "tel_app_mounts" / "app")
    yield from _serve(Export(root=root, read_only=False, writable=("/scratch",)))


def test_the_exported_files_are_served(client: Client) -> None:
    assert client.read_file(b"/etc/creds/password") == b"app password"
    assert client.read_file(b"etc/creds/password") == b"app password"
    assert sorted(client.listdir(b"/")) == [b".", b"..", b"etc", b"scratch"]


@pytest.mark.parametrize(
    "path",
    [
        b"../token",
        b"../../token",
        b"/../token",
        b"/etc/../../token",
        b"scratch/../../../../../token",
        b"/proc/self/environ",
        b"/proc/1/root/etc/hostname",
        b"/var/run/secrets/kubernetes.io/serviceaccount/token",
        b"/scratch/up",  # symlink ../../../token
        b"/scratch/abs",  # symlink to the token's absolute path
        b"/scratch/root/token",  # symlink to /
        b"/scratch/root/../token",
    ],
)
def test_nothing_outside_the_container_export_is_reachable(
    client: Client, agent_fs: Path, path: bytes
) -> None:
    assert client.read_file(path) == sftp.NO_SUCH_FILE
    assert client.stat(path) == sftp.NO_SUCH_FILE


def test_listing_parent_directories_shows_the_export_only(client: Client) -> None:
    assert sorted(client.listdir(b"/..")) == sorted(client.listdir(b"/"))
    assert sorted(client.listdir(b"/scratch/root/..")) == [b".", b"..", b"etc", b"scratch"]


def test_realpath_and_readlink_stay_inside(client: Client) -> None:
    got, reader = client.call(sftp.REALPATH, sftp.string(b"../../.."))
    assert got == sftp.NAME and reader.u32() == 1 and reader.string() == b"/"
    got, reader = client.call(sftp.REALPATH, sftp.string(b"/scratch/up"))
    assert got == sftp.NAME and reader.u32() == 1 and reader.string() == b"/token"


def test_writes_only_below_remote_volumes_and_as_a_non_root_user(
    client: Client, agent_fs: Path
) -> None:
    app = agent_fs / "tel_app_mounts" / "app"
    assert client.write_file(b"/scratch/note", b"from the laptop") == sftp.OK
    written = app / "scratch" / "note"
    assert written.read_bytes() == b"from the laptop"
    assert (written.stat().st_uid, written.stat().st_gid) == (sftp.DEFAULT_USER,) * 2
    # Not a Remote volume: refused by the server; and by the kernel for this user anyway.
    assert client.write_file(b"/etc/creds/password", b"x") == sftp.PERMISSION_DENIED
    assert client.write_file(b"/scratch/../etc/evil", b"x") == sftp.PERMISSION_DENIED
    assert client.status(sftp.MKDIR, sftp.string(b"/evil"), sftp.u32(0)) == sftp.PERMISSION_DENIED
    assert client.status(sftp.REMOVE, sftp.string(b"/etc/creds/password")) == (
        sftp.PERMISSION_DENIED
    )
    # Through a symlink inside the writable volume to the export's root: the kernel refuses
    # (the root is root's and the server is not root).
    assert client.write_file(b"/scratch/root/evil", b"x") == sftp.PERMISSION_DENIED
    assert not (app / "evil").exists() and not (app / "etc" / "evil").exists()
    assert (app / "etc" / "creds" / "password").read_bytes() == b"app password"
    # A symlink the client plants pointing out leads nowhere outside either.
    assert client.status(sftp.SYMLINK, sftp.string(b"/../token"), sftp.string(b"/scratch/t")) == 0
    assert client.read_file(b"/scratch/t") == sftp.NO_SUCH_FILE
    assert (agent_fs / "token").read_bytes() == SECRET


def test_a_read_only_export_refuses_every_write(agent_fs: Path) -> None:
    root = str(agent_fs / "tel_app_mounts" / "app")
    for client in _serve(Export(root=root, read_only=True)):
        assert client.read_file(b"/etc/creds/password") == b"app password"
        assert client.write_file(b"/scratch/note", b"x") == sftp.PERMISSION_DENIED
        assert client.status(sftp.MKDIR, sftp.string(b"/scratch/d"), sftp.u32(0)) == 3
        rename = sftp.string(b"posix-rename@openssh.com")
        paths = sftp.string(b"/scratch/up") + sftp.string(b"/scratch/up2")
        assert client.status(sftp.EXTENDED, rename, paths) == sftp.PERMISSION_DENIED
    assert not (agent_fs / "tel_app_mounts" / "app" / "scratch" / "note").exists()


def test_special_files_are_not_opened(client: Client) -> None:
    # A FIFO would block the server forever.
    assert client.read_file(b"/scratch/fifo") == sftp.PERMISSION_DENIED


def test_hostile_frames_end_only_their_request_or_connection(client: Client) -> None:
    # A truncated request is a BAD_MESSAGE, the connection goes on.
    client.next_id += 1
    client.frame(bytes([sftp.OPEN]) + sftp.u32(client.next_id) + sftp.u32(1000))
    kind, reader = client.reply()
    assert kind == sftp.STATUS and reader.u32() == client.next_id
    assert reader.u32() == sftp.BAD_MESSAGE
    assert client.status(sftp.CLOSE, sftp.string(b"no such handle")) == sftp.FAILURE
    assert client.status(99) == sftp.OP_UNSUPPORTED
    # Handles are bounded.
    codes = [client.open(b"/etc/creds/password")[0] for _ in range(sftp.MAX_HANDLES + 1)]
    assert codes[: sftp.MAX_HANDLES] == [-1] * sftp.MAX_HANDLES
    assert codes[-1] == sftp.FAILURE
    # A frame longer than the limit ends the connection.
    client.sock.sendall(struct.pack(">I", sftp.MAX_PACKET + 1) + b"\x03")
    with pytest.raises((EOFError, ConnectionResetError)):
        client.reply()


def test_without_the_privilege_to_confine_it_serves_nothing(agent_fs: Path) -> None:
    root = str(agent_fs / "tel_app_mounts" / "app")
    export = Export(root=root, uid=0, gid=0)  # root is refused: the server never stays root
    ours, theirs = socket.socketpair()
    with ours, theirs:
        done = subprocess.run(
            export.command(),
            stdin=theirs,
            stdout=theirs,
            capture_output=False,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1
    assert b"must not run as root" in done.stderr and b"Traceback" not in done.stderr
