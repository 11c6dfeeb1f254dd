"""The two halves of an engaged connection: an agent opens a tunnel stream for a connection it
took (dial id `AGENT_DIAL_PREFIX` + engagement id), the engaging client is asked to dial back
(WATCH_DIALS), and its stream is spliced to the agent's (see tele.rpc.agent_api)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from tele.manager.table import Active
from tele.net.tunnel import Accept, OpenRequest, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc.h2stream import H2Stream
from tele.rpc.tunnel import reset, splice

log = logging.getLogger(__name__)

DIAL_BACK_TIMEOUT = 10.0
MAX_PENDING_DIALS = 256


@dataclass
class ClientDials:
    send: trio.MemorySendChannel[aapi.DialRequest]
    receive: trio.MemoryReceiveChannel[aapi.DialRequest]


class DialBack:
    """Dial requests queued per client session, and agent streams waiting for their pair."""

    def __init__(
        self,
        *,
        engagement: Callable[[str], Active | None],
        agent_alive: Callable[[str], bool],
        client_alive: Callable[[str], bool],
        client_takes_channels: Callable[[str], bool] = lambda _session_id: True,
    ) -> None:
        self._engagement = engagement  # by engagement id
        self._agent_alive = agent_alive  # by agent session id
        self._client_alive = client_alive  # by client session id
        self._takes_channels = client_takes_channels  # by client session id
        self._dials: dict[str, ClientDials] = {}
        self._pending: dict[str, trio.MemorySendChannel[tuple[H2Stream, trio.Event]]] = {}

    def session_allowed(self, request: OpenRequest) -> bool:
        """The tunnel policy's view: agents may open engagement (and --proxy-via) streams,
        clients the rest."""
        agent_prefixes = (
            aapi.AGENT_DIAL_PREFIX,
            aapi.AGENT_RESPONSE_DIAL_PREFIX,
            aapi.AGENT_TAP_DIAL_PREFIX,
            aapi.AGENT_TAP_RESPONSE_DIAL_PREFIX,
            aapi.PROXY_DIAL_PREFIX,
            aapi.PROXY_FAIL_PREFIX,
        )
        if request.dial_id is not None and request.dial_id.startswith(agent_prefixes):
            return self._agent_alive(request.session)
        return self._client_alive(request.session)

    def client_dials(self, session_id: str) -> ClientDials:
        """The session's queue of dial requests, made on first use: requests made before the
        client watches wait there (bounded) instead of being refused."""
        dials = self._dials.get(session_id)
        if dials is None:
            send, receive = trio.open_memory_channel[aapi.DialRequest](MAX_PENDING_DIALS)
            dials = self._dials[session_id] = ClientDials(send, receive)
        return dials

    async def watch(self, session_id: str) -> AsyncIterator[aapi.DialRequest]:
        async for dial in self.client_dials(session_id).receive:
            yield dial

    def end_session(self, session_id: str) -> None:
        """The client is gone: its pending dials fail."""
        dials = self._dials.pop(session_id, None)
        if dials is not None:
            dials.send.close()

    async def dial_back(self, request: OpenRequest, stream: H2Stream) -> None:
        dial_id = request.dial_id or ""
        if dial_id.startswith(aapi.AGENT_DIAL_PREFIX):
            await self._from_agent(request, stream, dial_id[len(aapi.AGENT_DIAL_PREFIX) :])
            return
        if dial_id.startswith(aapi.AGENT_RESPONSE_DIAL_PREFIX):
            engagement_id = dial_id[len(aapi.AGENT_RESPONSE_DIAL_PREFIX) :]
            await self._from_agent(request, stream, engagement_id, response=True)
            return
        for prefix, response in (
            (aapi.AGENT_TAP_DIAL_PREFIX, False),
            (aapi.AGENT_TAP_RESPONSE_DIAL_PREFIX, True),
        ):
            if dial_id.startswith(prefix):
                engagement_id = dial_id[len(prefix) :]
                await self._from_agent(
                    request, stream, engagement_id, response=response, channel=True
                )
                return
        waiting = self._pending.pop(dial_id, None)
        if waiting is None:
            reset(stream, ResetReason.POLICY)
            return
        done = trio.Event()
        try:
            waiting.send_nowait((stream, done))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            reset(stream, ResetReason.TIMEOUT)
            return
        # The agent side's task splices; this handler (which owns the stream) waits for it.
        await done.wait()

    async def _from_agent(
        self,
        request: OpenRequest,
        agent_stream: H2Stream,
        engagement_id: str,
        *,
        response: bool = False,
        channel: bool = False,
    ) -> None:
        active = self._engagement(engagement_id)
        dials = self._dials.get(active.session_id) if active is not None else None
        if (
            active is None
            or dials is None
            or (response and not active.engagement.copy_responses)
            or (channel and active.info.kind != aapi.WIRETAP)
        ):
            reset(agent_stream, ResetReason.REFUSED)
            return
        if channel and not self._takes_channels(active.session_id):
            # Never to a client that would hand the records to its handler as raw bytes (the
            # manager refuses such a client wiretaps; this holds for any other way in too).
            log.warning(
                "client %s cannot read wiretap copy channels; %s's copies refused",
                active.info.client,
                active.info.name,
            )
            reset(agent_stream, ResetReason.REFUSED)
            return
        dial_id = secrets.token_hex(12)
        send, receive = trio.open_memory_channel[tuple[H2Stream, trio.Event]](1)
        self._pending[dial_id] = send
        try:
            dials.send.send_nowait(
                aapi.DialRequest(
                    dial_id=dial_id,
                    engagement_id=engagement_id,
                    original_host=str(request.destination.ip),
                    original_port=request.destination.port,
                    protocol=request.destination.protocol.value,
                    wiretap=active.info.kind == aapi.WIRETAP,
                    response=response,
                    channel=channel,
                )
            )
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending.pop(dial_id, None)
            reset(agent_stream, ResetReason.OVERLOADED)
            return
        paired: tuple[H2Stream, trio.Event] | None = None
        with trio.move_on_after(DIAL_BACK_TIMEOUT):
            paired = await receive.receive()
        self._pending.pop(dial_id, None)
        if paired is None:
            log.warning(
                "client %s did not dial back for %s in time", active.info.client, active.info.name
            )
            reset(agent_stream, ResetReason.TIMEOUT)
            return
        client_stream, done = paired
        try:
            accept = Accept().to_headers()
            await agent_stream.send_response(accept)
            await client_stream.send_response(accept)
            await splice(agent_stream, client_stream)
        finally:
            done.set()
