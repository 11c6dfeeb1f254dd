"""End-to-end tests on the sandbox with a node; shared steps below: kubectl, the manager's
install, the objects the tests apply (built by `manifest` from `deployment`, `echo_container`,
`service` and `caller_pod`), and a local HTTP handler."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import VENV_BIN
from tests.daemon.util import DaemonGuard, run_tele
from tests.sandbox.cluster.conftest import NodeSandbox

Object = dict[str, Any]


def kubectl(sandbox: NodeSandbox, *args: str, stdin: str | None = None) -> str:
    """kubectl against the sandbox; its stdout, asserting success."""
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(sandbox.kubeconfig), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def install_manager(sandbox: NodeSandbox, env: dict[str, str], *values: str) -> None:
    """`tele helm install` (with `--set` for each of `values`), then wait until the manager
    pod is ready."""
    sets = [arg for value in values for arg in ("--set", value)]
    installed = run_tele(
        env, "helm", "install", "--kubeconfig", str(sandbox.kubeconfig), *sets, timeout=120
    )
    assert installed.returncode == 0, installed.stderr
    kubectl(
        sandbox,
        "wait",
        "-n",
        "ambassador",
        "--for=condition=Ready",
        "pod",
        "-l",
        "app=traffic-manager",
        "--timeout=90s",
    )


def apply_ready(sandbox: NodeSandbox, manifest: str, app: str | None = None) -> None:
    """Apply `manifest`, then wait until every pod of the default namespace (or of the
    workload `app`) is Ready."""
    kubectl(sandbox, "apply", "-f", "-", stdin=manifest)
    # Right after the apply a Deployment's pods may not exist yet: `kubectl wait` would find
    # none ("no matching resources", an error) or only the pods that already were there.
    for obj in yaml.safe_load_all(manifest):
        if isinstance(obj, dict) and obj.get("kind") == "Deployment":
            meta = obj["metadata"]
            namespace = ("-n", meta["namespace"]) if meta.get("namespace") else ()
            kubectl(
                sandbox,
                "rollout",
                "status",
                *namespace,
                f"deployment/{meta['name']}",
                "--timeout=90s",
            )
    which = ("-l", f"app={app}") if app else ("--all",)
    kubectl(sandbox, "wait", "--for=condition=Ready", "pod", *which, "--timeout=90s")


def wait_rolled(sandbox: NodeSandbox, app: str, namespace: str = "default") -> None:
    """Wait until the Deployment `app` rolled out and its pods are Ready (`kubectl wait -l`
    alone, right after an apply, finds no pod yet: "no matching resources found")."""
    kubectl(sandbox, "rollout", "status", "-n", namespace, f"deployment/{app}", "--timeout=90s")
    ready = ("--for=condition=Ready", "pod", "-l", f"app={app}", "--timeout=90s")
    kubectl(sandbox, "wait", "-n", namespace, *ready)


def in_caller(sandbox: NodeSandbox, script: str, *args: str) -> str:
    """What the Python `script` (with `args`) prints in the caller pod (`caller_pod`)."""
    return kubectl(sandbox, "exec", "caller", "--", "python3", "-c", script, *args)


def call(sandbox: NodeSandbox, url: str) -> str:
    """What the caller pod (`caller_pod`) gets from `url`: a cluster-side client."""
    script = (
        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    )
    return in_caller(sandbox, script).strip()


def connect(env: dict[str, str], sandbox: NodeSandbox) -> None:
    """`tele connect --no-vif` to the sandbox, asserting success."""
    connected = run_tele(
        env, "connect", "--no-vif", "--kubeconfig", str(sandbox.kubeconfig), timeout=120
    )
    assert connected.returncode == 0, connected.stderr


@contextmanager
def installed_with(
    sandbox: NodeSandbox, apps: str, *, uninstall: bool = True
) -> Iterator[NodeSandbox]:
    """The traffic manager and `apps` (Ready), installed with a tele environment of its own,
    for a module's tests to share; with `uninstall`, the manager is uninstalled at the end."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HOME": home, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
        for name in ("CONFIG", "CACHE", "STATE", "RUNTIME"):
            env[f"XDG_{name}_HOME" if name != "RUNTIME" else "XDG_RUNTIME_DIR"] = home
        guard = DaemonGuard(env)
        try:
            install_manager(sandbox, env)
            apply_ready(sandbox, apps)
            yield sandbox
            if uninstall:
                kubeconfig = str(sandbox.kubeconfig)
                run_tele(env, "helm", "uninstall", "--kubeconfig", kubeconfig, timeout=120)
        finally:
            guard.kill_all()


