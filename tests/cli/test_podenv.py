"""A pod's environment never sets loader, interpreter or shell variables on this machine
unless the user says --unsafe-pod-env: for `-- COMMAND` (checked in what the command really
received) and in the env files (a `source` of the -e file sets none of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tele.cli import client, intercept_cmd, podenv
from tele.cli.main import cli
from tele.rpc.agent_api import EngagementInfo

HOSTILE = {
    "GREETING": "hello",
    "LD_PRELOAD": "",  # (empty: the opted-in run must not make ld.so complain)
    "PERL5OPT": "-Mevil",
    "PYTHONWARNINGS": "ignore::Warning:evil",
    "BROWSER": "sh -c evil",
    "PATH": "/pod/bin",
    "NODE_OPTIONS": "--require /tmp/evil.js",
    "BASH_ENV": "/tmp/evil.sh",
    "IFS": "x",
    "BASH_FUNC_ls%%": "() { evil; }",
    "X=1\nLD_PRELOAD": "/tmp/evil.so",  # a name that would add a line of its own to a file
    "MULTI": "a\nLD_AUDIT=/tmp/evil.so",
}
SHOW = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


@pytest.fixture
def engaged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`tele intercept` against a stand-in daemon that engages at once with HOSTILE's env."""
    info = EngagementInfo(
        id="1", name="api", namespace="default", workload="api", workload_kind="Deployment",
        container="api", service="api", service_port=80, container_port=8080, mechanism="tcp",
        client="me", environment=HOSTILE,
    )  # fmt: skip
    left: list[str] = []

    def run(call: Any) -> Any:
        return info

    monkeypatch.setattr(client, "run", run)
    monkeypatch.setattr(intercept_cmd, "_leave", left.append)
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    return left


def received(path: Path) -> dict[str, str]:
    return dict(json.loads(path.read_text()))


def test_the_command_gets_the_pods_env_but_not_its_loader_or_interpreter_settings(
    engaged: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "env.json"
    args = ["intercept", "api", "--port", "8080", "--", sys.executable, "-c", SHOW, str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    env = received(out)
    assert env["GREETING"] == "hello" and env["MULTI"].startswith("a\n")
    for name in ("LD_PRELOAD", "PERL5OPT", "PYTHONWARNINGS", "BROWSER", "NODE_OPTIONS",
                 "BASH_ENV", "IFS", "BASH_FUNC_ls%%"):  # fmt: skip
        assert env.get(name) == os.environ.get(name), name
    assert env["PATH"] == os.environ["PATH"]
    assert "kept your own BASH_ENV, BASH_FUNC_ls%%, BROWSER, IFS, LD_PRELOAD" in result.stderr
    assert "PATH" not in result.stderr.split("kept your own", 1)[1].split("(")[0]
    assert engaged == ["api"]


def test_the_user_may_opt_in_and_is_warned(engaged: list[str], tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    args = ["intercept", "api", "--port", "8080", "--unsafe-pod-env", "--"]
    args += [sys.executable, "-c", SHOW, str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    env = received(out)
    assert env["PERL5OPT"] == "-Mevil" and env["PATH"] == "/pod/bin"
    assert "warning: the pod's environment sets BASH_ENV" in result.stderr
    assert "PATH" in result.stderr


def test_env_files_keep_them_out_and_sourcing_sets_none(engaged: list[str], tmp_path: Path) -> None:
    sh_file, json_file = tmp_path / "api.env", tmp_path / "api.json"
    args = ["intercept", "api", "--port", "8080", "-e", str(sh_file), "-j", str(json_file)]
    result = CliRunner().invoke(cli, [*args, "--env-syntax", "sh"])
    assert result.exit_code == 0, result.output
    assert json.loads(json_file.read_text()) == {"GREETING": "hello", "MULTI": HOSTILE["MULTI"]}
    text = sh_file.read_text()
    assert '# LD_PRELOAD=""  (tele: the pod\'s, kept out; --unsafe-pod-env' in text
    sourced = subprocess.run(
        ["sh", "-c", f'set -a; . "{sh_file}"; env -0'], env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    names = {item.split("=", 1)[0] for item in sourced.stdout.split("\0")}
    assert {"GREETING", "MULTI"} <= names
    assert not names & {"LD_PRELOAD", "LD_AUDIT", "PERL5OPT", "BROWSER", "BASH_ENV", "X"}


def test_docker_env_file_gets_no_line_of_the_pods(engaged: list[str], tmp_path: Path) -> None:
    """docker's --env-file (the default syntax) has no quoting: a value with a newline would
    add a variable of the pod's choosing, so it is left out, saying so."""
    env_file = tmp_path / "api.env"
    result = CliRunner().invoke(cli, ["intercept", "api", "-p", "8080", "-e", str(env_file)])
    assert result.exit_code == 0, result.output
    lines = env_file.read_text().splitlines()
    assert "GREETING=hello" in lines
    assert not [line for line in lines if not line.startswith("#") and "LD_" in line]
    assert f"tele: left MULTI out of {env_file}: --env-syntax docker cannot hold" in result.stderr


def test_the_rule() -> None:
    assert all(podenv.protected(n) for n in ("LD_LIBRARY_PATH", "PYTHONPATH", "RUBYOPT", "PATH"))
    assert not any(podenv.protected(n) for n in ("GREETING", "DATABASE_URL", "LANG"))
    assert podenv.json_map(HOSTILE, unsafe=True)["PERL5OPT"] == "-Mevil"
    assert "X=1\nLD_PRELOAD" not in podenv.json_map(HOSTILE, unsafe=True)
