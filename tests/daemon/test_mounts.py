"""Volumes on the laptop (tele.daemon.mounts) served by the agent's file server
(tele.agent.files): real SFTP processes (tele.agent.sftp, chrooted as the agent runs them) and
sshfs over loopback, with the agent's export directory in a temp dir. The tunnel is left out
here (the relay connects sshfs to the agent directly); the sandbox e2e test
(tests/e2e/test_mounts_on_sandbox.py) goes through it."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio

from tele import paths
from tele.agent.files import Export, serve_files
from tele.daemon import mounts
from tele.daemon.mounts import MountFlag, Mounts, mounted_at
from tele.rpc.agent_api import EngagementInfo
from tele.testing.waits import wait_for

pytestmark = [
    pytest.mark.skipif(
        mounts.mount_problem() is not None,
        reason=f"FUSE mounts with sshfs do not work here: {mounts.mount_problem()}",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the file server chroots: needs root"),
]

SECRET = b"s3cr3t\x00\xffbytes\n"


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """What the agent's /tel_app_mounts looks like: container `app` with two volumes."""
    root = tmp_path / "tel_app_mounts"
    (root / "app" / "etc" / "creds").mkdir(parents=True)
    (root / "app" / "etc" / "creds" / "password").write_bytes(SECRET)
    (root / "app" / "scratch").mkdir()
    (root / "app" / "scratch").chmod(0o777)  # as Kubernetes makes an emptyDir
    return root


def _export(export: Path) -> Export:
    """The agent's file server for container `app`: /scratch is Remote, the rest read-only."""
    return Export(root=str(export / "app"), read_only=False, writable=("/scratch",))


@pytest.fixture
def no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    """Whatever a test mounted under its tmp_path is unmounted at the end, also on failure;
    a test that left one fails."""
    yield
    left = [line for line in _mount_lines() if str(tmp_path) in line or "telfs-" in line]
    for line in left:
        subprocess.run(["umount", "-l", line.split(" ")[4]], check=False)
    assert not left, left


def _mount_lines() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def _info(sftp_port: int, **policies: str) -> EngagementInfo:
    return EngagementInfo(
        id="e1",
        name="echo",
        namespace="default",
        workload="echo",
        workload_kind="Deployment",
        container="app",
        service="echo",
        service_port=80,
        container_port=8080,
        mechanism="tcp",
        client="me@here",
        pod_ips=["127.0.0.1"],
        environment={"GREETING": "hello"},
        mount_policies=policies
        or {"/etc/creds": "RemoteReadOnly", "/scratch": "Remote", "/tmp": "Local"},
        mount_point="/tel_app_mounts/app",
        sftp_port=sftp_port,
    )


async def _direct(host: str, port: int, local: trio.SocketStream) -> None:
    """The relay as the test sees it: the agent listens on this machine, no tunnel."""
    remote = await trio.open_tcp_stream(host, port)

    async def pump(
        source: trio.abc.HalfCloseableStream, sink: trio.abc.HalfCloseableStream
    ) -> None:
        async for chunk in source:
            await sink.send_all(chunk)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await sink.send_eof()

    async with remote, trio.open_nursery() as nursery:
        nursery.start_soon(pump, local, remote)
        nursery.start_soon(pump, remote, local)


@pytest.fixture
async def session_mounts(
    export: Path, no_leftover_mounts: None
) -> AsyncIterator[tuple[Mounts, int]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_files, _export(export), host="127.0.0.1"))
        table = Mounts(_direct)
        await nursery.start(table.serve)
        # The agent's export root is a temp dir: point the mount at it.
        yield table, port
        nursery.cancel_scope.cancel()


def _rooted(info: EngagementInfo, export: Path) -> EngagementInfo:
    return msgspec.structs.replace(info, mount_point="/")  # the server is chrooted there


async def test_a_mounted_secret_reads_the_same_bytes_and_leave_unmounts(
    session_mounts: tuple[Mounts, int], export: Path
) -> None:
    table, port = session_mounts
    info = await table.attach(_rooted(_info(port), export), MountFlag.parse("true"))
    assert info.mount_error == ""
    root = Path(info.local_mount)
    assert mounted_at(root) == "fuse.sshfs"
    assert info.environment["TELEPRESENCE_ROOT"] == str(root)
    assert info.environment["TELEPRESENCE_MOUNTS"] == "/etc/creds:/scratch"
    assert info.environment["TELEPRESENCE_LOCAL_MOUNTS"] == "/tmp"
    assert info.environment["GREETING"] == "hello"
    read = await trio.to_thread.run_sync((root / "etc" / "creds" / "password").read_bytes)
    assert read == SECRET
    # Writes reach the agent's side.
    await trio.to_thread.run_sync((root / "scratch" / "note").write_bytes, b"from the laptop")
    assert (export / "app" / "scratch" / "note").read_bytes() == b"from the laptop"
    assert mounts.pending() == [str(root)]

    await table.detach(info.id)
    assert mounted_at(root) is None
    assert not await trio.Path(root).exists()  # a directory tele made is removed again
    assert mounts.pending() == []


