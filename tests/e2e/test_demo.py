"""`tele demo` as a newcomer runs it: every step succeeds and nothing is left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tele.sandbox.network import netns
from tests.conftest import VENV_BIN


@pytest.mark.netns
def test_demo_tells_the_whole_story_and_cleans_up(tele_env: dict[str, str]) -> None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        pytest.skip("the sandbox's node and laptop need root, iproute2 and nftables")
    name = f"tele-demo-t{uuid.uuid4().hex[:5]}"
    host_resolv = _fingerprint(Path("/etc/resolv.conf"))
    try:
        result = subprocess.run(
            [str(VENV_BIN / "tele"), "demo", "--name", name],
            env=tele_env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        left = [n for n in netns.list_netns() if n.startswith(f"{name}-")]
        for n in left:
            netns.delete_sync(n)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = result.stdout
    for outcome in (
        "Connect the laptop to the cluster",
        "-> the frontend pod called the backend pod",
        "-> engaged (the agent was injected by the webhook)",
        "-> the backend call was answered on the laptop",
        "-> answered by the cluster's backend pod",
        "-> replaced (the pod rolled without it)",
        "-> left (the container runs again)",
        "-> left",
        "the sandbox and its namespaces are gone",
    ):
        assert outcome in out, out
    assert out.rstrip().splitlines()[-1].startswith("total")
    assert not left, f"the demo left network namespaces behind: {left}"
    # The laptop's DNS set-up went to the laptop's own resolv.conf: the host's was never written.
    assert _fingerprint(Path("/etc/resolv.conf")) == host_resolv
    assert not Path("/etc/resolv.conf.tele-orig").exists()
    assert not Path(f"/etc/netns/{name}-laptop").exists()


def _fingerprint(path: Path) -> tuple[int, int, bytes]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


def test_a_failing_step_is_named_and_the_exit_is_non_zero(tele_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "tele"), "demo", "--name", "Not Valid"],
        env=tele_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("tele: step 'Start a sandbox cluster' failed: ")
    assert "== Tear down" in result.stdout
