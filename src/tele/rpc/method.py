"""API definitions as data: a method is a path plus its request and response types.

Modules such as `daemon_api.py` declare their methods with these; the same definition is used by
the server to decode requests and by the client to decode replies. No transport here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

Req = TypeVar("Req", bound=msgspec.Struct)
Resp = TypeVar("Resp", bound=msgspec.Struct)


@dataclass(frozen=True)
class Unary(Generic[Req, Resp]):
    """One request, one response. `path` is "/<service>/<method>"."""

    path: str
    request: type[Req]
    response: type[Resp]


@dataclass(frozen=True)
class ServerStream(Generic[Req, Resp]):
    """One request, then a stream of responses until the server ends it (watches)."""

    path: str
    request: type[Req]
    response: type[Resp]


class Empty(msgspec.Struct, frozen=True):
    """A request or response that carries nothing."""
