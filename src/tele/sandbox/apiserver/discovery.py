"""Discovery documents: /version, /api, /apis, per group-version resource lists, aggregated lists.

Aggregated discovery (apidiscovery.k8s.io v2 and v2beta1) answers everything in two requests,
which is what kubectl 1.27+ asks for first; the legacy documents serve older clients. Every
document is computed from the kinds served at the time (built-in ones and those of CRDs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .kinds import RESOURCES, SUBRESOURCE_KINDS, SUBRESOURCE_VERBS, ResourceType, group_versions

Obj = dict[str, Any]

KUBE_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-tele-sandbox",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.24.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _resource_entries(rt: ResourceType) -> list[Obj]:
    main: Obj = {
        "name": rt.plural,
        "singularName": rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": list(rt.verbs),
    }
    if rt.short_names:
        main["shortNames"] = list(rt.short_names)
    if rt.categories:
        main["categories"] = list(rt.categories)
    out = [main]
    for sub in rt.subresources:
        entry: Obj = {
            "name": f"{rt.plural}/{sub}",
            "singularName": "",
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(SUBRESOURCE_VERBS.get(sub, ("get",))),
        }
        if sub in SUBRESOURCE_KINDS:
            group, version, kind = SUBRESOURCE_KINDS[sub]
            entry["kind"] = kind
            if group:
                entry["group"], entry["version"] = group, version
        out.append(entry)
    return out


def resource_list(
    group: str, version: str, resources: Sequence[ResourceType] = RESOURCES
) -> Obj | None:
    rts = [rt for rt in resources if rt.group == group and rt.version == version]
    if not rts:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [e for rt in rts for e in _resource_entries(rt)],
    }


def core_versions(server_address: str) -> Obj:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _group(group: str, resources: Sequence[ResourceType]) -> Obj:
    versions = [v for g, v in group_versions(resources) if g == group]
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def group_list(resources: Sequence[ResourceType] = RESOURCES) -> Obj:
    groups: list[Obj] = []
    for group, _ in group_versions(resources):
        if group and all(g["name"] != group for g in groups):
            groups.append(_group(group, resources))
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(group: str, resources: Sequence[ResourceType] = RESOURCES) -> Obj | None:
    if not any(g == group for g, _ in group_versions(resources)) or not group:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, resources)}


def aggregated(core: bool, version: str, served: Sequence[ResourceType] = RESOURCES) -> Obj:
    """APIGroupDiscoveryList for /api (core) or /apis, in apidiscovery `version` v2 or v2beta1."""
    items: list[Obj] = []
    for group, gv_version in group_versions(served):
        if bool(group) == core:
            continue
        resources = []
        for rt in served:
            if rt.group != group or rt.version != gv_version:
                continue
            entry: Obj = {
                "resource": rt.plural,
                "responseKind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
                "scope": "Namespaced" if rt.namespaced else "Cluster",
                "singularResource": rt.singular,
                "verbs": list(rt.verbs),
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            subs = []
            for sub in rt.subresources:
                g, v, k = SUBRESOURCE_KINDS.get(sub, (rt.group, rt.version, rt.kind))
                subs.append(
                    {
                        "subresource": sub,
                        "responseKind": {"group": g, "version": v, "kind": k},
                        "verbs": list(SUBRESOURCE_VERBS.get(sub, ("get",))),
                    }
                )
            if subs:
                entry["subresources"] = subs
            resources.append(entry)
        existing = next((i for i in items if i["metadata"]["name"] == group), None)
        version_entry = {"version": gv_version, "resources": resources, "freshness": "Current"}
        if existing is None:
            items.append(
                {
                    "metadata": {"name": group, "creationTimestamp": None},
                    "versions": [version_entry],
                }
            )
        else:
            existing["versions"].append(version_entry)
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": f"apidiscovery.k8s.io/{version}",
        "metadata": {},
        "items": items,
    }
