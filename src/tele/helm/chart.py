"""The traffic-manager chart shipped inside the package, driven through the real Helm.

helm-python-sdk binds Helm's Go SDK with ctypes: rendering, schema validation and lint are Helm's
own, offline. Its calls block, so the async wrappers run them in a worker thread. Helm errors are
translated here into `ValuesError` (one sentence naming the value's path) or `ChartError`.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import yaml

from tele.contracts.namespaces import NamespaceSelector, SelectorError
from tele.helm.errors import ChartError, ValuesError

if TYPE_CHECKING:
    import helm_python

Obj = dict[str, Any]

CHART_NAME = "traffic-manager"
DEFAULT_RELEASE = "traffic-manager"
DEFAULT_NAMESPACE = "ambassador"
KUBE_VERSION = "v1.31.0"

# Helm's own install order (pkg/release/util/kind_sorter.go), reversed for uninstall.
INSTALL_ORDER = (
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicaSet",
    "Deployment",
    "StatefulSet",
    "Job",
    "CronJob",
    "Ingress",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
)


def kind_rank(kind: str) -> int:
    try:
        return INSTALL_ORDER.index(kind)
    except ValueError:
        return len(INSTALL_ORDER)


def chart_dir() -> Path:
    """The chart directory inside the installed package (package data, see pyproject.toml)."""
    path = Path(str(importlib.resources.files("tele") / "charts" / CHART_NAME))
    if not (path / "Chart.yaml").is_file():
        raise ChartError(f"The traffic-manager chart is missing from this tele install ({path}).")
    return path


def _helm() -> Any:
    # Imported lazily: loading the Go library costs time that only `tele helm` should pay.
    try:
        import helm_python
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ChartError(f"helm-python-sdk is not usable: {exc}.") from None
    return helm_python


_AT = re.compile(r"^\s*- at '(?P<path>[^']*)': (?P<problem>.*)$")
_ADDITIONAL = re.compile(r"additional propert(?:y|ies) (?P<names>.+) not allowed")
_MISSING = re.compile(r"missing propert(?:y|ies) (?P<names>.+)")
_PATTERN = re.compile(r"^(?P<value>'.*') does not match pattern '(?P<pattern>.*)'$")
# What the schema's patterns mean, by a piece of each pattern (see values.schema.json).
_PATTERN_HINTS = (
    ("(ns|us|µs|ms|s|m|h)", "a duration like 60s, 1m30s or 500ms"),
    ("|Ki|M|Mi|", "a quantity like 250m or 128Mi"),
    ("[0-9a-fA-F:]+)/", "a CIDR like 10.96.0.0/12"),
    ("[-a-z0-9]*", "a lowercase DNS name (letters, digits, '-')"),
    ("^/", "a path starting with /"),
)


def _dotted(pointer: str) -> str:
    """A JSON pointer as the --set path a user would write: /a/b/0 -> a.b[0]."""
    out = ""
    for part in (p for p in pointer.split("/") if p):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def values_error(detail: str) -> ValuesError:
    """One sentence from Helm's schema report: the first failing JSON path and its problem."""
    found = [m for m in map(_AT.match, detail.splitlines()) if m]
    if not found:
        text = " ".join(detail.split()).removeprefix(f"{CHART_NAME}: ")
        return ValuesError(f"Invalid Helm values: {text.rstrip('.')}.")
    path, problem = _dotted(found[0]["path"]), found[0]["problem"]
    if problem in ("'not' failed",) and not path:
        return ValuesError("namespaces and namespaceSelector are mutually exclusive: set only one.")
    if problem in ("'anyOf' failed", "'oneOf' failed") and len(found) > 1:
        problem = " or ".join(dict.fromkeys(m["problem"] for m in found[1:]))
    if extra := _ADDITIONAL.search(problem):
        names = [n.strip().strip("'") for n in extra["names"].split(",")]
        full = ", ".join(f"{path}.{n}" if path else n for n in names)
        return ValuesError(f"Unknown Helm value {full}: the chart's schema does not allow it.")
    if missing := _MISSING.search(problem):
        names = [n.strip().strip("'") for n in missing["names"].split(",")]
        full = ", ".join(f"{path}.{n}" if path else n for n in names)
        return ValuesError(f"Helm value {full} is required and must not be null.")
    if pattern := _PATTERN.match(problem):
        raw = pattern["pattern"].replace("\\\\", "\\")
        hint = next((h for piece, h in _PATTERN_HINTS if piece in raw), "")
        if hint:
            problem = f"{pattern['value']} is not {hint}"
    return ValuesError(f"Invalid Helm value {path or '(top level)'}: {problem.rstrip('.')}.")


