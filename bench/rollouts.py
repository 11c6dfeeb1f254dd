"""Benchmark Argo Rollouts on the sandbox node against Deployments: a 3-replica workload created
until it is complete (Rollout phase Healthy / Deployment rolled out), and a template change
(the traffic manager's restartedAt merge patch) until it is complete again; medians of a few runs.

The cluster (with its node) runs in this process under a unique name; the Rollout CRD is created
through the API like `kubectl apply` would. Everything is removed at the end. Needs root,
iproute2 and nftables. Prints a table and one JSON line; no targets (the Rollout controller
reuses the Deployment controller's rolling, so the two should be close).

    .venv/bin/python bench/rollouts.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import yaml

from sandbox import CTX, _deployment, _echo, _rt  # bench/sandbox.py
from tele.sandbox import addons
from tele.sandbox.apiserver.store import Event
from tele.sandbox.cluster import serve_cluster

ApiObject = dict[str, Any]


async def _until(store: Any, key: str, done: Callable[[], bool]) -> None:
    changed = trio.Event()

    def on_change(_: Event) -> None:
        if done():
            changed.set()

    unsubscribe = store.subscribe(key, on_change)
    try:
        with trio.fail_after(120):
            if not done():
                await changed.wait()
    finally:
        unsubscribe()


def _complete(store: Any, resource_type: Any, name: str, generation: int) -> Callable[[], bool]:
    def done() -> bool:
        obj = store.get(resource_type.key, "default", name) or {}
        st = obj.get("status") or {}
        if str(st.get("observedGeneration")) != str(generation):
            return False
        if resource_type.kind == "Rollout":
            return bool(st.get("phase") == "Healthy")
        return st.get("updatedReplicas") == st.get("availableReplicas") == st.get("replicas") == 3

    return done


async def _measure(info: Any, resource_type: Any, body: ApiObject) -> tuple[float, float]:
    """Seconds to complete after create, then after a template patch."""
    name = body["metadata"]["name"]
    store = info.api.store
    t0 = time.perf_counter()
    await info.api.create(resource_type, "default", body, CTX)
    await _until(store, resource_type.key, _complete(store, resource_type, name, 1))
    created = time.perf_counter() - t0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = {"spec": {"template": {"metadata": {"annotations": {"restartedAt": stamp}}}}}
    t0 = time.perf_counter()
    await info.api.patch(
        resource_type,
        "default",
        name,
        "application/merge-patch+json",
        json.dumps(patch).encode(),
        ctx=CTX,
    )
    await _until(store, resource_type.key, _complete(store, resource_type, name, 2))
    restarted = time.perf_counter() - t0
    await info.api.delete(resource_type, "default", name, {}, CTX)
    return created, restarted


async def main(runs: int) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/rollouts.py needs root (network namespaces)")
    name = f"b{uuid.uuid4().hex[:6]}"
    results: dict[str, list[tuple[float, float]]] = {"Deployment": [], "Rollout": []}
    with tempfile.TemporaryDirectory(prefix="tele-bench-rollouts-") as tmp:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(
                lambda **kw: serve_cluster(name, nodes=True, state_dir=Path(tmp), **kw)
            )
            manifest = yaml.safe_load(addons.manifest_path("argo-rollouts").read_text())
            t0 = time.perf_counter()
            await info.api.create(
                _rt("apiextensions.k8s.io", "CustomResourceDefinition"), "", manifest, CTX
            )
            crd_s = time.perf_counter() - t0
            rollout_rt = info.api.kinds.by_kind("argoproj.io", "Rollout")
            for i in range(runs):
                deployment = _deployment(f"d{i}", 3, _echo())
                results["Deployment"].append(
                    await _measure(info, _rt("apps", "Deployment"), deployment)
                )
                rollout = _deployment(f"r{i}", 3, _echo())
                rollout.update(apiVersion="argoproj.io/v1alpha1", kind="Rollout")
                rollout["spec"]["strategy"] = {"canary": {}}
                results["Rollout"].append(await _measure(info, rollout_rt, rollout))
            nursery.cancel_scope.cancel()
    medians = {
        kind: (
            statistics.median(c for c, _ in values),
            statistics.median(r for _, r in values),
        )
        for kind, values in results.items()
    }
    print(f"{'measure (median of ' + str(runs) + ')':46} {'value':>8}   ({os.cpu_count()} CPUs)")
    print(f"{'Rollout CRD create -> kind served (ms)':46} {crd_s * 1000:8.2f}")
    for kind, (created, restarted) in medians.items():
        print(f"{kind + ', 3 replicas: create -> complete (s)':46} {created:8.3f}")
        print(f"{kind + ', template patch -> complete (s)':46} {restarted:8.3f}")
    print(
        json.dumps(
            {
                "bench": "rollouts",
                "runs": runs,
                "crd_create_ms": crd_s * 1000,
                "deployment_create_s": medians["Deployment"][0],
                "deployment_restart_s": medians["Deployment"][1],
                "rollout_create_s": medians["Rollout"][0],
                "rollout_restart_s": medians["Rollout"][1],
            }
        )
    )


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.runs)
