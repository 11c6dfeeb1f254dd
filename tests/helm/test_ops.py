"""install / upgrade / uninstall against the in-process sandbox API server: objects checked in
the API, release records, namespace conflicts between managers, pruning and full removal."""

from __future__ import annotations

from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml

from tele.helm import ops
from tele.helm import release as records
from tele.helm.chart import Chart
from tele.helm.errors import NamespaceConflict, ReleaseError
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient, open_kube_client
from tele.manager.state import STATE_CONFIGMAP
from tele.sandbox.cluster import ClusterInfo

Obj = dict[str, Any]

# Every kind the chart renders, plus Secrets (the release record).
OWNED_KINDS = (
    k8s.SERVICEACCOUNTS,
    k8s.SECRETS,
    k8s.CLUSTERROLES,
    k8s.CLUSTERROLEBINDINGS,
    k8s.ROLES,
    k8s.ROLEBINDINGS,
    k8s.SERVICES,
    k8s.DEPLOYMENTS,
    k8s.MUTATING_WEBHOOKS,
)


async def snapshot(kube: KubeClient) -> set[tuple[str, str, str]]:
    found: set[tuple[str, str, str]] = set()
    for resource in OWNED_KINDS:
        items, _ = await kube.list(resource)
        for item in items:
            meta = item["metadata"]
            found.add((resource.kind, meta.get("namespace", ""), meta["name"]))
    return found


async def make_namespace(kube: KubeClient, name: str, **labels: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    await kube.create(k8s.NAMESPACES, body)


async def install(kube: KubeClient, chart: Chart, namespace: str, values: Obj) -> ops.Outcome:
    return await ops.install(kube, chart, values, release="traffic-manager", namespace=namespace)


async def test_install_creates_every_rendered_object(kube: KubeClient, chart: Chart) -> None:
    outcome = await install(kube, chart, "ambassador", {"logLevel": "debug"})
    rendered = await chart.render(
        {"logLevel": "debug"}, release="traffic-manager", namespace="ambassador"
    )
    assert len(outcome.applied) == len(rendered) >= 9
    for obj in rendered:
        meta = obj["metadata"]
        live = await kube.get(k8s.resource_for(obj), meta["name"], meta.get("namespace"))
        assert live["metadata"]["labels"]["app.kubernetes.io/instance"] == "traffic-manager"
    deployment = await kube.get(k8s.DEPLOYMENTS, "traffic-manager", "ambassador")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "TELE_LOG_LEVEL", "value": "debug"} in env
    assert await kube.get(k8s.NAMESPACES, "ambassador")  # --create-namespace is the default
    record = await records.read(kube, "traffic-manager", "ambassador")
    assert record is not None
    assert (record.revision, record.status, record.values) == (1, "deployed", {"logLevel": "debug"})
    assert set(record.objects) == set(outcome.applied)
    assert outcome.scope == "all namespaces"


async def test_overlapping_managers_are_refused_naming_the_other(
    kube: KubeClient, chart: Chart
) -> None:
    for name in ("alpha", "beta", "gamma"):
        await make_namespace(kube, name)
    await make_namespace(kube, "delta", env="dev")
    await install(kube, chart, "mgr-a", {"namespaces": ["alpha", "beta"]})

    with pytest.raises(NamespaceConflict) as info:
        await install(kube, chart, "mgr-b", {"namespaces": ["beta", "gamma"]})
    assert str(info.value).startswith(
        "Release traffic-manager in namespace mgr-a already manages namespace beta;"
    )
    static_selector = {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["alpha"]}
        ]
    }
    with pytest.raises(NamespaceConflict, match="mgr-a already manages namespace alpha"):
        await install(kube, chart, "mgr-b", {"namespaceSelector": static_selector})
    with pytest.raises(NamespaceConflict, match="mgr-a already manages namespaces alpha, beta"):
        await install(kube, chart, "mgr-b", {})  # cluster-wide overlaps everything
    # Nothing of the refused installs was created.
    assert await kube.get_or_none(k8s.NAMESPACES, "mgr-b") is None

    await install(kube, chart, "mgr-c", {"namespaces": ["gamma"]})
    # A dynamic selector conflicts on an existing namespace both select...
    await make_namespace(kube, "epsilon", env="dev")
    await install(kube, chart, "mgr-d", {"namespaceSelector": {"matchLabels": {"env": "dev"}}})
    with pytest.raises(NamespaceConflict, match="mgr-d already manages namespace delta"):
        await install(kube, chart, "mgr-e", {"namespaces": ["delta"]})
    # ...and not when none exists yet.
    await install(kube, chart, "mgr-f", {"namespaceSelector": {"matchLabels": {"env": "qa"}}})
    names = {(r.namespace, r.name) for r in await records.list_all(kube)}
    assert {ns for ns, _ in names} == {"mgr-a", "mgr-c", "mgr-d", "mgr-f"}


