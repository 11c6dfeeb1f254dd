"""`tele helm ...` as a user runs it (a subprocess) against the in-process sandbox: exit codes,
one-line results and one-line errors, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio
import yaml

from tele.k8s import client as k8s
from tele.k8s.client import KubeClient

TELE = [sys.executable, "-m", "tele", "helm"]


async def tele(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [*TELE, *argv],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=b"",
        )


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tele: ")
    return lines[0]


async def test_lint_passes_and_a_broken_values_file_fails(
    tele_env: dict[str, str], tmp_path: Path
) -> None:
    ok = await tele(tele_env, "lint")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.decode().strip().endswith("1 chart linted, 0 failed.")

    broken = tmp_path / "broken.yaml"
    broken.write_text("agent:\n  port: ninety\nworkloads:\n  deployments:\n    enabled: yes\n")
    bad = await tele(tele_env, "lint", "-f", str(broken))
    assert bad.returncode == 1
    out = bad.stdout.decode()
    assert "[ERROR] values.yaml: Invalid Helm value agent.port: got string, want integer." in out
    line = one_line_error(bad)
    assert line == (
        "tele: The chart does not lint: Invalid Helm value agent.port: got string, want integer."
    )
    as_json = await tele(tele_env, "lint", "-f", str(broken), "-o", "json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"error": line.removeprefix("tele: "), "exit_code": 1}
    passed = await tele(tele_env, "lint", "-o", "json")
    assert passed.returncode == 0, passed.stderr
    assert {k: v for k, v in json.loads(passed.stdout).items() if k != "messages"} == {
        "linted": 1,
        "failed": 0,
    }


async def test_install_conflict_and_uninstall(
    tele_env: dict[str, str], kubeconfig: Path, kube: KubeClient
) -> None:
    kc = ["--kubeconfig", str(kubeconfig)]
    bad = await tele(tele_env, "install", *kc, "--set", "namespaces=oops")
    assert bad.returncode == 1
    assert one_line_error(bad) == "tele: Invalid Helm value namespaces: got string, want array."

    first = await tele(tele_env, "install", *kc, "--no-hooks", "--set", "logLevel=debug")
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().strip() == (
        "Installed release traffic-manager in namespace ambassador (revision 1): "
        "the traffic manager manages all namespaces."
    )
    assert first.stderr == b""  # not a terminal: no progress output
    assert await kube.get(k8s.DEPLOYMENTS, "traffic-manager", "ambassador")

    second = await tele(tele_env, "install", *kc, "-n", "other", "--set", "namespaces={default}")
    assert second.returncode == 1
    assert one_line_error(second).startswith(
        "tele: Release traffic-manager in namespace ambassador already manages all namespaces"
    )

    upgraded = await tele(tele_env, "upgrade", *kc, "--no-hooks", "--set", "namespaces={default}")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "(revision 2): the traffic manager manages namespaces default." in (
        upgraded.stdout.decode()
    )
    as_json = await tele(tele_env, "upgrade", *kc, "--reuse-values", "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert {k: data[k] for k in ("release", "namespace", "revision", "scope")} == {
        "release": "traffic-manager",
        "namespace": "ambassador",
        "revision": 3,
        "scope": "namespaces default",
    }
    assert "Deployment/ambassador/traffic-manager" in data["applied"]

    gone = await tele(tele_env, "uninstall", *kc, "-o", "yaml")
    assert gone.returncode == 0, gone.stderr
    removed = yaml.safe_load(gone.stdout)
    assert (removed["release"], removed["namespace"], removed["engagements_ended"]) == (
        "traffic-manager",
        "ambassador",
        [],
    )
    assert "Deployment/ambassador/traffic-manager" in removed["deleted"]
    assert await kube.get_or_none(k8s.DEPLOYMENTS, "traffic-manager", "ambassador") is None
    again = await tele(tele_env, "uninstall", *kc)
    assert again.returncode == 1
    assert one_line_error(again) == (
        "tele: Release traffic-manager is not installed in namespace ambassador."
    )


async def test_unreachable_cluster_is_exit_3(tele_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "dead-kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: dead\n"
        "clusters: [{name: dead, cluster: {server: 'https://127.0.0.1:9', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: dead, context: {cluster: dead, user: u}}]\n"
    )
    result = await tele(tele_env, "install", "--kubeconfig", str(config))
    assert result.returncode == 3
    assert "Cannot reach the Kubernetes API server at https://127.0.0.1:9" in one_line_error(result)


def _drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_progress_is_shown_on_a_terminal(tele_env: dict[str, str], kubeconfig: Path) -> None:
    controller, terminal = os.openpty()
    drained: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                drained.append(
                    await trio.to_thread.run_sync(_drain, controller, abandon_on_cancel=True)
                )

            nursery.start_soon(drain)
            with trio.fail_after(60):
                result = await trio.run_process(
                    [*TELE, "install", "--kubeconfig", str(kubeconfig)],
                    env={**tele_env, "COLUMNS": "120"},
                    stdin=b"",
                    capture_stdout=True,
                    stderr=terminal,
                    check=False,
                )
            os.close(terminal)  # the child has exited: the drain now sees the end
            terminal = -1
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert result.returncode == 0
    assert result.stdout.decode().startswith("Installed release traffic-manager")
    shown = drained[0].decode(errors="replace")
    assert "Installing" in shown and "applied" in shown