async def test_a_read_only_mount_refuses_writes(
    session_mounts: tuple[Mounts, int], export: Path, tmp_path: Path
) -> None:
    table, port = session_mounts
    where = tmp_path / "mnt"
    where.mkdir()
    info = await table.attach(_rooted(_info(port), export), MountFlag.parse(f"{where}:ro"))
    assert info.local_mount == str(where)
    with pytest.raises(OSError) as refused:
        await trio.to_thread.run_sync((where / "scratch" / "note").write_bytes, b"x")
    assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert not (export / "app" / "scratch" / "note").exists()
    await table.detach(info.id)
    assert mounted_at(where) is None
    assert where.is_dir()  # it existed before: it stays


async def test_mount_false_and_no_remote_volumes_mount_nothing(
    session_mounts: tuple[Mounts, int], export: Path
) -> None:
    table, port = session_mounts
    info = await table.attach(_rooted(_info(port), export), MountFlag.parse("false"))
    assert info.local_mount == "" and info.mount_error == ""
    assert "TELEPRESENCE_ROOT" not in info.environment
    assert info.environment["TELEPRESENCE_MOUNTS"] == "/etc/creds:/scratch"
    local_only = _rooted(_info(port, **{"/tmp": "Local"}), export)
    only_local = await table.attach(local_only, MountFlag())
    assert only_local.local_mount == ""
    assert only_local.environment["TELEPRESENCE_LOCAL_MOUNTS"] == "/tmp"


async def test_an_unreachable_file_server_is_one_sentence_and_no_mount(
    export: Path, tmp_path: Path, no_leftover_mounts: None
) -> None:
    # A port that is bound but not listening refuses connections (and, held, cannot be
    # picked as sshfs's own source port: a freed one could, and TCP would connect to itself).
    with trio.socket.socket() as closed:
        await closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        await _refused(export, tmp_path, port)


async def _refused(export: Path, tmp_path: Path, port: int) -> None:
    async with trio.open_nursery() as nursery:
        table = Mounts(_direct)
        await nursery.start(table.serve)
        where = tmp_path / "mnt"
        with trio.fail_after(10):
            info = await table.attach(_rooted(_info(port), export), MountFlag.parse(str(where)))
        assert info.local_mount == ""
        assert info.mount_error.startswith("sshfs could not mount the volumes at")
        assert "TELEPRESENCE_ROOT" not in info.environment
        assert mounted_at(where) is None and not where.exists()
        nursery.cancel_scope.cancel()


async def test_an_agent_without_file_server_is_said(
    session_mounts: tuple[Mounts, int], export: Path
) -> None:
    table, _ = session_mounts
    info = await table.attach(_rooted(_info(0), export), MountFlag.parse("true"))
    assert info.mount_error == "the workload's traffic agent does not export volumes"


async def test_the_session_ending_unmounts(export: Path, no_leftover_mounts: None) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_files, _export(export), host="127.0.0.1"))
        async with trio.open_nursery() as session:
            table = Mounts(_direct)
            await session.start(table.serve)
            info = await table.attach(_rooted(_info(port), export), MountFlag.parse("true"))
            assert mounted_at(info.local_mount) == "fuse.sshfs"
            session.cancel_scope.cancel()
        assert mounted_at(info.local_mount) is None
        assert not await trio.Path(info.local_mount).exists()
        assert mounts.pending() == []
        nursery.cancel_scope.cancel()


async def test_recover_unmounts_what_a_killed_daemon_left(
    export: Path, tmp_path: Path, no_leftover_mounts: None
) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_files, _export(export), host="127.0.0.1"))
        where = tmp_path / "left"
        where.mkdir()
        # What a daemon killed with -9 leaves: a live sshfs (daemonized, as nobody reaps it
        # any more) and its journal entry.
        mounts._record(mounts._Entry(str(where), True))
        await trio.run_process(["sshfs", "-o", f"directport={port}", "127.0.0.1:/", str(where)])
        assert mounted_at(where) == "fuse.sshfs"
        done = await trio.to_thread.run_sync(mounts.recover)
        assert done == [f"unmounted {where}"]
        assert mounted_at(where) is None and not where.exists()
        assert mounts.pending() == []
        nursery.cancel_scope.cancel()


