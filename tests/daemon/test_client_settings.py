"""Client config keys (~/.config/tele/config.yml) take effect, shown as a user sees them: the
manager's namespace, mapped namespaces, the intercept's default port and agent wait, the
Kubernetes API's first answer, the local handler's dial (issue 19)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import yaml

from tele.daemon.engage import _open_local
from tele.sandbox.testing import ThreadedCluster, threaded_cluster
from tests.daemon.test_connect import ManagerProcess
from tests.daemon.util import DaemonGuard, run_tele, single_error_line


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ThreadedCluster, Path]]:
    kubeconfig = tmp_path / "kubeconfig"
    with threaded_cluster(kubeconfig) as cluster:
        yield cluster, kubeconfig


@pytest.fixture
def manager(cluster: tuple[ThreadedCluster, Path]) -> Iterator[ManagerProcess]:
    """Without authentication: the stand-in agent has no pod token (tests/manager/test_auth)."""
    process = ManagerProcess(cluster[1], lease="2s", auth_mode="disabled")
    try:
        yield process
    finally:
        process.stop()


WORKLOAD = [
    {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "api"}},
            "template": {
                "metadata": {"labels": {"app": "api"}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": "tele-sandbox/echo",
                            "ports": [{"name": "http", "containerPort": 8080}],
                        }
                    ]
                },
            },
        },
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": "http"}]},
    },
]


def write_config(env: dict[str, str], text: str) -> None:
    path = Path(env["XDG_CONFIG_HOME"]) / "tele" / "config.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


def test_manager_namespace_comes_from_flag_then_kubeconfig_then_config(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    kubeconfig = cluster[1]

    def refusal(*flags: str, config: Path = kubeconfig) -> str:
        result = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(config), *flags)
        assert result.returncode == 1, result.stderr
        return single_error_line(result)

    write_config(tele_env, "cluster:\n  defaultManagerNamespace: from-config\n")
    assert "No traffic manager is installed in namespace from-config" in refusal()
    document = yaml.safe_load(kubeconfig.read_text())
    document["clusters"][0]["cluster"]["extensions"] = [
        {"name": "telepresence.io", "extension": {"manager": {"namespace": "from-kubeconfig"}}}
    ]
    with_extension = kubeconfig.parent / "kubeconfig-ext"
    with_extension.write_text(yaml.safe_dump(document))
    assert "namespace from-kubeconfig" in refusal(config=with_extension)
    assert "namespace from-flag" in refusal(
        "--manager-namespace", "from-flag", config=with_extension
    )


def test_cluster_connect_bounds_the_first_answer_of_the_api_server(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        document = yaml.safe_load(cluster[1].read_text())
        document["clusters"][0]["cluster"]["server"] = (
            f"https://127.0.0.1:{silent.getsockname()[1]}"
        )
        broken = cluster[1].parent / "silent-kubeconfig"
        broken.write_text(yaml.safe_dump(document))
        write_config(tele_env, "timeouts:\n  clusterConnect: 1s\n")
        result = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(broken))
    assert result.returncode == 3, result.stderr
    assert single_error_line(result) == (
        f"tele: The Kubernetes API server https://127.0.0.1:{port} did not "
        "answer within 1s (config timeouts.clusterConnect)."
    )


async def test_mapped_namespaces_intercept_timeout_and_default_port(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    manager: ManagerProcess,
    tmp_path: Path,
) -> None:
    from tele.rpc import agent_api as aapi
    from tele.rpc.client import open_client

    kubeconfig = cluster[1]
    manifest = tmp_path / "api.yaml"
    manifest.write_text(yaml.safe_dump_all(WORKLOAD))
    await trio.to_thread.run_sync(
        lambda: subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", str(manifest)],
            check=True,
            capture_output=True,
        )
    )

    async def tele(*args: str) -> subprocess.CompletedProcess[str]:
        return await trio.to_thread.run_sync(lambda: run_tele(tele_env, *args))

    async def echo(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, echo, 0)
        port = listeners[0].socket.getsockname()[1]
        write_config(
            tele_env,
            f"timeouts:\n  intercept: 1s\nintercept:\n  defaultPort: {port}\n"
            "cluster:\n  mappedNamespaces: [default]\n",
        )
        connected = await tele(
            "connect",
            "--no-vif",
            "--kubeconfig",
            str(kubeconfig),
            "--manager-address",
            f"127.0.0.1:{manager.port}",
        )
        assert connected.returncode == 0, connected.stderr
        status = json.loads((await tele("status", "-o", "json")).stdout)
        assert status["session"]["mapped_namespaces"] == ["default"]

        # No agent ever arrives (no kubelet here): the config's 1 s, not the default 30 s.
        started = trio.current_time()
        waited = await tele("intercept", "api")
        assert waited.returncode != 0
        assert "tele: No traffic agent of Deployment default/api arrived within 1s" in (
            waited.stderr
        )
        assert waited.stderr.rstrip().endswith(
            "; if its pods are only slow to start, raise timeouts.intercept in config.yml "
            "(the Helm value timeouts.agentArrival bounds it too)."
        )
        assert trio.current_time() - started < 20

        # With an agent, an intercept without --port goes to intercept.defaultPort.
        agent_link = await trio.open_tcp_stream("127.0.0.1", manager.port)
        async with open_client(agent_link) as agent:
            await agent.call(
                aapi.ARRIVE_AS_AGENT,
                aapi.AgentIdentity(
                    pod_name="api-xyz",
                    namespace="default",
                    pod_ip="10.244.0.9",
                    workload_name="api",
                    workload_kind="Deployment",
                    version="0.1.0",
                ),
            )
            engaged = await tele("intercept", "api")
            assert engaged.returncode == 0, engaged.stderr
            shown = await tele("status")
            assert f"api: intercepted Deployment default/api -> 127.0.0.1:{port} (tcp)" in (
                shown.stdout
            )
            assert (await tele("leave", "api")).returncode == 0
        nursery.cancel_scope.cancel()


async def test_endpoint_dial_bounds_the_connection_to_the_local_handler() -> None:
    """A local handler that never accepts (its backlog full: the kernel drops the SYNs) is a
    refused connection after endpointDial, not a caller left waiting."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        where = full.getsockname()
        fillers = []
        try:
            for _ in range(2):  # Linux takes backlog + 1 into the queue
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(where)
                fillers.append(filler)
            started = trio.current_time()
            assert await _open_local(where, None, 0.5) is None
            assert 0.4 < trio.current_time() - started < 5
        finally:
            for filler in fillers:
                filler.close()


