"""A Service whose targetPort is a number: the webhook adds agent-init (tele's image, root with
NET_ADMIN), which redirects the container port to the agent with nft inside the pod's network
namespace; an intercept then answers a cluster call from this machine."""

from __future__ import annotations

import json

import pytest

from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import (
    apply_ready,
    caller_pod,
    connect,
    deployment,
    echo_container,
    in_caller,
    install_manager,
    kubectl,
    manifest,
    service,
)
from tests.e2e.test_intercept_on_sandbox import laptop_handler  # noqa: F401 - the fixture
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

APP = manifest(
    deployment("numeric", echo_container(port_name=None)),
    service("numeric", {"port": 80, "targetPort": 8080}),
    caller_pod(),
)

CALL = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://numeric.default/', timeout=10).read().decode())"
)


def test_numeric_target_port_is_redirected_by_agent_init_from_teles_image(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
    laptop_handler: int,  # noqa: F811
) -> None:
    install_manager(node_sandbox, tele_env)
    apply_ready(node_sandbox, APP)
    assert '"pod": "numeric-' in in_caller(node_sandbox, CALL)

    connect(tele_env, node_sandbox)
    engaged = run_tele(tele_env, "intercept", "numeric", "--port", str(laptop_handler), timeout=120)
    assert engaged.returncode == 0, engaged.stderr
    assert in_caller(node_sandbox, CALL) == "hello from the laptop\n\n"

    pods = json.loads(kubectl(node_sandbox, "get", "pods", "-l", "app=numeric", "-o", "json"))
    [pod] = pods["items"]
    [init] = pod["status"]["initContainerStatuses"]
    assert init["name"] == "tele-agent-init"
    assert init["state"]["terminated"]["exitCode"] == 0, init
    # Pulled and run from tele's image (a module of this venv would have no digest).
    assert "@sha256:" in init["imageID"], init

    assert run_tele(tele_env, "leave", "numeric").returncode == 0
    assert run_tele(tele_env, "quit").returncode == 0