async def test_a_cluster_wide_manager_blocks_every_other(kube: KubeClient, chart: Chart) -> None:
    await make_namespace(kube, "alpha")
    await install(kube, chart, "ambassador", {})
    with pytest.raises(NamespaceConflict) as info:
        await install(kube, chart, "other", {"namespaces": ["alpha"]})
    assert "Release traffic-manager in namespace ambassador already manages all namespaces" in (
        str(info.value)
    )
    with pytest.raises(NamespaceConflict, match="already installs a traffic manager in namespace"):
        await ops.install(kube, chart, {}, release="second", namespace="ambassador")


async def test_upgrade_patches_changed_objects_and_prunes_dropped_ones(
    kube: KubeClient, chart: Chart
) -> None:
    await make_namespace(kube, "alpha")
    await make_namespace(kube, "beta")
    await install(kube, chart, "ambassador", {"namespaces": ["alpha"]})
    assert await kube.get_or_none(k8s.ROLES, "traffic-manager-ambassador", "alpha")
    # The manager patches its CA into the webhook; an upgrade must not take it away.
    webhook = "agent-injector-webhook-ambassador"
    ca_patch = {
        "webhooks": [
            {"name": "agent-injector-ambassador.tele.io", "clientConfig": {"caBundle": "Q0E="}}
        ]
    }
    await kube.patch(
        k8s.MUTATING_WEBHOOKS, webhook, ca_patch, patch_type="strategic", field_manager="manager"
    )

    outcome = await ops.upgrade(
        kube,
        chart,
        {"namespaces": ["beta"], "logLevel": "debug"},
        release="traffic-manager",
        namespace="ambassador",
    )
    assert await kube.get_or_none(k8s.ROLES, "traffic-manager-ambassador", "alpha") is None
    assert await kube.get_or_none(k8s.ROLEBINDINGS, "traffic-manager-ambassador", "alpha") is None
    assert await kube.get(k8s.ROLES, "traffic-manager-ambassador", "beta")
    assert {r.describe() for r in outcome.pruned} == {
        "Role alpha/traffic-manager-ambassador",
        "RoleBinding alpha/traffic-manager-ambassador",
    }
    deployment = await kube.get(k8s.DEPLOYMENTS, "traffic-manager", "ambassador")
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TELE_LOG_LEVEL"] == "debug"
    assert env["TELE_NAMESPACES"] == '["beta"]'
    live_hook = await kube.get(k8s.MUTATING_WEBHOOKS, webhook)
    hook = live_hook["webhooks"][0]
    assert hook["clientConfig"]["caBundle"] == "Q0E="
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["beta"]
    record = await records.read(kube, "traffic-manager", "ambassador")
    assert record is not None and (record.revision, record.status) == (2, "deployed")

    # No values: the last revision's are kept; --reset-values goes back to the defaults.
    kept = await ops.upgrade(
        kube, chart, {}, release="traffic-manager", namespace="ambassador", values_given=False
    )
    assert kept.record.values == {"namespaces": ["beta"], "logLevel": "debug"}
    reused = await ops.upgrade(
        kube,
        chart,
        {"logLevel": "info"},
        release="traffic-manager",
        namespace="ambassador",
        reuse_values=True,
    )
    assert reused.record.values == {"namespaces": ["beta"], "logLevel": "info"}
    reset = await ops.upgrade(
        kube,
        chart,
        {},
        release="traffic-manager",
        namespace="ambassador",
        reset_values=True,
        values_given=False,
    )
    assert reset.record.values == {} and reset.scope == "all namespaces"
    assert await kube.get_or_none(k8s.ROLES, "traffic-manager-ambassador", "beta") is None


