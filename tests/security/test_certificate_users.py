"""A kubeconfig user with a client certificate and no token (issue 15 item 1, beyond
Telepresence) connects through the real daemon on the sandbox: its link to the manager is TLS
inside the port-forward, the manager verifies the certificate against the cluster's client CA
(kube-system/extension-apiserver-authentication) and the user is the certificate's CN with its
O as groups, as the API server has it: RBAC decides, and the manager's audit says who came."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from tele.sandbox.identities import client_certificate
from tests.daemon.util import DaemonGuard, run_tele
from tests.e2e import install_manager, kubectl
from tests.sandbox.cluster.conftest import NodeSandbox, node_sandbox  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

REACH = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reach-manager, namespace: ambassador}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get, list, watch]}
- {apiGroups: [""], resources: [pods/portforward], verbs: [create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: devs-reach-manager, namespace: ambassador}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reach-manager}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: devs}]
"""


def test_a_certificate_user_connects_as_its_certificate_says(
    node_sandbox: NodeSandbox,  # noqa: F811
    tele_env: dict[str, str],
    guard: DaemonGuard,
) -> None:
    install_manager(node_sandbox, tele_env)
    admin = yaml.safe_load(node_sandbox.kubeconfig.read_text())
    info = node_sandbox.cluster.info
    assert info is not None
    pair = client_certificate(info.ca, "carol", ["devs"])
    user = {
        "client-certificate-data": base64.b64encode(pair.cert_pem).decode(),
        "client-key-data": base64.b64encode(pair.key_pem).decode(),
    }
    carol = {**admin, "users": [{"name": admin["users"][0]["name"], "user": user}]}
    path = node_sandbox.home / "carol.yaml"
    path.write_text(yaml.safe_dump(carol))

    refused = run_tele(tele_env, "connect", "--kubeconfig", str(path), timeout=120)
    assert refused.returncode != 0  # no RBAC to reach the manager yet: one sentence
    assert "Traceback" not in refused.stderr and refused.stderr.strip(), refused.stderr
    run_tele(tele_env, "quit")

    kubectl(node_sandbox, "apply", "-f", "-", stdin=REACH)
    connected = run_tele(tele_env, "connect", "--kubeconfig", str(path), timeout=120)
    assert connected.returncode == 0, connected.stderr
    status = json.loads(run_tele(tele_env, "status", "-o", "json").stdout)
    assert status["session"]["session_id"]
    log = kubectl(node_sandbox, "logs", "-n", "ambassador", "deploy/traffic-manager")
    assert "a link authenticated by client certificate: carol ['devs', 'system:authenticated']" in (
        log
    )
    arrivals = [
        json.loads("{" + line.split(" audit {", 1)[1])
        for line in log.splitlines()
        if " audit {" in line and '"arrival"' in line
    ]
    assert [(a["user"], a["groups"]) for a in arrivals] == [
        ("carol", ["devs", "system:authenticated"])
    ]
