"""`tele intercept -e FILE --env-syntax S`: each syntax is read back by the program it is for
(docker run --env-file, a compose/dotenv reader, sh, csh) and every value arrives verbatim:
quotes, `$`, backslashes, newlines. cmd and PowerShell are not on this machine: their files are
read by the quoting rules of those languages, written out below. A value a syntax cannot hold
is left out with a comment and a warning, never written so that it starts a line of its own."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tele.cli import client, intercept_cmd
from tele.cli.main import cli
from tele.rpc.agent_api import EngagementInfo

VALUES = {
    "PLAIN": "hello",
    "EMPTY": "",
    "SPACES": "  two  words  ",
    "QUOTES": 'it\'s "quoted"',
    "DOLLAR": "$HOME ${HOME} $(id) `id`",
    "BACKSLASH": "C:\\path\\n\\",
    "NEWLINE": "line1\nline2",
    "CR": "dos\r",
    "TAB": "a\tb",
    "HASH": "x #not a comment",
    "BANG": "wow!x !! !$",
    "CMD": "a&b|c<d>e^f(g)%PATH%",
    "SMART": "it\u2019s \u2018so\u2019",
    "UNICODE": "\u017c\u00f3\u0142w \u2603",
    "EQUALS": "a=b==",
    "MIXED": 'it\'s $HOME\nand \\ "more" ${X}',
    "JSON": '{"k": ["v", 1]}',
}
PROTECTED = {"LD_PRELOAD": "/tmp/evil.so"}
ONE_LINE = {k: v for k, v in VALUES.items() if "\n" not in v and "\r" not in v}
"""What docker's --env-file and a cmd batch file can hold."""


