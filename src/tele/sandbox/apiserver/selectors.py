"""Label and field selectors: the query-string syntax and `LabelSelector` objects.

A parsed selector is a list of requirements that all must hold; parsing errors carry the text
Kubernetes uses so that 400 replies read the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import StatusError, bad_request

_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_TOKEN_RE = re.compile(r"\s*(!=|==|=|\(|\)|,|!|[^\s!=(),]+)")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # in, notin, exists, !exists, =, !=
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        if self.op in ("!=", "notin"):
            return not present or labels[self.key] not in self.values
        if self.op in ("gt", "lt"):
            if not present:
                return False
            try:
                value = int(labels[self.key])
            except ValueError:
                return False
            bound = int(self.values[0])
            return value > bound if self.op == "gt" else value < bound
        return False


LabelSelector = tuple[Requirement, ...]


def parse_label_selector(text: str) -> LabelSelector:
    """Parse `a=b,c!=d,e in (x,y),!f,g` into requirements (400 with the reason on error)."""
    tokens = _TOKEN_RE.findall(text)
    if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", text):
        raise bad_request(f"unable to parse requirement: found unexpected characters in {text!r}")
    reqs: list[Requirement] = []
    i = 0

    def fail(msg: str) -> StatusError:
        return bad_request(f"unable to parse requirement: {msg}")

    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            if i + 1 >= len(tokens):
                raise fail("found '', expected: identifier after '!'")
            reqs.append(Requirement(_check_key(tokens[i + 1]), "!exists"))
            i += 2
        else:
            key = _check_key(tok)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ","
            if nxt == ",":
                reqs.append(Requirement(key, "exists"))
                i += 1
            elif nxt in ("=", "==", "!="):
                value = tokens[i + 2] if i + 2 < len(tokens) else ""
                if value in (",", ")", "("):
                    value, step = "", 2
                else:
                    step = 3
                _check_value(value)
                reqs.append(Requirement(key, "!=" if nxt == "!=" else "=", (value,)))
                i += step
            elif nxt in ("in", "notin"):
                if i + 2 >= len(tokens) or tokens[i + 2] != "(":
                    raise fail(
                        f"found '{tokens[i + 2] if i + 2 < len(tokens) else ''}', expected: '('"
                    )
                j = i + 3
                values: list[str] = []
                while j < len(tokens) and tokens[j] != ")":
                    if tokens[j] != ",":
                        values.append(_check_value(tokens[j]))
                    j += 1
                if j >= len(tokens):
                    raise fail("found '', expected: ')'")
                reqs.append(Requirement(key, nxt, tuple(values)))
                i = j + 1
            elif nxt.startswith((">", "<")):
                raise fail(f"found '{nxt}', expected: '=', '!=', '==', 'in', notin'")
            else:
                raise fail(f"found '{nxt}', expected: ',', '=', '!=', '==', 'in', notin'")
        if i < len(tokens):
            if tokens[i] != ",":
                raise fail(f"found '{tokens[i]}', expected: ','")
            i += 1
    return tuple(reqs)


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key) or len(key.rpartition("/")[2]) > 63:
        raise bad_request(
            f'unable to parse requirement: values[0][{key}]: Invalid value: "{key}": name part '
            "must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character"
        )
    return key


def _check_value(value: str) -> str:
    if value and not re.match(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", value):
        raise bad_request(
            f'unable to parse requirement: values[0]: Invalid value: "{value}": a valid label '
            "must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character"
        )
    return value


def matches_labels(selector: LabelSelector, labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in selector)


def from_label_selector_object(obj: dict[str, Any] | None) -> LabelSelector | None:
    """A metav1.LabelSelector; None (no selector object) matches nothing, {} matches all."""
    if obj is None:
        return None
    reqs = [Requirement(k, "=", (v,)) for k, v in sorted((obj.get("matchLabels") or {}).items())]
    for expr in obj.get("matchExpressions") or []:
        op = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}.get(
            expr.get("operator", ""), ""
        )
        reqs.append(Requirement(expr.get("key", ""), op, tuple(expr.get("values") or ())))
    return tuple(reqs)


def label_selector_text(obj: dict[str, Any] | None) -> str:
    """Render a LabelSelector as query text (Scale.status.selector, `kubectl get -o wide`)."""
    if not obj:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((obj.get("matchLabels") or {}).items())]
    for expr in obj.get("matchExpressions") or []:
        op = expr.get("operator")
        vals = ",".join(expr.get("values") or [])
        key = expr.get("key")
        parts.append(
            {
                "In": f"{key} in ({vals})",
                "NotIn": f"{key} notin ({vals})",
                "Exists": f"{key}",
                "DoesNotExist": f"!{key}",
            }.get(op or "", "")
        )
    return ",".join(parts)


# --- field selectors ------------------------------------------------------------------------

FieldSelector = tuple[tuple[str, str, str], ...]  # (path, op "="/"!=", value)


def parse_field_selector(text: str, supports: Callable[[str], bool]) -> FieldSelector:
    out: list[tuple[str, str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        for op in ("!=", "==", "="):
            if op in part:
                key, _, value = part.partition(op)
                break
        else:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        key = key.strip()
        if not supports(key):
            raise bad_request(f"field label not supported: {key}")
        out.append((key, "!=" if op == "!=" else "=", value.strip()))
    return tuple(out)


def field_value(obj: dict[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    if isinstance(cur, list):
        # status.podIPs matches any of the pod's addresses
        return ",".join(str(c.get("ip", c)) if isinstance(c, dict) else str(c) for c in cur)
    return str(cur)


def matches_fields(selector: FieldSelector, obj: dict[str, Any]) -> bool:
    for path, op, value in selector:
        actual = field_value(obj, path)
        hit = value in actual.split(",") if path == "status.podIPs" else actual == value
        if hit != (op == "="):
            return False
    return True