def test_dns_and_routing_come_from_flags_then_kubeconfig_then_manager_then_config(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    """Each key from the first source that sets it: `tele connect` flags, the kubeconfig's
    telepresence.io extension, the manager's Helm values `client.*`, config.yml."""
    helm_client = {
        "dns": {
            "includeSuffixes": [".manager"],
            "mappings": [{"name": "db.local", "aliasFor": "10.0.0.5"}],
        },
        "routing": {"alsoProxySubnets": ["10.50.0.0/16"], "neverProxySubnets": ["10.0.2.0/24"]},
    }
    manager = ManagerProcess(
        cluster[1],
        lease="10s",
        auth_mode="disabled",
        extra_env={"TELE_CLIENT_CONFIG": json.dumps(helm_client)},
    )
    try:
        write_config(
            tele_env,
            "dns:\n  includeSuffixes: [.config]\n  excludes: [config.only]\n"
            "  lookupTimeout: 3s\nrouting:\n  neverProxySubnets: [10.0.1.0/24]\n",
        )
        document = yaml.safe_load(cluster[1].read_text())
        document["clusters"][0]["cluster"]["extensions"] = [
            {
                "name": "telepresence.io",
                "extension": {
                    "dns": {"include-suffixes": [".kube"]},
                    "also-proxy": ["10.60.0.0/16"],
                },
            }
        ]
        kubeconfig = cluster[1].parent / "kubeconfig-ext"
        kubeconfig.write_text(yaml.safe_dump(document))
        connected = run_tele(
            tele_env,
            "connect",
            "--no-vif",
            "--kubeconfig",
            str(kubeconfig),
            "--manager-address",
            f"127.0.0.1:{manager.port}",
            "--also-proxy",
            "10.70.0.0/16",
        )
        assert connected.returncode == 0, connected.stderr
        status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
        assert status["session"]["dns_and_routing"] == {
            "dns": {
                "includeSuffixes": [".kube"],  # the kubeconfig's, over the manager's and config's
                "excludes": ["config.only"],  # only config.yml sets it
                "mappings": [{"name": "db.local", "aliasFor": "10.0.0.5"}],  # the manager's
                "lookupTimeout": "3s",
            },
            "routing": {
                "alsoProxySubnets": ["10.70.0.0/16"],  # the flag, over kubeconfig and manager
                "neverProxySubnets": ["10.0.2.0/24"],  # the manager's, over config.yml
            },
        }
    finally:
        manager.stop()


@pytest.mark.parametrize(
    ("config_text", "sentence"),
    [
        (
            "dns:\n  mappings:\n    - {name: db.local, aliasFor: 'not a name!'}\n",
            "the DNS mapping of db.local is an alias for 'not a name!', which is neither a DNS "
            "name nor an IP address.",
        ),
        (
            "routing:\n  alsoProxySubnets: [10.0.0.0/33]\n",
            "routing.alsoProxySubnets has '10.0.0.0/33', which is not a subnet (CIDR).",
        ),
    ],
)
def test_a_bad_dns_or_routing_setting_is_one_sentence_and_no_session(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    config_text: str,
    sentence: str,
) -> None:
    write_config(tele_env, config_text)
    result = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(cluster[1]))
    assert result.returncode == 1, result.stderr
    line = single_error_line(result)
    assert line.startswith("tele: In the config file ") and line.endswith(sentence), line
    status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    assert status.get("session") is None


