"""Issue 18 on the sandbox: `tele intercept` on a terminal shows its current step while the
agent is injected (and nothing extra when piped); `tele loglevel` reaches the traffic manager
and its agents (and `--remote-only`, `--local-only` keep to their side); `tele gather-logs
--traffic-manager --traffic-agents [--anonymize]` zips the manager's log (with its audit lines)
and the agents', read through the manager, with names and addresses replaced consistently."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import socket
import struct
import subprocess
import termios
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tests.daemon.util import TELE, DaemonGuard, run_tele
from tests.e2e import apply_ready, connect, install_manager, kubectl
from tests.e2e.test_intercept_on_sandbox import APP
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns


def _on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`tele ARGS` with stderr on a terminal (a pty 400 columns wide), as a user sees it: the
    exit code, stdout, and everything the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
    process = subprocess.Popen(
        [TELE, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    received: list[bytes] = []

    def pump() -> None:  # (read as it comes: a full pty would block the CLI's writes)
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the CLI closed its end
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        stdout, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(10)
        os.close(master)
    return process.returncode, stdout.decode(), b"".join(received).decode(errors="replace")


def _logs_until(sandbox: NodeSandbox, needle: str, *args: str, deadline: float = 60) -> str:
    """`kubectl logs ARGS` once it holds `needle` (an agent hears of a level asynchronously)."""
    end = time.monotonic() + deadline
    while True:
        text = kubectl(sandbox, "logs", *args)
        if needle in text or time.monotonic() > end:
            return text
        time.sleep(0.5)


def test_loglevel_and_gather_logs_reach_the_manager_and_agents(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    tmp_path: Path,
) -> None:
    install_manager(node_sandbox, tele_env)
    apply_ready(node_sandbox, APP)
    connect(tele_env, node_sandbox)
    # The first intercept injects the agent: a terminal sees the step and the seconds waited.
    handler = socket.create_server(("127.0.0.1", 0))
    port = handler.getsockname()[1]
    try:
        code, stdout, terminal = _on_a_terminal(tele_env, "intercept", "echo", "--port", str(port))
        assert code == 0, terminal
        assert "Intercepting echo: the traffic manager engages echo (injecting its traffic " in (
            terminal
        )
        assert re.search(r"\(\d+s\)", terminal)
        assert "Intercept name         : echo" in stdout
        assert run_tele(tele_env, "leave", "echo").returncode == 0
        piped = run_tele(tele_env, "intercept", "echo", "--port", str(port), timeout=120)
        assert (piped.returncode, piped.stderr) == (0, "")  # piped: no progress at all
    finally:
        handler.close()
    manager_pod = kubectl(
        node_sandbox, "get", "pod", "-n", "ambassador", "-l", "app=traffic-manager",
        "-o", "jsonpath={.items[0].metadata.name}",
    )  # fmt: skip
    agent_pod = kubectl(
        node_sandbox, "get", "pod", "-l", "app=echo", "-o", "jsonpath={.items[0].metadata.name}"
    )

    # loglevel: the daemon, the manager and its one agent, the value said once.
    both = run_tele(tele_env, "loglevel", "debug", "-d", "5m")
    assert both.returncode == 0, both.stderr
    assert both.stdout == (
        "The log level is debug for the daemon (was info), the traffic manager (was info) and "
        "1 traffic agent; their configured levels return in 5m.\n"
    )
    manager_log = _logs_until(node_sandbox, "log level info -> debug", "-n", "ambassador",
                              manager_pod)  # fmt: skip
    assert "log level info -> debug for 300s" in manager_log
    agent_log = _logs_until(node_sandbox, "(tele loglevel)", agent_pod, "-c", "traffic-agent")
    assert "log level info -> debug (tele loglevel)" in agent_log
    # debug shows tele's steps, not the h2 frames or HTTP requests of the libraries
    assert not re.search(r" DEBUG (h2|hpack|httpx|httpcore)\b", manager_log)

    remote = run_tele(tele_env, "loglevel", "info", "--remote-only", "-o", "json")
    assert remote.returncode == 0, remote.stderr
    reply = json.loads(remote.stdout)
    assert (reply["previous"], reply["traffic_manager"]) == (
        "",
        {"level": "info", "previous": "debug", "agents": 1},
    )
    agent_log = _logs_until(node_sandbox, "debug -> info", agent_pod, "-c", "traffic-agent")
    assert "log level debug -> info (tele loglevel)" in agent_log
    local = run_tele(tele_env, "loglevel", "warning", "--local-only", "-d", "0")
    assert local.stdout == "The daemon's log level is warning (was debug).\n", local.stderr
    status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    assert status["daemon"]["log_level"] == "warning"

    # gather-logs: the manager's log (its audit lines too) and the agent's, through the manager.
    target = tmp_path / "bug.zip"
    gathered = run_tele(
        tele_env, "gather-logs", "--traffic-manager", "--traffic-agents", "--output-file",
        str(target), "-o", "json", timeout=120,
    )  # fmt: skip
    assert gathered.returncode == 0, gathered.stderr
    data = json.loads(gathered.stdout)
    manager_entry = f"tele_logs/cluster/traffic-manager/{manager_pod}.log"
    agent_entry = f"tele_logs/cluster/traffic-agents/default/{agent_pod}.log"
    assert {manager_entry, agent_entry, "tele_logs/daemon.log"} <= set(data["files"])
    assert (data["connected"], data["anonymized"], data["problems"]) == (True, False, [])
    with zipfile.ZipFile(target) as archive:
        manager_text = archive.read(manager_entry).decode()
        agent_text = archive.read(agent_entry).decode()
    audit = [json.loads(line.split(" audit ", 1)[1]) for line in manager_text.splitlines()
             if " audit {" in line]  # fmt: skip
    assert {"engagement-start", "log-level"} <= {entry["event"] for entry in audit}
    assert "log level info -> debug (tele loglevel)" in agent_text

    # --anonymize: the same stand-in for the same name in every file and file name.
    anonymous = tmp_path / "anonymous.zip"
    gathered = run_tele(
        tele_env, "gather-logs", "--traffic-agents", "echo", "--no-traffic-manager",
        "--anonymize", "--output-file", str(anonymous), "-o", "json", timeout=120,
    )  # fmt: skip
    assert gathered.returncode == 0, gathered.stderr
    files = json.loads(gathered.stdout)["files"]
    [agent_file] = [f for f in files if f.startswith("tele_logs/cluster/traffic-agents/")]
    assert agent_file == "tele_logs/cluster/traffic-agents/default/pod-1.log"
    with zipfile.ZipFile(anonymous) as archive:
        texts = {name: archive.read(name).decode() for name in archive.namelist()}
    everything = "\n".join(texts.values())
    assert agent_pod not in everything and manager_pod not in everything
    assert not re.search(r"\b10\.\d+\.\d+\.\d+\b", everything)  # the sandbox's pod addresses
    assert not re.search(r"\becho\b", everything), [
        line for line in everything.splitlines() if re.search(r"\becho\b", line)
    ][:5]
    assert "log level debug -> info (tele loglevel)" in texts[agent_file]
