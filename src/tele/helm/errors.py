"""Errors of the helm layer, translated from helm_python's exceptions at this layer's edge."""

from __future__ import annotations

from tele.errors import TeleError, UserError


class ValuesError(UserError):
    """Helm values that the chart's schema (or the chart itself) refuses."""


class ChartError(TeleError):
    """The chart shipped with tele could not be found, loaded or rendered: a packaging bug."""

    exit_code = 4


class ReleaseError(UserError):
    """An install, upgrade or uninstall that cannot proceed (missing or existing release)."""


class NamespaceConflict(ReleaseError):
    """Another traffic manager already manages namespaces this one would manage."""