@pytest.mark.parametrize(
    ("config_text", "flags", "sentence"),
    [
        (
            "",
            ["--vnat", "everything"],
            "tele: --vnat 'everything' is not a CIDR like 10.0.0.0/8",
        ),
        (
            "",
            ["--vnat", "246.246.0.0/24"],
            "tele: --vnat 246.246.0.0/24 overlaps the virtual IP subnet 246.246.0.0/16; choose "
            "another cluster.virtualIPSubnet in the config",
        ),
        (
            "cluster:\n  virtualIPSubnet: 10.96.0.0/12\n",
            ["--vnat", "pods"],
            "tele: The virtual IP subnet 10.96.0.0/12 overlaps the routed subnet 10.96.0.0/16; "
            "choose another cluster.virtualIPSubnet in the config",
        ),
    ],
)
def test_vnat_that_cannot_work_is_one_sentence_and_no_session(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    manager: ManagerProcess,
    config_text: str,
    flags: list[str],
    sentence: str,
) -> None:
    write_config(tele_env, config_text)
    address = f"127.0.0.1:{manager.port}"
    args = ["connect", "--no-vif", "--kubeconfig", str(cluster[1]), "--manager-address", address]
    result = run_tele(tele_env, *args, *flags)
    assert result.returncode == 1, result.stderr
    assert single_error_line(result).rstrip(".") == sentence
    status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    assert status.get("session") is None
    if "routed subnet" in sentence:  # refused after arriving: the session departed at once
        manager.wait_for_log("departed")


def test_daemon_start_bounds_the_wait_for_a_starting_daemon(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    write_config(tele_env, "timeouts:\n  daemonStart: 0s\n")
    result = run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(cluster[1]))
    assert result.returncode == 3, result.stderr
    assert single_error_line(result).startswith("tele: The daemon did not start within 0s; see ")


