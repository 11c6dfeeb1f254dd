"""Which namespaces a traffic manager manages: Helm's `namespaces` / `namespaceSelector`.

Seed 004: the two values are mutually exclusive; a selector that only names namespaces
(`kubernetes.io/metadata.name In [...]`, or the `namespaces` short form) is static, anything else
is dynamic and follows label changes live; no declaration means cluster-wide. Conflict detection
between managers is all-encompassing: cluster-wide overlaps everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

NAME_LABEL = "kubernetes.io/metadata.name"


class SelectorError(ValueError):
    """A namespaceSelector that Kubernetes would not accept."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class NamespaceSelector:
    """A parsed selector; `requirements` empty and `everything` true means cluster-wide."""

    requirements: tuple[Requirement, ...] = ()
    everything: bool = True
    source: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> NamespaceSelector:
        """From Helm values; raises SelectorError for both keys or a malformed selector."""
        names = values.get("namespaces") or []
        selector = values.get("namespaceSelector") or {}
        if names and selector:
            raise SelectorError("namespaces and namespaceSelector are mutually exclusive")
        if names:
            return cls.for_names(names)
        if not selector:
            return cls()
        return cls.parse(selector)

    @classmethod
    def for_names(cls, names: Iterable[str]) -> NamespaceSelector:
        wanted = frozenset(names)
        return cls(
            (Requirement(NAME_LABEL, "In", wanted),),
            everything=False,
            source={
                "matchExpressions": [
                    {"key": NAME_LABEL, "operator": "In", "values": sorted(wanted)}
                ]
            },
        )

    @classmethod
    def parse(cls, selector: Mapping[str, Any]) -> NamespaceSelector:
        requirements: list[Requirement] = []
        labels = selector.get("matchLabels") or {}
        if not isinstance(labels, Mapping):
            raise SelectorError("matchLabels must be a map of label to value")
        for key, value in labels.items():
            requirements.append(Requirement(str(key), "In", frozenset([str(value)])))
        for expression in selector.get("matchExpressions") or []:
            if not isinstance(expression, Mapping) or "key" not in expression:
                raise SelectorError("each matchExpressions entry needs a key and an operator")
            operator = expression.get("operator")
            values = frozenset(str(v) for v in expression.get("values") or [])
            if operator in ("In", "NotIn") and not values:
                raise SelectorError(f"operator {operator} on {expression['key']} needs values")
            if operator in ("Exists", "DoesNotExist") and values:
                raise SelectorError(f"operator {operator} on {expression['key']} takes no values")
            if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise SelectorError(f"unknown operator {operator!r} on {expression['key']}")
            requirements.append(Requirement(str(expression["key"]), str(operator), values))
        return cls(tuple(requirements), everything=not requirements, source=selector)

    def matches(self, name: str, labels: Mapping[str, str] | None = None) -> bool:
        all_labels = {**(labels or {}), NAME_LABEL: name}
        return all(r.matches(all_labels) for r in self.requirements)

    @property
    def static_names(self) -> frozenset[str] | None:
        """The namespaces a static selector names; None for a dynamic or cluster-wide one."""
        if self.everything:
            return None
        names: frozenset[str] | None = None
        for requirement in self.requirements:
            if requirement.key != NAME_LABEL or requirement.operator != "In":
                return None
            names = requirement.values if names is None else names & requirement.values
        return names

    @property
    def is_dynamic(self) -> bool:
        return not self.everything and self.static_names is None

    def describe(self) -> str:
        if self.everything:
            return "all namespaces"
        static = self.static_names
        if static is not None:
            return "namespaces " + ", ".join(sorted(static))
        parts = []
        for r in self.requirements:
            if r.operator in ("In", "NotIn"):
                parts.append(f"{r.key} {r.operator.lower()} ({', '.join(sorted(r.values))})")
            else:
                parts.append(f"{'' if r.operator == 'Exists' else '!'}{r.key}")
        return "namespaces with " + ", ".join(parts)


def overlap(
    a: NamespaceSelector,
    b: NamespaceSelector,
    existing: Mapping[str, Mapping[str, str]],
) -> set[str] | None:
    """Namespaces both selectors claim (a set, possibly empty when they may still collide), or
    None when they cannot overlap. Cluster-wide overlaps everything; two static selectors overlap
    on their common names; otherwise they conflict on any existing namespace both match, and a
    dynamic selector is given the benefit of the doubt only when no namespace matches both."""
    if a.everything or b.everything:
        return set(existing) or {"*"}
    static_a, static_b = a.static_names, b.static_names
    if static_a is not None and static_b is not None:
        shared = static_a & static_b
        return set(shared) if shared else None
    candidates = set(existing)
    for static in (static_a, static_b):
        if static is not None:
            candidates |= static
    common = {
        name
        for name in candidates
        if a.matches(name, existing.get(name)) and b.matches(name, existing.get(name))
    }
    return common or None
