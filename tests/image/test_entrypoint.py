"""tele's image entry point as a container's PID 1: SIGTERM ends the agent promptly and cleanly
(PID 1 gets no default action for it; without a handler a pod's deletion waits out its grace
period)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from tele.image.build import _ENTRYPOINT_SCRIPT
from tele.testing.waits import wait_for
from tests.agent.servers import settings_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (a PID namespace)",
)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _pid_in_its_namespace(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("NSpid:")[1].splitlines()[0].split()[-1])


async def test_sigterm_ends_the_agent_running_as_pid_1(tmp_path: Path) -> None:
    entrypoint = tmp_path / "tele-entrypoint"
    entrypoint.write_text(_ENTRYPOINT_SCRIPT.replace(_ENTRYPOINT_SCRIPT.splitlines()[0], ""))
    config = msgspec.to_builtins(settings_for(9).config)
    config["manager_host"] = "127.0.0.1"
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    config["containers"][0]["intercepts"][0]["agent_port"] = probe.getsockname()[1]
    probe.close()  # free again for the agent (a tiny race with other processes)
    env = {**os.environ, "_TEL_AGENT_CONFIG": json.dumps(config), "LOG_LEVEL": "info"}
    command = ["unshare", "--pid", "--fork", sys.executable, str(entrypoint), "agent"]
    process = await trio.lowlevel.open_process(command, env=env, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        log = b""
        with trio.fail_after(30):
            while b"ready on" not in log:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log.decode()
                log += chunk
        await wait_for(lambda: bool(_children(process.pid)))
        [pid_1] = _children(process.pid)  # the agent: PID 1 of its namespace
        assert _pid_in_its_namespace(pid_1) == 1
        os.kill(pid_1, signal.SIGTERM)
        with trio.fail_after(10):
            while chunk := await process.stderr.receive_some(4096):
                log += chunk
            code = await process.wait()
        assert code == 0, log.decode()[-2000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
