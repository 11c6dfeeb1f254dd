"""The node's API subresources: `pods/log` (HTTP, with follow), and over websocket (channel
framing v4/v5.channel.k8s.io) `pods/exec`, `pods/attach` and `pods/portforward`; registered on
the API app by `serve_node`."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tele.sandbox.apiserver.app import ASGIReceive, ASGISend, Request, cancel_on_disconnect
from tele.sandbox.apiserver.errors import StatusError, bad_request
from tele.sandbox.network import netns

from .kubelet import ContainerRun, Kubelet, PodWorker
from .logs import render, tail

log = logging.getLogger(__name__)

PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "channel.k8s.io")


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("true", "1")


class NodeHandlers:
    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet

    async def log(self, req: Request, receive: ASGIReceive, send: ASGISend) -> None:
        if req.scope.get("type") != "http":
            await _refuse_websocket(receive, send)
            return
        pod = self.kubelet.api.store.get("/pods", req.namespace, req.name)
        if pod is None:
            raise StatusError(
                404,
                "NotFound",
                f'pods "{req.name}" not found',
                details={"name": req.name, "kind": "pods"},
            )
        names = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        inits = [c["name"] for c in (pod.get("spec") or {}).get("initContainers") or []]
        container = req.query.get("container", "")
        if not container:
            if len(names) != 1:
                raise bad_request(
                    f"a container name must be specified for pod {req.name}, choose one of: "
                    f"[{' '.join(names)}]"
                    + (f" or one of the init containers: [{' '.join(inits)}]" if inits else "")
                )
            container = names[0]
        if container not in names + inits:
            raise bad_request(f"container {container} is not valid for pod {req.name}")
        worker = self.kubelet.worker_for(req.namespace, req.name)
        run = worker.run_named(container) if worker is not None else None
        previous = _flag(req.query, "previous")
        if run is None or not run.logs:
            reason = "ContainerCreating"
            if run is not None and "waiting" in run.state:
                reason = run.state["waiting"].get("reason", reason)
            raise bad_request(
                f'container "{container}" in pod "{req.name}" is waiting to start: {reason}'
            )
        if previous:
            if len(run.logs) < 2:
                raise bad_request(
                    f'previous terminated container "{container}" in pod "{req.name}" not found'
                )
            logfile = run.logs[-2]
        else:
            logfile = run.logs[-1]
        timestamps = _flag(req.query, "timestamps")
        tail_lines = int(req.query["tailLines"]) if req.query.get("tailLines") else None
        limit = int(req.query["limitBytes"]) if req.query.get("limitBytes") else None
        follow = _flag(req.query, "follow") and not previous
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"cache-control", b"no-cache, private"),
                ],
            }
        )
        raw = logfile.path.read_bytes()
        offset = len(raw)
        body = render(tail(raw, tail_lines), timestamps=timestamps)
        sent = 0
        if limit is not None:
            body = body[:limit]
        sent += len(body)
        await send({"type": "http.response.body", "body": body, "more_body": follow})
        if not follow:
            return
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, receive, scope)
                while not logfile.closed and (limit is None or sent < limit):
                    changed = logfile.changed
                    await changed.wait()
                    with logfile.path.open("rb") as f:
                        f.seek(offset)
                        new = f.read()
                    offset += len(new)
                    # Only whole lines were written, so the split never cuts a line.
                    chunk = render(new, timestamps=timestamps)
                    if limit is not None:
                        chunk = chunk[: limit - sent]
                    sent += len(chunk)
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                nursery.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def portforward(self, req: Request, receive: ASGIReceive, send: ASGISend) -> None:
        scope = req.scope
        if scope.get("type") != "websocket":
            raise _upgrade_required("portforward")
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
        ports: list[int] = []
        try:
            for value in query.get("ports", []):
                ports += [int(p) for p in value.split(",") if p]
        except ValueError:
            ports = []
        offered = list(scope.get("subprotocols") or [])
        protocol = next((p for p in PORTFORWARD_PROTOCOLS if p in offered), None)
        worker = self.kubelet.worker_for(req.namespace, req.name)
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not ports or protocol is None or worker is None or not worker.netns:
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept", "subprotocol": protocol})
        streams: dict[int, trio.SocketStream] = {}
        for i, port in enumerate(ports):
            prefix = port.to_bytes(2, "little")
            await send({"type": "websocket.send", "bytes": bytes([2 * i]) + prefix})
            await send({"type": "websocket.send", "bytes": bytes([2 * i + 1]) + prefix})
            try:
                streams[i] = await netns.connect_in(worker.netns, "127.0.0.1", port)
            except OSError as exc:
                text = (
                    f"error forwarding port {port} to pod {worker.uid}, uid : failed to connect to "
                    f'localhost:{port} inside namespace "{worker.netns}", IPv4: dial tcp4 '
                    f"127.0.0.1:{port}: connect: {(exc.strerror or str(exc)).lower()} "
                )
                await send({"type": "websocket.send", "bytes": bytes([2 * i + 1]) + text.encode()})
        if not streams:
            await send({"type": "websocket.close", "code": 1000})
            return
        opened = list(streams.values())
        send_lock = trio.Lock()

        async def pod_to_client(i: int, stream: trio.SocketStream) -> None:
            try:
                # 256 KiB reads: one websocket message per read, and a message's fixed cost
                # (hypercorn, wsproto) is most of this hop's CPU on a bulk stream.
                while data := await stream.receive_some(262144):
                    async with send_lock:
                        await send({"type": "websocket.send", "bytes": bytes([2 * i]) + data})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            streams.pop(i, None)
            if not streams:
                nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for i, stream in list(streams.items()):
                    nursery.start_soon(pod_to_client, i, stream)
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        nursery.cancel_scope.cancel()
                        break
                    data: Any = message.get("bytes") or (message.get("text") or "").encode()
                    if not data:
                        continue
                    channel, payload = data[0], data[1:]
                    target = streams.get(channel // 2)
                    if channel % 2 == 0 and target is not None and payload:
                        try:
                            await target.send_all(payload)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            streams.pop(channel // 2, None)
        finally:
            for stream in opened:
                await trio.aclose_forcefully(stream)
        try:
            await send({"type": "websocket.close", "code": 1000})
        except Exception:  # the client may be gone already
            log.debug("port-forward close after disconnect", exc_info=True)


def _upgrade_required(what: str) -> StatusError:
    # SPDY upgrades are taken by the API server (apiserver/spdystreaming.py) when they open a
    # connection, as Go clients do; one that comes later on a kept-alive connection ends here.
    return bad_request(
        f"{what} needs a websocket upgrade, or SPDY/3.1 as the first request of a connection"
    )


async def _refuse_websocket(receive: ASGIReceive, send: ASGISend) -> None:
    if (await receive())["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008})


EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")


def _exit_status(code: int) -> bytes:
    if code == 0:
        return json.dumps({"metadata": {}, "status": "Success"}).encode()
    return json.dumps(
        {
            "metadata": {},
            "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    ).encode()


@dataclass
class _ChannelSession:
    """An accepted `pods/exec` or `pods/attach` websocket: the request's query, the pod's
    worker and the container run it names, and channel-framed output, one message at a time."""

    what: str
    query: dict[str, list[str]]
    worker: PodWorker
    run: ContainerRun
    send: ASGISend
    lock: trio.Lock = field(default_factory=trio.Lock)

    async def out(self, channel: int, data: bytes) -> None:
        async with self.lock:
            await self.send({"type": "websocket.send", "bytes": bytes([channel]) + data})

    async def close(self) -> None:
        try:
            await self.send({"type": "websocket.close", "code": 1000})
        except Exception:  # the client may be gone already
            log.debug("%s close after disconnect", self.what, exc_info=True)


async def _websocket_target(
    kubelet: Kubelet,
    req: Request,
    receive: ASGIReceive,
    send: ASGISend,
    what: str,
    *,
    usable: Callable[[dict[str, list[str]], ContainerRun], bool],
) -> _ChannelSession | None:
    """The set-up `pods/exec` and `pods/attach` share: a websocket upgrade (plain HTTP is
    refused), a channel protocol both sides speak, the pod's worker and the container named
    by `?container=` (its first when none), which `usable` accepts for this request. The
    accepted session; None when the client left before connecting, or when something is
    missing (the websocket is closed with 1008 then)."""
    if req.scope.get("type") != "websocket":
        raise _upgrade_required(what)
    query = urllib.parse.parse_qs(req.scope.get("query_string", b"").decode())
    offered = list(req.scope.get("subprotocols") or [])
    protocol = next((p for p in EXEC_PROTOCOLS if p in offered), None)
    worker = kubelet.worker_for(req.namespace, req.name)
    message = await receive()
    if message["type"] != "websocket.connect":
        return None
    container = (query.get("container") or [""])[0]
    run = worker.run_named(container) if worker is not None else None
    if protocol is None or worker is None or run is None or not usable(query, run):
        await send({"type": "websocket.close", "code": 1008})
        return None
    await send({"type": "websocket.accept", "subprotocol": protocol})
    return _ChannelSession(what, query, worker, run, send)


async def exec_handler(
    kubelet: Kubelet, req: Request, receive: ASGIReceive, send: ASGISend
) -> None:
    """`pods/exec` over websocket: stdin on channel 0, stdout 1, stderr 2, the exit Status on 3;
    v5 adds channel 255 for the client's end of stdin. No TTY."""
    target = await _websocket_target(
        kubelet,
        req,
        receive,
        send,
        "exec",
        usable=lambda query, run: bool(query.get("command")) and run.proc is not None,
    )
    if target is None:
        return
    query, worker, run, out = target.query, target.worker, target.run, target.out
    command = query["command"]
    try:
        proc = await worker.spawn_exec(run, command)
    except OSError as exc:
        await out(
            3,
            _exit_status(126)
            if not exc.strerror
            else json.dumps(
                {"metadata": {}, "status": "Failure", "message": exc.strerror}
            ).encode(),
        )
        await target.close()
        return
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin
    want_stdin = (query.get("stdin") or ["false"])[0] == "true"
    if not want_stdin:
        await stdin.aclose()

    async def pump(stream: trio.abc.ReceiveStream, channel: int) -> None:
        try:
            while data := await stream.receive_some(65536):
                await out(channel, bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def from_client() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                worker.kill_exec(proc)
                return
            data: Any = msg.get("bytes") or b""
            if not data:
                continue
            if data[0] == 0 and want_stdin and len(data) > 1:
                try:
                    await stdin.send_all(data[1:])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            elif data[0] == 255 and len(data) > 1 and data[1] == 0:
                await stdin.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(from_client)
        async with trio.open_nursery() as pumps:
            pumps.start_soon(pump, proc.stdout, 1)
            pumps.start_soon(pump, proc.stderr, 2)
        code = await proc.wait()
        worker.forget_exec(proc)
        await out(3, _exit_status(code if code >= 0 else 128 - code))
        nursery.cancel_scope.cancel()
    await target.close()


async def attach_handler(
    kubelet: Kubelet, req: Request, receive: ASGIReceive, send: ASGISend
) -> None:
    """`pods/attach` over websocket: the running container's own stdio, as a kubelet serves
    it. Output from now on goes to channel 1 (a tty's and a pipe's stdout and stderr are one
    stream here: the runtime merges them, as it does for the log); channel 0 writes to the
    container's stdin when its spec has `stdin: true` (closed after the first session when
    `stdinOnce`), channel 4 resizes its tty; the Status on channel 3 once the container ends."""
    target = await _websocket_target(
        kubelet,
        req,
        receive,
        send,
        "attach",
        usable=lambda query, run: run.proc is not None and run.proc.returncode is None,
    )
    if target is None:
        return
    query, run, out = target.query, target.run, target.out

    def flag(name: str) -> bool:
        return (query.get(name) or ["false"])[-1].lower() in ("true", "1")

    output = run.attach()
    want_output = flag("stdout") or flag("stderr")
    want_stdin = flag("stdin") and bool(run.spec.get("stdin"))
    run.attach_sessions += 1
    first_session = run.attach_sessions == 1

    def end_stdin() -> None:
        if run.spec.get("stdinOnce") and first_session and run.stdin is not None:
            stdin, run.stdin = run.stdin, None
            # A pty's master is also the output: only a pipe is closed (a tty gets EOF).
            if run.pty is None:
                stdin_closer.start_soon(trio.aclose_forcefully, stdin)
            else:
                stdin_closer.start_soon(stdin.send_all, b"\x04")

    async def to_client() -> None:
        async with output:
            async for chunk in output:
                if want_output:
                    await out(1, chunk)
        await out(3, _exit_status(0))
        done.cancel()

    async def from_client() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                done.cancel()
                return
            data: Any = msg.get("bytes") or b""
            if not data:
                continue
            if data[0] == 0 and want_stdin and len(data) > 1 and run.stdin is not None:
                try:
                    await run.stdin.send_all(data[1:])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            elif data[0] == 255 and len(data) > 1 and data[1] == 0 and want_stdin:
                end_stdin()
            elif data[0] == 4:
                try:
                    size = json.loads(bytes(data[1:]))
                    width, height = int(size["Width"]), int(size["Height"])
                except (ValueError, TypeError, KeyError, OverflowError):
                    continue
                if 0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF:  # a winsize's fields
                    run.resize(width, height)

    async with trio.open_nursery() as stdin_closer:
        with trio.CancelScope() as done:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(to_client)
                nursery.start_soon(from_client)
        if want_stdin:
            end_stdin()
    await target.close()