async def test_in_a_mounts_dir_mounts_let_others_in_and_a_dead_daemons_are_recovered(
    export: Path,
    tmp_path: Path,
    no_leftover_mounts: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon container of connect --docker (TELE_MOUNTS_DIR): its mount points are made in
    that directory, open to other users (the handler container's), and what a dead container
    left there (no journal: it died with the container) is unmounted by the next daemon."""
    where = tmp_path / "shared"
    where.mkdir()
    monkeypatch.setenv(paths.MOUNTS_DIR_ENV, str(where))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_files, _export(export), host="127.0.0.1"))
        table = Mounts(_direct)
        await nursery.start(table.serve)
        with trio.fail_after(30):
            info = await table.attach(_rooted(_info(port), export), MountFlag())
        assert Path(info.local_mount).parent == where, info.mount_error
        table_text = await trio.Path("/proc/self/mountinfo").read_text()
        options = [
            line.split(" - ")[1]
            for line in table_text.splitlines()
            if f" {info.local_mount} " in line
        ]
        assert len(options) == 1 and "allow_other" in options[0], options
        with trio.fail_after(10):
            await table.detach(info.id)
        assert not await trio.Path(info.local_mount).exists()

        left = where / "telfs-left"
        left.mkdir()
        await trio.run_process(["sshfs", "-o", f"directport={port}", "127.0.0.1:/", str(left)])
        assert mounted_at(left) == "fuse.sshfs"
        assert mounts.pending() == [str(left)]
        assert await trio.to_thread.run_sync(mounts.recover) == [f"unmounted {left}"]
        assert mounted_at(left) is None and list(where.iterdir()) == []
        assert mounts.pending() == []
        nursery.cancel_scope.cancel()


async def test_the_file_server_refuses_peers_that_are_not_the_manager(
    export: Path, tmp_path: Path, no_leftover_mounts: None
) -> None:
    peers: list[str] = []

    def nobody(peer: str) -> bool:
        peers.append(peer)
        return False

    async with trio.open_nursery() as nursery:
        files = partial(serve_files, _export(export), host="127.0.0.1", allow=nobody)
        port = await nursery.start(files)
        table = Mounts(_direct)
        await nursery.start(table.serve)
        with trio.fail_after(10):
            info = await table.attach(_rooted(_info(port), export), MountFlag())
        assert info.local_mount == ""
        assert info.mount_error.startswith("sshfs could not mount the volumes at")
        assert peers == ["127.0.0.1"]
        nursery.cancel_scope.cancel()


async def test_remount_serves_the_new_pods_files_at_the_same_directory(
    export: Path, tmp_path: Path, no_leftover_mounts: None
) -> None:
    """The pod that served the volumes was replaced: its file server ended (sshfs with it),
    and the new pod's server has its own files; `remount` mounts them where the old were."""
    newer = tmp_path / "newer_pod"
    (newer / "app" / "etc" / "creds").mkdir(parents=True)
    (newer / "app" / "etc" / "creds" / "password").write_bytes(b"the new pod's")
    async with trio.open_nursery() as nursery:
        old_server = trio.CancelScope()

        async def old_pod(*, task_status: trio.TaskStatus[int]) -> None:
            with old_server:
                await serve_files(_export(export), host="127.0.0.1", task_status=task_status)

        old_port = await nursery.start(old_pod)
        new_port = await nursery.start(partial(serve_files, _export(newer), host="127.0.0.1"))
        table = Mounts(_direct)
        await nursery.start(table.serve)
        info = await table.attach(_rooted(_info(old_port), export), MountFlag.parse("true"))
        root = Path(info.local_mount)
        read = await trio.to_thread.run_sync((root / "etc" / "creds" / "password").read_bytes)
        assert read == SECRET
        old_server.cancel()  # the old pod is gone: sshfs ends with its connection
        with trio.fail_after(20):
            await wait_for(lambda: mounted_at(root) is None)
        # The engagement lasts: its directory stays (empty), and the journal knows it.
        assert await trio.Path(root).is_dir()
        assert mounts.pending() == [str(root)]

        moved = msgspec.structs.replace(info, sftp_port=new_port)
        with trio.fail_after(20):
            again = await table.remount(moved)
        assert again.mount_error == "" and again.local_mount == str(root)
        assert again.environment["TELEPRESENCE_ROOT"] == str(root)
        assert mounted_at(root) == "fuse.sshfs"
        read = await trio.to_thread.run_sync((root / "etc" / "creds" / "password").read_bytes)
        assert read == b"the new pod's"
        assert mounts.pending() == [str(root)]

        await table.detach(info.id)
        assert mounted_at(root) is None and not await trio.Path(root).exists()
        assert mounts.pending() == []
        # Never mounted (or left): nothing to mount again.
        assert await table.remount(moved) == moved
        nursery.cancel_scope.cancel()
