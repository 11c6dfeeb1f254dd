"""The daemon's RPC side: the accept loop on its unix socket (peer uid checked on every
connection), one `serve_connection` task per client, and the handlers of tele.rpc.daemon_api.

The cluster session (tele.daemon.session: manager link, lease, engagements, VIF and DNS) runs in
`run_sessions`' nursery, a sibling of the accept loop in the process's root nursery
(tele.daemon.process); `connect` starts it there, one at a time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

import tele
from tele import unixsock
from tele.config import Config, parse_log_level
from tele.daemon.session import ClusterSession
from tele.errors import TeleError, UserError, first_leaf
from tele.loglevel import LogLevelController
from tele.rpc import daemon_api as api
from tele.rpc import manager_api as mapi
from tele.rpc.agent_api import UNINSTALL, EngagementInfo, UninstallReply
from tele.rpc.agent_api import UninstallRequest as AgentUninstall
from tele.rpc.errors import Code, RpcError
from tele.rpc.manager_api import LIST_WORKLOADS, WorkloadList, WorkloadsRequest
from tele.rpc.server import Router, serve_connection

if TYPE_CHECKING:
    from tele.vif.connect import NetworkOptions
    from tele.vif.helper_link import HelperPrivileges

log = logging.getLogger(__name__)


def _network_options(request: api.ConnectRequest, cfg: Config) -> NetworkOptions:
    """The connect flags for the network part; TELE_VIF=1 (tests, containers) also enables it."""
    from tele.vif.connect import ENV_ENABLE, NetworkOptions

    options = NetworkOptions.from_env()
    options.enabled = options.enabled or request.vif
    # TELE_VIF=0: never by default (the test suite sets it: no test may touch the host's
    # routes or resolver by forgetting --no-vif).
    options.when_possible = request.vif_when_possible and os.environ.get(ENV_ENABLE) != "0"
    options.dial_timeout = float(cfg.timeouts.proxy_dial)
    return options


def _check_same_proxy_via(asked: api.ConnectRequest, current: api.ConnectRequest) -> None:
    """Connecting again with other --proxy-via routes would do nothing: say so (without the
    flag, connecting again keeps the session's routes, as `tele list` connecting on demand)."""
    wanted, have = sorted(set(asked.proxy_via)), sorted(set(current.proxy_via))
    if wanted and wanted != have:
        now = f"with --proxy-via {', '.join(have)}" if have else "without --proxy-via"
        raise RpcError(
            Code.FAILED_PRECONDITION,
            f"Already connected {now}; run `tele quit` and connect again to route "
            f"{', '.join(wanted)}.",
        )


# accept() errors that mean "out of resources for now": wait and retry rather than die.
_RETRYABLE_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_DELAY = 0.1


def _failure_text(exc: BaseException) -> str:
    """Why a session ended, in one sentence for `tele status` (the traceback is in the log)."""
    if isinstance(exc, BaseExceptionGroup):
        ours, _ = exc.split(TeleError)
        exc = first_leaf(ours if ours is not None else exc)
    if isinstance(exc, TeleError):
        return str(exc)
    return f"the session failed unexpectedly ({type(exc).__name__}); see the daemon log"


class Daemon:
    """The daemon's state and its RPC handlers; `serve` runs the listener until cancelled."""

    def __init__(
        self,
        *,
        listener: trio.SocketListener,
        socket_path: Path,
        pid_path: Path,
        log_file: Path,
        log_level: LogLevelController,
        max_message_size: int,
    ) -> None:
        self.listener = listener
        self.socket_path = socket_path
        self.pid_path = pid_path
        self.log_file = log_file
        self.log_level = log_level
        self.max_message_size = max_message_size
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self.quit_requested = trio.Event()
        self._open_connections = 0
        self._idle = trio.Event()
        self._idle.set()
        self.router = Router()
        self.router.unary(api.VERSION, self.version)
        self.router.unary(api.STATUS, self.status)
        self.router.unary(api.QUIT, self.quit)
        self.router.unary(api.SET_LOG_LEVEL, self.set_log_level)
        self.router.unary(api.CONNECT, self.connect)
        self.router.unary(api.DISCONNECT, self.disconnect)
        self.router.unary(api.LIST, self.list_workloads)
        self.router.unary(api.INTERCEPT, self.intercept)
        self.router.unary(api.LEAVE, self.leave)
        self.router.unary(api.UNINSTALL, self.uninstall)
        self.router.unary(api.CLUSTER_LOG_SOURCES, self.cluster_log_sources)
        self.router.unary(api.CLUSTER_LOG, self.cluster_log)
        self.router.unary(api.PROGRESS, self.progress)
        self.session: ClusterSession | None = None
        self._connecting = trio.Lock()
        """One connect at a time: a second waits, then finds the first's session."""
        self._failed: api.ConnectionInfo | None = None
        """The last session that failed after it had started (for status, until a connect)."""
        self._helper: HelperPrivileges | None = None
        """A privileged helper that connected for the next session's network."""
        self._sessions: trio.Nursery | None = None
        self._session_ended = trio.Event()
        self._session_ended.set()

    # -- handlers ---------------------------------------------------------------------------

    async def version(self, request: api.Empty) -> api.VersionReply:
        return api.VersionReply(
            version=tele.__version__, python=platform.python_version(), pid=os.getpid()
        )

    async def status(self, request: api.Empty) -> api.StatusReply:
        return api.StatusReply(
            version=tele.__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            uptime=time.monotonic() - self._started_monotonic,
            log_file=str(self.log_file),
            socket=str(self.socket_path),
            log_level=self.log_level.current,
            connection=self.session.status if self.session else "not connected",
            session=self.session.info() if self.session else self._failed,
        )

    async def quit(self, request: api.Empty) -> api.QuitReply:
        # Stop being reachable before replying, so that a CLI that got the reply never finds
        # the old socket; the process exits once the reply is out (see `serve_until_quit`).
        log.info("quit requested")
        ended = sorted(self.session.engagements.engaged) if self.session else []
        await self.end_session()
        await self.stop_listening()
        self.quit_requested.set()
        return api.QuitReply(pid=os.getpid(), ended=ended)

    async def set_log_level(self, request: api.SetLogLevelRequest) -> api.SetLogLevelReply:
        try:
            level = parse_log_level(request.level)
        except ValueError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"Unknown log level: {exc}.") from None
        if not math.isfinite(request.duration) or request.duration < 0:
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"The duration must be zero or more seconds, not {request.duration}.",
            )
        remote, problem = None, ""
        if request.remote:
            if self.session is None:
                if not request.local:
                    raise RpcError(
                        Code.FAILED_PRECONDITION, "Not connected; run `tele connect` first."
                    )
                # (nothing to reach: the daemon's level alone, as asked when not connected)
            else:
                try:
                    remote = await self.session.call_in_session(
                        mapi.SET_LOG_LEVEL,
                        lambda session_id: mapi.LogLevelRequest(
                            session_id=session_id, level=str(level), duration=request.duration
                        ),
                    )
                except RpcError as exc:
                    problem = exc.message
            if problem and not request.local:
                raise RpcError(Code.FAILED_PRECONDITION, problem)
        previous, revert_in = "", None
        if request.local:
            previous = self.log_level.set(level, request.duration)
            revert_in = self.log_level.revert_in()
        return api.SetLogLevelReply(
            level=str(level),
            previous=previous,
            revert_to=self.log_level.configured if revert_in is not None else None,
            revert_in=revert_in,
            traffic_manager=remote,
            remote_problem=problem,
        )

    async def connect(self, request: api.ConnectRequest) -> api.ConnectionInfo:
        # Checking for a session and starting one spans awaits: two `tele connect` at once
        # would both start one. The second waits here and gets the first's session (or, when
        # the first failed, its own attempt).
        async with self._connecting:
            return await self._connect(request)

    async def _connect(self, request: api.ConnectRequest) -> api.ConnectionInfo:
        if self.session is not None:
            current = self.session.info()
            wanted_context = request.context or current.kube_context
            if wanted_context == current.kube_context and (
                not request.namespace or request.namespace == current.namespace
            ):
                _check_same_proxy_via(request, self.session.request)
                return current  # already connected there: connecting again is a no-op
            if wanted_context == current.kube_context:
                differs = (
                    f"in namespace {current.namespace}, not {request.namespace}; name another "
                    "namespace per command with -n, or run `tele quit` and connect again"
                )
            else:
                differs = f"not {wanted_context}; run `tele quit` first"
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"Already connected to context {current.kube_context} {differs}.",
            )
        if self._sessions is None:
            raise RpcError(Code.UNAVAILABLE, "the daemon is shutting down")
        self._failed = None
        try:
            info: api.ConnectionInfo = await self._sessions.start(self._run_session, request)
        except* UserError as group:
            raise RpcError(Code.FAILED_PRECONDITION, str(first_leaf(group))) from None
        except* TeleError as group:  # not UNAVAILABLE: the CLI would read it as a lost daemon
            raise RpcError(Code.ABORTED, str(first_leaf(group))) from None
        finally:
            # A helper the session did not use (no network wanted, or connecting failed
            # first) must not wait as root for a next time: it exits on end of file.
            self._drop_helper()
        return info

    # -- the privileged helper --------------------------------------------------------------

    def attach_helper(self, helper: HelperPrivileges) -> None:
        """A helper connected (tele connect started it for the coming session)."""
        self._drop_helper()
        self._helper = helper

    def take_helper(self) -> HelperPrivileges | None:
        helper, self._helper = self._helper, None
        return helper

    def _drop_helper(self) -> None:
        helper = self.take_helper()
        if helper is not None:
            helper.hang_up()

    async def _run_session(
        self,
        request: api.ConnectRequest,
        *,
        task_status: trio.TaskStatus[api.ConnectionInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from tele import config
        from tele.k8s.client import open_kube_client

        cfg = config.load()
        self._session_ended = trio.Event()
        session: ClusterSession | None = None
        try:
            async with open_kube_client(
                request.kubeconfig or None, request.context or None
            ) as kube:
                session = ClusterSession(
                    request,
                    kube,
                    settings=cfg,
                    network=_network_options(request, cfg),
                    take_helper=self.take_helper,
                )
                self.session = session
                await session.run(task_status=task_status)
        except Exception as exc:
            if session is None or not session.started:
                raise  # the connect call reports it
            log.exception("the cluster session failed")
            self._failed = msgspec.structs.replace(
                session.info(),
                status="failed",
                last_error=_failure_text(exc),
                ended_at=time.time(),
            )
        finally:
            self.session = None
            self._session_ended.set()

    async def disconnect(self, request: api.Empty) -> api.Empty:
        self._failed = None
        await self.end_session()
        return api.Empty()

    async def end_session(self) -> None:
        """Depart and stop the cluster session, if any; returns once it is gone."""
        session = self.session
        if session is not None:
            await session.disconnect()
            with trio.move_on_after(5):
                await self._session_ended.wait()

    def _connected(self) -> ClusterSession:
        if self.session is None:
            raise RpcError(Code.FAILED_PRECONDITION, "Not connected; run `tele connect` first.")
        return self.session

    async def intercept(self, request: api.InterceptRequest) -> EngagementInfo:
        try:
            return await self._connected().engage(request)
        except RpcError:
            raise  # the manager's answer, as it is
        except UserError as exc:
            raise RpcError(Code.FAILED_PRECONDITION, str(exc)) from None
        except TeleError as exc:  # not UNAVAILABLE: the CLI would read it as a lost daemon
            raise RpcError(Code.ABORTED, str(exc)) from None

    async def leave(self, request: api.LeaveRequest) -> api.Empty:
        try:
            await self._connected().leave(request.name)
        except UserError as exc:
            raise RpcError(Code.NOT_FOUND, str(exc)) from None
        return api.Empty()

    async def uninstall(self, request: api.UninstallRequest) -> UninstallReply:
        session = self._connected()
        return await session.call_in_session(
            UNINSTALL,
            lambda session_id: AgentUninstall(
                session_id=session_id,
                namespace=request.namespace or session.namespace,
                workloads=list(request.workloads),
                all_agents=request.all_agents,
            ),
        )

    async def progress(self, request: api.Empty) -> api.ProgressReply:
        steps = []
        if self._connecting.locked() and self.session is None:
            steps.append("connecting to the cluster's traffic manager")
        if self.session is not None:
            steps += list(self.session.engagements.steps.values())
        return api.ProgressReply(steps=steps)

    async def cluster_log_sources(self, request: api.ClusterLogsRequest) -> mapi.LogSources:
        return await self._connected().call_in_session(
            mapi.LOG_SOURCES,
            lambda session_id: mapi.LogSourcesRequest(
                session_id=session_id,
                traffic_manager=request.traffic_manager,
                traffic_agents=request.traffic_agents,
            ),
        )

    async def cluster_log(self, request: mapi.LogSource) -> mapi.PodLog:
        return await self._connected().call_in_session(
            mapi.POD_LOG,
            lambda session_id: mapi.PodLogRequest(session_id=session_id, source=request),
        )

    async def list_workloads(self, request: api.ListRequest) -> WorkloadList:
        session = self._connected()
        return await session.call_in_session(
            LIST_WORKLOADS,
            lambda session_id: WorkloadsRequest(
                session_id=session_id, namespace=request.namespace or session.namespace
            ),
        )

    async def run_sessions(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The nursery that cluster sessions live in (a sibling of the RPC server)."""
        async with trio.open_nursery() as nursery:
            self._sessions = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._sessions = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def stop_listening(self) -> None:
        """Close the listener and remove the socket and pid files (idempotent).

        Safe only while this process holds the daemon lock: nobody else can own those paths.
        """
        await self.listener.aclose()
        for path in (self.socket_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def connections_closed(self) -> None:
        """Wait until no client connection is open."""
        while self._open_connections:
            await self._idle.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until the listener closes; serve each on its own task."""
        async with trio.open_nursery() as connections:
            task_status.started()
            while True:
                try:
                    stream = await self.listener.accept()
                except trio.ClosedResourceError:
                    return  # quit closed the listener; open connections finish on their own
                except OSError as exc:
                    if exc.errno not in _RETRYABLE_ACCEPT_ERRNOS:
                        raise
                    log.warning("accept failed (%s); retrying", os.strerror(exc.errno))
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                try:
                    peer = unixsock.peer_credentials(stream.socket)
                except Exception:
                    log.exception("cannot read a client's credentials; closing it")
                    await trio.aclose_forcefully(stream)
                    continue
                if not unixsock.peer_is_trusted(peer.uid):
                    log.warning(
                        "refused a connection from pid %d uid %d (not this user)",
                        peer.pid,
                        peer.uid,
                    )
                    await trio.aclose_forcefully(stream)
                    continue
                connections.start_soon(self._serve_connection, stream, peer)

    async def _serve_connection(
        self, stream: trio.SocketStream, peer: unixsock.PeerCredentials
    ) -> None:
        if self._open_connections == 0:
            self._idle = trio.Event()
        self._open_connections += 1
        log.debug("client pid %d connected", peer.pid)
        try:
            await serve_connection(stream, self.router, max_message_size=self.max_message_size)
        except Exception:
            # One broken client must not take the daemon down.
            log.exception("connection from pid %d failed", peer.pid)
        finally:
            await trio.aclose_forcefully(stream)
            self._open_connections -= 1
            if self._open_connections == 0:
                self._idle.set()
            log.debug("client pid %d disconnected", peer.pid)
