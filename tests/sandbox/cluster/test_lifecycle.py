"""Container lifecycle: restart policy with back-off (CrashLoopBackOff, `logs --previous`),
liveness restarts, `logs -f` until the container ends, graceful deletion (SIGTERM, then SIGKILL
after the grace period). The test cluster's back-off starts at 0.2 s instead of 10 s."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from .conftest import Kubectl

pytestmark = pytest.mark.netns


def _pod(name: str, script: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "containers": [
                    {"name": "c", "image": "tele-sandbox/worker", "command": ["sh", "-c", script]}
                ],
                **spec,
            },
        }
    )


def test_crash_loop_and_previous_logs(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", "-", input=_pod("crash", "echo run $$; exit 3"))
    kubectl.run(
        "wait",
        "--for=jsonpath={.status.containerStatuses[0].restartCount}=2",
        "pod/crash",
        "--timeout=30s",
    )
    status = json.loads(kubectl.run("get", "pod", "crash", "-o", "json").stdout)["status"]
    last = status["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 3 and last["reason"] == "Error"
    previous = kubectl.run("logs", "crash", "--previous").stdout
    assert previous.startswith("run ")
    table = kubectl.run("get", "pod", "crash").stdout
    assert "CrashLoopBackOff" in table or "Error" in table or "Running" in table


def test_liveness_restart_and_follow(kubectl: Kubectl) -> None:
    probe = {
        "exec": {"command": ["sh", "-c", "test ! -e /tmp/unhealthy-$HOSTNAME"]},
        "periodSeconds": 1,
        "failureThreshold": 1,
    }
    pod = json.loads(_pod("live", "sleep 1; touch /tmp/unhealthy-$HOSTNAME; sleep 60"))
    pod["spec"]["containers"][0]["livenessProbe"] = probe
    pod["spec"]["terminationGracePeriodSeconds"] = 1
    kubectl.run("apply", "-f", "-", input=json.dumps(pod))
    try:
        kubectl.run(
            "wait",
            "--for=jsonpath={.status.containerStatuses[0].restartCount}=1",
            "pod/live",
            "--timeout=30s",
        )
    finally:
        kubectl.run("delete", "pod", "live", "--grace-period=0", "--force", check=False)

    script = "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done"
    kubectl.run("apply", "-f", "-", input=_pod("follow", script, restartPolicy="Never"))
    kubectl.run("wait", "--for=condition=Ready", "pod/follow", "--timeout=30s")
    followed = kubectl.run("logs", "-f", "follow", timeout=30).stdout
    assert followed.splitlines() == [f"line {i}" for i in range(1, 6)]


def test_graceful_deletion(kubectl: Kubectl) -> None:
    polite = "trap 'echo got TERM; exit 0' TERM; echo up; while true; do sleep 0.1; done"
    stubborn = "trap '' TERM; echo up; while true; do sleep 0.1; done"
    kubectl.run("apply", "-f", "-", input=_pod("polite", polite, terminationGracePeriodSeconds=30))
    kubectl.run(
        "apply", "-f", "-", input=_pod("stubborn", stubborn, terminationGracePeriodSeconds=2)
    )
    kubectl.run("wait", "--for=condition=Ready", "pod/polite", "pod/stubborn", "--timeout=30s")

    started = time.monotonic()
    kubectl.run("delete", "pod", "polite", "--timeout=20s")
    assert time.monotonic() - started < 10  # SIGTERM ended it long before its 30 s grace

    started = time.monotonic()
    kubectl.run("delete", "pod", "stubborn", "--timeout=20s")
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 10  # ignored SIGTERM: killed once the 2 s grace period ran out
    assert kubectl.run("get", "pods", "-o", "name").stdout.strip() == ""


def test_kubectl_exec(kubectl: Kubectl) -> None:
    script = "echo up; while true; do sleep 0.2; done"
    kubectl.run("apply", "-f", "-", input=_pod("shell", script, terminationGracePeriodSeconds=1))
    kubectl.run("wait", "--for=condition=Ready", "pod/shell", "--timeout=30s")
    result = kubectl.run(
        "exec", "shell", "--", "sh", "-c", "echo out $HOSTNAME; echo err >&2; exit 3", check=False
    )
    assert result.returncode == 3
    assert result.stdout == "out shell\n" and "err" in result.stderr
    piped = kubectl.run("exec", "-i", "shell", "--", "tr", "a-z", "A-Z", input="hello\n")
    assert piped.stdout == "HELLO\n"
