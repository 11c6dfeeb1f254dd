"""tele.daemon.mounts without mounting anything: the --mount flag (CLI and daemon), the
TELEPRESENCE_* variables, and the one-sentence reason when mounting cannot work here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tele.cli.intercept_cmd import _mount
from tele.daemon import mounts
from tele.daemon.mounts import MountFlag
from tele.errors import UserError
from tele.rpc.agent_api import EngagementInfo


def test_mount_flag() -> None:
    assert MountFlag.parse("true") == MountFlag()
    assert MountFlag.parse("false") == MountFlag(enabled=False)
    assert MountFlag.parse("/mnt/x:ro") == MountFlag(directory="/mnt/x", read_only=True)
    assert MountFlag.parse("true:ro") == MountFlag(read_only=True)
    with pytest.raises(UserError, match="absolute directory"):
        MountFlag.parse("relative/dir")


def test_without_sshfs_the_reason_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert mounts.mount_problem() == "sshfs is not installed (Debian/Ubuntu: apt install sshfs)"


def test_the_cli_makes_a_mount_directory_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/tmp")
    assert _mount("true") == "true"
    assert _mount("false") == "false"
    assert _mount("mnt") == "/tmp/mnt"
    assert _mount("mnt:ro") == "/tmp/mnt:ro"
    assert _mount("~/v") == os.path.expanduser("~/v")


def test_the_handlers_variables() -> None:
    info = EngagementInfo(
        id="e",
        name="n",
        namespace="ns",
        workload="w",
        workload_kind="Deployment",
        container="c",
        service="s",
        service_port=80,
        container_port=8080,
        mechanism="tcp",
        client="me",
        mount_policies={"/b": "RemoteReadOnly", "/a": "Remote", "/t": "Local", "/u": "Local"},
        local_mount="/tmp/telfs-1",
    )
    assert mounts.environment(info) == {
        "TELEPRESENCE_INTERCEPT_ID": "e",
        "TELEPRESENCE_CONTAINER": "c",
        "TELEPRESENCE_ROOT": "/tmp/telfs-1",
        "TELEPRESENCE_MOUNTS": "/a:/b",
        "TELEPRESENCE_LOCAL_MOUNTS": "/t:/u",
    }
