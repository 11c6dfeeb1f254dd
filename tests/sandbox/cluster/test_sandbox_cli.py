"""`tele sandbox up/shell/down` with the node: the laptop namespace sees only the API server,
and `down` after a crash (SIGKILL) of the sandbox process removes every namespace it made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pytest

from tele.sandbox.network import netns

pytestmark = pytest.mark.netns


def _tele(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tele", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_up_shell_crash_down(tele_env: dict[str, str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root and network namespaces")
    name = f"c{uuid.uuid4().hex[:6]}"
    try:
        up = _tele(tele_env, "sandbox", "up", "--name", name, "-o", "json")
        assert up.returncode == 0, up.stderr
        pid = json.loads(up.stdout)["pid"]
        assert {f"{name}-node", f"{name}-laptop"} <= set(netns.list_netns())
        assert os.path.ismount(netns.mount_ns_path(f"{name}-laptop"))

        script = (
            "ip -o -4 addr show | awk '{print \"addr\", $2, $4}'; kubectl get ns default -o name; "
            "echo home=$HOME; curl -s -m 1 http://10.96.0.10/ >/dev/null || echo unreachable"
        )
        shell = _tele(tele_env, "sandbox", "shell", "--name", name, "--", "sh", "-c", script)
        assert shell.returncode == 0, shell.stderr
        lines = shell.stdout.splitlines()
        assert [x for x in lines if x.startswith("addr ")] == ["addr lo 127.0.0.1/8"]
        assert "namespace/default" in lines
        assert f"home={tele_env['XDG_STATE_HOME']}/tele/sandbox/{name}/laptop" in lines
        assert lines[-1] == "unreachable"

        os.kill(pid, signal.SIGKILL)
        down = _tele(tele_env, "sandbox", "down", "--name", name)
        assert down.returncode == 0, down.stderr
        assert not [n for n in netns.list_netns() if n.startswith(f"{name}-")]
        assert not (netns.ETC_NETNS / f"{name}-laptop").exists()  # its own resolv.conf too
        assert not netns.mount_ns_path(f"{name}-laptop").parent.exists()  # and its mount ns
    finally:
        _tele(tele_env, "sandbox", "down", "--name", name)
        for n in netns.list_netns():
            if n.startswith(f"{name}-"):
                netns.delete_sync(n)
