"""Identity as a real cluster has it: TokenRequest (audiences, expiry, pod binding) gives
signed JWTs the API server accepts, TokenReview and SubjectAccessReview answer with the
cluster's authenticators and RBAC, users come from client certificates (CN, O) and static
tokens, and the extension-apiserver-authentication ConfigMap publishes the client CA.
Checked with the `kubernetes` client and with real kubectl (oldest and newest)."""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.kubeconfig import kubeconfig
from tele.sandbox.identities import client_certificate

from .conftest import Kubectl, Sandbox, unique_namespace

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402


def _client(path: Path) -> Any:
    return config.new_client_from_config(config_file=str(path))


def _write(tmp_path: Path, name: str, doc: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cert_kubeconfig(sandbox: Sandbox, tmp_path: Path, user: str, groups: list[str]) -> Path:
    info = sandbox.info
    pair = client_certificate(info.ca, user, groups)
    doc = kubeconfig(
        "test",
        info.server,
        info.ca.cert_pem,
        "",
        user=user,
        credentials={
            "client-certificate-data": base64.b64encode(pair.cert_pem).decode(),
            "client-key-data": base64.b64encode(pair.key_pem).decode(),
        },
    )
    return _write(tmp_path, f"cert-{user}", doc)


def _token_kubeconfig(sandbox: Sandbox, tmp_path: Path, user: str, groups: list[str]) -> Path:
    token = uuid.uuid4().hex
    sandbox.info.api.authn.add_static(token, User(user, (*groups, "system:authenticated")))
    return _write(tmp_path, f"token-{user}", sandbox.info.token_kubeconfig(token, user))


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.fixture
def admin(sandbox: Sandbox) -> Iterator[tuple[Any, str]]:
    api_client = _client(sandbox.kubeconfig)
    ns = unique_namespace("id")
    v1 = client.CoreV1Api(api_client)
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        yield api_client, ns
    finally:
        v1.delete_namespace(ns)
        api_client.close()


def _bind(api_client: Any, ns: str, role: str, kind: str, name: str) -> None:
    client.RbacAuthorizationV1Api(api_client).create_namespaced_role_binding(
        ns,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name=f"{role}-{uuid.uuid4().hex[:6]}"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role
            ),
            subjects=[
                client.RbacV1Subject(
                    kind=kind,
                    name=name,
                    namespace=ns if kind == "ServiceAccount" else None,
                    api_group="" if kind == "ServiceAccount" else "rbac.authorization.k8s.io",
                )
            ],
        ),
    )


def _review(api_client: Any, token: str, audiences: list[str] | None = None) -> Any:
    return client.AuthenticationV1Api(api_client).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
    )


def _pod(name: str) -> Any:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
    )


def test_token_request_mints_a_jwt_with_the_real_claims_that_authenticates(
    sandbox: Sandbox, admin: tuple[Any, str], tmp_path: Path
) -> None:
    api_client, ns = admin
    v1 = client.CoreV1Api(api_client)
    account = v1.create_namespaced_service_account(
        ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="bot"))
    )
    answer = v1.create_namespaced_service_account_token(
        "bot",
        ns,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=["tele-manager"], expiration_seconds=900)
        ),
    )
    assert answer.spec.audiences == ["tele-manager"] and answer.spec.expiration_seconds == 900
    header = json.loads(base64.urlsafe_b64decode(answer.status.token.split(".")[0] + "=="))
    assert header["alg"] == "ES256" and header["kid"]
    claims = _claims(answer.status.token)
    assert claims["iss"] == "https://kubernetes.default.svc.cluster.local"
    assert claims["aud"] == ["tele-manager"]
    assert claims["sub"] == f"system:serviceaccount:{ns}:bot"
    assert claims["exp"] - claims["iat"] == 900 and claims["nbf"] == claims["iat"]
    assert claims["kubernetes.io"] == {
        "namespace": ns,
        "serviceaccount": {"name": "bot", "uid": account.metadata.uid},
    }
    review = _review(api_client, answer.status.token, ["tele-manager"])
    assert review.status.authenticated is True
    assert review.status.audiences == ["tele-manager"]
    assert review.status.user.username == f"system:serviceaccount:{ns}:bot"
    assert review.status.user.uid == account.metadata.uid
    assert set(review.status.user.groups) == {
        "system:serviceaccounts",
        f"system:serviceaccounts:{ns}",
        "system:authenticated",
    }
    # Not for the API server's audience: a bearer token for another audience is refused...
    wrong = _review(api_client, answer.status.token)
    assert wrong.status.authenticated is False and "audiences" in wrong.status.error
    kc = _write(tmp_path, "aud", sandbox.info.token_kubeconfig(answer.status.token, "bot", ns))
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(_client(kc)).list_namespaced_pod(ns)
    assert refused.value.status == 401
    # ...and one for the API server works as a bearer token.
    default = v1.create_namespaced_service_account_token(
        "bot", ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    kc = _write(tmp_path, "bot", sandbox.info.token_kubeconfig(default, "bot", ns))
    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(_client(kc)).list_namespaced_pod(ns)
    assert denied.value.status == 403  # authenticated as the account, which may not list pods
    with pytest.raises(ApiException) as short:
        v1.create_namespaced_service_account_token(
            "bot",
            ns,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=599)
            ),
        )
    assert short.value.status == 422
    assert "may not specify a duration less than 10 minutes" in short.value.body
    # A recreated account (new uid) invalidates the old tokens.
    v1.delete_namespaced_service_account("bot", ns)
    assert _review(api_client, default).status.authenticated is False


