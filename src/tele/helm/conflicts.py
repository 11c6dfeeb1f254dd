"""Namespace conflicts between traffic managers, all-encompassing as seed 004 says.

A cluster-wide manager conflicts with every other; two static ones conflict when their names
intersect; a dynamic selector conflicts on any existing namespace that both select. The overlap
itself is tele.contracts.namespaces.overlap(), the same rule the manager uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tele.contracts.namespaces import NamespaceSelector, SelectorError, overlap
from tele.helm.errors import NamespaceConflict
from tele.helm.release import ReleaseRecord


def selector_of(scope: Mapping[str, object]) -> NamespaceSelector:
    return NamespaceSelector.from_values(scope)


def check_conflicts(
    release: str,
    namespace: str,
    scope: Mapping[str, object],
    others: Iterable[ReleaseRecord],
    existing: Mapping[str, Mapping[str, str]],
) -> None:
    """Raise NamespaceConflict naming the first other release this one would collide with."""
    mine = selector_of(scope)
    for other in sorted(others, key=lambda r: (r.namespace, r.name)):
        if (other.namespace, other.name) == (namespace, release):
            continue
        if other.namespace == namespace:
            raise NamespaceConflict(
                f"Release {other.name} already installs a traffic manager in namespace "
                f"{namespace}; upgrade or uninstall it, or choose another --namespace."
            )
        try:
            theirs = selector_of(other.scope)
        except SelectorError:
            continue  # a damaged record cannot be compared; it never blocks an install
        shared = overlap(mine, theirs, existing)
        if shared is None:
            continue
        if theirs.everything:
            what = "all namespaces"
        elif mine.everything or shared == {"*"}:
            what = theirs.describe()
        else:
            what = "namespace" + ("s " if len(shared) > 1 else " ") + ", ".join(sorted(shared))
        raise NamespaceConflict(
            f"Release {other.name} in namespace {other.namespace} already manages {what}; "
            "two traffic managers cannot share a namespace."
        )