async def test_upgrade_is_checked_for_conflicts_too(kube: KubeClient, chart: Chart) -> None:
    await make_namespace(kube, "alpha")
    await make_namespace(kube, "beta")
    await install(kube, chart, "mgr-a", {"namespaces": ["alpha"]})
    await install(kube, chart, "mgr-b", {"namespaces": ["beta"]})
    with pytest.raises(NamespaceConflict, match="in namespace mgr-a already manages"):
        await ops.upgrade(
            kube,
            chart,
            {"namespaces": ["alpha", "beta"]},
            release="traffic-manager",
            namespace="mgr-b",
        )


async def test_uninstall_removes_everything_it_installed(kube: KubeClient, chart: Chart) -> None:
    await make_namespace(kube, "ambassador")
    await make_namespace(kube, "alpha")
    before = await snapshot(kube)
    await install(kube, chart, "ambassador", {"namespaces": ["alpha"]})
    installed = await snapshot(kube) - before
    assert ("Role", "alpha", "traffic-manager-ambassador") in installed
    assert ("Secret", "ambassador", "tele-release-traffic-manager") in installed
    # What the manager makes for itself when it runs (tele.manager.webhook.ensure_tls and
    # tele.manager.state).
    tls = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mutator-webhook-tls"}}
    await kube.create(k8s.SECRETS, tls, "ambassador")
    state = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": STATE_CONFIGMAP}}
    await kube.create(k8s.CONFIGMAPS, state, "ambassador")
    outcome = await ops.uninstall(kube, release="traffic-manager", namespace="ambassador")
    # All but the record (deleted last), plus the TLS Secret and the state ConfigMap.
    assert len(outcome.pruned) == len(installed) + 1
    assert await snapshot(kube) == before


async def test_release_state_errors_are_one_sentence(kube: KubeClient, chart: Chart) -> None:
    with pytest.raises(ReleaseError, match="is not installed in namespace ambassador; use `tele"):
        await ops.upgrade(kube, chart, {}, release="traffic-manager", namespace="ambassador")
    with pytest.raises(ReleaseError, match="Release traffic-manager is not installed"):
        await ops.uninstall(kube, release="traffic-manager", namespace="ambassador")
    with pytest.raises(ReleaseError, match="Namespace nowhere does not exist; create it or pass"):
        await ops.install(
            kube,
            chart,
            {},
            release="traffic-manager",
            namespace="nowhere",
            create_namespace=False,
        )
    with pytest.raises(ReleaseError, match="Namespaces ghost, spirit do not exist"):
        await install(kube, chart, "ambassador", {"namespaces": ["spirit", "ghost"]})
    await install(kube, chart, "ambassador", {})
    with pytest.raises(ReleaseError, match="already installed in namespace ambassador"):
        await install(kube, chart, "ambassador", {})