def test_user_daemon_log_level_is_the_daemons(
    tele_env: dict[str, str], guard: DaemonGuard, cluster: tuple[ThreadedCluster, Path]
) -> None:
    log = Path(tele_env["XDG_CACHE_HOME"]) / "tele" / "logs" / "daemon.log"
    write_config(tele_env, "logLevels:\n  userDaemon: debug\n")
    run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(cluster[1]))
    assert " DEBUG " in log.read_text()
    assert run_tele(tele_env, "quit").returncode == 0
    log.unlink()
    write_config(tele_env, "logLevels:\n  userDaemon: warning\n")
    run_tele(tele_env, "connect", "--no-vif", "--kubeconfig", str(cluster[1]))
    text = log.read_text()
    assert " DEBUG " not in text and " INFO " not in text, text


async def test_traffic_manager_api_bounds_each_call_to_the_manager(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    nursery: trio.Nursery,
) -> None:
    """A manager that takes the link but never answers ARRIVE: the config's 1 s, then one
    sentence, instead of the default 15 s."""
    from tele.rpc import manager_api as mapi
    from tele.rpc.server import Router, serve_connection

    async def never(_: mapi.ClientIdentity) -> mapi.SessionInfo:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    router = Router()
    router.unary(mapi.ARRIVE, never)

    async def serve(stream: trio.SocketStream) -> None:
        await serve_connection(stream, router)

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    port = listeners[0].socket.getsockname()[1]
    write_config(tele_env, "timeouts:\n  trafficManagerAPI: 1s\n")
    started = trio.current_time()
    result = await trio.to_thread.run_sync(
        lambda: run_tele(
            tele_env,
            "connect",
            "--no-vif",
            "--kubeconfig",
            str(cluster[1]),
            "--manager-address",
            f"127.0.0.1:{port}",
        )
    )
    assert result.returncode != 0
    assert single_error_line(result) == (
        "tele: The traffic manager did not answer ArriveAsClient within 1s "
        "(timeouts.trafficManagerAPI); if it is only slow, raise timeouts.trafficManagerAPI "
        "in config.yml (`tele config view` shows the settings), otherwise look at the "
        "traffic-manager pod with kubectl."
    )
    assert trio.current_time() - started < 10
    nursery.cancel_scope.cancel()


HOST_NETWORK_WORKLOAD = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "hostnet", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "hostnet"}},
        "template": {
            "metadata": {"labels": {"app": "hostnet"}},
            "spec": {
                "hostNetwork": True,
                "containers": [{"name": "app", "image": "tele-sandbox/echo"}],
            },
        },
    },
}


NO_VIF = (
    "tele: --proxy-via needs the virtual network interface (its subnets' virtual IPs are "
    "routed there), which --no-vif turns off; drop one of the two"
)
NO_NETWORK = (
    "tele: --proxy-via needs the virtual network interface (its subnets' virtual IPs are "
    "routed there), and this connect sets up none; connect without --no-vif"
)