def manifest(*objects: Object) -> str:
    """The objects as one YAML stream, for `kubectl apply -f -`."""
    return yaml.safe_dump_all(objects, sort_keys=False)


def env_list(**values: str) -> list[Object]:
    """A container's `env` from keyword arguments."""
    return [{"name": name, "value": value} for name, value in values.items()]


def echo_container(
    port: int = 8080,
    *,
    name: str = "echo",
    image: str = "tele-sandbox/echo",
    port_name: str | None = "http",
    env: dict[str, str] | None = None,
    more_ports: tuple[Object, ...] = (),
    **fields: Any,
) -> Object:
    """The echo app (or an image that serves as it does) on `port` (told by $PORT when it is
    not the default 8080), with a tcpSocket readinessProbe on it: Ready then means the program
    listens, not only that the container started. `more_ports` are declared after it,
    `fields` added to the container."""
    variables = dict(env or {})
    if port != 8080:
        variables.setdefault("PORT", str(port))
    declared: Object = {"containerPort": port}
    if port_name is not None:
        declared = {"name": port_name, **declared}
    container: Object = {"name": name, "image": image, "ports": [declared, *more_ports]}
    if variables:
        container["env"] = env_list(**variables)
    container["readinessProbe"] = {
        "tcpSocket": {"port": port_name if port_name is not None else port},
        "periodSeconds": 1,
    }
    container.update(fields)
    return container


def deployment(
    name: str,
    *containers: Object,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
    kind: str = "Deployment",
    strategy: Object | None = None,
    **pod_spec: Any,
) -> Object:
    """A workload of one replica whose pods are labelled `app: NAME`; `annotations` go on the
    pod template, `pod_spec` (volumes, ...) into its spec. `kind` may be an Argo `Rollout`
    (with its `strategy`)."""
    template: Object = {"metadata": {"labels": {"app": name}}}
    if annotations:
        template["metadata"]["annotations"] = annotations
    template["spec"] = {"containers": list(containers), **pod_spec}
    spec: Object = {"replicas": 1, "selector": {"matchLabels": {"app": name}}}
    if strategy is not None:
        spec["strategy"] = strategy
    spec["template"] = template
    return {
        "apiVersion": "argoproj.io/v1alpha1" if kind == "Rollout" else "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


HTTP_PORT: Object = {"name": "http", "port": 80, "targetPort": "http"}
"""A Service's port 80 to the pods' port named http."""


def service(
    name: str, *ports: Object, namespace: str = "default", headless: bool = False
) -> Object:
    """A Service `name` for the pods labelled `app: NAME`, on `ports` (HTTP_PORT when none);
    `headless`: clusterIP None."""
    spec: Object = {"selector": {"app": name}, "ports": list(ports) or [HTTP_PORT]}
    if headless:
        spec = {"clusterIP": "None", **spec}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def genyaml(env: dict[str, str], *args: str) -> Any:
    """`tele genyaml ARGS...`, which must succeed: what it printed, as YAML (None if nothing)."""
    made = run_tele(env, "genyaml", *args)
    assert made.returncode == 0, made.stderr
    return yaml.safe_load(made.stdout) if made.stdout else None


def hand_injected(env: dict[str, str], app: Path, config: Path) -> list[Object]:
    """The documents of `app` (HAND_APP's, as written there) with what `tele genyaml` makes of
    `config` added to its workload, as a user injects an agent by hand: the agent container,
    its init container and its volumes."""
    documents = list(yaml.safe_load_all(app.read_text()))
    spec = documents[0]["spec"]["template"]["spec"]
    spec["containers"].append(genyaml(env, "container", "-c", str(config), "-i", str(app)))
    spec["initContainers"] = [genyaml(env, "initcontainer", "-c", str(config))]
    spec["volumes"] = genyaml(env, "volume", "-c", str(config))
    return documents


def caller_pod(namespace: str = "default", **spec: Any) -> Object:
    """The pod `caller` (tele-sandbox/worker: it has python3) that tests call the cluster
    from, with `kubectl exec`."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "caller", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "tele-sandbox/worker"}], **spec},
    }


@contextmanager
def laptop_http(body: str | Callable[[str], str]) -> Iterator[int]:
    """An HTTP server on this machine answering every GET with `body` (or `body(path)`);
    yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = (body if isinstance(body, str) else body(self.path)).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


HAND_APP = manifest(
    deployment(
        "hand",
        echo_container(name="hand"),
        annotations={"telepresence.io/manually-injected": "true"},
    ),
    service("hand"),
)
"""An echo workload (`hand`, with its Service) whose agent a test injects by hand
(`hand_injected`)."""
