"""Deployment roll-outs by the controllers alone (no node, no root): RollingUpdate respects
maxSurge/maxUnavailable at every step, Recreate removes every old pod before a new one
appears. Pods are made Ready by a stand-in for the kubelet that only writes their status."""

from __future__ import annotations

import copy
from typing import Any

import trio
import trio.testing

from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.kinds import by_kind
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.apiserver.store import Event
from tele.sandbox.controllers.registry import controller_manager

CTX = RequestContext(User("test", ("system:masters",)))
POD = by_kind("", "Pod")
DEPLOY = by_kind("apps", "Deployment")
assert POD is not None and DEPLOY is not None


def _deployment(strategy: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 4,
            "strategy": strategy,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "tele-sandbox/echo"}]},
            },
        },
    }


async def _fake_kubelet(api: Api, *, task_status: trio.TaskStatus[None]) -> None:
    """Mark each new pod Running and Ready (one at a time, as a node would, after a moment)."""
    send, recv = trio.open_memory_channel[str](1000)

    def on_pod(event: Event) -> None:
        if event.type == "ADDED":
            send.send_nowait(event.obj["metadata"]["name"])

    unsubscribe = api.store.subscribe("/pods", on_pod)
    task_status.started()
    try:
        async for name in recv:
            await trio.sleep(0.01)
            live = api.store.get("/pods", "default", name)
            if live is None:
                continue
            body = copy.deepcopy(live)
            body["status"] = {
                "phase": "Running",
                "podIP": "10.244.9.9",
                "conditions": [{"type": "Ready", "status": "True"}],
            }
            await api.update(POD, "default", name, body, CTX, subresource="status")
    finally:
        unsubscribe()


async def _roll(strategy: dict[str, Any]) -> list[tuple[int, int, int]]:
    """Roll a 4-replica Deployment to a new template; (old, new, ready) pod counts seen."""
    api = Api()
    api.bootstrap()
    seen: list[tuple[int, int, int]] = []
    goal: dict[str, Any] = {"counts": (4, 0, 4), "reached": trio.Event()}

    def count(event: Event) -> None:
        pods = [
            p
            for p in api.store.objects("/pods", "default")
            if not p["metadata"].get("deletionTimestamp")
        ]
        new = [p for p in pods if (p["metadata"].get("annotations") or {}).get("v") == "2"]
        ready = [p for p in pods if (p.get("status") or {}).get("conditions")]
        seen.append((len(pods) - len(new), len(new), len(ready)))
        if seen[-1] == goal["counts"]:
            goal["reached"].set()

    api.store.subscribe("/pods", count)
    async with trio.open_nursery() as nursery:
        await nursery.start(_fake_kubelet, api)
        await nursery.start(controller_manager(api).serve)
        await api.create(DEPLOY, "default", _deployment(strategy), CTX)
        with trio.fail_after(10):
            await goal["reached"].wait()
        seen.clear()
        goal.update(counts=(0, 4, 4), reached=trio.Event())
        live = api.store.get(DEPLOY.key, "default", "web")
        assert live is not None
        body = copy.deepcopy(live)
        body["spec"]["template"]["metadata"]["annotations"] = {"v": "2"}
        await api.update(DEPLOY, "default", "web", body, CTX)
        with trio.fail_after(10):
            await goal["reached"].wait()
        nursery.cancel_scope.cancel()
    return seen


async def test_rolling_update_keeps_within_surge_and_availability() -> None:
    seen = await _roll(
        {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    )
    assert max(old + new for old, new, _ in seen) <= 5, seen
    assert min(ready for _, _, ready in seen) >= 4
    assert any(0 < new < 4 for _, new, _ in seen)  # old and new served side by side


async def test_recreate_removes_old_pods_first() -> None:
    seen = await _roll({"type": "Recreate"})
    assert all(old == 0 for old, new, _ in seen if new > 0)


async def _graceful_kubelet(
    api: Api, release: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """Bind each new pod to a node and make it Ready; pods being deleted (they have a grace
    period, being on a node) are finished only once `release` is set, as after a long grace."""
    send, recv = trio.open_memory_channel[str](1000)

    def on_pod(event: Event) -> None:
        if event.type == "ADDED" or event.obj["metadata"].get("deletionTimestamp"):
            send.send_nowait(event.obj["metadata"]["name"])

    unsubscribe = api.store.subscribe("/pods", on_pod)
    task_status.started()
    try:
        async for name in recv:
            live = api.store.get("/pods", "default", name)
            if live is None:
                continue
            if live["metadata"].get("deletionTimestamp"):
                await release.wait()
                await api.delete(POD, "default", name, {"gracePeriodSeconds": 0}, CTX)
            elif not live["spec"].get("nodeName"):
                await api.bind("default", name, {"target": {"name": "node"}}, CTX)
                body = copy.deepcopy(api.store.get("/pods", "default", name))
                body["status"] = {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
                await api.update(POD, "default", name, body, CTX, subresource="status")
    finally:
        unsubscribe()


async def test_recreate_goes_on_when_graceful_pods_are_gone() -> None:
    api = Api()
    api.bootstrap()
    release = trio.Event()
    goal = {"version": "", "reached": trio.Event()}

    def on_pod(_: Event) -> None:
        pods = api.store.objects("/pods", "default")
        if len(pods) == 4 and all(
            (p["metadata"].get("annotations") or {}).get("v", "") == goal["version"]
            and (p.get("status") or {}).get("conditions")
            for p in pods
        ):
            goal["reached"].set()  # type: ignore[attr-defined]

    api.store.subscribe("/pods", on_pod)
    async with trio.open_nursery() as nursery:
        await nursery.start(_graceful_kubelet, api, release)
        await nursery.start(controller_manager(api).serve)
        await api.create(DEPLOY, "default", _deployment({"type": "Recreate"}), CTX)
        with trio.fail_after(10):
            await goal["reached"].wait()  # type: ignore[attr-defined]
        goal.update(version="2", reached=trio.Event())
        live = api.store.get(DEPLOY.key, "default", "web")
        assert live is not None
        body = copy.deepcopy(live)
        body["spec"]["template"]["metadata"]["annotations"] = {"v": "2"}
        await api.update(DEPLOY, "default", "web", body, CTX)
        # The controllers settle while the old pods terminate; only then do they go.
        await trio.testing.wait_all_tasks_blocked()
        assert all(p["metadata"].get("deletionTimestamp") for p in api.store.objects("/pods"))
        release.set()
        with trio.fail_after(10):
            await goal["reached"].wait()  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
