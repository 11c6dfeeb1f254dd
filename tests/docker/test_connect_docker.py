"""`tele connect --docker` on a private Docker Engine, without a cluster: what the CLI says of
volumes while the daemon runs in a container; and for a user who is not root, the daemon runs
as root in its container and serves the user who started it (the socket and files it makes
in the user's runtime directory are that user's, its peer check answers that user and no other).

The CLI itself runs in this (root) test process, given the other user's uid as the CLI of a
non-root user computes it: a CLI running as that user would need its own copy of tele's image
cache (root's is not readable by others) and engine socket."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tele import paths
from tele.cli import docker_cmd
from tests.daemon.test_process import _connect_as
from tests.docker.dockerd import PrivateDockerd, busybox_image

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")

OWNER, OTHER = 65534, 65533


@pytest.fixture
def user_dirs(dockerd: PrivateDockerd, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The environment the CLI reads (engine, XDG dirs, a named connection) in a directory the
    other users may traverse (pytest's temp dirs are 0700 all the way up)."""
    base = Path(tempfile.mkdtemp(prefix="tele-test-owner-"))
    os.chmod(base, 0o711)
    for name in ("runtime", "cache", "config", "state"):
        (base / name).mkdir(mode=0o711)
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    monkeypatch.setenv("HOME", str(base))
    for name in ("runtime", "cache", "config", "state"):
        monkeypatch.setenv(
            f"XDG_{name.upper()}_{'DIR' if name == 'runtime' else 'HOME'}", str(base / name)
        )
    monkeypatch.setenv(paths.USE_ENV, f"tele-{uuid.uuid4().hex[:8]}")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_daemon_container_serves_the_user_who_started_it(
    dockerd: PrivateDockerd, user_dirs: Path
) -> None:
    kubeconfig = user_dirs / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": "https://192.0.2.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
            }
        )
    )
    name = paths.connection_name()
    container = f"tele-daemon-{name}"
    try:
        docker_cmd.start_daemon_container(str(kubeconfig), "", name, OWNER)
        runtime = paths.runtime_dir()
        socket_path = runtime / "daemon.sock"
        for made in (socket_path, runtime / "daemon.pid", runtime / "daemon.lock"):
            assert made.stat().st_uid == OWNER, made
        assert (paths.logs_dir() / "daemon.log").stat().st_uid == OWNER
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        # The user's own runtime directory (here made by root, the CLI's process): open its way.
        for directory in (runtime, runtime.parent, runtime.parent.parent):
            os.chmod(directory, 0o711)

        accepted = _connect_as(OWNER, str(socket_path))
        assert accepted[3:4] == b"\x04"  # the daemon's HTTP/2 SETTINGS frame

        os.chmod(socket_path, 0o666)  # only the peer check stands in the other uid's way
        assert _connect_as(OTHER, str(socket_path)) == b""
        log = (paths.logs_dir() / "daemon.log").read_text()
        assert f"uid {OTHER} (not this user)" in log
    finally:
        removed = dockerd.docker("rm", "-f", container)
        assert removed.returncode == 0 or "No such container" in removed.stderr, removed.stderr


def test_volumes_are_said_to_be_unmounted_while_the_daemon_runs_in_a_container(
    dockerd: PrivateDockerd, user_dirs: Path
) -> None:
    """The daemon in its container cannot mount (no FUSE): intercept says so in one sentence
    naming the pod's volumes, instead of the daemon's own reason (sshfs missing, which
    installing on this machine would not cure); with the daemon on this machine, not."""
    base = busybox_image(dockerd)
    name = paths.connection_name()
    container = f"tele-daemon-{name}"
    runtime = paths.ensure_private_dir(paths.runtime_dir())
    marker = {"container": container, "engine": dockerd.host}
    (runtime / "docker-daemon.json").write_text(json.dumps(marker))
    data = {
        "mount_error": "sshfs is not installed (Debian/Ubuntu: apt install sshfs)",
        "environment": {"TELEPRESENCE_MOUNTS": "/etc/creds:/var/run/secrets/x"},
    }
    # A marker left by an earlier connect --docker, its container gone: the daemon is here.
    assert docker_cmd.volumes_note(data) is None
    try:
        started = dockerd.docker("run", "-d", "--name", container, base, "sleep", "300")
        assert started.returncode == 0, started.stderr
        assert docker_cmd.volumes_note(data) == (
            "tele: The pod's volumes (/etc/creds, /var/run/secrets/x) are not mounted, neither "
            "here nor in a --docker-run container: the daemon runs in a container (tele connect "
            "--docker), which cannot mount them; connect without --docker to have them."
        )
        assert docker_cmd.volumes_note({**data, "mount_error": ""}) is None  # --mount=false
    finally:
        removed = dockerd.docker("rm", "-f", container)
        assert removed.returncode == 0, removed.stderr
