"""Errors of the image layer: bad image names and registries that refuse, fail or misbehave.

Every `str()` is one sentence a person can act on; the kubelet maps them to Kubernetes reasons
(`InvalidImageName`, `ErrImagePull`), the CLI prints them and exits non-zero.
"""

from __future__ import annotations

from ..errors import ConnectionFailed, UserError


class InvalidReference(UserError):
    """An image name that is not a valid reference (the kubelet's InvalidImageName)."""


class RegistryError(ConnectionFailed):
    """A registry refused a request, failed, or answered something that is not what the API says.

    `status` is the HTTP status when there was an answer (None when there was none).
    """

    def __init__(self, registry: str, status: int | None, message: str) -> None:
        self.registry = registry
        self.status = status
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return f"Registry {self.registry}: {self.message}{status}."

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.registry, self.status, self.message))


class Unauthorized(RegistryError):
    """The registry wants credentials we do not have, or refused the ones we sent."""


class NotFound(RegistryError):
    """The repository, tag, manifest or blob does not exist in the registry."""


class DigestMismatch(RegistryError):
    """Content did not match its digest or announced size (corrupt, truncated or swapped)."""


class RegistryUnreachable(RegistryError):
    """No connection, a TLS failure or a timeout: there was no HTTP answer at all."""


class InvalidDockerConfig(UserError):
    """A docker config.json (or a pull secret's .dockerconfigjson) that cannot be read."""