def test_a_pod_bound_token_stops_authenticating_when_its_pod_is_gone(
    admin: tuple[Any, str],
) -> None:
    api_client, ns = admin
    v1 = client.CoreV1Api(api_client)
    v1.create_namespaced_service_account(
        ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent"))
    )
    pod = v1.create_namespaced_pod(ns, _pod("p"))
    token = v1.create_namespaced_service_account_token(
        "agent",
        ns,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=["tele-manager"],
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name="p", uid=pod.metadata.uid
                ),
            )
        ),
    ).status.token
    assert _claims(token)["kubernetes.io"]["pod"] == {"name": "p", "uid": pod.metadata.uid}
    review = _review(api_client, token, ["tele-manager"])
    assert review.status.authenticated is True
    assert review.status.user.extra["authentication.kubernetes.io/pod-name"] == ["p"]
    assert review.status.user.extra["authentication.kubernetes.io/pod-uid"] == [pod.metadata.uid]
    v1.delete_namespaced_pod("p", ns)
    gone = _review(api_client, token, ["tele-manager"])
    assert gone.status.authenticated is False and "pod" in gone.status.error
    with pytest.raises(ApiException) as no_pod:  # and none can be bound to a missing pod
        v1.create_namespaced_service_account_token(
            "agent",
            ns,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(
                    audiences=[],
                    bound_object_ref=client.V1BoundObjectReference(kind="Pod", name="p"),
                )
            ),
        )
    assert no_pod.value.status == 404


def test_reviews_need_create_permission_and_answer_with_rbac(
    sandbox: Sandbox, admin: tuple[Any, str], tmp_path: Path
) -> None:
    api_client, ns = admin
    viewer = _cert_kubeconfig(sandbox, tmp_path, "viewer", ["qa"])
    _bind(api_client, ns, "view", "User", "viewer")
    viewer_client = _client(viewer)
    with pytest.raises(ApiException) as denied:
        _review(viewer_client, "anything")
    assert denied.value.status == 403
    assert 'cannot create resource \\"tokenreviews\\"' in denied.value.body
    client.RbacAuthorizationV1Api(api_client).create_cluster_role_binding(
        client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=f"delegator-{ns}"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io",
                kind="ClusterRole",
                name="system:auth-delegator",
            ),
            subjects=[
                client.RbacV1Subject(
                    kind="User", name="viewer", api_group="rbac.authorization.k8s.io"
                )
            ],
        )
    )
    try:
        assert _review(viewer_client, "not-a-token").status.authenticated is False
        authz = client.AuthorizationV1Api(viewer_client)

        def allowed(verb: str, resource: str, subresource: str = "", namespace: str = ns) -> bool:
            review = authz.create_subject_access_review(
                client.V1SubjectAccessReview(
                    spec=client.V1SubjectAccessReviewSpec(
                        user="viewer",
                        groups=["qa", "system:authenticated"],
                        resource_attributes=client.V1ResourceAttributes(
                            namespace=namespace,
                            verb=verb,
                            resource=resource,
                            subresource=subresource or None,
                        ),
                    )
                )
            )
            return bool(review.status.allowed)

        assert allowed("get", "pods")
        assert not allowed("create", "pods", "portforward")
        assert not allowed("get", "pods", namespace="default")
        assert not allowed("get", "secrets")
    finally:
        client.RbacAuthorizationV1Api(api_client).delete_cluster_role_binding(f"delegator-{ns}")


