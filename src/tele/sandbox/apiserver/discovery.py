"""Discovery documents: /version, /api, /apis, per group-version resource lists, aggregated lists.

Aggregated discovery (apidiscovery.k8s.io v2 and v2beta1) answers everything in two requests,
which is what kubectl 1.27+ asks for first; the legacy documents serve older clients. Every
document is computed from the kinds served at the time (built-in ones and those of CRDs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .kinds import RESOURCES, SUBRESOURCE_KINDS, SUBRESOURCE_VERBS, ResourceType, group_versions

ApiObject = dict[str, Any]

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


def _resource_entries(resource_type: ResourceType) -> list[ApiObject]:
    main: ApiObject = {
        "name": resource_type.plural,
        "singularName": resource_type.singular,
        "namespaced": resource_type.namespaced,
        "kind": resource_type.kind,
        "verbs": list(resource_type.verbs),
    }
    if resource_type.short_names:
        main["shortNames"] = list(resource_type.short_names)
    if resource_type.categories:
        main["categories"] = list(resource_type.categories)
    out = [main]
    for sub in resource_type.subresources:
        entry: ApiObject = {
            "name": f"{resource_type.plural}/{sub}",
            "singularName": "",
            "namespaced": resource_type.namespaced,
            "kind": resource_type.kind,
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
) -> ApiObject | None:
    rts = [
        resource_type
        for resource_type in resources
        if resource_type.group == group and resource_type.version == version
    ]
    if not rts:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [e for resource_type in rts for e in _resource_entries(resource_type)],
    }


def core_versions(server_address: str) -> ApiObject:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _group(group: str, resources: Sequence[ResourceType]) -> ApiObject:
    versions = [v for g, v in group_versions(resources) if g == group]
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def group_list(resources: Sequence[ResourceType] = RESOURCES) -> ApiObject:
    groups: list[ApiObject] = []
    for group, _ in group_versions(resources):
        if group and all(g["name"] != group for g in groups):
            groups.append(_group(group, resources))
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(group: str, resources: Sequence[ResourceType] = RESOURCES) -> ApiObject | None:
    if not any(g == group for g, _ in group_versions(resources)) or not group:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, resources)}


def aggregated(core: bool, version: str, served: Sequence[ResourceType] = RESOURCES) -> ApiObject:
    """APIGroupDiscoveryList for /api (core) or /apis, in apidiscovery `version` v2 or v2beta1."""
    items: list[ApiObject] = []
    for group, gv_version in group_versions(served):
        if bool(group) == core:
            continue
        resources = []
        for resource_type in served:
            if resource_type.group != group or resource_type.version != gv_version:
                continue
            entry: ApiObject = {
                "resource": resource_type.plural,
                "responseKind": {
                    "group": resource_type.group,
                    "version": resource_type.version,
                    "kind": resource_type.kind,
                },
                "scope": "Namespaced" if resource_type.namespaced else "Cluster",
                "singularResource": resource_type.singular,
                "verbs": list(resource_type.verbs),
            }
            if resource_type.short_names:
                entry["shortNames"] = list(resource_type.short_names)
            if resource_type.categories:
                entry["categories"] = list(resource_type.categories)
            subs = []
            for sub in resource_type.subresources:
                g, v, k = SUBRESOURCE_KINDS.get(
                    sub, (resource_type.group, resource_type.version, resource_type.kind)
                )
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
