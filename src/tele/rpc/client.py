"""The RPC client side: typed unary calls and server streams over one h2 link.

Transport failures become `RpcError(UNAVAILABLE)`, an exceeded deadline
`RpcError(DEADLINE_EXCEEDED)`; a caller that is cancelled resets its stream, which cancels the
handler on the server.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import msgspec
import trio

from tele import jsonlimits
from tele.rpc import wire
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import H2Link, H2Stream, LinkSettings, open_link
from tele.rpc.method import Req, Resp, ServerStream, Unary


class Client:
    """Calls methods on the server at the other end of `link`."""

    def __init__(self, link: H2Link, *, max_message_size: int = wire.DEFAULT_MAX_MESSAGE) -> None:
        self.link = link
        self.max_message_size = max_message_size

    async def call(
        self, method: Unary[Req, Resp], request: Req, *, timeout: float | None = None
    ) -> Resp:
        """Call a unary method and return its response."""
        body = self._encode(request)
        deadline = _deadline(timeout)
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                stream = await self._start(method.path, body, deadline)
                try:
                    messages = await self._read_all(stream, method.response, limit=1)
                finally:
                    _finish(stream)
                if not messages:
                    raise RpcError(Code.INTERNAL, f"{method.path} returned no response")
                return messages[0]
        except trio.BrokenResourceError as exc:
            raise RpcError(Code.UNAVAILABLE, f"connection to the server lost: {exc}") from None
        assert scope.cancelled_caught
        raise RpcError(Code.DEADLINE_EXCEEDED, f"{method.path} did not answer within {timeout:g}s")

    def stream(
        self, method: ServerStream[Req, Resp], request: Req, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Resp]]:
        """Open a server stream: `async with client.stream(m, req) as items: async for ...`."""
        return self._stream(method, request, timeout)

    @asynccontextmanager
    async def _stream(
        self, method: ServerStream[Req, Resp], request: Req, timeout: float | None
    ) -> AsyncIterator[AsyncIterator[Resp]]:
        body = self._encode(request)
        deadline = _deadline(timeout)
        try:
            stream = await self._start(method.path, body, deadline)
        except trio.BrokenResourceError as exc:
            raise RpcError(Code.UNAVAILABLE, f"connection to the server lost: {exc}") from None
        items = self._iterate(stream, method.response, method.path, deadline)
        try:
            yield items
        finally:
            # The caller may stop early: finish the generator here, not in the GC.
            await items.aclose()
            _finish(stream)

    async def _iterate(
        self, stream: H2Stream, response_type: type[Resp], path: str, deadline: float
    ) -> AsyncGenerator[Resp]:
        reader = wire.MessageReader(self.max_message_size)
        decoder = msgspec.json.Decoder(response_type)
        while True:
            with trio.CancelScope(deadline=deadline) as scope:
                try:
                    chunk = await stream.receive_some()
                except trio.BrokenResourceError as exc:
                    raise self._failure(stream, exc) from None
            if scope.cancelled_caught:
                raise RpcError(Code.DEADLINE_EXCEEDED, f"{path} did not finish in time")
            if not chunk:
                self._raise_status(stream, path, ended=True)
                return
            for message in self._split(reader, chunk, stream):
                yield self._decode(decoder, message)

    async def _start(self, path: str, body: bytes, deadline: float) -> H2Stream:
        timeout = None if math.isinf(deadline) else max(0.0, deadline - trio.current_time())
        stream = await self.link.open_stream(
            wire.request_headers(path, timeout), body=body, end_stream=True
        )
        try:
            headers = await stream.receive_response()
        except BaseException:
            _finish(stream)
            raise
        status = dict(headers).get(":status")
        if status != "200":
            stream.close()
            raise RpcError(Code.UNAVAILABLE, f"the server answered HTTP status {status}")
        if wire.parse_status(headers) is not None:  # trailers-only: an error before any message
            stream.close()
            self._raise_status(stream, path, ended=True, trailers=headers)
        return stream

    async def _read_all(
        self, stream: H2Stream, response_type: type[Resp], limit: int
    ) -> list[Resp]:
        try:
            body = await stream.receive_all(self.max_message_size * limit + limit)
        except trio.BrokenResourceError as exc:
            raise self._failure(stream, exc) from None
        except ValueError:
            stream.close()
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"response larger than the maximum of {self.max_message_size} bytes",
            ) from None
        reader = wire.MessageReader(self.max_message_size)
        decoder = msgspec.json.Decoder(response_type)
        messages = [self._decode(decoder, m) for m in self._split(reader, body, stream)]
        if len(messages) > limit:
            raise RpcError(Code.INTERNAL, "the server sent more than one response")
        self._raise_status(stream, stream.header(":path") or "", ended=True)
        return messages

    def _split(self, reader: wire.MessageReader, chunk: bytes, stream: H2Stream) -> list[bytes]:
        try:
            return reader.feed(chunk)
        except wire.MessageTooLarge:
            stream.close()
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"response larger than the maximum of {self.max_message_size} bytes",
            ) from None

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder[Resp], message: bytes) -> Resp:
        try:
            jsonlimits.check_depth(message)
            return decoder.decode(message)
        except (msgspec.DecodeError, msgspec.ValidationError, jsonlimits.TooDeep) as exc:
            raise RpcError(Code.INTERNAL, f"malformed response from the server: {exc}") from None

    @staticmethod
    def _raise_status(
        stream: H2Stream, path: str, *, ended: bool, trailers: list[tuple[str, str]] | None = None
    ) -> None:
        if trailers is None:
            trailers = stream.trailers if stream.trailers is not None else stream.response_headers
        status = wire.parse_status(trailers)
        if status is None:
            raise RpcError(Code.INTERNAL, f"{path}: the server ended the call without a status")
        code, message = status
        if code is not Code.OK:
            raise RpcError(code, message)

    def _failure(self, stream: H2Stream, exc: BaseException) -> RpcError:
        if stream.was_reset and self.link.failure is None:
            return RpcError(Code.CANCELLED, f"the server cancelled the call: {exc}")
        return RpcError(Code.UNAVAILABLE, f"connection to the server lost: {exc}")

    def _encode(self, request: Any) -> bytes:
        data = msgspec.json.encode(request)
        if len(data) > self.max_message_size:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"request larger than the maximum of {self.max_message_size} bytes",
            )
        return data


def _finish(stream: H2Stream) -> None:
    """Done with a call's stream: if the server has not finished, it must stop (reset)."""
    if stream.remote_ended:
        stream.close()
    else:
        stream.reset()


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else trio.current_time() + timeout


@asynccontextmanager
async def open_client(
    stream: trio.abc.Stream,
    *,
    max_message_size: int = wire.DEFAULT_MAX_MESSAGE,
    settings: LinkSettings | None = None,
) -> AsyncIterator[Client]:
    """An RPC client over `stream` (h2 client side) for the duration of the block."""
    async with open_link(stream, client_side=True, settings=settings, name="rpc-client") as link:
        yield Client(link, max_message_size=max_message_size)