@pytest.mark.parametrize("credential", ["cert", "token"])
def test_kubectl_as_a_view_user_gets_403_on_portforward_and_auth_can_i_answers(
    kubectl: Kubectl, tmp_path: Path, credential: str
) -> None:
    sandbox, ns = kubectl.sandbox, kubectl.namespace
    user = f"dev-{credential}"
    make = _cert_kubeconfig if credential == "cert" else _token_kubeconfig
    path = make(sandbox, tmp_path, user, ["devs"])
    admin_client = _client(sandbox.kubeconfig)
    _bind(admin_client, ns, "view", "Group", "devs")
    core = client.CoreV1Api(admin_client)
    core.create_namespaced_pod(ns, _pod("web"))
    core.patch_namespaced_pod_status("web", ns, {"status": {"phase": "Running"}})
    as_user = Kubectl(kubectl.binary, Sandbox(sandbox.cluster, path, sandbox.home), ns)

    def can_i(*args: str) -> str:
        result = as_user.run("auth", "can-i", *args, check=False)
        return result.stdout.strip()

    assert can_i("get", "pods") == "yes"
    assert can_i("create", "pods/portforward") == "no"
    assert can_i("create", "pods") == "no"
    assert can_i("get", "pods", "-n", "default") == "no"
    name = kubectl.binary.name
    minor = int(name.rsplit(".", 1)[1]) if name.startswith("kubectl.1.") else 99
    if minor >= 28:  # `kubectl auth whoami` (SelfSubjectReview) is in kubectl from 1.28
        who = as_user.run("auth", "whoami", "-o", "json")
        info = json.loads(who.stdout)["status"]["userInfo"]
        assert info["username"] == user and "devs" in info["groups"]
    assert as_user.run("get", "pods", "-o", "name").stdout.strip() == "pod/web"
    listed = as_user.run("auth", "can-i", "--list").stdout
    pods = next(line for line in listed.splitlines() if line.startswith("pods "))
    assert "[get list watch]" in pods
    assert not any(line.startswith("pods/portforward") for line in listed.splitlines())
    denied = as_user.run("port-forward", "pod/web", "0:80", check=False)
    assert denied.returncode != 0 and "Forwarding from" not in denied.stdout
    # The API server's own answer to the subresource (the upgrade's words are the streaming
    # code's, and an API-only sandbox serves no port-forward at all):
    ssl_context = ssl.create_default_context(cadata=sandbox.info.ca.cert_pem.decode())
    cert = (tmp_path / "c.crt", tmp_path / "c.key")
    doc = yaml.safe_load(path.read_text())["users"][0]["user"]
    headers = {}
    if "token" in doc:
        headers["Authorization"] = f"Bearer {doc['token']}"
    else:
        cert[0].write_bytes(base64.b64decode(doc["client-certificate-data"]))
        cert[1].write_bytes(base64.b64decode(doc["client-key-data"]))
        ssl_context.load_cert_chain(*cert)
    with httpx.Client(base_url=sandbox.info.server, verify=ssl_context) as http:
        resp = http.post(f"/api/v1/namespaces/{ns}/pods/web/portforward", headers=headers)
    assert resp.status_code == 403, resp.text
    assert resp.json()["message"] == (
        f'pods "web" is forbidden: User "{user}" cannot create resource "pods/portforward" in '
        f'API group "" in the namespace "{ns}"'
    )


def test_the_client_ca_is_published_for_extension_api_servers(
    sandbox: Sandbox, admin: tuple[Any, str], tmp_path: Path
) -> None:
    api_client, ns = admin
    v1 = client.CoreV1Api(api_client)
    v1.create_namespaced_service_account(
        ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="ext"))
    )
    token = v1.create_namespaced_service_account_token(
        "ext", ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    ext = client.CoreV1Api(
        _client(_write(tmp_path, "ext", sandbox.info.token_kubeconfig(token, "ext", ns)))
    )
    with pytest.raises(ApiException) as denied:
        ext.read_namespaced_config_map("extension-apiserver-authentication", "kube-system")
    assert denied.value.status == 403
    client.RbacAuthorizationV1Api(api_client).create_namespaced_role_binding(
        "kube-system",
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name=f"ext-{ns}"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io",
                kind="Role",
                name="extension-apiserver-authentication-reader",
            ),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="ext", namespace=ns)],
        ),
    )
    try:
        cm = ext.read_namespaced_config_map("extension-apiserver-authentication", "kube-system")
        assert cm.data["client-ca-file"] == sandbox.info.ca.cert_pem.decode()
        assert json.loads(cm.data["requestheader-username-headers"]) == ["X-Remote-User"]
        with pytest.raises(ApiException) as other:
            ext.read_namespaced_config_map("kube-root-ca.crt", "kube-system")
        assert other.value.status == 403
    finally:
        client.RbacAuthorizationV1Api(api_client).delete_namespaced_role_binding(
            f"ext-{ns}", "kube-system"
        )


