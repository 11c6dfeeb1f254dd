"""install, upgrade and uninstall of the traffic manager with tele's own Kubernetes client.

Each object the chart renders is applied with server-side apply (field manager `tele-helm`,
forced: the chart owns these fields), in Helm's install order. The release record is written
before the first object is applied (listing every object that may exist) and rewritten when the
work is done, so an interrupted install or upgrade is still cleaned up by the next upgrade or
uninstall.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import trio

from tele.contracts import agentconfig
from tele.contracts.names import STATE_CONFIGMAP
from tele.helm import release as records
from tele.helm.chart import Chart, kind_rank
from tele.helm.conflicts import check_conflicts, selector_of
from tele.helm.errors import ReleaseError
from tele.helm.release import ObjectRef, ReleaseRecord
from tele.helm.values import deep_merge
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient, Resource

log = logging.getLogger(__name__)

Obj = dict[str, Any]
FIELD_MANAGER = "tele-helm"


class Progress(Protocol):
    """What the CLI shows while objects are applied or deleted."""

    def begin(self, action: str, total: int) -> None: ...

    def advance(self, text: str) -> None: ...


class QuietProgress:
    def begin(self, action: str, total: int) -> None:
        pass

    def advance(self, text: str) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    record: ReleaseRecord
    applied: list[ObjectRef]
    pruned: list[ObjectRef]
    scope: str  # "all namespaces", "namespaces a, b", ...


def _resource(ref: ObjectRef) -> Resource:
    return k8s.resource_for({"apiVersion": ref.api_version, "kind": ref.kind})


async def _existing_namespaces(kube: KubeClient) -> dict[str, dict[str, str]]:
    items, _ = await kube.list(k8s.NAMESPACES)
    return {str(ns["metadata"]["name"]): dict(ns["metadata"].get("labels") or {}) for ns in items}


MANAGER_SELECTOR = "app=traffic-manager,telepresence=manager"


async def _installed_managers(kube: KubeClient) -> list[ReleaseRecord]:
    """Every traffic manager in the cluster: tele's release records, plus the managers that
    `helm` itself installed from this chart (no record: their scope is read from the
    Deployment's TELE_NAMESPACES / TELE_NAMESPACE_SELECTOR)."""
    found = await records.list_all(kube)
    recorded = {r.namespace for r in found}
    deployments, _ = await kube.list(k8s.DEPLOYMENTS, label_selector=MANAGER_SELECTOR)
    for deployment in deployments:
        meta = deployment["metadata"]
        if meta.get("namespace") in recorded:
            continue
        containers = deployment["spec"]["template"]["spec"].get("containers") or []
        env = {e["name"]: e.get("value") or "" for c in containers for e in c.get("env") or []}
        try:
            scope = {
                "namespaces": json.loads(env.get("TELE_NAMESPACES") or "[]"),
                "namespaceSelector": json.loads(env.get("TELE_NAMESPACE_SELECTOR") or "{}"),
            }
        except ValueError:
            continue
        labels = meta.get("labels") or {}
        found.append(
            ReleaseRecord(
                name=str(labels.get("app.kubernetes.io/instance") or meta["name"]),
                namespace=str(meta["namespace"]),
                revision=0,
                status="deployed",
                chart_version="",
                app_version="",
                values={},
                scope=scope,
                objects=[],
            )
        )
    return found


async def _check_scope(
    kube: KubeClient, release: str, namespace: str, merged: Obj, *, creating: bool = False
) -> str:
    """Refuse a scope that collides with another manager's or names missing namespaces (the
    release namespace is not missing when the install is about to create it)."""
    scope = records.scope_of(merged)
    existing = await _existing_namespaces(kube)
    others = await _installed_managers(kube)
    check_conflicts(release, namespace, scope, others, existing)
    selector = selector_of(scope)
    static = selector.static_names
    if static is not None:
        missing = sorted(static - set(existing) - ({namespace} if creating else set()))
        if missing:
            raise ReleaseError(
                f"Namespace{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'do' if len(missing) > 1 else 'does'} not exist; create "
                f"{'them' if len(missing) > 1 else 'it'} first or leave "
                f"{'them' if len(missing) > 1 else 'it'} out of the managed namespaces."
            )
    return selector.describe()


async def _ensure_namespace(kube: KubeClient, namespace: str, create: bool) -> None:
    if await kube.get_or_none(k8s.NAMESPACES, namespace) is not None:
        return
    if not create:
        raise ReleaseError(
            f"Namespace {namespace} does not exist; create it or pass --create-namespace."
        )
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    try:
        await kube.create(k8s.NAMESPACES, body)
    except ApiError as exc:
        if not exc.conflict:
            raise


# Lists whose entries are keyed by `name` in strategic merge patches (the ones the chart renders).
_NAMED_LISTS = frozenset(
    {"containers", "initContainers", "env", "volumes", "volumeMounts", "webhooks"}
)


def removal_patch(old: Any, new: Any, key: str = "") -> Any:
    """A strategic merge patch that deletes what `old` (the last applied manifest) had and `new`
    lacks, or None. Server-side apply does this by itself on a real API server; sending it too
    makes removals independent of how completely a server implements field ownership (the
    sandbox's apply is a strategic merge), and is a no-op where apply already removed them."""
    if isinstance(old, dict) and isinstance(new, dict):
        patch: Obj = {}
        for name, value in old.items():
            if name not in new:
                patch[name] = None
            elif (sub := removal_patch(value, new[name], name)) is not None:
                patch[name] = sub
        return patch or None
    if key in _NAMED_LISTS and isinstance(old, list) and isinstance(new, list):
        current = {e.get("name"): e for e in new if isinstance(e, dict)}
        items: list[Obj] = []
        for entry in old:
            if not isinstance(entry, dict) or "name" not in entry:
                continue
            if entry["name"] not in current:
                items.append({"name": entry["name"], "$patch": "delete"})
            elif (sub := removal_patch(entry, current[entry["name"]])) is not None:
                items.append({"name": entry["name"], **sub})
        return items or None
    return None


async def _apply(
    kube: KubeClient, objects: list[Obj], previous: list[Obj], progress: Progress
) -> list[ObjectRef]:
    before = {ObjectRef.of(o): o for o in previous}
    applied: list[ObjectRef] = []
    for obj in objects:
        ref = ObjectRef.of(obj)
        resource, namespace = _resource(ref), ref.namespace or None
        try:
            await kube.patch(
                resource,
                ref.name,
                obj,
                namespace,
                patch_type="apply",
                field_manager=FIELD_MANAGER,
                force=True,
            )
            removals = removal_patch(before[ref], obj) if ref in before else None
            if removals is not None:
                log.debug("removing fields of %s: %s", ref.describe(), removals)
                await kube.patch(
                    resource,
                    ref.name,
                    removals,
                    namespace,
                    patch_type="strategic",
                    field_manager=FIELD_MANAGER,
                )
        except ApiError as exc:
            raise ApiError(
                exc.code, exc.reason, f"cannot apply {ref.describe()}: {exc.message}", exc.status
            ) from None
        applied.append(ref)
        progress.advance(f"applied {ref.describe()}")
    return applied


async def _delete(
    kube: KubeClient, refs: Iterable[ObjectRef], progress: Progress, *, wait: float | None
) -> list[ObjectRef]:
    """Delete in reverse install order; with `wait`, until each is gone (watched, not polled)."""
    ordered = sorted(refs, key=lambda r: kind_rank(r.kind), reverse=True)
    for ref in ordered:
        await kube.delete(_resource(ref), ref.name, ref.namespace or None)
        progress.advance(f"deleted {ref.describe()}")
    if wait is not None:
        for ref in ordered:
            await _wait_gone(kube, ref, wait)
    return ordered


async def _wait_gone(kube: KubeClient, ref: ObjectRef, timeout: float) -> None:
    resource = _resource(ref)
    namespace = ref.namespace or None
    with trio.move_on_after(timeout) as scope:
        while True:
            live = await kube.get_or_none(resource, ref.name, namespace)
            if live is None:
                return
            version = str(live["metadata"].get("resourceVersion") or "")
            watch = kube.watch(
                resource,
                namespace,
                resource_version=version,
                field_selector=f"metadata.name={ref.name}",
                timeout_seconds=max(1, int(timeout)),
            )
            async with aclosing(watch) as events:
                async for event in events:
                    if event.type == "DELETED":
                        return
    if scope.cancelled_caught:
        raise ReleaseError(
            f"{ref.describe()} was not deleted within {timeout:g}s; "
            "check its finalizers with kubectl."
        )


async def install(
    kube: KubeClient,
    chart: Chart,
    values: Obj,
    *,
    release: str,
    namespace: str,
    create_namespace: bool = True,
    progress: Progress | None = None,
) -> Outcome:
    progress = progress or QuietProgress()
    merged = await chart.merged(values)
    previous = await records.read(kube, release, namespace)
    if previous is not None and previous.status != "pending-install":
        raise ReleaseError(
            f"Release {release} is already installed in namespace {namespace} "
            f"(revision {previous.revision}); use `tele helm upgrade` to change it."
        )
    scope_text = await _check_scope(kube, release, namespace, merged, creating=create_namespace)
    objects = await chart.render(values, release=release, namespace=namespace)
    await _ensure_namespace(kube, namespace, create_namespace)
    refs = [ObjectRef.of(o) for o in objects]
    rendered = set(refs)
    leftovers = [r for r in (previous.objects if previous else []) if r not in rendered]
    record = ReleaseRecord(
        name=release,
        namespace=namespace,
        revision=1,
        status="pending-install",
        chart_version=chart.version,
        app_version=chart.app_version,
        values=values,
        scope=records.scope_of(merged),
        objects=refs + leftovers,
        manifests=previous.manifests if previous else [],
    )
    await records.write(kube, record)
    progress.begin("Installing", len(objects) + len(leftovers))
    applied = await _apply(kube, objects, previous.manifests if previous else [], progress)
    pruned = await _delete(kube, leftovers, progress, wait=None)
    record.status = "deployed"
    record.objects = refs
    record.manifests = objects
    await records.write(kube, record)
    return Outcome(record, applied, pruned, scope_text)


async def upgrade(
    kube: KubeClient,
    chart: Chart,
    values: Obj,
    *,
    release: str,
    namespace: str,
    reuse_values: bool = False,
    reset_values: bool = False,
    values_given: bool = True,
    progress: Progress | None = None,
) -> Outcome:
    """Apply the chart with new values, then delete what the old revision had and this lacks.

    Values as Helm decides them: --reset-values starts from the chart's defaults, --reuse-values
    merges the new ones over the last revision's, and with neither the last revision's are kept
    when no new ones are given."""
    progress = progress or QuietProgress()
    previous = await records.read(kube, release, namespace)
    if previous is None:
        raise ReleaseError(
            f"Release {release} is not installed in namespace {namespace}; "
            "use `tele helm install` first."
        )
    if reuse_values and not reset_values:
        values = deep_merge(previous.values, values)
    elif not reset_values and not values_given:
        values = dict(previous.values)
    merged = await chart.merged(values)
    scope_text = await _check_scope(kube, release, namespace, merged)
    revision = previous.revision + 1
    objects = await chart.render(
        values, release=release, namespace=namespace, revision=revision, upgrade=True
    )
    refs = [ObjectRef.of(o) for o in objects]
    rendered = set(refs)
    stale = [r for r in previous.objects if r not in rendered]
    record = ReleaseRecord(
        name=release,
        namespace=namespace,
        revision=revision,
        status="pending-upgrade",
        chart_version=chart.version,
        app_version=chart.app_version,
        values=values,
        scope=records.scope_of(merged),
        objects=refs + stale,
        manifests=previous.manifests,
    )
    await records.write(kube, record)
    progress.begin("Upgrading", len(objects) + len(stale))
    applied = await _apply(kube, objects, previous.manifests, progress)
    pruned = await _delete(kube, stale, progress, wait=None)
    record.status = "deployed"
    record.objects = refs
    record.manifests = objects
    await records.write(kube, record)
    return Outcome(record, applied, pruned, scope_text)


def _made_by_the_manager(record: ReleaseRecord) -> list[ObjectRef]:
    """What the running manager creates for itself and so belongs to the release too: the
    agent injector's TLS Secret, named in the last applied Deployment's environment, and the
    ConfigMap where it keeps the workloads that get an agent."""
    made: list[ObjectRef] = []
    for manifest in record.manifests:
        if manifest.get("kind") != "Deployment":
            continue
        made.append(ObjectRef("v1", "ConfigMap", STATE_CONFIGMAP, record.namespace))
        pod = (manifest.get("spec") or {}).get("template") or {}
        for container in (pod.get("spec") or {}).get("containers") or []:
            for env in container.get("env") or []:
                if env.get("name") == "TELE_WEBHOOK_SECRET" and env.get("value"):
                    made.append(ObjectRef("v1", "Secret", str(env["value"]), record.namespace))
    return made


async def uninstall(
    kube: KubeClient,
    *,
    release: str,
    namespace: str,
    wait: float = 120.0,
    progress: Progress | None = None,
) -> Outcome:
    """Delete every object the release record lists, wait until they are gone, then the record."""
    progress = progress or QuietProgress()
    record = await records.read(kube, release, namespace)
    if record is None:
        raise ReleaseError(f"Release {release} is not installed in namespace {namespace}.")
    record.status = "uninstalling"
    await records.write(kube, record)
    owned = record.objects + [r for r in _made_by_the_manager(record) if r not in record.objects]
    progress.begin("Uninstalling", len(owned))
    deleted = await _delete(kube, owned, progress, wait=wait)
    await records.delete(kube, record)
    return Outcome(record, [], deleted, "")


# --- the traffic agents the manager's webhook injected ---------------------------------------

_RESTARTABLE = {
    "Deployment": k8s.DEPLOYMENTS,
    "StatefulSet": k8s.STATEFULSETS,
    "Rollout": k8s.ROLLOUTS,
}


@dataclass(frozen=True, order=True)
class AgentWorkload:
    """A workload whose pods carry the traffic agent."""

    kind: str
    namespace: str
    name: str
    by_template: bool = False
    """Its pod template asks for the agent (inject-traffic-agent: enabled): left as it is."""
    by_hand: bool = False
    """Its pod template carries the agent itself (manually-injected, `tele genyaml`): no
    restart can take it out, so it is left as it is."""

    def describe(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def _controller(obj: Obj) -> tuple[str, str] | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("kind")), str(ref.get("name"))
    return None


def _carries_agent(pod: Obj) -> bool:
    containers = (pod.get("spec") or {}).get("containers") or []
    return any(c.get("name") == agentconfig.AGENT_CONTAINER for c in containers)


async def agent_workloads(kube: KubeClient) -> list[AgentWorkload]:
    """The workloads with pods that carry the traffic agent, in every namespace (a pod
    without a controller counts as its own workload, kind Pod)."""
    pods, _ = await kube.list(k8s.PODS)
    found: set[AgentWorkload] = set()
    for pod in pods:
        if not _carries_agent(pod) or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        namespace = str(pod["metadata"].get("namespace") or "")
        owner = _controller(pod)
        if owner is None:
            name = str(pod["metadata"]["name"])
            by_hand = agentconfig.manually_injected(pod)
            found.add(AgentWorkload("Pod", namespace, name, by_hand=by_hand))
            continue
        kind, name = owner
        workload = None
        if kind == "ReplicaSet":
            replicaset = await kube.get_or_none(k8s.REPLICASETS, name, namespace)
            parent = _controller(replicaset) if replicaset is not None else None
            if parent is not None and parent[0] in _RESTARTABLE:
                kind, name = parent
            else:
                workload = replicaset
        if kind in _RESTARTABLE:
            workload = await kube.get_or_none(_RESTARTABLE[kind], name, namespace)
        template = ((workload or {}).get("spec") or {}).get("template") or {}
        by_template = agentconfig.injection_policy(template) == "enabled"
        by_hand = agentconfig.manually_injected(template) or agentconfig.manually_injected(pod)
        found.add(AgentWorkload(kind, namespace, name, by_template, by_hand))
    return sorted(found)


async def remove_agents(
    kube: KubeClient,
    workloads: Iterable[AgentWorkload],
    *,
    wait: float,
    progress: Progress | None = None,
) -> list[AgentWorkload]:
    """Make the pods of `workloads` anew without the agent (once the webhook is gone): a
    Deployment, StatefulSet or Rollout is restarted as `kubectl rollout restart` does, the pods
    of a ReplicaSet or a bare Pod are deleted (a bare Pod is not made again). Waits until no
    pod of theirs carries the agent. Returns the workloads done (not those whose template asks
    for the agent, or carries it by hand)."""
    progress = progress or QuietProgress()
    chosen = [w for w in workloads if not w.by_template and not w.by_hand]
    progress.begin("Removing traffic agents", len(chosen))
    stamp = datetime.now(UTC).isoformat()
    for workload in chosen:
        if workload.kind in _RESTARTABLE:
            patch = {
                "spec": {
                    "template": {
                        "metadata": {
                            "annotations": {agentconfig.ANNOTATION_PREFIX + "restartedAt": stamp}
                        }
                    }
                }
            }
            await kube.patch(_RESTARTABLE[workload.kind], workload.name, patch, workload.namespace)
        else:
            for pod in await _agent_pods(kube, workload.namespace):
                if _controller(pod) == (workload.kind, workload.name) or (
                    workload.kind == "Pod" and pod["metadata"]["name"] == workload.name
                ):
                    await kube.delete(k8s.PODS, pod["metadata"]["name"], workload.namespace)
        progress.advance(f"restarted {workload.describe()}")
    with trio.move_on_after(wait) as scope:
        for namespace in sorted({w.namespace for w in chosen}):
            await _wait_no_agent_pods(kube, namespace, {w.name for w in chosen})
    if scope.cancelled_caught:
        raise ReleaseError(
            f"Pods with a traffic agent were still there after {wait:g}s; "
            "see `kubectl get pods -A` (their workloads were restarted)."
        )
    return chosen


async def _agent_pods(kube: KubeClient, namespace: str) -> list[Obj]:
    pods, _ = await kube.list(k8s.PODS, namespace)
    return [pod for pod in pods if _carries_agent(pod)]


async def _wait_no_agent_pods(kube: KubeClient, namespace: str, names: set[str]) -> None:
    """Until no pod of the workloads `names` in `namespace` carries the agent (watched, not
    polled). A pod's workload is its controller, or the Deployment or Rollout of its
    ReplicaSet (named `<workload>-<hash>`)."""

    def ours(pod: Obj) -> bool:
        owner = _controller(pod)
        owners = {str(pod["metadata"]["name"])}
        if owner is not None:
            owners |= {owner[1], owner[1].rsplit("-", 1)[0]}
        return _carries_agent(pod) and bool(owners & names)

    while True:
        pods, version = await kube.list(k8s.PODS, namespace)
        if not any(ours(pod) for pod in pods):
            return
        watch = kube.watch(k8s.PODS, namespace, resource_version=version, timeout_seconds=30)
        async with aclosing(watch) as events:
            async for _ in events:
                break