@pytest.fixture
def stand_in_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tele intercept` against a stand-in daemon that engages at once with VALUES' env."""
    info = EngagementInfo(
        id="1", name="api", namespace="default", workload="api", workload_kind="Deployment",
        container="api", service="api", service_port=80, container_port=8080, mechanism="tcp",
        client="me", environment={**VALUES, **PROTECTED},
    )  # fmt: skip

    def run(call: Any) -> Any:
        return info

    monkeypatch.setattr(client, "run", run)
    monkeypatch.setattr(intercept_cmd, "_leave", lambda name: None)


def written(tmp_path: Path, *syntax: str) -> tuple[Path, str]:
    """Run `tele intercept api -e FILE [--env-syntax S]`: the file and what tele said on stderr."""
    path = tmp_path / "api.env"
    flags = ["--env-syntax", *syntax] if syntax else []
    result = CliRunner().invoke(cli, ["intercept", "api", "-p", "8080", "-e", str(path), *flags])
    assert result.exit_code == 0, result.output
    return path, result.stderr


def left_out_warning(path: Path, syntax: str) -> str:
    return (
        f"tele: left CR, MIXED, NEWLINE out of {path}: --env-syntax {syntax} cannot hold a line "
        "break in a value (compose, sh or json can).\n"
    )


# docker ---------------------------------------------------------------------------------------


class _RecordingDocker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Just enough of the Docker API for `docker run` to send its container create request,
    which holds the environment the CLI read from --env-file; answered with an error."""

    daemon_threads = True
    created: list[dict[str, Any]]


class _DockerHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RecordingDocker

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Api-Version", "1.45")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._answer(200, b"")

    def do_GET(self) -> None:
        self._answer(200 if self.path.endswith("/_ping") else 404, b"OK")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "/containers/create" in self.path:
            self.server.created.append(json.loads(body))
        self._answer(400, b'{"message": "tele test: recorded"}')

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def docker_daemon() -> Iterator[tuple[dict[str, str], list[dict[str, Any]]]]:
    """DOCKER_HOST (and an empty DOCKER_CONFIG) for a recording stand-in daemon."""
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not on this machine")
    workdir = tempfile.mkdtemp(prefix="tele-docker-")  # (short: a socket path has 108 bytes)
    server = _RecordingDocker(os.path.join(workdir, "d.sock"), _DockerHandler)
    server.created = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            "PATH": os.environ["PATH"],
            "DOCKER_HOST": f"unix://{workdir}/d.sock",
            "DOCKER_CONFIG": workdir,
        }
        yield env, server.created
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_docker_is_the_default_and_docker_run_reads_every_value_verbatim(
    stand_in_daemon: None,
    docker_daemon: tuple[dict[str, str], list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    path, stderr = written(tmp_path)
    assert stderr == left_out_warning(path, "docker")
    text = path.read_text()
    assert "# NEWLINE: left out (tele: docker cannot hold a line break in a value;" in text
    assert "line2" not in text and "LD_PRELOAD=" not in text.replace("# LD_PRELOAD=", "")
    env, created = docker_daemon
    run = subprocess.run(
        ["docker", "run", "--rm", "--env-file", str(path), "tele-test-image", "true"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "tele test: recorded" in run.stderr, run.stderr
    (request,) = created
    received = dict(item.split("=", 1) for item in request["Env"])
    assert received == ONE_LINE


# compose (dotenv) -----------------------------------------------------------------------------


def test_compose_file_is_read_back_by_a_dotenv_reader(
    stand_in_daemon: None, tmp_path: Path
) -> None:
    dotenv = pytest.importorskip("dotenv", reason="python-dotenv is not installed")
    path, stderr = written(tmp_path, "compose")
    assert stderr == ""
    # python-dotenv reads the quoting and escapes as compose does; interpolation differs
    # (python-dotenv expands ${...} even in single quotes), so that is asserted on the text
    # by compose's documented rules: single-quoted values are literal, a double-quoted one
    # takes $$ for a literal $.
    read = dotenv.dotenv_values(path, interpolate=False)
    compose_dollars = {"MIXED"}
    assert {k: v for k, v in read.items() if k not in compose_dollars} == {
        k: v for k, v in VALUES.items() if k not in compose_dollars
    }
    assert read["MIXED"] == VALUES["MIXED"].replace("$", "$$")
    lines = path.read_text().splitlines()
    assert 'MIXED="it\'s $$HOME\\nand \\\\ \\"more\\" $${X}"' in lines
    assert "DOLLAR='$HOME ${HOME} $(id) `id`'" in lines  # single quotes: no interpolation
    assert "PLAIN=hello" in lines and "EMPTY=" in lines
    assert "LD_PRELOAD" not in read


# sh, csh ---------------------------------------------------------------------------------------

DUMP = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


@pytest.mark.parametrize(
    ("syntax", "source"),
    [("sh", "set -a; . {file}"), ("sh:export", ". {file}")],
)
def test_sh_file_sourced_by_sh_sets_every_value_verbatim(
    stand_in_daemon: None, tmp_path: Path, syntax: str, source: str
) -> None:
    path, stderr = written(tmp_path, syntax)
    assert stderr == ""
    out = tmp_path / "seen.json"
    script = f'{source.format(file=path)}; exec "$0" -c "$1" "$2"'
    subprocess.run(
        ["sh", "-c", script, sys.executable, DUMP, str(out)],
        env={"PATH": "/usr/bin:/bin"}, check=True, timeout=30,
    )  # fmt: skip
    seen = json.loads(out.read_text())
    assert {k: seen.get(k) for k in VALUES} == VALUES
    assert "LD_PRELOAD" not in seen


def test_csh_files_sourced_by_tcsh_set_every_value_verbatim(
    stand_in_daemon: None, tmp_path: Path
) -> None:
    tcsh = shutil.which("tcsh")
    if tcsh is None:
        pytest.skip("tcsh is not on this machine (scripts/setup.sh installs it)")
    path, _ = written(tmp_path, "csh:export")
    assert "setenv PLAIN 'hello'\n" in path.read_text()
    out = tmp_path / "seen.json"
    script, dump = tmp_path / "read.csh", tmp_path / "dump.py"
    dump.write_text(DUMP)
    script.write_text(f"source {path}\n{sys.executable} {dump} {out}\n")
    subprocess.run([tcsh, "-f", str(script)], env={"PATH": "/usr/bin:/bin"}, check=True, timeout=30)
    seen = json.loads(out.read_text())
    assert {k: seen.get(k) for k in VALUES} == VALUES
    assert "LD_PRELOAD" not in seen

    # plain csh: shell variables (`set`), which x$NAME:q passes on as one word (x: an empty
    # one would be no word)
    path, _ = written(tmp_path, "csh")
    assert "set PLAIN='hello'\n" in path.read_text()
    args = " ".join(f"$?{name} x${name}:q" for name in VALUES)
    dump.write_text("import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], 'w'))")
    script.write_text(f"source {path}\n{sys.executable} {dump} {out} {args}\n")
    subprocess.run([tcsh, "-f", str(script)], env={"PATH": "/usr/bin:/bin"}, check=True, timeout=30)
    flat = json.loads(out.read_text())
    assert {name: word[1:] for name, word in zip(VALUES, flat[1::2], strict=True)} == VALUES
    assert set(flat[0::2]) == {"1"}


# cmd, PowerShell: their rules --------------------------------------------------------------------


def _read_cmd_batch(text: str) -> dict[str, str]:
    """A batch file's `set NAME=VALUE` lines as cmd.exe reads them (delayed expansion off):
    `%%` is one `%`, `^` takes the next character literally, `"` toggles quoting (where `^`,
    `&`, `|`, `<`, `>` are literal); an unescaped `&|<>` outside quotes ends the command."""
    values = {}
    for written_line in text.splitlines():
        if written_line.startswith("REM ") or not written_line:
            continue
        assert written_line.startswith("set "), written_line
        line = re.sub(r"%%|%[^%]*%", lambda m: "%" if m[0] == "%%" else "EXPANDED", written_line)
        out, quoted, escape = [], False, False
        for char in line[4:]:
            if escape:
                out.append(char)
                escape = False
            elif char == '"':
                quoted = not quoted
                out.append(char)
            elif quoted:
                out.append(char)
            elif char == "^":
                escape = True
            else:
                assert char not in "&|<>", f"{char!r} ends the command: {line!r}"
                out.append(char)
        name, _, value = "".join(out).partition("=")
        values[name] = value
    return values


def test_cmd_batch_file_follows_cmds_rules(stand_in_daemon: None, tmp_path: Path) -> None:
    path, stderr = written(tmp_path, "cmd")
    assert stderr == left_out_warning(path, "cmd")
    text = path.read_text()
    assert "set CMD=a^&b^|c^<d^>e^^f^(g^)%%PATH%%\n" in text
    assert "REM LD_PRELOAD  (tele: the pod's, kept out; --unsafe-pod-env writes it)\n" in text
    assert _read_cmd_batch(text) == ONE_LINE


def _read_powershell(text: str) -> dict[str, str]:
    """`$Env:NAME='VALUE'` lines as PowerShell reads single-quoted strings: nothing is special
    but the quote characters (' and the typographic single quotes), doubled to stand for one."""
    quotes = "'\u2018\u2019\u201a\u201b"
    values = {}
    position = 0
    while position < len(text):
        if text.startswith("#", position):
            position = text.index("\n", position) + 1
            continue
        match = re.compile(r"\$Env:([A-Za-z_][A-Za-z0-9_]*)=").match(text, position)
        assert match, text[position : position + 40]
        position = match.end()
        assert text[position] in quotes
        position += 1
        value = []
        while True:
            char = text[position]
            if char in quotes:
                if position + 1 < len(text) and text[position + 1] in quotes:
                    value.append(char)
                    position += 2
                    continue
                position += 1
                break
            value.append(char)
            position += 1
        assert text[position] == "\n"
        position += 1
        values[match.group(1)] = "".join(value)
    return values


def test_powershell_file_follows_powershells_rules(stand_in_daemon: None, tmp_path: Path) -> None:
    path, stderr = written(tmp_path, "ps")
    assert stderr == ""
    text = path.read_bytes().decode()  # (no newline translation: a CR is a value's)
    assert "$Env:SMART='it\u2019\u2019s \u2018\u2018so\u2019\u2019'\n" in text
    assert _read_powershell(text) == VALUES


def test_json_syntax_and_bad_syntax(stand_in_daemon: None, tmp_path: Path) -> None:
    path, stderr = written(tmp_path, "json")
    assert json.loads(path.read_text()) == VALUES and stderr == ""
    result = CliRunner().invoke(cli, ["intercept", "api", "-e", "x.env", "--env-syntax", "bash"])
    assert result.exit_code == 2
    assert "Invalid value for '--env-syntax': 'bash' is not one of 'docker', 'compose'" in (
        result.stderr
    )
