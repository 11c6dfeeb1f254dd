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
from typing import Any

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


def test_what_becomes_of_the_volumes_while_the_daemon_runs_in_a_container(
    dockerd: PrivateDockerd, user_dirs: Path
) -> None:
    """With the daemon in a container, volumes go only into a --docker-run container (nothing
    is mounted on this machine, and one sentence says so otherwise); when they cannot be
    mounted, the sentence says why (the reason connect --docker found first)."""
    base = busybox_image(dockerd)
    name = paths.connection_name()
    container = f"tele-daemon-{name}"
    runtime = paths.ensure_private_dir(paths.runtime_dir())
    why = "Docker passes the daemon container's mounts on only from a shared mount, and ..."
    marker = {"container": container, "engine": dockerd.host, "mounts": None, "no_mounts": why}
    (runtime / "docker-daemon.json").write_text(json.dumps(marker))
    data = {
        "mount_error": "/dev/fuse does not exist (FUSE is not available here)",
        "environment": {"TELEPRESENCE_MOUNTS": "/etc/creds:/var/run/secrets/x"},
    }
    # A marker left by an earlier connect --docker, its container gone: the daemon is here.
    assert not docker_cmd.daemon_in_container()
    try:
        started = dockerd.docker("run", "-d", "--name", container, base, "sleep", "300")
        assert started.returncode == 0, started.stderr
        assert docker_cmd.daemon_in_container()
        assert docker_cmd.volumes_note(data, handler_container=False) == (
            "tele: The pod's volumes (/etc/creds, /var/run/secrets/x) are not mounted on this "
            "machine: with tele connect --docker they go only into a --docker-run container, at "
            "the pod's paths."
        )
        assert docker_cmd.volumes_note(data, handler_container=True) == (
            "tele: The pod's volumes (/etc/creds, /var/run/secrets/x) are not mounted in the "
            f"--docker-run container: {why.rstrip('.')}."
        )
        assert docker_cmd.volumes_note({**data, "mount_error": ""}, True) is None  # --mount=false
        assert docker_cmd.volumes_note({**data, "environment": {}}, False) is None  # no volumes
        # Mounted: in the container, and on this machine under the shared directory.
        mounted = {**data, "mount_error": "", "local_mount": "/tele/mounts/telfs-x"}
        assert docker_cmd.volumes_note(mounted, True) is None
        assert docker_cmd.host_mount("/tele/mounts/telfs-x") == ""  # none shared
        shared = runtime / "docker-mounts"
        marker.update(mounts=str(shared), no_mounts=None)
        (runtime / "docker-daemon.json").write_text(json.dumps(marker))
        assert docker_cmd.host_mount("/tele/mounts/telfs-x") == f"{shared}/telfs-x"
        assert docker_cmd.host_mount("/tmp/telfs-x") == ""
        assert docker_cmd.host_mount("/tele/mounts/a/../../x") == ""
        assert docker_cmd.host_mount("/tele/mounts/..") == ""
        assert docker_cmd.host_mount("/tele/mounts/telfs-x/../..") == ""
    finally:
        removed = dockerd.docker("rm", "-f", container)
        assert removed.returncode == 0, removed.stderr


def test_only_a_docker_run_handler_asks_the_daemon_container_for_a_mount() -> None:
    assert docker_cmd.mount_request("true", handler_container=False) == "false"
    assert docker_cmd.mount_request("/home/me/vols", handler_container=True) == "true"
    assert docker_cmd.mount_request("/home/me/vols:ro", handler_container=True) == "true:ro"
    assert docker_cmd.mount_request("false", handler_container=True) == "false"
    assert docker_cmd.mount_dir_note("true") is None
    assert docker_cmd.mount_dir_note("false") is None
    assert docker_cmd.mount_dir_note("true:ro") is None
    assert docker_cmd.mount_dir_note("/home/me/vols:ro") == (
        "tele: --mount /home/me/vols is not used: with tele connect --docker the volumes are "
        "mounted in the daemon's container, for the --docker-run container only."
    )


def test_a_private_mount_is_said_to_keep_the_containers_mounts_from_this_machine(
    tmp_path: Path,
) -> None:
    """Docker passes a container's mounts on (rshared) only from a shared mount: a private one
    is named, with the remedy; a shared one (a bind of the directory on itself) passes."""
    from tests.docker.dockerd import shared_mount

    where = tmp_path / "mounts"
    where.mkdir()
    table = Path("/proc/self/mountinfo").read_text()
    holder = max(
        (line.split(" ")[4] for line in table.splitlines()),
        key=lambda point: len(point) if str(where).startswith(point.rstrip("/") + "/") else -1,
    )
    problem = docker_cmd.shared_mount_problem(where)
    holder_line = next(line for line in table.splitlines() if line.split(" ")[4] == holder)
    if "shared:" in holder_line.split(" - ")[0]:
        assert problem is None
    else:
        assert problem is not None and f"{where} is on {holder}, which is not shared" in problem
        assert "mount --make-rshared /" in problem
    with shared_mount(where):
        assert docker_cmd.shared_mount_problem(where / "sub") is None
    assert docker_cmd.shared_mount_problem(where) == problem


