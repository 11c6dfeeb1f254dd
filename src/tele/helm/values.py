"""User-supplied Helm values from `-f/--values` files and `--set*` flags, parsed by Helm itself.

Helm's order: values files left to right, then --set-json, --set, --set-string, --set-file,
each merged over what came before (maps merge key by key; anything else is replaced). Parsing
goes through helm-python-sdk so that `--set a={1,2}`, `b=true` and YAML quirks mean what they
mean to `helm`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tele.helm.chart import _helm
from tele.helm.errors import ValuesError

Obj = dict[str, Any]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Obj:
    """`override` over `base`: nested maps merge, everything else is replaced."""
    out: Obj = dict(base)
    for key, value in override.items():
        current = out.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(current, value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class ValueSources:
    """The value flags of one command line, in the order the user gave each kind."""

    files: Sequence[str] = ()
    set: Sequence[str] = ()
    set_string: Sequence[str] = ()
    set_json: Sequence[str] = ()
    set_file: Sequence[str] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.files
            or self.set
            or self.set_string
            or self.set_json
            or self.set_file
            or self.extra
        )

    def build(self) -> Obj:
        """The merged values; ValuesError (one sentence) for an unreadable or malformed one."""
        helm = _helm()
        values: Obj = dict(self.extra)
        for path in self.files:
            values = deep_merge(values, _read_values_file(helm, path))
        parsers = (
            ("--set-json", self.set_json, helm.parse_set_json),
            ("--set", self.set, helm.parse_set_string),
            ("--set-string", self.set_string, helm.parse_set_string_values),
            ("--set-file", self.set_file, helm.parse_set_file),
        )
        for flag, expressions, parse in parsers:
            for expression in expressions:
                try:
                    parsed = parse(expression)
                except helm.HelmError as exc:
                    detail = " ".join(str(exc).split())
                    raise ValuesError(
                        f"Cannot parse {flag} {expression!r}: {detail.rstrip('.')}."
                    ) from None
                values = deep_merge(values, parsed)
        return values


def _read_values_file(helm: Any, path: str) -> Obj:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValuesError(f"Cannot read values file {path}: {reason}.") from None
    try:
        parsed = helm.values_from_yaml(text)
    except helm.HelmError as exc:
        detail = " ".join(str(exc).split())
        if "cannot unmarshal" in detail:  # valid YAML, but a list or a scalar
            raise ValuesError(
                f"Values file {path} must hold a map of values at the top level."
            ) from None
        raise ValuesError(f"Values file {path} is not valid YAML: {detail.rstrip('.')}.") from None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise ValuesError(f"Values file {path} must hold a map of values at the top level.")
    return parsed
