"""Typed RPC errors: a code that programs branch on and a message that people read."""

from __future__ import annotations

import enum

from tele.errors import TeleError


class Code(enum.StrEnum):
    """Error codes, with the meanings gRPC gave them."""

    OK = "ok"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"

    @classmethod
    def parse(cls, value: str | None) -> Code:
        try:
            return cls(value or "unknown")
        except ValueError:
            return cls.UNKNOWN


# How each code maps onto the CLI's exit codes (1 user error, 3 cluster/connection).
_EXIT_CODES = {
    Code.UNAVAILABLE: 3,
    Code.DEADLINE_EXCEEDED: 3,
    Code.UNAUTHENTICATED: 3,
    Code.INTERNAL: 3,
    Code.UNKNOWN: 3,
}


class RpcError(TeleError):
    """An error a handler sent back, or a transport failure seen by a caller."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = _EXIT_CODES.get(code, 1)

    def __repr__(self) -> str:
        return f"RpcError({self.code.value!r}, {self.message!r})"