def test_a_certificate_from_another_ca_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    from tele.sandbox.apiserver.certs import CertificateAuthority

    info = sandbox.info
    stranger = client_certificate(
        CertificateAuthority.create("not-the-cluster-ca"), "mallory", ["system:masters"]
    )
    doc = kubeconfig(
        "test",
        info.server,
        info.ca.cert_pem,
        "",
        user="mallory",
        credentials={
            "client-certificate-data": base64.b64encode(stranger.cert_pem).decode(),
            "client-key-data": base64.b64encode(stranger.key_pem).decode(),
        },
    )
    api_client = _client(_write(tmp_path, "mallory", doc))
    api_client.configuration.retries = 0
    with pytest.raises(Exception) as refused:  # the TLS handshake fails
        client.CoreV1Api(api_client).list_namespace(_request_timeout=10)
    assert not isinstance(refused.value, ApiException) or refused.value.status in (0, 401)
    # The cluster is fine afterwards.
    assert client.CoreV1Api(_client(sandbox.kubeconfig)).list_namespace().items


def test_kubectl_create_token_mints_bound_tokens(kubectl: Kubectl) -> None:
    ns = kubectl.namespace
    kubectl.run("create", "serviceaccount", "bot")
    token = kubectl.run(
        "create", "token", "bot", "--audience", "tele-manager", "--duration", "15m"
    ).stdout.strip()
    claims = _claims(token)
    assert claims["aud"] == ["tele-manager"] and claims["exp"] - claims["iat"] == 900
    assert claims["sub"] == f"system:serviceaccount:{ns}:bot"
    client.CoreV1Api(_client(kubectl.sandbox.kubeconfig)).create_namespaced_pod(ns, _pod("p"))
    bound = kubectl.run(
        "create", "token", "bot", "--bound-object-kind", "Pod", "--bound-object-name", "p"
    ).stdout.strip()
    assert _claims(bound)["kubernetes.io"]["pod"]["name"] == "p"
    short = kubectl.run("create", "token", "bot", "--duration", "5m", check=False)
    assert short.returncode != 0 and "may not specify a duration less than 10 minutes" in (
        short.stderr
    )


def test_a_forbidden_websocket_upgrade_is_a_403_status(
    sandbox: Sandbox, admin: tuple[Any, str], tmp_path: Path
) -> None:
    """kubectl >= 1.30 upgrades to a websocket for exec and port-forward: a user who may not
    create the subresource gets the API server's 403 Status, not an upgrade; no token, 401."""
    import socket

    api_client, ns = admin
    _bind(api_client, ns, "view", "User", "watcher")
    token = uuid.uuid4().hex
    sandbox.info.api.authn.add_static(token, User("watcher", ("system:authenticated",)))
    info = sandbox.info
    context = ssl.create_default_context(cadata=info.ca.cert_pem.decode())

    def upgrade(auth: str) -> tuple[int, dict[str, Any]]:
        request = (
            f"GET /api/v1/namespaces/{ns}/pods/web/portforward?ports=80 HTTP/1.1\r\n"
            f"Host: {info.host}:{info.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n{auth}\r\n"
        )
        with (
            socket.create_connection((info.host, info.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=info.host) as tls,
        ):
            tls.sendall(request.encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += tls.recv(4096)
        return int(head.split(b" ")[1]), json.loads(body)

    code, status = upgrade(f"Authorization: Bearer {token}\r\n")
    assert code == 403 and status["reason"] == "Forbidden"
    assert status["message"] == (
        f'pods "web" is forbidden: User "watcher" cannot create resource "pods/portforward" in '
        f'API group "" in the namespace "{ns}"'
    )
    code, status = upgrade("")
    assert code == 401 and status["reason"] == "Unauthorized"
