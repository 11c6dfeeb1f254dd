"""The real kubectl (oldest and newest on the machine) against the sandbox API server."""

from __future__ import annotations

import json

from .conftest import MANIFESTS, Kubectl


def _get(k: Kubectl, *what: str) -> dict:  # type: ignore[type-arg]
    return json.loads(k.run("get", *what, "-o", "json").stdout)


def test_apply_get_describe_delete(kubectl: Kubectl) -> None:
    out = kubectl.run(
        "apply",
        "-f",
        str(MANIFESTS / "deployment.yaml"),
        "-f",
        str(MANIFESTS / "service.yaml"),
        "-f",
        str(MANIFESTS / "configmap.yaml"),
    )
    assert "deployment.apps/web created" in out.stdout
    assert "service/web created" in out.stdout
    again = kubectl.run("apply", "-f", str(MANIFESTS / "configmap.yaml"))
    assert "configmap/settings unchanged" in again.stdout

    table = kubectl.run("get", "deploy,svc,cm").stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert "deployment.apps/web" in table and "0/2" in table
    assert "service/web" in table and "80/TCP" in table
    assert "configmap/settings" in table

    deploy = _get(kubectl, "deployment", "web")
    assert deploy["metadata"]["generation"] == 1
    assert deploy["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": "25%",
        "maxUnavailable": "25%",
    }
    pod_spec = deploy["spec"]["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Always" and pod_spec["dnsPolicy"] == "ClusterFirst"
    svc = _get(kubectl, "service", "web")
    assert svc["spec"]["clusterIP"].startswith("10.96.")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"

    described = kubectl.run("describe", "configmap", "settings").stdout
    assert "Name:" in described and "settings" in described and "greeting" in described
    described = kubectl.run("describe", "deployment", "web").stdout
    assert "RollingUpdate" in described and "tele-sandbox/echo:1.0" in described

    all_ns = kubectl.run("get", "configmaps", "-A", "--show-labels", namespace=False).stdout
    line = next(ln for ln in all_ns.splitlines() if " settings " in ln)
    assert line.startswith(kubectl.namespace) and "tier=backend" in line

    out = kubectl.run(
        "delete", "-f", str(MANIFESTS / "deployment.yaml"), "-f", str(MANIFESTS / "configmap.yaml")
    )
    assert 'deployment.apps "web" deleted' in out.stdout
    missing = kubectl.run("get", "configmap", "settings", check=False)
    assert missing.returncode != 0
    assert 'configmaps "settings" not found' in missing.stderr


def test_label_annotate_and_three_patch_types(kubectl: Kubectl) -> None:
    kubectl.run(
        "apply", "-f", str(MANIFESTS / "configmap.yaml"), "-f", str(MANIFESTS / "deployment.yaml")
    )
    kubectl.run("label", "configmap", "settings", "owner=team-a")
    kubectl.run("annotate", "configmap", "settings", "note=hello world")
    kubectl.run("patch", "configmap", "settings", "-p", '{"data":{"strategic":"1"}}')
    kubectl.run(
        "patch",
        "configmap",
        "settings",
        "--type",
        "merge",
        "-p",
        '{"data":{"color":null,"merge":"2"}}',
    )
    kubectl.run(
        "patch",
        "configmap",
        "settings",
        "--type",
        "json",
        "-p",
        '[{"op":"replace","path":"/data/greeting","value":"hi"}]',
    )
    cm = _get(kubectl, "configmap", "settings")
    assert cm["data"] == {"greeting": "hi", "strategic": "1", "merge": "2"}
    assert cm["metadata"]["labels"] == {"tier": "backend", "owner": "team-a"}
    assert cm["metadata"]["annotations"]["note"] == "hello world"
    kubectl.run("label", "configmap", "settings", "owner-")
    assert "owner" not in _get(kubectl, "configmap", "settings")["metadata"]["labels"]

    # Strategic merge by the container list's merge key keeps the other container.
    kubectl.run(
        "patch",
        "deployment",
        "web",
        "-p",
        '{"spec":{"template":{"spec":{"containers":[{"name":"echo","image":"tele-sandbox/echo:2.0"}]}}}}',
    )
    deploy = _get(kubectl, "deployment", "web")
    images = {c["name"]: c["image"] for c in deploy["spec"]["template"]["spec"]["containers"]}
    assert images == {"echo": "tele-sandbox/echo:2.0", "sidecar": "tele-sandbox/worker:1.0"}
    assert deploy["metadata"]["generation"] == 2
    kubectl.run("scale", "deployment", "web", "--replicas=5")
    assert _get(kubectl, "deployment", "web")["spec"]["replicas"] == 5
    bad = kubectl.run(
        "patch",
        "configmap",
        "settings",
        "--type",
        "json",
        "-p",
        '[{"op":"test","path":"/data/greeting","value":"nope"}]',
        check=False,
    )
    assert bad.returncode != 0


def test_apply_changes_and_server_side(kubectl: Kubectl) -> None:
    manifest = (MANIFESTS / "deployment.yaml").read_text()
    kubectl.run("apply", "-f", "-", input=manifest)
    out = kubectl.run("apply", "-f", "-", input=manifest.replace("replicas: 2", "replicas: 3"))
    assert "deployment.apps/web configured" in out.stdout
    assert _get(kubectl, "deployment", "web")["spec"]["replicas"] == 3
    out = kubectl.run("apply", "--server-side", "-f", str(MANIFESTS / "configmap.yaml"))
    assert "configmap/settings serverside-applied" in out.stdout
    out = kubectl.run(
        "apply",
        "--server-side",
        "-f",
        "-",
        input=(MANIFESTS / "configmap.yaml").read_text().replace("blue", "green"),
    )
    assert _get(kubectl, "configmap", "settings")["data"]["color"] == "green"


def test_explain(kubectl: Kubectl) -> None:
    out = kubectl.run("explain", "deployment.spec.strategy", namespace=False).stdout
    assert "DeploymentStrategy" in out
    assert "rollingUpdate" in out
    out = kubectl.run("explain", "pods.spec.containers.ports", namespace=False).stdout
    assert "containerPort" in out


def test_errors_read_like_kubernetes(kubectl: Kubectl) -> None:
    bad = kubectl.run("apply", "-f", str(MANIFESTS / "bad-name.yaml"), check=False)
    assert bad.returncode == 1
    assert 'ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name"' in bad.stderr
    strict = kubectl.run("apply", "-f", str(MANIFESTS / "unknown-field.yaml"), check=False)
    assert strict.returncode == 1
    assert 'strict decoding error: unknown field "colour"' in strict.stderr
    missing = kubectl.run("get", "widgets", check=False)
    assert missing.returncode == 1
    assert 'the server doesn\'t have a resource type "widgets"' in missing.stderr
    gone = kubectl.run("delete", "pod", "nothing-here", check=False)
    assert 'pods "nothing-here" not found' in gone.stderr


def test_auth_can_i_and_rbac_denial(kubectl: Kubectl) -> None:
    kubectl.run("create", "serviceaccount", "reader")
    token = kubectl.run("create", "token", "reader").stdout.strip()
    assert token
    base = [f"--token={token}"]
    denied = kubectl.run(*base, "get", "configmaps", check=False)
    assert denied.returncode == 1
    assert (
        f'configmaps is forbidden: User "system:serviceaccount:{kubectl.namespace}:reader" '
        f'cannot list resource "configmaps" in API group "" in the namespace '
        f'"{kubectl.namespace}"'
    ) in denied.stderr
    assert (
        kubectl.run(*base, "auth", "can-i", "list", "configmaps", check=False).stdout.strip()
        == "no"
    )
    kubectl.run("create", "role", "cm-reader", "--verb=get,list", "--resource=configmaps")
    kubectl.run(
        "create",
        "rolebinding",
        "reader-cm",
        "--role=cm-reader",
        f"--serviceaccount={kubectl.namespace}:reader",
    )
    assert kubectl.run(*base, "auth", "can-i", "list", "configmaps").stdout.strip() == "yes"
    assert kubectl.run(*base, "get", "configmaps").returncode == 0
    assert (
        kubectl.run(*base, "auth", "can-i", "delete", "configmaps", check=False).stdout.strip()
        == "no"
    )


def test_rollout_status_follows_the_watch(kubectl: Kubectl) -> None:
    import subprocess as sp

    from kubernetes import client, config

    kubectl.run("apply", "-f", str(MANIFESTS / "deployment.yaml"))
    base = [
        str(kubectl.binary),
        "--kubeconfig",
        str(kubectl.sandbox.kubeconfig),
        "-n",
        kubectl.namespace,
        "--cache-dir",
        str(kubectl.sandbox.home / f"cache-{kubectl.binary.name}"),
    ]
    waiter = sp.Popen(
        [*base, "rollout", "status", "deployment/web", "--timeout=30s"],
        stdout=sp.PIPE,
        stderr=sp.PIPE,
        text=True,
        env={"HOME": str(kubectl.sandbox.home)},
    )
    try:
        api_client = config.new_client_from_config(config_file=str(kubectl.sandbox.kubeconfig))
        apps = client.AppsV1Api(api_client)
        apps.patch_namespaced_deployment_status(
            "web",
            kubectl.namespace,
            {
                "status": {
                    "observedGeneration": 1,
                    "replicas": 2,
                    "updatedReplicas": 2,
                    "readyReplicas": 2,
                    "availableReplicas": 2,
                    "conditions": [
                        {
                            "type": "Available",
                            "status": "True",
                            "reason": "MinimumReplicasAvailable",
                        }
                    ],
                }
            },
        )
        api_client.close()
        out, err = waiter.communicate(timeout=40)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, err
    assert 'deployment "web" successfully rolled out' in out
    waited = kubectl.run("wait", "--for=condition=Available", "deployment/web", "--timeout=10s")
    assert "condition met" in waited.stdout
