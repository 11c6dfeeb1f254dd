"""`python -m tele.agent agent` as a process: config errors, and forwarding with the real env."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
import trio

from tests.agent.servers import settings_for, start_tcp_server


async def test_missing_config_is_one_sentence_and_exit_1() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("_TEL_")}
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "tele.agent", "agent"],
            env=env,
            capture_stderr=True,
            check=False,
        )
    stderr = done.stderr.decode()
    assert done.returncode == 1
    assert "_TEL_AGENT_CONFIG is not set" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


async def test_agent_process_forwards_its_port_to_the_app() -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    agent_port = probe.getsockname()[1]
    probe.close()  # free again for the agent (a tiny race with other processes)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            settings = settings_for(app.port)
            config = msgspec.to_builtins(settings.config)
            config["containers"][0]["intercepts"][0]["agent_port"] = agent_port
            config["manager_host"] = "127.0.0.1"  # no DNS look-ups for a manager that is absent
            env = {**os.environ, "_TEL_AGENT_CONFIG": json.dumps(config), "LOG_LEVEL": "info"}
            command = [sys.executable, "-m", "tele.agent", "agent"]
            process = await trio.lowlevel.open_process(command, env=env, stderr=subprocess.PIPE)
            try:
                assert process.stderr is not None
                log = b""
                while b"ready on" not in log:  # the agent logs once it listens
                    chunk = await process.stderr.receive_some(4096)
                    assert chunk, log.decode()
                    log += chunk
                stream = await trio.open_tcp_stream("127.0.0.1", agent_port)
                async with stream:
                    await stream.send_all(b"hello")
                    await stream.send_eof()
                    received = b""
                    while data := await stream.receive_some(4096):
                        received += data
            finally:
                process.terminate()
                with trio.CancelScope(shield=True):
                    await process.wait()
                    if process.stderr is not None:
                        await process.stderr.aclose()
            nursery.cancel_scope.cancel()
    assert received.startswith(b"app:5:")
