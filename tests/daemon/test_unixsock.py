"""The daemon's socket plumbing: private listener, long paths, peer credentials, trust rule."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tele import unixsock


@pytest.mark.parametrize("depth", [1, 12], ids=["short-path", "path-beyond-sun_path"])
async def test_listener_is_private_and_reports_the_peer(tmp_path: Path, depth: int) -> None:
    directory = tmp_path.joinpath(*(["d" * 10] * depth))
    directory.mkdir(parents=True, mode=0o700)
    path = directory / "daemon.sock"
    assert (len(os.fsencode(path)) > 107) == (depth > 1)
    path.write_text("stale")  # whatever was left there is replaced

    listener = await unixsock.open_private_listener(path)
    async with listener, await unixsock.connect(path) as client:
        server = await listener.accept()
        async with server:
            assert stat.S_ISSOCK(path.stat().st_mode)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            # Both ends see this very process: pid and uid as the kernel recorded them.
            peer = unixsock.peer_credentials(server.socket)
            assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
            assert unixsock.peer_credentials(client.socket).pid == os.getpid()
            await client.send_all(b"ping")
            assert await server.receive_some(4) == b"ping"


async def test_connect_to_a_missing_or_dead_socket_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await unixsock.connect(tmp_path / "absent.sock")
    listener = await unixsock.open_private_listener(tmp_path / "dead.sock")
    await listener.aclose()  # the file stays, nobody listens: what a killed daemon leaves
    with pytest.raises(ConnectionRefusedError):
        await unixsock.connect(tmp_path / "dead.sock")


def test_only_the_same_user_and_root_are_trusted() -> None:
    assert unixsock.peer_is_trusted(1000, own_uid=1000)
    assert unixsock.peer_is_trusted(0, own_uid=1000)
    assert not unixsock.peer_is_trusted(1001, own_uid=1000)
    assert not unixsock.peer_is_trusted(65534, own_uid=0)


@pytest.mark.skipif(os.getuid() != 0, reason="the delegated uid is root's only: run as root")
def test_a_root_daemon_also_trusts_the_user_it_runs_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(unixsock.OWNER_ENV, "1000")
    assert unixsock.delegated_uid() == 1000
    assert unixsock.peer_is_trusted(1000, own_uid=0)
    assert not unixsock.peer_is_trusted(1001, own_uid=0)
    assert not unixsock.peer_is_trusted(1000, own_uid=1002)  # a user's daemon: its own only
    for bad in ("0", "-1", "1000x", "", str(2**32 - 1)):
        monkeypatch.setenv(unixsock.OWNER_ENV, bad)
        assert unixsock.delegated_uid() is None, bad
