"""Issue 9, point 5 on the sandbox: `tele intercept --mount DIR -- CMD` mounts the engaged
container's volumes (a Secret, a ConfigMap, emptyDirs) on this machine through the tunnel; CMD
finds them under TELEPRESENCE_ROOT with the right bytes, a RemoteReadOnly volume refuses
writes, a Remote one takes them (the pod sees the file), and leaving unmounts."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tele.cli.quick import wait_process_gone
from tele.daemon.mounts import mount_problem
from tests.daemon.util import DaemonGuard, run_tele, runtime_dir
from tests.e2e import (
    apply_ready,
    connect,
    deployment,
    echo_container,
    install_manager,
    kubectl,
    manifest,
    service,
)
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(mount_problem() is not None, reason=f"no FUSE mounts: {mount_problem()}"),
]

PY = ("/usr/bin/python3.11", "-c")
"""The app container's image (echo) has Python and no coreutils."""

SECRET = b"s3cr3t\x00\xff-bytes\n"

APP = manifest(
    {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds", "namespace": "default"},
        "data": {"password": base64.b64encode(SECRET).decode()},
    },
    {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": "default"},
        "data": {"app.conf": "color=blue\n"},
    },
    deployment(
        "files",
        echo_container(
            name="app",
            volumeMounts=[
                {"name": "creds", "mountPath": "/etc/creds"},
                {"name": "settings", "mountPath": "/etc/settings"},
                {"name": "scratch", "mountPath": "/scratch"},
                {"name": "cache", "mountPath": "/var/cache/app"},
                {"name": "work", "mountPath": "/work"},
            ],
        ),
        annotations={
            "telepresence.io/mount-policies": '{"cache": "RemoteReadOnly", "work": "Local"}'
        },
        volumes=[
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "settings", "configMap": {"name": "settings"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "work", "emptyDir": {}},
        ],
    ),
    service("files"),
)

# The local handler: what it finds under TELEPRESENCE_ROOT, as JSON in argv[1].
HANDLER = """
import errno, json, os, sys
root = os.environ["TELEPRESENCE_ROOT"]
seen = {k: os.environ.get(k) for k in ("TELEPRESENCE_MOUNTS", "TELEPRESENCE_LOCAL_MOUNTS")}
seen["root"] = root
with open(root + "/etc/creds/password", "rb") as f:
    seen["password"] = f.read().hex()
with open(root + "/etc/settings/app.conf") as f:
    seen["conf"] = f.read()
try:
    open(root + "/var/cache/app/note", "w").write("no")
    seen["read_only"] = "written"
except OSError as exc:
    seen["read_only"] = errno.errorcode[exc.errno]
with open(root + "/scratch/from-laptop", "w") as f:
    f.write("hello from the laptop")
seen["mounted"] = any(line.split()[4] == root for line in open("/proc/self/mountinfo"))
json.dump(seen, open(sys.argv[1], "w"))
"""


