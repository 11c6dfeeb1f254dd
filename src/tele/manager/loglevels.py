"""`tele loglevel` in the cluster: the traffic manager's own level (with its revert timer) and
the level it hands its agents, which follow it on a WATCH_LOG_LEVEL stream and return to their
configured level when the manager's duration ends."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from tele.config import parse_log_level
from tele.loglevel import LogLevelController
from tele.manager.auth import audit_line
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.errors import Code, RpcError

log = logging.getLogger(__name__)

Require = Callable[..., Awaitable[None]]


class LogLevels:
    """SET_LOG_LEVEL for client sessions, WATCH_LOG_LEVEL for agents."""

    def __init__(
        self,
        configured: str,
        *,
        manager_namespace: str,
        check_session: Callable[[str], object],
        check_agent: Callable[[str], bool],
        agent_count: Callable[[], int],
        require: Require,
    ) -> None:
        self.controller = LogLevelController(configured, on_revert=lambda: self._tell_agents(""))
        self._manager_namespace = manager_namespace
        self._check_session = check_session
        self._check_agent = check_agent
        self._agent_count = agent_count
        self._require = require
        self._agent_level = ""
        self._changed = trio.Event()

    def _tell_agents(self, level: str) -> None:
        if level != self._agent_level:
            self._agent_level = level
            self._changed.set()
            self._changed = trio.Event()

    async def set(self, request: api.LogLevelRequest) -> api.LogLevelReply:
        self._check_session(request.session_id)
        try:
            level = str(parse_log_level(request.level))
        except ValueError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"unknown log level: {exc}") from None
        if not math.isfinite(request.duration) or request.duration < 0:
            raise RpcError(Code.INVALID_ARGUMENT, "the duration must be zero or more seconds")
        # Who may read the manager's log may make it say more (trace logs wire-level detail).
        await self._require("get", "pods", self._manager_namespace, subresource="log")
        previous = self.controller.set(level, request.duration)
        if request.agents:
            self._tell_agents(level)
        audit_line("log-level", level=level, duration=request.duration, agents=request.agents)
        return api.LogLevelReply(
            level=level,
            previous=previous,
            agents=self._agent_count() if request.agents else 0,
        )

    async def watch(self, request: api.SessionRequest) -> AsyncIterator[aapi.AgentLogLevel]:
        if not self._check_agent(request.session_id):
            raise RpcError(Code.NOT_FOUND, "the agent session has expired or is unknown")
        last = None
        while self._check_agent(request.session_id):
            if self._agent_level != last:
                last = self._agent_level
                yield aapi.AgentLogLevel(level=last)
            with trio.move_on_after(30):  # (and look again whether the agent is still there)
                await self._changed.wait()
