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
