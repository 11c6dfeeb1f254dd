"""What an engagement hands its client only if the client's user may read it (issue 15 item 2):
environment values from Secrets and ConfigMaps need `get` on them, exported volumes need `get`
on the Secrets and ConfigMaps they are made of, and a service account token volume needs
`create serviceaccounts/token` for that service account (it is that account's credential).
Engaging needs only `create pods/portforward`; without these the engagement goes on with the
values and volumes left out and one sentence saying so (`EngagementInfo.withheld`).

Sans-IO but for `allowed`, the caller's SubjectAccessReview (manager.auth, cached).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from tele.contracts.agentconfig import REMOTE_POLICIES

Source = tuple[str, str, str, str]
"""(verb, resource, subresource, name) the user needs in the namespace."""
Allowed = Callable[[Source], Awaitable[bool]]


@dataclass
class Withheld:
    env: set[str] = field(default_factory=set)
    """Names of the container's variables left out."""
    volumes: str = ""
    """Why no volume is exported ("" when they are): the engagement's mount_error."""
    notes: list[str] = field(default_factory=list)
    """About the environment: the engagement's `withheld`."""


def _describe(source: Source) -> str:
    verb, resource, subresource, name = source
    what = f"{resource}/{subresource}" if subresource else resource
    return f"{verb} {what} {name}"


def env_sources(container: Mapping[str, Any]) -> dict[str, Source]:
    """Variable name -> what reading its value needs (only those from Secrets/ConfigMaps)."""
    found: dict[str, Source] = {}
    for variable in container.get("env") or []:
        ref = (variable.get("valueFrom") or {}) if isinstance(variable, dict) else {}
        for key, resource in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            name = (ref.get(key) or {}).get("name")
            if isinstance(name, str) and name:
                found[str(variable.get("name"))] = ("get", resource, "", name)
    return found


def volume_sources(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], policies: Mapping[str, str]
) -> list[Source]:
    """What reading the container's exported (Remote*) volumes needs."""
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or [] if isinstance(v, dict)}
    account = str(pod_spec.get("serviceAccountName") or "default")
    needed: list[Source] = []
    for mount in container.get("volumeMounts") or []:
        if policies.get(str(mount.get("mountPath"))) not in REMOTE_POLICIES:
            continue
        volume = volumes.get(mount.get("name")) or {}
        secret = (volume.get("secret") or {}).get("secretName")
        config_map = (volume.get("configMap") or {}).get("name")
        for name, resource in ((secret, "secrets"), (config_map, "configmaps")):
            if isinstance(name, str) and name:
                needed.append(("get", resource, "", name))
        for part in (volume.get("projected") or {}).get("sources") or []:
            for key, resource in (("secret", "secrets"), ("configMap", "configmaps")):
                name = (part.get(key) or {}).get("name")
                if isinstance(name, str) and name:
                    needed.append(("get", resource, "", name))
            if part.get("serviceAccountToken") is not None:
                needed.append(("create", "serviceaccounts", "token", account))
    return needed


def likely_sources(template_spec: Mapping[str, Any]) -> set[Source]:
    """What any container of a pod template may need to hand over (every Secret/ConfigMap
    reference, and the token volume admission adds unless automounting is off): asked ahead,
    while the engagement's other steps run, so that `judge` finds the answers cached."""
    needed: set[Source] = set()
    every = {str(m.get("mountPath")): "Remote" for c in template_spec.get("containers") or []
             for m in c.get("volumeMounts") or []}  # fmt: skip
    for container in template_spec.get("containers") or []:
        needed |= set(env_sources(container).values())
        needed |= set(volume_sources(template_spec, container, every))
    if template_spec.get("automountServiceAccountToken") is not False:
        account = str(template_spec.get("serviceAccountName") or "default")
        needed.add(("create", "serviceaccounts", "token", account))
        needed.add(("get", "configmaps", "", "kube-root-ca.crt"))
    return needed


async def judge(
    pod_spec: Mapping[str, Any],
    container_name: str,
    policies: Mapping[str, str],
    allowed: Allowed,
    user: str,
    namespace: str,
) -> Withheld:
    """What of container `container_name` of a pod (spec) `user` may not have."""
    container: Mapping[str, Any] = next(
        (c for c in pod_spec.get("containers") or [] if c.get("name") == container_name), {}
    )
    verdicts: dict[Source, bool] = {}
    needed = {*env_sources(container).values(), *volume_sources(pod_spec, container, policies)}

    failures: list[Exception] = []

    async def ask(source: Source) -> None:
        try:
            verdicts[source] = await allowed(source)
        except Exception as exc:  # e.g. the API server is unavailable: the caller's error
            failures.append(exc)

    async with trio.open_nursery() as nursery:  # the reviews at once, not one after another
        for source in sorted(needed):
            nursery.start_soon(ask, source)
    if failures:
        raise failures[0]

    async def may(source: Source) -> bool:
        return verdicts[source]

    withheld = Withheld()
    denied_env: list[Source] = []
    for variable, source in sorted(env_sources(container).items()):
        if not await may(source):
            withheld.env.add(variable)
            if source not in denied_env:
                denied_env.append(source)
    if withheld.env:
        withheld.notes.append(
            f"{', '.join(sorted(withheld.env))} left out of the environment: {user} may not "
            f"{'; '.join(_describe(s) for s in denied_env)} in namespace {namespace}"
        )
    for source in volume_sources(pod_spec, container, policies):
        if not await may(source):
            withheld.volumes = (
                f"{user} may not {_describe(source)} in namespace {namespace}, which a volume "
                "of the container is made of"
            )
            break
    return withheld
