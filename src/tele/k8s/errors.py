"""Errors of the Kubernetes layer: kubeconfig problems and port-forward failures, translated
from the kubernetes package, trio-websocket, ssl and OSError at this layer's I/O edge."""

from __future__ import annotations

import trio

from tele.errors import ConnectionFailed, UserError


class KubeconfigError(UserError):
    """The kubeconfig is missing, malformed, or names a context/credential that does not work."""


class PortForwardError(ConnectionFailed):
    """A port-forward to a pod could not be opened, or the cluster reported an error on it."""


class PortForwardBroken(PortForwardError, trio.BrokenResourceError):
    """The port-forward websocket broke off; also a `trio.BrokenResourceError` for stream users."""