async def test_uninstall_waits_until_objects_are_gone(
    kube: KubeClient, chart: Chart, nursery: trio.Nursery
) -> None:
    await install(kube, chart, "ambassador", {})
    hold = {"metadata": {"finalizers": ["example.com/hold"]}}
    await kube.patch(k8s.DEPLOYMENTS, "traffic-manager", hold, "ambassador")
    finished = trio.Event()

    async def run_uninstall() -> None:
        await ops.uninstall(kube, release="traffic-manager", namespace="ambassador")
        finished.set()

    nursery.start_soon(run_uninstall)
    with trio.fail_after(10):
        while True:  # until the uninstall has asked for the deletion (watched, not polled)
            live = await kube.get(k8s.DEPLOYMENTS, "traffic-manager", "ambassador")
            if live["metadata"].get("deletionTimestamp"):
                break
            await trio.testing.wait_all_tasks_blocked()
        assert await kube.get_or_none(k8s.SERVICES, "traffic-manager", "ambassador") is None
        assert not finished.is_set()
        assert await records.read(kube, "traffic-manager", "ambassador") is not None
        release = [{"op": "remove", "path": "/metadata/finalizers"}]
        await kube.patch(
            k8s.DEPLOYMENTS, "traffic-manager", release, "ambassador", patch_type="json"
        )
        await finished.wait()
    assert await records.read(kube, "traffic-manager", "ambassador") is None


async def test_uninstall_gives_up_on_an_object_that_stays(kube: KubeClient, chart: Chart) -> None:
    await install(kube, chart, "ambassador", {})
    hold = {"metadata": {"finalizers": ["example.com/hold"]}}
    await kube.patch(k8s.SERVICEACCOUNTS, "traffic-manager", hold, "ambassador")
    with pytest.raises(ReleaseError) as info:
        await ops.uninstall(kube, release="traffic-manager", namespace="ambassador", wait=0.3)
    assert str(info.value) == (
        "ServiceAccount ambassador/traffic-manager was not deleted within 0.3s; "
        "check its finalizers with kubectl."
    )
    # The record stays so that a later uninstall can finish the job.
    record = await records.read(kube, "traffic-manager", "ambassador")
    assert record is not None and record.status == "uninstalling"


async def test_an_interrupted_install_is_finished_by_the_next_one(
    kube: KubeClient, chart: Chart
) -> None:
    # What a crash after the first write leaves: a pending record listing an object that the
    # chart (here: this revision of it) no longer renders.
    await make_namespace(kube, "ambassador")
    stray = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "stray"}}
    await kube.create(k8s.CONFIGMAPS, stray, "ambassador")
    pending = records.ReleaseRecord(
        name="traffic-manager",
        namespace="ambassador",
        revision=1,
        status="pending-install",
        chart_version="0.0.1",
        app_version="0.0.1",
        values={},
        scope={"namespaces": [], "namespaceSelector": {}},
        objects=[records.ObjectRef("v1", "ConfigMap", "stray", "ambassador")],
    )
    await records.write(kube, pending)
    outcome = await install(kube, chart, "ambassador", {})
    assert [r.describe() for r in outcome.pruned] == ["ConfigMap ambassador/stray"]
    assert await kube.get_or_none(k8s.CONFIGMAPS, "stray", "ambassador") is None
    record = await records.read(kube, "traffic-manager", "ambassador")
    assert record is not None and record.status == "deployed"
    assert set(record.objects) == set(outcome.applied)


