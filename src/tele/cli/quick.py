"""Blocking unary calls to the running daemon, for the commands that must answer fast.

`tele status`, `tele version` and `tele quit` only ask an already running daemon one small
question. Importing trio costs ~0.17 s on the reference machine, more than half of the 0.3 s
budget of `tele status`, so these calls speak the same wire format (tele.rpc.wire: one h2
stream, a JSON request, a JSON reply, status trailers) over a blocking socket with h2 directly.
Everything that starts the daemon, streams or runs long uses the trio client (tele.rpc.client).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import h2.config
import h2.events
import h2.exceptions
import msgspec

from tele import paths, unixsock
from tele.errors import ConnectionFailed, TeleError, UserError
from tele.net.h2conn import Connection
from tele.rpc import wire
from tele.rpc.errors import Code, RpcError
from tele.rpc.method import Unary

Req = TypeVar("Req", bound=msgspec.Struct)
Resp = TypeVar("Resp", bound=msgspec.Struct)

_MAX_REQUEST = 16 * 1024  # fits one DATA frame in the initial window: no flow-control dance


class DaemonNotRunning(Exception):
    """Nothing listens on the daemon's socket (absent, or left stale by a killed daemon)."""


def ask_daemon(method: Unary[Req, Resp], request: Req, *, timeout: float = 5.0) -> Resp | None:
    """Call the running daemon; None when none runs. Failures become one-sentence TeleErrors."""
    try:
        return call(paths.daemon_socket(), method, request, timeout=timeout)
    except DaemonNotRunning:
        return None
    except RpcError as exc:
        raise translate(exc) from exc


def translate(exc: RpcError) -> TeleError:
    """An RPC failure -> the CLI's error: bad input is the user's, the rest is the connection's."""
    if exc.code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS):
        return UserError(exc.message)
    if exc.code == Code.FAILED_PRECONDITION:
        return UserError(exc.message)
    if exc.code == Code.UNAVAILABLE:
        return ConnectionFailed(f"Lost the connection to the daemon: {exc.message.rstrip('.')}.")
    if exc.code == Code.DEADLINE_EXCEEDED:
        return ConnectionFailed("The daemon did not answer in time.")
    if exc.code in (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED):
        # The traffic manager's refusal, relayed by the daemon: its sentence as it is (it often
        # starts with the user's name, which keeps its case).
        text = exc.message.rstrip(".") + "."
        return UserError(text) if exc.code == Code.PERMISSION_DENIED else ConnectionFailed(text)
    if exc.code == Code.ABORTED:  # the daemon relays a failure of the cluster side
        return ConnectionFailed(sentence(exc.message))
    return ConnectionFailed(f"The daemon failed: {exc.message.rstrip('.')}.")


def sentence(text: str) -> str:
    """`text` with a capital first letter and a final period, each added only when missing."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def wait_process_gone(pid: int, timeout: float) -> bool:
    """Poll until process `pid` has exited (or is a zombie); False if it outlives `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        # An exited process whose parent has not reaped it yet is gone for our purposes.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def connect(path: Path, timeout: float) -> socket.socket:
    """A blocking socket to the daemon at `path`, its peer checked; DaemonNotRunning if none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        with unixsock.addressable(path) as address:
            sock.connect(address)
        peer = unixsock.peer_credentials(sock)
        if not unixsock.peer_is_trusted(peer.uid):
            raise ConnectionFailed(
                f"The process listening on {path} belongs to uid {peer.uid}, not to you; "
                "remove that socket and try again."
            )
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise DaemonNotRunning(str(path)) from None
    except TimeoutError:
        sock.close()
        raise ConnectionFailed(f"The daemon's socket {path} does not answer.") from None
    except OSError as exc:
        sock.close()
        raise ConnectionFailed(f"Cannot connect to the daemon at {path}: {exc.strerror}.") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def call(
    path: Path,
    method: Unary[Req, Resp],
    request: Req,
    *,
    timeout: float = 5.0,
    max_message_size: int = wire.DEFAULT_MAX_MESSAGE,
) -> Resp:
    """One unary call on a fresh connection. Raises DaemonNotRunning when no daemon listens,
    RpcError with the handler's code, or RpcError(UNAVAILABLE | DEADLINE_EXCEEDED)."""
    deadline = time.monotonic() + timeout
    with connect(path, timeout) as sock:
        try:
            return _call_on(sock, method, request, deadline, max_message_size)
        except TimeoutError:
            raise RpcError(
                Code.DEADLINE_EXCEEDED, f"{method.path} did not answer in time"
            ) from None
        except OSError as exc:
            raise RpcError(Code.UNAVAILABLE, f"connection to the daemon lost: {exc}") from None
        except h2.exceptions.H2Error as exc:
            raise RpcError(Code.UNAVAILABLE, f"the daemon broke the protocol: {exc}") from None


def _call_on(
    sock: socket.socket,
    method: Unary[Req, Resp],
    request: Req,
    deadline: float,
    max_message_size: int,
) -> Resp:
    body = msgspec.json.encode(request)
    if len(body) > _MAX_REQUEST:
        raise ValueError(f"request of {len(body)} bytes is too large for a quick call")
    conn = Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, wire.request_headers(method.path, deadline - time.monotonic()))
    conn.send_data(stream_id, body, end_stream=True)
    sock.sendall(conn.data_to_send())

    headers: list[tuple[str, str]] = []
    trailers: list[tuple[str, str]] | None = None
    reply = bytearray()
    ended = False
    while not ended:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise RpcError(Code.UNAVAILABLE, "the daemon closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                headers = _decoded(event.headers)
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                reply += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                if len(reply) > max_message_size + 1:
                    raise RpcError(Code.RESOURCE_EXHAUSTED, "the daemon's reply is too large")
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = _decoded(event.headers)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                ended = True
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                raise RpcError(Code.UNAVAILABLE, "the daemon reset the call")
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise RpcError(Code.UNAVAILABLE, "the daemon closed the connection")
        pending = conn.data_to_send()
        if pending:
            sock.sendall(pending)
    conn.close_connection()
    sock.sendall(conn.data_to_send())

    if dict(headers).get(":status") != "200":
        status_line = dict(headers).get(":status")
        raise RpcError(Code.UNAVAILABLE, f"the daemon answered HTTP status {status_line}")
    status = wire.parse_status(trailers if trailers is not None else headers)
    if status is None:
        raise RpcError(Code.INTERNAL, f"{method.path}: the daemon ended the call without a status")
    code, message = status
    if code is not Code.OK:
        raise RpcError(code, message)
    document = bytes(reply).split(b"\n", 1)[0]
    try:
        return msgspec.json.decode(document, type=method.response)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RpcError(Code.INTERNAL, f"malformed reply from the daemon: {exc}") from None


def _decoded(headers: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    return [
        (
            name.decode() if isinstance(name, bytes) else name,
            value.decode() if isinstance(value, bytes) else value,
        )
        for name, value in headers
    ]
