"""`tele sandbox up/status/kubeconfig/down` as a user runs them: real background processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from tele.sandbox.instance import _is_our_process


def _tele(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["tele", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_up_status_kubeconfig_down_two_side_by_side(tele_env: dict[str, str]) -> None:
    started: list[int] = []
    try:
        out = _tele(tele_env, "sandbox", "up", "--name", "one").stdout
        assert "Sandbox 'one' is up." in out and "export KUBECONFIG=" in out
        second = json.loads(_tele(tele_env, "sandbox", "up", "--name", "two", "-o", "json").stdout)
        assert second["running"] and second["server"].startswith("https://127.0.0.1:")
        again = _tele(tele_env, "sandbox", "up", "--name", "one").stdout
        assert "already running" in again

        states = {
            s["name"]: s
            for s in json.loads(_tele(tele_env, "sandbox", "status", "-o", "json").stdout)
        }
        assert set(states) == {"one", "two"}
        assert states["one"]["server"] != states["two"]["server"]
        started = [states["one"]["pid"], states["two"]["pid"]]
        assert all(
            _is_our_process(pid, name) for pid, name in zip(started, ("one", "two"), strict=True)
        )

        kubeconfig = _tele(tele_env, "sandbox", "kubeconfig", "--name", "two").stdout
        config = yaml.safe_load(kubeconfig)
        assert config["clusters"][0]["cluster"]["server"] == states["two"]["server"]
        path = Path(
            _tele(tele_env, "sandbox", "kubeconfig", "--name", "two", "--path").stdout.strip()
        )
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        kubectl = subprocess.run(
            ["kubectl", "--kubeconfig", str(path), "get", "namespaces", "-o", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": tele_env["HOME"]},
            check=False,
        )
        if kubectl.returncode != 127:
            assert "namespace/kube-system" in kubectl.stdout

        assert "stopped" in _tele(tele_env, "sandbox", "down", "--name", "one").stdout
        assert not _is_our_process(started[0], "one")
        states = {
            s["name"]: s
            for s in json.loads(_tele(tele_env, "sandbox", "status", "-o", "json").stdout)
        }
        assert set(states) == {"two"} and states["two"]["running"]
    finally:
        _tele(tele_env, "sandbox", "down", "--name", "one", check=False)
        _tele(tele_env, "sandbox", "down", "--name", "two", check=False)
    assert not any(
        _is_our_process(pid, name) for pid, name in zip(started, ("one", "two"), strict=False)
    )
    assert not (Path(tele_env["XDG_STATE_HOME"]) / "tele" / "sandbox" / "two").exists()
    missing = _tele(tele_env, "sandbox", "kubeconfig", "--name", "two", check=False)
    assert (
        missing.returncode == 1
        and "is not running" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    bad = _tele(tele_env, "sandbox", "up", "--name", "Bad_Name", check=False)
    assert bad.returncode == 1 and "is not valid" in bad.stderr


def _kubectl(env: dict[str, str], config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": env["HOME"]},
        check=False,
    )


def test_kubeconfig_mints_users_and_service_accounts_to_try_rbac(
    tele_env: dict[str, str], tmp_path: Path
) -> None:
    if subprocess.run(["which", "kubectl"], capture_output=True, check=False).returncode != 0:
        import pytest

        pytest.skip("kubectl is not installed")
    try:
        _tele(tele_env, "sandbox", "up", "--name", "rbac")
        admin = Path(
            _tele(tele_env, "sandbox", "kubeconfig", "--name", "rbac", "--path").stdout.strip()
        )
        assert _kubectl(tele_env, admin, "create", "namespace", "team").returncode == 0
        bind = _kubectl(
            tele_env,
            admin,
            "-n",
            "team",
            "create",
            "rolebinding",
            "qa-view",
            "--clusterrole=view",
            "--group=qa",
        )
        assert bind.returncode == 0, bind.stderr
        for credential in ("--token", "--cert"):
            minted = _tele(
                tele_env,
                "sandbox",
                "kubeconfig",
                "--name",
                "rbac",
                "--user",
                "ann",
                "--group",
                "qa",
                credential,
            ).stdout
            config = tmp_path / f"ann{credential}.yaml"
            config.write_text(minted)
            user = yaml.safe_load(minted)["users"][0]["user"]
            assert ("token" in user) == (credential == "--token")
            can = _kubectl(tele_env, config, "-n", "team", "auth", "can-i", "list", "pods")
            assert can.stdout.strip() == "yes", can.stderr
            cannot = _kubectl(
                tele_env, config, "-n", "team", "auth", "can-i", "create", "pods/portforward"
            )
            assert cannot.stdout.strip() == "no"
            create = _kubectl(tele_env, config, "-n", "team", "create", "configmap", "x")
            assert create.returncode != 0
            assert 'User "ann" cannot create resource "configmaps"' in create.stderr

        minted = _tele(
            tele_env,
            "sandbox",
            "kubeconfig",
            "--name",
            "rbac",
            "--service-account",
            "team/default",
        ).stdout
        config = tmp_path / "sa.yaml"
        config.write_text(minted)
        denied = _kubectl(tele_env, config, "get", "pods")
        assert "system:serviceaccount:team:default" in denied.stderr
        assert _kubectl(tele_env, config, "auth", "can-i", "get", "pods").stdout.strip() == "no"

        usage = _tele(
            tele_env, "sandbox", "kubeconfig", "--name", "rbac", "--group", "qa", check=False
        )
        assert usage.returncode == 2 and "--group goes with --user" in usage.stderr
        bad = _tele(
            tele_env, "sandbox", "kubeconfig", "--name", "rbac", "--user", "a b", check=False
        )
        assert bad.returncode == 1 and "Traceback" not in bad.stderr
        assert "The user name 'a b' is not usable" in bad.stderr
        missing = _tele(
            tele_env,
            "sandbox",
            "kubeconfig",
            "--name",
            "rbac",
            "--service-account",
            "team/nobody",
            check=False,
        )
        assert missing.returncode == 1 and "does not exist" in missing.stderr
    finally:
        _tele(tele_env, "sandbox", "down", "--name", "rbac", check=False)