@dataclass(frozen=True)
class LintMessage:
    severity: int  # 1 info, 2 warning, 3 error (Helm's numbering)
    path: str
    text: str

    @property
    def label(self) -> str:
        return {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(self.severity, "UNKNOWN")


class Chart:
    """The loaded chart. Thread-safe (Helm charts are immutable); blocking methods end in
    `_blocking`, their async twins run them in a worker thread."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or chart_dir()
        helm = _helm()
        try:
            self._chart: helm_python.Chart = helm.Chart.load(str(self.path))
        except helm.HelmError as exc:
            raise ChartError(
                f"Cannot load the chart at {self.path}: {str(exc).rstrip('.')}."
            ) from None

    @classmethod
    async def load(cls, path: Path | None = None) -> Chart:
        return await trio.to_thread.run_sync(cls, path)

    def close(self) -> None:
        self._chart.close()

    @property
    def version(self) -> str:
        return self._chart.version

    @property
    def app_version(self) -> str:
        return str(self._chart.metadata.get("appVersion") or "")

    # --- values --------------------------------------------------------------------------------

    def merged_blocking(self, values: Mapping[str, Any]) -> Obj:
        """Defaults coalesced with `values` and checked: the schema, then the namespace scope."""
        helm = _helm()
        try:
            self._chart.validate_schema(dict(values))
            merged: Obj = self._chart.merge_values(dict(values))
        except helm.HelmValuesError as exc:
            raise values_error(str(exc)) from None
        try:
            NamespaceSelector.from_values(merged)
        except SelectorError as exc:
            raise ValuesError(f"Invalid namespace scope: {str(exc).rstrip('.')}.") from None
        return merged

    async def merged(self, values: Mapping[str, Any]) -> Obj:
        return await trio.to_thread.run_sync(self.merged_blocking, values)

    # --- render --------------------------------------------------------------------------------

    def render_blocking(
        self,
        values: Mapping[str, Any],
        *,
        release: str,
        namespace: str,
        revision: int = 1,
        upgrade: bool = False,
    ) -> list[Obj]:
        """The chart's objects for these values, in Helm's install order."""
        helm = _helm()
        self.merged_blocking(values)
        try:
            rendered = self._chart.render(
                dict(values),
                name=release,
                namespace=namespace,
                revision=revision,
                is_install=not upgrade,
                is_upgrade=upgrade,
            )
        except helm.HelmValuesError as exc:
            raise values_error(str(exc)) from None
        except helm.HelmError as exc:
            raise _render_error(str(exc)) from None
        objects: list[Obj] = []
        for template, text in sorted(rendered.items()):
            if not template.endswith((".yaml", ".yml")):
                continue  # NOTES.txt
            for doc in yaml.safe_load_all(text):
                if doc:
                    if not isinstance(doc, dict) or "kind" not in doc:
                        raise ChartError(f"Template {template} rendered something not an object.")
                    doc.setdefault("metadata", {})
                    objects.append(doc)
        objects.sort(key=lambda o: kind_rank(str(o["kind"])))
        return objects

    async def render(
        self,
        values: Mapping[str, Any],
        *,
        release: str,
        namespace: str,
        revision: int = 1,
        upgrade: bool = False,
    ) -> list[Obj]:
        call = functools.partial(
            self.render_blocking,
            values,
            release=release,
            namespace=namespace,
            revision=revision,
            upgrade=upgrade,
        )
        return await trio.to_thread.run_sync(call)


def _render_error(detail: str) -> ValuesError | ChartError:
    # A `fail` in a template is the chart refusing values: report it as the values' fault.
    if "error calling fail:" in detail:
        return ValuesError(detail.rsplit("error calling fail:", 1)[1].strip())
    return ChartError(f"The chart failed to render: {' '.join(detail.split()).rstrip('.')}.")


def lint_blocking(
    values: Mapping[str, Any], *, namespace: str, path: Path | None = None, strict: bool = True
) -> list[LintMessage]:
    """Helm's own lint of the chart with these values (schema included)."""
    helm = _helm()
    try:
        report = helm.lint(
            str(path or chart_dir()),
            dict(values),
            strict=strict,
            namespace=namespace,
            kube_version=KUBE_VERSION,
        )
    except helm.HelmError as exc:
        raise ChartError(f"helm lint could not run: {str(exc).rstrip('.')}.") from None
    return [
        LintMessage(int(m.get("severity") or 0), str(m.get("path") or ""), str(m.get("error")))
        for m in report.get("messages") or []
    ]


async def lint(
    values: Mapping[str, Any], *, namespace: str, path: Path | None = None, strict: bool = True
) -> list[LintMessage]:
    call = functools.partial(lint_blocking, values, namespace=namespace, path=path, strict=strict)
    return await trio.to_thread.run_sync(call)