def test_intercept_mounts_the_pods_volumes_and_leave_unmounts(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    mount_dir: Path,
    tmp_path: Path,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    try:
        apply_ready(node_sandbox, APP, app="files")
        connect(tele_env, node_sandbox)
        report, env_file = tmp_path / "seen.json", tmp_path / "files.env"
        engaged = run_tele(
            tele_env,
            "intercept",
            "files",
            "--port",
            "8089",
            "--mount",
            str(mount_dir),
            "-e",
            str(env_file),
            "--",
            sys.executable,
            "-c",
            HANDLER,
            str(report),
            timeout=180,
        )
        assert engaged.returncode == 0, engaged.stderr
        assert f"Volume Mount Point     : {mount_dir}" in engaged.stdout
        seen = json.loads(report.read_text())
        assert bytes.fromhex(seen["password"]) == SECRET
        assert seen["conf"] == "color=blue\n"
        assert seen["read_only"] in ("EROFS", "EACCES", "EPERM")
        assert seen["root"] == str(mount_dir) and seen["mounted"] is True
        assert seen["TELEPRESENCE_MOUNTS"] == "/etc/creds:/etc/settings:/scratch:/var/cache/app"
        assert seen["TELEPRESENCE_LOCAL_MOUNTS"] == "/work"
        assert f"TELEPRESENCE_ROOT={mount_dir}" in env_file.read_text()
        # The Remote volume took the write: the app container sees the file.
        pod = kubectl(
            node_sandbox,
            "get",
            "pods",
            "-l",
            "app=files",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        )
        written = kubectl(
            node_sandbox,
            "exec",
            pod,
            "-c",
            "app",
            "--",
            *PY,
            "print(open('/scratch/from-laptop').read(), end='')",
        )
        assert written == "hello from the laptop"
        cached = kubectl(
            node_sandbox,
            "exec",
            pod,
            "-c",
            "app",
            "--",
            *PY,
            "import os; print(os.listdir('/var/cache/app'))",
        )
        assert cached == "[]\n"

        # The command's end left the intercept: no mount, no directory (tele made it).
        assert str(mount_dir) not in Path("/proc/self/mountinfo").read_text()
        assert not mount_dir.exists()
        listed = run_tele(tele_env, "status")
        assert "files:" not in listed.stdout
    finally:
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


def test_a_killed_daemons_mount_is_undone_when_the_next_daemon_starts(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    mount_dir: Path,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    try:
        apply_ready(node_sandbox, APP, app="files")
        connect(tele_env, node_sandbox)
        engaged = run_tele(
            tele_env, "intercept", "files", "--port", "8089", "--mount", str(mount_dir), timeout=120
        )
        assert engaged.returncode == 0, engaged.stderr
        assert (mount_dir / "etc" / "settings" / "app.conf").read_text() == "color=blue\n"
        assert f"volumes at {mount_dir}" in run_tele(tele_env, "status").stdout

        # A daemon that dies alone takes its mounts along (sshfs exits, and unmounts, when its
        # connection closes); a crash that kills sshfs too leaves a dead mount behind.
        # (sshfs is stopped first so that it cannot unmount on its way out, nor the daemon
        # clean up after it.)
        daemon = int((runtime_dir(tele_env) / "daemon.pid").read_text())
        sshfs = _sshfs_of(mount_dir)
        os.kill(sshfs, signal.SIGSTOP)
        for pid in (daemon, sshfs):
            os.kill(pid, signal.SIGKILL)
            assert wait_process_gone(pid, timeout=10)
        assert str(mount_dir) in Path("/proc/self/mountinfo").read_text()

        # The next daemon (started by connect) unmounts it before anything else.
        connect(tele_env, node_sandbox)
        assert str(mount_dir) not in Path("/proc/self/mountinfo").read_text()
        assert not mount_dir.exists()
    finally:
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)


def _sshfs_of(mount_dir: Path) -> int:
    """The pid of the sshfs process serving `mount_dir` (the daemon's child)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"sshfs") and str(mount_dir).encode() in argv:
                return int(entry.name)
    raise AssertionError(f"no sshfs process serves {mount_dir}")


# An ingesting handler: the secret reads, and every volume is read-only (even a Remote one).
INGEST_HANDLER = """
import errno, json, os, sys
root = os.environ["TELEPRESENCE_ROOT"]
seen = {"password": open(root + "/etc/creds/password", "rb").read().hex()}
try:
    open(root + "/scratch/from-ingest", "w").write("no")
    seen["scratch"] = "written"
except OSError as exc:
    seen["scratch"] = errno.errorcode[exc.errno]
json.dump(seen, open(sys.argv[1], "w"))
"""


def test_ingest_gives_a_readable_mounted_secret_read_only(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    mount_dir: Path,
    tmp_path: Path,
) -> None:
    kubeconfig = str(node_sandbox.kubeconfig)
    install_manager(node_sandbox, tele_env)
    try:
        apply_ready(node_sandbox, APP, app="files")
        connect(tele_env, node_sandbox)
        report = tmp_path / "seen.json"
        ingested = run_tele(
            tele_env,
            "ingest",
            "files",
            "--mount",
            str(mount_dir),
            "--",
            sys.executable,
            "-c",
            INGEST_HANDLER,
            str(report),
            timeout=180,
        )
        assert ingested.returncode == 0, ingested.stderr
        seen = json.loads(report.read_text())
        assert bytes.fromhex(seen["password"]) == SECRET
        assert seen["scratch"] in ("EROFS", "EACCES", "EPERM")
        assert str(mount_dir) not in Path("/proc/self/mountinfo").read_text()
    finally:
        run_tele(tele_env, "quit")
        run_tele(tele_env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