def test_status_says_where_the_daemon_containers_volumes_are_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tele status` with the daemon in a container: an engagement's mount point is the path
    on this machine that its --docker-run container binds (not the container's), said to be
    for that container only; one that does not show here keeps the container's path, said to
    be in the daemon's container only; a daemon on this machine's mount point is left as is.
    The daemon's log file and socket: the paths on this machine too."""
    from tele.cli.intercept_cmd import mounted_here
    from tests.docker.dockerd import shared_mount

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(paths.USE_ENV, raising=False)
    runtime = paths.ensure_private_dir(paths.runtime_dir())
    shared = runtime / "docker-mounts"
    (shared / "telfs-x").mkdir(parents=True)

    def session() -> dict[str, Any]:
        return {
            "intercepts": [
                "app: intercepted Deployment default/app -> 127.0.0.1:8080 (tcp), volumes at "
                "/tele/mounts/telfs-x, pod app-1",
                "other: intercepted Deployment default/other, volumes at /home/me/vols",
            ],
            "engagements": [
                {"name": "app", "local_mount": "/tele/mounts/telfs-x"},
                {"name": "other", "local_mount": "/home/me/vols"},
                {"name": "bare", "local_mount": ""},
            ],
        }

    unchanged = session()
    docker_cmd.show_host_mounts(unchanged, mounted_here)  # no daemon container (no marker)
    assert unchanged == session() and docker_cmd.mount_lines(unchanged) == []
    inside = {"log_file": "/tele/cache/tele/logs/daemon.log", "socket": "/tele/run/tele/d.sock"}
    daemon = dict(inside)
    docker_cmd.show_host_files(daemon)
    assert daemon == inside

    marker = {"container": "tele-daemon-default", "mounts": str(shared), "no_mounts": None}
    (runtime / "docker-daemon.json").write_text(json.dumps(marker))
    docker_cmd.show_host_files(daemon)
    assert daemon == {
        "log_file": str(paths.logs_dir() / "daemon.log"),
        "socket": str(runtime / "d.sock"),
    }
    unseen = session()
    docker_cmd.show_host_mounts(
        unseen, mounted_here
    )  # the mount did not come through to this machine
    assert unseen["engagements"][0] == {
        "name": "app",
        "local_mount": "/tele/mounts/telfs-x",
        "mounted_for": "daemon-container",
    }
    assert unseen["engagements"][1:] == session()["engagements"][1:]
    assert unseen["intercepts"] == [
        "app: intercepted Deployment default/app -> 127.0.0.1:8080 (tcp), volumes at "
        "/tele/mounts/telfs-x in the daemon's container, pod app-1",
        session()["intercepts"][1],
    ]
    assert docker_cmd.mount_lines(unseen) == [
        "  Volumes:            app's at /tele/mounts/telfs-x in the daemon's container only "
        "(not on this machine)"
    ]
    with shared_mount(shared / "telfs-x"):  # as the daemon's sshfs shows here
        seen = session()
        docker_cmd.show_host_mounts(seen, mounted_here)
    assert seen["engagements"][0] == {
        "name": "app",
        "local_mount": f"{shared}/telfs-x",
        "mounted_for": "docker-run",
    }
    assert seen["engagements"][1:] == session()["engagements"][1:]
    assert seen["intercepts"] == [
        "app: intercepted Deployment default/app -> 127.0.0.1:8080 (tcp), volumes at "
        f"{shared}/telfs-x (for its --docker-run container), pod app-1",
        session()["intercepts"][1],
    ]
    assert docker_cmd.mount_lines(seen) == [
        f"  Volumes:            app's at {shared}/telfs-x, mounted only for its --docker-run "
        "container (at the pod's paths in there)"
    ]


def test_quit_removes_the_docker_directories_only_when_empty_and_not_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.docker.dockerd import shared_mount

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(paths.USE_ENV, raising=False)
    runtime = paths.ensure_private_dir(paths.runtime_dir())
    marker = runtime / "docker-daemon.json"
    mounts, relay = runtime / "docker-mounts", runtime / "docker-relay"

    def make() -> None:
        for directory in (mounts, relay):
            directory.mkdir(exist_ok=True)
        marker.write_text("{}")

    # A dead daemon's mount point left in docker-mounts, the relay's socket: they stay, and
    # the marker with them (the next `tele quit` removes that mount with it).
    make()
    (mounts / "telfs-x").mkdir()
    (relay / "api.sock").write_text("")
    docker_cmd.tidy_runtime(wait_relay=0.0)
    assert sorted(p.name for p in runtime.iterdir()) == sorted(
        ["docker-daemon.json", "docker-mounts", "docker-relay"]
    )
    # A live mount (empty, a mount point) is never removed.
    (mounts / "telfs-x").rmdir()
    (relay / "api.sock").unlink()
    with shared_mount(mounts):
        docker_cmd.tidy_runtime(wait_relay=0.0)
        assert sorted(p.name for p in runtime.iterdir()) == ["docker-daemon.json", "docker-mounts"]
    # Empty and not mounted: nothing is left.
    make()
    docker_cmd.tidy_runtime(wait_relay=0.0)
    assert list(runtime.iterdir()) == []
    docker_cmd.tidy_runtime(wait_relay=0.0)  # nothing there: nothing to do
    assert list(runtime.iterdir()) == []
