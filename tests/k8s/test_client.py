"""The trio Kubernetes client against the sandbox API server, in the same process."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import pytest
import trio
import yaml

from tele.k8s import client as k8s
from tele.k8s.client import ApiError, ApiUnreachable, KubeClient, open_kube_client
from tele.k8s.config import load_connection
from tele.sandbox.cluster import ClusterInfo


def configmap(name: str, **data: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "t"}},
        "data": data,
    }


async def test_crud_and_patches(kube: KubeClient) -> None:
    created = await kube.create(k8s.CONFIGMAPS, configmap("one", a="1"))
    assert created["metadata"]["uid"]
    got = await kube.get(k8s.CONFIGMAPS, "one", "default")
    assert got["data"] == {"a": "1"}
    merged = await kube.patch(k8s.CONFIGMAPS, "one", {"data": {"b": "2"}}, "default")
    assert merged["data"] == {"a": "1", "b": "2"}
    jsonp = [{"op": "remove", "path": "/data/a"}]
    patched = await kube.patch(k8s.CONFIGMAPS, "one", jsonp, "default", patch_type="json")
    assert patched["data"] == {"b": "2"}
    smp = {"metadata": {"labels": {"extra": "yes"}}}
    patched = await kube.patch(k8s.CONFIGMAPS, "one", smp, "default", patch_type="strategic")
    assert patched["metadata"]["labels"] == {"app": "t", "extra": "yes"}
    assert await kube.delete(k8s.CONFIGMAPS, "one", "default") is not None
    assert await kube.get_or_none(k8s.CONFIGMAPS, "one", "default") is None
    assert await kube.delete(k8s.CONFIGMAPS, "one", "default") is None
    with pytest.raises(ApiError) as info:
        await kube.get(k8s.CONFIGMAPS, "one", "default")
    assert info.value.not_found and "not found" in info.value.message


async def test_conflict_on_stale_resource_version(kube: KubeClient) -> None:
    first = await kube.create(k8s.CONFIGMAPS, configmap("cas", a="1"))
    await kube.patch(k8s.CONFIGMAPS, "cas", {"data": {"a": "2"}}, "default")
    first["data"] = {"a": "3"}
    with pytest.raises(ApiError) as info:
        await kube.replace(k8s.CONFIGMAPS, first)
    assert info.value.conflict and info.value.reason == "Conflict"


async def test_list_follows_continue_tokens(kube: KubeClient) -> None:
    for i in range(7):
        await kube.create(k8s.CONFIGMAPS, configmap(f"page-{i}"))
    items, version = await kube.list(k8s.CONFIGMAPS, "default", label_selector="app=t", page_size=2)
    assert sorted(i["metadata"]["name"] for i in items) == [f"page-{i}" for i in range(7)]
    assert version


async def test_informer_lists_then_follows_changes(kube: KubeClient) -> None:
    await kube.create(k8s.CONFIGMAPS, configmap("before"))
    seen: list[tuple[str, str]] = []
    with trio.fail_after(10):
        events = kube.informer(k8s.CONFIGMAPS, "default")
        first = await anext(events)
        assert first.type == "RELISTED"
        names = {i["metadata"]["name"] for i in first.object["items"]}
        assert names == {"before", "kube-root-ca.crt"}
        await kube.create(k8s.CONFIGMAPS, configmap("after"))
        await kube.patch(k8s.CONFIGMAPS, "after", {"data": {"x": "1"}}, "default")
        await kube.delete(k8s.CONFIGMAPS, "after", "default")
        while len(seen) < 3:
            event = await anext(events)
            seen.append((event.type, event.name))
        await events.aclose()
    assert seen == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "after")]


async def test_watch_from_a_too_old_version_is_gone(kube: KubeClient) -> None:
    _, version = await kube.list(k8s.CONFIGMAPS, "default")
    for i in range(60):  # more changes than the sandbox keeps (history_size=50)
        await kube.create(k8s.CONFIGMAPS, configmap(f"churn-{i}"))
    with pytest.raises(ApiError) as info:
        async with aclosing(kube.watch(k8s.CONFIGMAPS, "default", resource_version=version)) as w:
            async for _ in w:
                pass
    assert info.value.gone


async def test_unreachable_server_is_one_clear_error(
    sandbox_api: ClusterInfo, tmp_path: Path
) -> None:
    config = sandbox_api.kubeconfig()
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:9"  # nothing listens there
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    connection = await load_connection(str(path))
    async with open_kube_client(connection=connection) as kube:
        with pytest.raises(ApiUnreachable) as info:
            await kube.get(k8s.NAMESPACES, "default")
    assert "Cannot reach the Kubernetes API server at https://127.0.0.1:9" in str(info.value)


async def test_wrong_token_is_unauthorized(sandbox_api: ClusterInfo, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(sandbox_api.token_kubeconfig("not-a-token", "mallory")))
    async with open_kube_client(str(path)) as kube:
        with pytest.raises(ApiError) as info:
            await kube.get(k8s.NAMESPACES, "default")
    assert info.value.code == 401


async def test_each_user_of_a_connection_gets_its_own_tls_context(
    sandbox_api: ClusterInfo, tmp_path: Path
) -> None:
    # httpx sets ALPN (h2) on the context it is given; the port-forward must offer only
    # HTTP/1.1 or the API server answers its websocket upgrade in HTTP/2.
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(sandbox_api.kubeconfig()))
    connection = await load_connection(str(path))
    first = connection.new_ssl_context()
    second = connection.new_ssl_context(alpn=["http/1.1"])
    assert first is not None and second is not None and first is not second
    async with open_kube_client(connection=connection) as kube:
        assert await kube.get(k8s.NAMESPACES, "default")
    tls = await trio.open_ssl_over_tcp_stream(
        sandbox_api.host, sandbox_api.port, ssl_context=second
    )
    async with tls:
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() in (None, "http/1.1")


async def test_in_cluster_credentials_follow_the_rotated_token_file(
    sandbox_api: ClusterInfo, kube: KubeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod's client (the manager, the agents) re-reads its service-account token file: once
    the token it holds has expired, a request and a watch are asked again with the token the
    kubelet put in the file, instead of failing with 401 until a restart."""
    import time

    from tele.k8s.incluster import in_cluster_connection

    rbac = "rbac.authorization.k8s.io"
    await kube.request(
        "POST",
        f"/apis/{rbac}/v1/namespaces/default/rolebindings",
        body={
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "default-views"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "default"}],
        },
    )
    api = sandbox_api.api
    account = api.store.get("/serviceaccounts", "default", "default")
    assert account is not None
    issuer = api.authn.service_accounts
    account_dir = tmp_path / "serviceaccount"
    account_dir.mkdir()
    (account_dir / "ca.crt").write_bytes(sandbox_api.ca.cert_pem)
    (account_dir / "namespace").write_text("default")
    (account_dir / "token").write_text(issuer.issue(account, seconds=600)[0])
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", sandbox_api.host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(sandbox_api.port))
    whoami = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    path = "/apis/authentication.k8s.io/v1/selfsubjectreviews"
    async with open_kube_client(connection=in_cluster_connection(account_dir)) as pod:
        first = await pod.request("POST", path, body=whoami)
        assert first["status"]["userInfo"]["username"] == "system:serviceaccount:default:default"
        # 11 minutes later for the API server: the held token has expired; the file has a
        # new one (as the kubelet writes it at 80 % of the old one's life).
        later = time.time() + 660
        monkeypatch.setattr(issuer, "_clock", lambda: later)
        (account_dir / "token").write_text(issuer.issue(account, seconds=600)[0])
        again = await pod.request("POST", path, body=whoami)
        assert again["status"]["userInfo"]["username"] == "system:serviceaccount:default:default"
        # And a watch (the manager's informers reconnect with the token they hold).
        monkeypatch.setattr(issuer, "_clock", lambda: later + 660)
        (account_dir / "token").write_text(issuer.issue(account, seconds=600)[0])
        with trio.fail_after(10):
            watch = pod.watch(k8s.CONFIGMAPS, "default", timeout_seconds=1)
            async with aclosing(watch) as events:
                async for _ in events:
                    pass
