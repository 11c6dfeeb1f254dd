"""Argo Rollouts on the sandbox: the Rollout CRD add-on and the sandbox's Rollout controller.

By the controllers alone (no node, no root): a Rollout owns ReplicaSets named and labelled by
`rollouts-pod-template-hash`, canary keeps within maxSurge/maxUnavailable, blueGreen brings the
new set up before the old goes, the status says Healthy with the counts, and deleting the CRD
takes them all away. With real pods and kubectl: apply, `kubectl wait` on the phase, a template
patch rolls the pods, scale, and deleting the CRD takes Rollouts, ReplicaSets and pods away.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import trio
import yaml

from tele.sandbox import addons
from tele.sandbox.apiserver.kinds import ResourceType, by_kind
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.apiserver.store import Event
from tele.sandbox.controllers.registry import controller_manager

from .conftest import Kubectl
from .test_rollout import CTX, _fake_kubelet

CRD = by_kind("apiextensions.k8s.io", "CustomResourceDefinition")
assert CRD is not None
HASH = "rollouts-pod-template-hash"


def _rollout(strategy: dict[str, Any], replicas: int = 4) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "strategy": strategy,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "tele-sandbox/echo"}]},
            },
        },
    }


async def _install(api: Api) -> ResourceType:
    manifest = yaml.safe_load(addons.manifest_path("argo-rollouts").read_text())
    await api.create(CRD, "", manifest, CTX)
    kind = api.kinds.by_kind("argoproj.io", "Rollout")
    assert kind is not None
    return kind


async def _until(api: Api, key: str, done: Any) -> None:
    """Wait (bounded by the caller) until `done()` holds after a change of `key`."""
    changed = trio.Event()

    def on_change(_: Event) -> None:
        if done():
            changed.set()

    unsubscribe = api.store.subscribe(key, on_change)
    try:
        if not done():
            await changed.wait()
    finally:
        unsubscribe()


async def _roll(strategy: dict[str, Any]) -> tuple[list[tuple[int, int, int]], Api]:
    """Create a 4-replica Rollout, roll it to a new template; (old, new, ready) pods seen."""
    api = Api()
    api.bootstrap()
    kind = await _install(api)
    seen: list[tuple[int, int, int]] = []

    def count(_: Event) -> None:
        pods = [
            p
            for p in api.store.objects("/pods", "default")
            if not p["metadata"].get("deletionTimestamp")
        ]
        new = [p for p in pods if (p["metadata"].get("annotations") or {}).get("v") == "2"]
        ready = [p for p in pods if (p.get("status") or {}).get("conditions")]
        seen.append((len(pods) - len(new), len(new), len(ready)))

    def healthy(generation: str) -> bool:
        live = api.store.get(kind.key, "default", "web") or {}
        status = live.get("status") or {}
        return status.get("phase") == "Healthy" and status.get("observedGeneration") == generation

    api.store.subscribe("/pods", count)
    async with trio.open_nursery() as nursery:
        await nursery.start(_fake_kubelet, api)
        await nursery.start(controller_manager(api).serve)
        await api.create(kind, "default", _rollout(strategy), CTX)
        with trio.fail_after(10):
            await _until(api, kind.key, lambda: healthy("1"))
        seen.clear()
        live = api.store.get(kind.key, "default", "web")
        assert live is not None
        body = copy.deepcopy(live)
        body["spec"]["template"]["metadata"]["annotations"] = {"v": "2"}
        await api.update(kind, "default", "web", body, CTX)
        with trio.fail_after(10):
            await _until(api, kind.key, lambda: healthy("2"))
        nursery.cancel_scope.cancel()
    return seen, api


async def test_canary_rolls_within_surge_and_reports_healthy() -> None:
    seen, api = await _roll({"canary": {"maxSurge": 1, "maxUnavailable": 0}})
    assert max(old + new for old, new, _ in seen) <= 5, seen
    assert min(ready for _, _, ready in seen) >= 4, seen
    assert any(0 < new < 4 for _, new, _ in seen)  # old and new served side by side
    assert seen[-1] == (0, 4, 4)

    rollout = api.store.get("argoproj.io/rollouts", "default", "web")
    assert rollout is not None
    status = rollout["status"]
    sets = [rs for rs in api.store.objects("apps/replicasets", "default")]
    current = next(rs for rs in sets if rs["spec"]["replicas"] == 4)
    pod_hash = current["metadata"]["labels"][HASH]
    assert current["metadata"]["name"] == f"web-{pod_hash}"
    assert current["spec"]["selector"]["matchLabels"] == {"app": "web", HASH: pod_hash}
    owner = current["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["apiVersion"], owner["controller"]) == (
        "Rollout",
        "argoproj.io/v1alpha1",
        True,
    )
    assert current["metadata"]["annotations"]["rollout.argoproj.io/revision"] == "2"
    assert [rs["spec"]["replicas"] for rs in sets if rs is not current] == [0]
    assert {k: status[k] for k in ("replicas", "updatedReplicas", "readyReplicas")} == {
        "replicas": 4,
        "updatedReplicas": 4,
        "readyReplicas": 4,
    }
    assert status["availableReplicas"] == 4 and status["stableRS"] == pod_hash
    assert status["currentPodHash"] == pod_hash and status["selector"] == "app=web"
    pods = api.store.objects("/pods", "default")
    assert {p["metadata"]["labels"][HASH] for p in pods} == {pod_hash}


async def test_blue_green_brings_the_new_set_up_before_the_old_goes() -> None:
    seen, _ = await _roll({"blueGreen": {"activeService": "web"}})
    assert all(old == 4 for old, new, _ in seen if new < 4), seen
    assert min(ready for _, _, ready in seen) >= 4


async def test_deleting_the_crd_takes_rollouts_and_their_pods_away() -> None:
    api = Api()
    api.bootstrap()
    async with trio.open_nursery() as nursery:
        await nursery.start(controller_manager(api).serve)
        kind = await _install(api)
        await api.create(kind, "default", _rollout({"canary": {}}, replicas=1), CTX)
        with trio.fail_after(10):
            await _until(api, "apps/replicasets", lambda: api.store.objects("apps/replicasets"))
        await api.delete(CRD, "", "rollouts.argoproj.io", {}, CTX)
        # The Rollout, its ReplicaSet and pods went with the CRD; the kind is no more.
        assert api.kinds.by_kind("argoproj.io", "Rollout") is None
        assert not api.store.objects(kind.key)
        assert not api.store.objects("apps/replicasets") and not api.store.objects("/pods")
        nursery.cancel_scope.cancel()


@pytest.mark.netns
def test_kubectl_rollout_rolls_real_pods(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(addons.manifest_path("argo-rollouts")))
    kubectl.run("wait", "--for=condition=Established", "crd/rollouts.argoproj.io")
    manifest = _rollout({"canary": {"maxSurge": 1, "maxUnavailable": 0}}, replicas=2)
    del manifest["metadata"]["namespace"]
    kubectl.run("apply", "-f", "-", input=json.dumps(manifest))

    def healthy(generation: int) -> dict[str, Any]:
        kubectl.run(
            "wait",
            f"--for=jsonpath={{.status.observedGeneration}}={generation}",
            "rollout/web",
            "--timeout=60s",
        )
        kubectl.run(
            "wait", "--for=jsonpath={.status.phase}=Healthy", "rollout/web", "--timeout=60s"
        )
        rollout: dict[str, Any] = json.loads(
            kubectl.run("get", "rollout", "web", "-o", "json").stdout
        )
        return rollout

    first = healthy(1)["status"]
    assert (first["replicas"], first["readyReplicas"], first["availableReplicas"]) == (2, 2, 2)
    table = kubectl.run("get", "rollouts").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "DESIRED", "CURRENT", "UP-TO-DATE", "AVAILABLE"]
    assert table[1].split()[:5] == ["web", "2", "2", "2", "2"]

    # A template change, as the traffic manager's restartedAt patch (a merge patch), rolls.
    kubectl.run(
        "patch",
        "rollout",
        "web",
        "--type=merge",
        "-p",
        '{"spec":{"template":{"metadata":{"annotations":{"restartedAt":"now"}}}}}',
    )
    second = healthy(2)["status"]
    assert second["currentPodHash"] != first["currentPodHash"]
    pods = json.loads(kubectl.run("get", "pods", "-l", "app=web", "-o", "json").stdout)["items"]
    running = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(running) == 2
    assert {p["metadata"]["labels"][HASH] for p in running} == {second["currentPodHash"]}
    assert all(p["status"]["phase"] == "Running" for p in running)

    kubectl.run("scale", "rollout", "web", "--replicas=3")
    assert healthy(3)["status"]["availableReplicas"] == 3

    names = [f"pod/{p['metadata']['name']}" for p in running]
    kubectl.run("delete", "crd", "rollouts.argoproj.io")
    kubectl.run("wait", "--for=delete", *names, "--timeout=60s")
    assert kubectl.run("get", "rs", "-o", "name").stdout.strip() == ""
