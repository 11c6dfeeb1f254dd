"""The official kubernetes Python client against the sandbox: CRUD, selectors, paging, watches
with resume and 410, conflicts, garbage collection, RBAC denial and SelfSubjectAccessReview."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tele.sandbox.testing import threaded_cluster

from .conftest import Sandbox, unique_namespace

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402


def _message(exc: ApiException) -> str:
    return str(json.loads(exc.body)["message"])


def _api_client(kubeconfig: Path) -> Any:
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture
def core(sandbox: Sandbox) -> Iterator[tuple[Any, str]]:
    api_client = _api_client(sandbox.kubeconfig)
    v1 = client.CoreV1Api(api_client)
    ns = unique_namespace("py")
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        yield v1, ns
    finally:
        v1.delete_namespace(ns)
        api_client.close()


def _cm(name: str, labels: dict[str, str] | None = None, **data: str) -> Any:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=labels), data=data)


def test_crud_and_conflicts(core: tuple[Any, str]) -> None:
    v1, ns = core
    created = v1.create_namespaced_config_map(ns, _cm("one", a="1"))
    assert created.metadata.uid and created.metadata.resource_version
    assert created.metadata.creation_timestamp is not None
    with pytest.raises(ApiException) as exists:
        v1.create_namespaced_config_map(ns, _cm("one"))
    assert exists.value.status == 409
    assert 'configmaps "one" already exists' in _message(exists.value)

    created.data["b"] = "2"
    replaced = v1.replace_namespaced_config_map("one", ns, created)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    # `created` still carries the old resourceVersion: optimistic concurrency says no.
    created.data["c"] = "3"
    with pytest.raises(ApiException) as stale:
        v1.replace_namespaced_config_map("one", ns, created)
    assert stale.value.status == 409
    assert "the object has been modified" in _message(stale.value)

    patched = v1.patch_namespaced_config_map("one", ns, {"data": {"c": "3"}})
    assert patched.data == {"a": "1", "b": "2", "c": "3"}
    assert v1.read_namespaced_config_map("one", ns).data["c"] == "3"
    v1.delete_namespaced_config_map("one", ns)
    with pytest.raises(ApiException) as missing:
        v1.read_namespaced_config_map("one", ns)
    assert missing.value.status == 404


def test_selectors_and_paging(core: tuple[Any, str]) -> None:
    v1, ns = core
    for i in range(7):
        v1.create_namespaced_config_map(
            ns, _cm(f"cm-{i}", {"parity": "even" if i % 2 == 0 else "odd", "i": str(i)})
        )
    even = v1.list_namespaced_config_map(ns, label_selector="parity=even")
    assert [c.metadata.name for c in even.items] == ["cm-0", "cm-2", "cm-4", "cm-6"]
    odd_not_3 = v1.list_namespaced_config_map(ns, label_selector="parity in (odd),i!=3")
    assert [c.metadata.name for c in odd_not_3.items] == ["cm-1", "cm-5"]
    by_name = v1.list_namespaced_config_map(ns, field_selector="metadata.name=cm-3")
    assert [c.metadata.name for c in by_name.items] == ["cm-3"]
    with pytest.raises(ApiException) as bad:
        v1.list_namespaced_config_map(ns, field_selector="data.x=1")
    assert bad.value.status == 400 and "field label not supported: data.x" in _message(bad.value)

    names: list[str] = []
    token = None
    pages = 0
    while True:
        page = v1.list_namespaced_config_map(ns, limit=3, _continue=token, label_selector="parity")
        names += [c.metadata.name for c in page.items]
        pages += 1
        token = page.metadata._continue
        if not token:
            break
        assert page.metadata.remaining_item_count > 0
    assert pages == 3
    assert names == [f"cm-{i}" for i in range(7)]


def test_watch_resume_after_reconnect(core: tuple[Any, str]) -> None:
    v1, ns = core
    listed = v1.list_namespaced_config_map(ns)
    rv = listed.metadata.resource_version
    v1.create_namespaced_config_map(ns, _cm("w1", a="1"))
    v1.patch_namespaced_config_map("w1", ns, {"data": {"a": "2"}})

    w = watch.Watch()
    seen = []
    for event in w.stream(
        v1.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=5
    ):
        seen.append((event["type"], event["object"].metadata.name, event["object"].data))
        if len(seen) == 2:
            w.stop()
    assert seen == [("ADDED", "w1", {"a": "1"}), ("MODIFIED", "w1", {"a": "2"})]
    last_rv = w.resource_version

    # "Reconnect" from the last version seen: only what happened since then arrives.
    v1.create_namespaced_config_map(ns, _cm("w2"))
    v1.delete_namespaced_config_map("w1", ns)
    w = watch.Watch()
    resumed = []
    for event in w.stream(
        v1.list_namespaced_config_map, ns, resource_version=last_rv, timeout_seconds=5
    ):
        resumed.append((event["type"], event["object"].metadata.name))
        if len(resumed) == 2:
            w.stop()
    assert resumed == [("ADDED", "w2"), ("DELETED", "w1")]


def test_watch_with_selector_sees_objects_move_in_and_out(core: tuple[Any, str]) -> None:
    v1, ns = core
    rv = v1.list_namespaced_config_map(ns).metadata.resource_version
    v1.create_namespaced_config_map(ns, _cm("mover"))
    v1.patch_namespaced_config_map("mover", ns, {"metadata": {"labels": {"pick": "me"}}})
    v1.patch_namespaced_config_map("mover", ns, {"metadata": {"labels": {"pick": None}}})
    w = watch.Watch()
    seen = []
    for event in w.stream(
        v1.list_namespaced_config_map,
        ns,
        resource_version=rv,
        label_selector="pick=me",
        timeout_seconds=5,
    ):
        seen.append(event["type"])
        if len(seen) == 2:
            w.stop()
    assert seen == ["ADDED", "DELETED"]


def test_watch_gone_after_history_compaction(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    with threaded_cluster(kubeconfig, name="small", history_size=5) as _cluster:
        api_client = _api_client(kubeconfig)
        v1 = client.CoreV1Api(api_client)
        try:
            old_rv = v1.list_namespaced_config_map("default").metadata.resource_version
            for i in range(8):
                v1.create_namespaced_config_map("default", _cm(f"c{i}"))
            stream = v1.list_namespaced_config_map(
                "default", watch=True, resource_version=old_rv, _preload_content=False
            )
            line = stream.readline()
            stream.release_conn()
            event = yaml.safe_load(line)
            assert event["type"] == "ERROR"
            assert event["object"]["code"] == 410
            assert event["object"]["reason"] == "Expired"
            assert "too old resource version" in event["object"]["message"]
            # The client's own watch helper turns that into an ApiException(410) on retry.
            w = watch.Watch()
            with pytest.raises(ApiException) as gone:
                for _ in w.stream(
                    v1.list_namespaced_config_map,
                    "default",
                    resource_version=old_rv,
                    timeout_seconds=2,
                ):
                    pass
            assert gone.value.status == 410
        finally:
            api_client.close()


def test_watch_bookmarks_and_timeout(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    with threaded_cluster(kubeconfig, name="bm", bookmark_interval=0.2) as _cluster:
        api_client = _api_client(kubeconfig)
        v1 = client.CoreV1Api(api_client)
        try:
            rv = v1.list_namespaced_config_map("default").metadata.resource_version
            stream = v1.list_namespaced_config_map(
                "default",
                watch=True,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=1,
                _preload_content=False,
            )
            lines = [yaml.safe_load(ln) for ln in stream.read().splitlines() if ln.strip()]
            stream.release_conn()
            assert lines and all(e["type"] == "BOOKMARK" for e in lines)
            assert lines[0]["object"]["metadata"]["resourceVersion"] == rv
        finally:
            api_client.close()


def test_owner_references_and_propagation(sandbox: Sandbox, core: tuple[Any, str]) -> None:
    v1, ns = core
    apps = client.AppsV1Api(v1.api_client)
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels={"app": "gc"}),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="c", image="tele-sandbox/worker")]
        ),
    )

    def deployment_with_replicaset(name: str) -> tuple[Any, Any]:
        dep = apps.create_namespaced_deployment(
            ns,
            client.V1Deployment(
                metadata=client.V1ObjectMeta(name=name),
                spec=client.V1DeploymentSpec(
                    selector=client.V1LabelSelector(match_labels={"app": "gc"}), template=template
                ),
            ),
        )
        owner = client.V1OwnerReference(
            api_version="apps/v1",
            kind="Deployment",
            name=name,
            uid=dep.metadata.uid,
            controller=True,
            block_owner_deletion=True,
        )
        rs = apps.create_namespaced_replica_set(
            ns,
            client.V1ReplicaSet(
                metadata=client.V1ObjectMeta(name=f"{name}-rs", owner_references=[owner]),
                spec=client.V1ReplicaSetSpec(
                    selector=client.V1LabelSelector(match_labels={"app": "gc"}), template=template
                ),
            ),
        )
        pod_owner = client.V1OwnerReference(
            api_version="apps/v1",
            kind="ReplicaSet",
            name=rs.metadata.name,
            uid=rs.metadata.uid,
            controller=True,
        )
        v1.create_namespaced_pod(
            ns,
            client.V1Pod(
                metadata=client.V1ObjectMeta(
                    name=f"{name}-pod", owner_references=[pod_owner], labels={"app": "gc"}
                ),
                spec=template.spec,
            ),
        )
        return dep, rs

    deployment_with_replicaset("bg")
    apps.delete_namespaced_deployment("bg", ns, propagation_policy="Background")
    assert [r.metadata.name for r in apps.list_namespaced_replica_set(ns).items] == []
    assert [p.metadata.name for p in v1.list_namespaced_pod(ns).items] == []

    deployment_with_replicaset("orphan")
    apps.delete_namespaced_deployment("orphan", ns, propagation_policy="Orphan")
    rs = apps.read_namespaced_replica_set("orphan-rs", ns)
    assert rs.metadata.owner_references is None
    assert v1.read_namespaced_pod("orphan-pod", ns).metadata.owner_references is not None

    deployment_with_replicaset("fg")
    apps.delete_namespaced_deployment("fg", ns, propagation_policy="Foreground")
    with pytest.raises(ApiException) as gone:
        apps.read_namespaced_deployment("fg", ns)
    assert gone.value.status == 404
    assert "fg-pod" not in [p.metadata.name for p in v1.list_namespaced_pod(ns).items]


def test_graceful_pod_deletion_and_finalizers(core: tuple[Any, str]) -> None:
    v1, ns = core
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="sleeper"),
        spec=client.V1PodSpec(
            node_name="node-1",
            termination_grace_period_seconds=20,
            containers=[client.V1Container(name="c", image="x")],
        ),
    )
    v1.create_namespaced_pod(ns, pod)
    v1.patch_namespaced_pod_status("sleeper", ns, {"status": {"phase": "Running"}})
    v1.delete_namespaced_pod("sleeper", ns)
    terminating = v1.read_namespaced_pod("sleeper", ns)
    assert terminating.metadata.deletion_timestamp is not None
    assert terminating.metadata.deletion_grace_period_seconds == 20
    v1.delete_namespaced_pod("sleeper", ns, grace_period_seconds=0)
    with pytest.raises(ApiException) as gone:
        v1.read_namespaced_pod("sleeper", ns)
    assert gone.value.status == 404

    cm = _cm("held")
    cm.metadata.finalizers = ["example.com/hold"]
    v1.create_namespaced_config_map(ns, cm)
    v1.delete_namespaced_config_map("held", ns)
    assert v1.read_namespaced_config_map("held", ns).metadata.deletion_timestamp is not None
    v1.patch_namespaced_config_map("held", ns, {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as released:
        v1.read_namespaced_config_map("held", ns)
    assert released.value.status == 404


def test_services_allocate_cluster_ips_like_kubernetes(core: tuple[Any, str]) -> None:
    v1, ns = core

    def svc(name: str, ip: str | None = None) -> Any:
        return client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(cluster_ip=ip, ports=[client.V1ServicePort(port=80)]),
        )

    first = v1.create_namespaced_service(ns, svc("a"))
    assert first.spec.cluster_ip.startswith("10.96.") and first.spec.cluster_ips == [
        first.spec.cluster_ip
    ]
    assert first.spec.ports[0].target_port == 80 and first.spec.ports[0].protocol == "TCP"
    with pytest.raises(ApiException) as taken:
        v1.create_namespaced_service(ns, svc("b", first.spec.cluster_ip))
    assert taken.value.status == 422
    assert (
        f'spec.clusterIPs: Invalid value: []string{{"{first.spec.cluster_ip}"}}: '
        f"failed to allocate IP {first.spec.cluster_ip}: provided IP is already allocated"
    ) in _message(taken.value)
    with pytest.raises(ApiException) as outside:
        v1.create_namespaced_service(ns, svc("c", "10.97.0.5"))
    assert (
        "the provided IP (10.97.0.5) is not in the valid range. "
        "The range of valid IPs is 10.96.0.0/16" in _message(outside.value)
    )
    v1.delete_namespaced_service("a", ns)
    again = v1.create_namespaced_service(ns, svc("d", first.spec.cluster_ip))
    assert again.spec.cluster_ip == first.spec.cluster_ip


def test_rbac_denial_and_self_subject_access_review(
    sandbox: Sandbox, core: tuple[Any, str], tmp_path: Path
) -> None:
    v1, ns = core
    v1.create_namespaced_service_account(
        ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="bot"))
    )
    token = v1.create_namespaced_service_account_token(
        "bot", ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    kubeconfig = tmp_path / "bot.yaml"
    kubeconfig.write_text(yaml.safe_dump(sandbox.info.token_kubeconfig(token, "bot", ns)))
    bot_client = _api_client(kubeconfig)
    try:
        bot = client.CoreV1Api(bot_client)
        with pytest.raises(ApiException) as denied:
            bot.list_namespaced_pod(ns)
        assert denied.value.status == 403
        assert (
            f'pods is forbidden: User "system:serviceaccount:{ns}:bot" cannot list resource "pods" '
            f'in API group "" in the namespace "{ns}"'
        ) in _message(denied.value)

        review = client.AuthorizationV1Api(bot_client).create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=ns, verb="list", resource="pods"
                    )
                )
            )
        )
        assert review.status.allowed is False

        rbac = client.RbacAuthorizationV1Api(v1.api_client)
        rbac.create_namespaced_role(
            ns,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="pod-reader"),
                rules=[
                    client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list", "get"])
                ],
            ),
        )
        rbac.create_namespaced_role_binding(
            ns,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="bot-reads"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
                ),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="bot", namespace=ns)],
            ),
        )
        assert bot.list_namespaced_pod(ns).items == []
        review = client.AuthorizationV1Api(bot_client).create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=ns, verb="list", resource="pods"
                    )
                )
            )
        )
        assert review.status.allowed is True
        with pytest.raises(ApiException) as other_ns:
            bot.list_namespaced_pod("default")
        assert other_ns.value.status == 403

        # Deleting the account revokes its tokens.
        v1.delete_namespaced_service_account("bot", ns)
        with pytest.raises(ApiException) as revoked:
            bot.list_namespaced_pod(ns)
        assert revoked.value.status == 401
    finally:
        bot_client.close()


def test_concurrent_clients_do_not_interfere(core: tuple[Any, str]) -> None:
    v1, ns = core
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(10):
                v1.create_namespaced_config_map(ns, _cm(f"w{i}-{j}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(v1.list_namespaced_config_map(ns, label_selector="").items) >= 40


def test_eviction_honours_disruption_budgets(core: tuple[Any, str]) -> None:
    v1, ns = core
    policy = client.PolicyV1Api(v1.api_client)
    v1.create_namespaced_pod(
        ns,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="guarded", labels={"app": "db"}),
            spec=client.V1PodSpec(
                node_name="node-1",
                termination_grace_period_seconds=0,
                containers=[client.V1Container(name="c", image="x")],
            ),
        ),
    )
    v1.patch_namespaced_pod_status("guarded", ns, {"status": {"phase": "Running"}})
    policy.create_namespaced_pod_disruption_budget(
        ns,
        client.V1PodDisruptionBudget(
            metadata=client.V1ObjectMeta(name="db-pdb"),
            spec=client.V1PodDisruptionBudgetSpec(
                min_available=1, selector=client.V1LabelSelector(match_labels={"app": "db"})
            ),
        ),
    )
    policy.patch_namespaced_pod_disruption_budget_status(
        "db-pdb",
        ns,
        {
            "status": {
                "disruptionsAllowed": 0,
                "currentHealthy": 1,
                "desiredHealthy": 1,
                "expectedPods": 1,
            }
        },
    )
    eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name="guarded", namespace=ns))
    with pytest.raises(ApiException) as refused:
        v1.create_namespaced_pod_eviction("guarded", ns, eviction)
    assert refused.value.status == 429
    body = json.loads(refused.value.body)
    assert body["message"] == "Cannot evict pod as it would violate the pod's disruption budget."
    assert body["details"]["causes"][0]["message"] == (
        "The disruption budget db-pdb needs 1 healthy pods and has 1 currently"
    )

    policy.patch_namespaced_pod_disruption_budget_status(
        "db-pdb", ns, {"status": {"disruptionsAllowed": 1}}
    )
    v1.create_namespaced_pod_eviction("guarded", ns, eviction)
    with pytest.raises(ApiException) as gone:
        v1.read_namespaced_pod("guarded", ns)
    assert gone.value.status == 404
    status = policy.read_namespaced_pod_disruption_budget("db-pdb", ns).status
    assert status.disruptions_allowed == 0 and "guarded" in status.disrupted_pods


def test_scale_subresource_and_status_isolation(core: tuple[Any, str]) -> None:
    v1, ns = core
    apps = client.AppsV1Api(v1.api_client)
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels={"app": "s"}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")]),
    )
    apps.create_namespaced_deployment(
        ns,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="s"),
            spec=client.V1DeploymentSpec(
                selector=client.V1LabelSelector(match_labels={"app": "s"}), template=template
            ),
        ),
    )
    scale = apps.read_namespaced_deployment_scale("s", ns)
    assert scale.spec.replicas == 1 and scale.status.selector == "app=s"
    apps.patch_namespaced_deployment_scale("s", ns, {"spec": {"replicas": 4}})
    dep = apps.read_namespaced_deployment("s", ns)
    assert dep.spec.replicas == 4 and dep.metadata.generation == 2
    # Status goes through /status only; spec changes there are ignored, and vice versa.
    apps.patch_namespaced_deployment_status(
        "s", ns, {"spec": {"replicas": 9}, "status": {"replicas": 4, "observedGeneration": 2}}
    )
    apps.patch_namespaced_deployment("s", ns, {"status": {"replicas": 99}})
    dep = apps.read_namespaced_deployment("s", ns)
    assert dep.spec.replicas == 4 and dep.status.replicas == 4 and dep.metadata.generation == 2


def test_immutable_configmap_refuses_changes(core: tuple[Any, str]) -> None:
    v1, ns = core
    cm = _cm("frozen", a="1")
    cm.immutable = True
    v1.create_namespaced_config_map(ns, cm)
    with pytest.raises(ApiException) as refused:
        v1.patch_namespaced_config_map("frozen", ns, {"data": {"a": "2"}})
    assert refused.value.status == 422
    assert "data: Forbidden: field is immutable when `immutable` is set" in _message(refused.value)
    v1.patch_namespaced_config_map("frozen", ns, {"metadata": {"labels": {"ok": "yes"}}})
