"""`tele intercept` tells whether the volumes' mount point is a mount where the CLI runs (the
daemon mounts in its own mount namespace): read from mountinfo, escapes included."""

from __future__ import annotations

from pathlib import Path

from tele.cli.intercept_cmd import mounted_here

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "90 22 0:50 / /tmp/tele\\040vols/echo rw,nosuid,nodev shared:60 - fuse.sshfs tele: rw\n"
)


def test_a_mount_point_in_mountinfo_is_mounted_here(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mounted_here("/tmp/tele vols/echo", str(info))
    assert mounted_here("/", str(info))
    assert not mounted_here("/tmp/tele vols", str(info))
    assert not mounted_here("/tmp/tele\\040vols/echo", str(info))


def test_unreadable_mountinfo_claims_nothing(tmp_path: Path) -> None:
    assert mounted_here("/anywhere", str(tmp_path / "missing"))


def test_this_process_sees_its_root_mounted() -> None:
    assert mounted_here("/")