async def test_upgrade_removes_fields_the_new_values_drop(kube: KubeClient, chart: Chart) -> None:
    await make_namespace(kube, "alpha")
    first = {"namespaces": ["alpha"], "podAnnotations": {"example.com/a": "1"}}
    await install(kube, chart, "ambassador", first)
    dynamic = {"matchLabels": {"env": "dev"}}
    await ops.upgrade(
        kube,
        chart,
        {"namespaceSelector": dynamic, "agentInjector": {"webhook": {"timeoutSeconds": 9}}},
        release="traffic-manager",
        namespace="ambassador",
    )
    webhook = await kube.get(k8s.MUTATING_WEBHOOKS, "agent-injector-webhook-ambassador")
    assert webhook["webhooks"][0]["namespaceSelector"] == dynamic  # not merged with the old one
    assert webhook["webhooks"][0]["timeoutSeconds"] == 9
    deployment = await kube.get(k8s.DEPLOYMENTS, "traffic-manager", "ambassador")
    template = deployment["spec"]["template"]
    assert "example.com/a" not in (template["metadata"].get("annotations") or {})
    names = [e["name"] for e in template["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names)) and "TELE_NAMESPACE_SELECTOR" in names


def test_removal_patch_deletes_only_what_the_new_manifest_lacks() -> None:
    old = {
        "metadata": {"name": "x", "annotations": {"a": "1", "b": "2"}},
        "spec": {
            "containers": [
                {"name": "c", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "gone", "image": "i"},
            ],
            "selector": {"matchExpressions": [{"key": "k"}]},
        },
    }
    new = {
        "metadata": {"name": "x", "annotations": {"b": "3"}},
        "spec": {
            "containers": [{"name": "c", "env": [{"name": "B", "value": "2"}]}],
            "selector": {"matchLabels": {"k": "v"}},
        },
    }
    assert ops.removal_patch(old, new) == {
        "metadata": {"annotations": {"a": None}},
        "spec": {
            "containers": [
                {"name": "c", "env": [{"name": "A", "$patch": "delete"}]},
                {"name": "gone", "$patch": "delete"},
            ],
            "selector": {"matchExpressions": None},
        },
    }
    assert ops.removal_patch(new, new) is None


async def service_account_client(
    kube: KubeClient, cluster: ClusterInfo, tmp_path: Path, namespace: str
) -> AbstractAsyncContextManager[KubeClient]:
    """A client that is the manager's ServiceAccount (a TokenRequest, then its bearer token)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
    path = k8s.SERVICEACCOUNTS.path(namespace, "traffic-manager", "token")
    answer = await kube.request("POST", path, body=request)
    user = f"system:serviceaccount:{namespace}:traffic-manager"
    config = tmp_path / "sa-kubeconfig"
    config.write_text(yaml.safe_dump(cluster.token_kubeconfig(answer["status"]["token"], user)))
    return open_kube_client(str(config))


async def allowed(call: Awaitable[object]) -> bool:
    try:
        await call
    except ApiError as exc:
        if exc.code == 403:
            return False
        raise
    return True


async def test_rbac_is_scoped_to_the_managed_namespaces(
    kube: KubeClient, chart: Chart, cluster: ClusterInfo, tmp_path: Path
) -> None:
    for name in ("alpha", "gamma"):
        await make_namespace(kube, name)
    await install(kube, chart, "ambassador", {"namespaces": ["alpha"]})
    async with await service_account_client(kube, cluster, tmp_path, "ambassador") as sa:
        assert await allowed(sa.list(k8s.NAMESPACES))
        assert await allowed(sa.list(k8s.PODS, "alpha"))
        assert await allowed(sa.list(k8s.DEPLOYMENTS, "alpha"))
        assert not await allowed(sa.list(k8s.PODS, "gamma"))
        assert not await allowed(sa.list(k8s.PODS))  # not cluster-wide
        assert not await allowed(sa.list(k8s.SECRETS, "alpha"))
        assert await allowed(sa.list(k8s.SECRETS, "ambassador"))
        patch = {"metadata": {"labels": {"checked": "yes"}}}
        webhook = "agent-injector-webhook-ambassador"
        assert await allowed(sa.patch(k8s.MUTATING_WEBHOOKS, webhook, patch))
        other = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "other"},
        }
        await kube.create(k8s.MUTATING_WEBHOOKS, other)
        assert not await allowed(sa.patch(k8s.MUTATING_WEBHOOKS, "other", patch))

    await ops.upgrade(kube, chart, {}, release="traffic-manager", namespace="ambassador")
    async with await service_account_client(kube, cluster, tmp_path, "ambassador") as sa:
        assert await allowed(sa.list(k8s.PODS, "gamma"))
        assert await allowed(sa.list(k8s.PODS))
        assert not await allowed(sa.list(k8s.SECRETS, "gamma"))


async def test_the_release_namespace_may_be_managed_too(kube: KubeClient, chart: Chart) -> None:
    await install(kube, chart, "self", {"namespaces": ["self"]})  # created first, then used
    assert await kube.get(k8s.ROLES, "traffic-manager-self", "self")