@pytest.mark.parametrize(
    ("flags", "sentence"),
    [
        (
            ["10.0.0.0/24"],
            "tele: --proxy-via '10.0.0.0/24' is not CIDR=WORKLOAD: give e.g. 10.0.0.0/24=my-app",
        ),
        (
            ["10.0.0.0/33=api"],
            "tele: --proxy-via '10.0.0.0/33' is not a CIDR like 10.0.0.0/24 (nor one of pods, "
            "service, also, all)",
        ),
        (
            ["246.246.7.0/24=api"],
            "tele: --proxy-via 246.246.7.0/24 overlaps the virtual IP subnet 246.246.0.0/16; "
            "choose another subnet, or another cluster.virtualIPSubnet in the config",
        ),
        (
            ["10.0.0.0/16=api", "--proxy-via", "10.0.1.0/24=hostnet"],
            "tele: --proxy-via 10.0.1.0/24=hostnet overlaps --proxy-via 10.0.0.0/16=api: an "
            "address can go out through one workload only; give subnets that do not overlap",
        ),
        (
            ["10.0.1.0/24=hostnet", "--vnat", "10.0.0.0/16"],
            "tele: --proxy-via 10.0.1.0/24=hostnet overlaps --vnat 10.0.0.0/16: an address goes "
            "out through the workload or through the traffic manager, not both; give subnets "
            "that do not overlap (a --proxy-via subnet gets virtual IPs without --vnat)",
        ),
        (["10.1.0.0/24=hostnet", "--no-vif"], NO_VIF),
        # The suite's TELE_VIF=0: no VIF unless asked for, as a daemon that cannot set one up.
        (["10.1.0.0/24=hostnet"], NO_NETWORK),
    ],
)
def test_proxy_via_that_cannot_work_is_one_sentence_and_no_session(
    tele_env: dict[str, str],
    guard: DaemonGuard,
    cluster: tuple[ThreadedCluster, Path],
    manager: ManagerProcess,
    tmp_path: Path,
    flags: list[str],
    sentence: str,
) -> None:
    """Malformed, overlapping, or with no VIF to route the subnet: refused before arriving,
    so the manager never hears of it (no agent is injected, nothing is left). The manager's
    own refusals (an unknown workload, pods that cannot run an agent) need a VIF first: the
    sandbox e2e (tests/e2e/test_vnat_on_sandbox.py) drives them."""
    manifest = tmp_path / "hostnet.yaml"
    manifest.write_text(yaml.safe_dump(HOST_NETWORK_WORKLOAD))
    kubectl = ["kubectl", "--kubeconfig", str(cluster[1])]
    subprocess.run([*kubectl, "apply", "-f", str(manifest)], check=True, capture_output=True)
    address = f"127.0.0.1:{manager.port}"
    args = ["connect", "--kubeconfig", str(cluster[1]), "--manager-address", address]
    result = run_tele(tele_env, *args, "--proxy-via", *flags)
    assert result.returncode == 1, result.stderr
    assert single_error_line(result).rstrip(".") == sentence
    status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    assert status.get("session") is None
    assert not any(" arrived: " in line for line in manager.lines), manager.lines
    deployment = subprocess.run(
        [*kubectl, "get", "deployment", "hostnet", "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "traffic-agent" not in deployment  # never rolled with an agent


@pytest.mark.parametrize("helper", [False, True])
def test_proxy_via_with_a_daemon_that_cannot_set_up_the_vif(
    monkeypatch: pytest.MonkeyPatch, helper: bool
) -> None:
    """`tele connect` (the VIF when possible) with a daemon that has no CAP_NET_ADMIN: with
    --proxy-via, no privileged helper is a sentence before arriving; a helper is taken then,
    and the VIF becomes required (its failure fails the connect, it is no longer a note)."""
    from tele.daemon.session import ClusterSession
    from tele.errors import UserError
    from tele.rpc import daemon_api
    from tele.vif import caps
    from tele.vif.connect import NetworkOptions

    monkeypatch.setattr(caps, "has_net_admin", lambda pid="self": False)
    taken: list[object] = []
    marker = object()

    def take_helper() -> object | None:
        taken.append(marker)
        return marker if helper else None

    session = ClusterSession.__new__(ClusterSession)
    session.request = daemon_api.ConnectRequest(proxy_via=["10.1.0.0/24=api"])
    session.network_options = NetworkOptions(when_possible=True)
    session._take_helper = take_helper  # type: ignore[assignment]
    session._privileges = None
    if helper:
        session._require_network()
        assert session._privileges is marker and session.network_options.enabled
    else:
        with pytest.raises(UserError) as refused:
            session._require_network()
        assert str(refused.value) == (
            "--proxy-via needs the virtual network interface, and the daemon runs without "
            "CAP_NET_ADMIN and no privileged helper was started; `tele connect --vif` starts "
            "one with sudo."
        )
    assert taken == [marker]
