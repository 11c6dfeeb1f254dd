"""Making a workload's pods as engagements want them: evict the pods that are not (the webhook
makes their replacements right), roll the workload out when a disruption budget refuses, wait
for agents of the wanted configuration, and roll back after replaces."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import trio

from tele.contracts import agentconfig
from tele.k8s import client as k8s
from tele.k8s.client import ApiError, KubeClient
from tele.manager.changes import Changes
from tele.manager.state import AgentWorkloads
from tele.manager.table import WorkloadKey
from tele.manager.view import ClusterView
from tele.rpc import agent_api as aapi
from tele.rpc.errors import Code, RpcError

log = logging.getLogger(__name__)

RESTORE_TIMEOUT = 30.0
REMOVAL_TIMEOUT = 20.0
"""How long `tele uninstall` waits for the pods that run an agent to be on their way out."""
MAX_PENDING_RESTORES = 1024
ORPHAN_GRACE = 60.0
"""Seconds a new manager gives replacing clients to engage again before it rolls back the
pods they had replaced (their daemons do so as soon as they arrive anew)."""


class Rollouts:
    """Rolls workloads' pods to what the engagements want (`replaced_containers`)."""

    def __init__(
        self,
        *,
        view: ClusterView,
        view_changed: Callable[[], trio.Event],
        kube: KubeClient,
        agent_workloads: AgentWorkloads,
        agents_of: Callable[[WorkloadKey], list[aapi.AgentIdentity]],
        replaced_containers: Callable[[WorkloadKey], frozenset[str]],
        changes: Changes,
    ) -> None:
        self._view = view
        self._view_changed = view_changed
        self._kube = kube
        self._agent_workloads = agent_workloads
        self._agents_of = agents_of
        self._replaced_containers = replaced_containers
        self._changes = changes
        self._restarted: dict[WorkloadKey, int] = {}
        """Workload key -> the generation our last restart patch made (its controller rolls)."""
        self._restores_send, self._restores_receive = trio.open_memory_channel[WorkloadKey](
            MAX_PENDING_RESTORES
        )

    async def rollout_exists(self, namespace: str, name: str) -> bool | None:
        """Whether an Argo Rollout of that name is there (asked of the API: Rollouts may not
        be watched); None when the manager may not look (its role has no Rollouts unless they
        are enabled), False when there is none or the API does not know Rollouts."""
        try:
            return await self._kube.get_or_none(k8s.ROLLOUTS, name, namespace) is not None
        except ApiError as exc:
            return None if exc.code == 403 else False

    async def ensure_agent(
        self, key: WorkloadKey, workload: dict[str, Any], timeout: float
    ) -> list[aapi.AgentIdentity]:
        """Roll the pods that are not as wanted (no agent, or another set of replaced
        containers) and wait until none is left and an agent of the wanted kind is up."""
        had_agent = key in self._agent_workloads
        self._agent_workloads.add(key)  # new pods of the workload keep getting one
        with trio.move_on_after(timeout):
            while True:
                # Taken before looking, so a change while we look (or evict) is not missed.
                changes = (self._changes.event, self._view_changed())
                replaced = self._replaced_containers(key)
                if await self.roll(key, workload, want_agent=True, replaced=replaced) == 0:
                    ready = [a for a in self._agents_of(key) if set(a.replaced) == replaced]
                    if ready:
                        return ready
                await _first_of(*changes)
        why = self._why_no_agent(key)
        if not had_agent and not self._agents_of(key):
            # Nothing half set up: its pods are not made with an agent from now on (they are
            # not rolled back: none of them runs one).
            self._agent_workloads.discard(key)
        raise RpcError(
            Code.DEADLINE_EXCEEDED,
            f"No traffic agent of {key[0]} {key[1]}/{key[2]} arrived within {timeout:g}s"
            + (f": {why.rstrip('.')}" if why else "")
            + "; if its pods are only slow to start, raise timeouts.intercept in config.yml "
            "(the Helm value timeouts.agentArrival bounds it too).",
        )

    def _why_no_agent(self, key: WorkloadKey) -> str:
        """What keeps the workload's pods from running an agent, from their status (the
        first such pod), e.g. `pod echo-1 is Pending (ImagePullBackOff: ...)`."""
        running = False
        for (ns, name), pod in sorted(self._view.pods.items()):
            if ns != key[1] or not live_pod(pod):
                continue
            if _owner_name(self._view.workload_of(pod, ns)) != key[2]:
                continue
            status = pod.get("status") or {}
            phase = str(status.get("phase") or "Pending")
            for container in status.get("containerStatuses") or []:
                waiting = (container.get("state") or {}).get("waiting") or {}
                if waiting.get("reason"):
                    detail = str(waiting.get("message") or "").splitlines()
                    more = f": {detail[0][:200]}" if detail else ""
                    return (
                        f"pod {name} is {phase}, its container {container.get('name')} "
                        f"waiting ({waiting['reason']}{more})"
                    )
            if phase != "Running":
                return f"pod {name} is {phase}"
            running = True
        return "" if running else "it has no running pod"

    async def roll(
        self,
        key: WorkloadKey,
        workload: dict[str, Any],
        *,
        want_agent: bool,
        replaced: frozenset[str] = frozenset(),
    ) -> int:
        """Evict the workload's live pods that are not as wanted (agent or not; which
        containers replaced), so that the webhook makes their replacements right; a disruption
        budget that refuses gets a rollout instead. Returns how many pods were not as wanted."""
        pods = [
            pod
            for (ns, _), pod in list(self._view.pods.items())
            if ns == key[1]
            and _owner_name(self._view.workload_of(pod, ns)) == key[2]
            and live_pod(pod)
        ]
        wrong = [pod for pod in pods if not _as_wanted(pod, want_agent, replaced)]
        for pod in wrong:
            try:
                await self._kube.evict(pod["metadata"]["name"], key[1])
            except ApiError as exc:
                if exc.code == 404:
                    continue
                if exc.code != 429:
                    raise
                log.info("eviction refused (%s); rolling the workload out instead", exc.message)
                await self._restart_workload(key, workload)
                break
        return len(wrong)

    async def remove_and_wait(
        self, workloads: dict[WorkloadKey, dict[str, Any]], timeout: float = REMOVAL_TIMEOUT
    ) -> None:
        """Evict the pods of `workloads` that run an agent and wait (bounded) until none of
        them is live: when `tele uninstall` returns, `tele list --agents` no longer names the
        workloads. Their new pods come without one (the caller took the workloads out of
        `agent_workloads` first). A roll slower than `timeout` (a disruption budget that makes
        it a rollout) goes on and is only logged."""
        left = dict(workloads)
        with trio.move_on_after(timeout):
            while left:
                # Taken before looking, so a change while we look (or evict) is not missed.
                changes = (self._changes.event, self._view_changed())
                for key, workload in list(left.items()):
                    if await self.roll(key, workload, want_agent=False) == 0:
                        del left[key]
                if left:
                    await _first_of(*changes)
        for key in sorted(left):
            log.warning("%s %s/%s: pods with an agent still run after %gs", *key, timeout)

    async def restore(self, key: WorkloadKey) -> None:
        """After a replace: roll the pods back to what the remaining engagements want."""
        workload = self._view.workloads.get(key)
        if workload is None:
            return
        try:
            await self.roll(
                key, dict(workload), want_agent=True, replaced=self._replaced_containers(key)
            )
        except ApiError as exc:
            log.warning("cannot roll %s %s/%s back after a replace: %s", *key, exc.message)

    def queue_restore(self, key: WorkloadKey) -> None:
        """`restore` soon, from synchronous code (the reaper, a departure): `serve_restores`."""
        try:
            self._restores_send.send_nowait(key)
        except trio.WouldBlock:
            log.warning("too many roll-backs queued; %s %s/%s keeps its pods", *key)

    async def restore_and_wait(self, key: WorkloadKey) -> None:
        """Roll the pods back after a replace and wait (bounded) until an agent of a pod with
        the container running again arrived: when `tele leave` returns, the cluster's app
        answers again. The engagement is over either way; a slow roll is only logged."""
        workload = self._view.workloads.get(key)
        if workload is None:
            return
        try:
            await self.ensure_agent(key, dict(workload), RESTORE_TIMEOUT)
        except ApiError as exc:
            log.warning("cannot roll %s %s/%s back after a replace: %s", *key, exc.message)
        except RpcError:
            log.warning("%s %s/%s: the container is not back within %gs", *key, RESTORE_TIMEOUT)

    async def serve_restores(self, *, orphan_grace: float = ORPHAN_GRACE) -> NoReturn:
        """Roll workloads back after replaces that ended with their session (queued by
        `queue_restore`); once, `orphan_grace` seconds after the start, also those a previous
        manager left replaced (see `restore_orphans`)."""
        async with trio.open_nursery() as nursery:

            async def orphans() -> None:
                await trio.sleep(orphan_grace)
                await self.restore_orphans()

            nursery.start_soon(orphans)
            async for key in self._restores_receive:
                await self.restore(key)
        raise AssertionError("unreachable")  # pragma: no cover

    async def restore_orphans(self) -> list[WorkloadKey]:
        """Roll back the workloads whose pods were made for a replace that nobody holds now:
        a new manager pod starts without engagements, and a replacing client that does not
        come back (its daemon engages again after arriving anew) must not leave the container
        out for good. Returns the workloads rolled back."""
        orphaned = set()
        for (namespace, _), pod in list(self._view.pods.items()):
            config = agentconfig.pod_config(pod)
            if not live_pod(pod) or config is None or not config.replaced():
                continue
            workload = self._view.workload_of(pod, namespace)
            if workload is None:
                continue
            key = (str(workload.get("kind")), namespace, str(workload["metadata"]["name"]))
            if not set(config.replaced()) <= self._replaced_containers(key):
                orphaned.add(key)
        for key in sorted(orphaned):
            log.info("rolling %s %s/%s back: no client replaces its container now", *key)
            await self.restore(key)
        return sorted(orphaned)

    async def _restart_workload(self, key: WorkloadKey, workload: dict[str, Any]) -> None:
        # Once per spec: while the controller rolls out our last restart, the old pods are
        # still there and their evictions still refused; restarting again would only make
        # a new ReplicaSet per view change.
        live = self._view.workloads.get(key) or workload
        generation = int((live.get("metadata") or {}).get("generation") or 0)
        if generation and generation <= self._restarted.get(key, 0):
            return
        resource = {
            "Deployment": k8s.DEPLOYMENTS,
            "StatefulSet": k8s.STATEFULSETS,
            "ReplicaSet": k8s.REPLICASETS,
            "Rollout": k8s.ROLLOUTS,
        }[key[0]]
        stamp = datetime.now(UTC).isoformat()
        patch = {
            "spec": {
                "template": {
                    "metadata": {
                        "annotations": {agentconfig.ANNOTATION_PREFIX + "restartedAt": stamp}
                    }
                }
            }
        }
        patched = await self._kube.patch(resource, key[2], patch, key[1])
        self._restarted[key] = int(patched["metadata"].get("generation") or 0)


def _owner_name(workload: Any) -> str | None:
    return None if workload is None else str(workload["metadata"]["name"])


async def _first_of(*events: trio.Event) -> None:
    """Until any of `events` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def live_pod(pod: Any) -> bool:
    """A pod that is (or will be) running: not deleted, not finished."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def _as_wanted(pod: Any, want_agent: bool, replaced: frozenset[str]) -> bool:
    if agentconfig.manually_injected(pod):
        return True  # its agent is its owner's (tele genyaml): never rolled for it
    has_agent = any(c.get("name") == agentconfig.AGENT_CONTAINER for c in pod["spec"]["containers"])
    if has_agent != want_agent:
        return False
    if not has_agent:
        return True
    config = agentconfig.pod_config(pod)
    return frozenset(config.replaced() if config else ()) == replaced
