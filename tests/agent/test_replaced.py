"""An agent whose container is replaced: one engagement takes several ports, and with no
engagement a connection is reset — never relayed to the (absent) app, even if something
listens on the app's port."""

from __future__ import annotations

from functools import partial

import msgspec
import pytest
import trio

from tele.agent.engagements import StaticEngagements
from tele.agent.forward import serve
from tele.rpc.agent_api import Engagement
from tests.agent.servers import settings_for, start_tcp_server

PORTS = (18080, 18081)  # agent ports of the config; served on listeners the test binds


async def test_a_replaced_container_has_only_its_engagement() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")  # the app's port, if it were there
            handler = await start_tcp_server(nursery, "handler")
            base = settings_for(app.port)
            [container] = base.config.containers
            [intercept] = container.intercepts
            replaced = msgspec.structs.replace(
                container,
                replace=True,
                intercepts=[msgspec.structs.replace(intercept, agent_port=p) for p in PORTS],
            )
            settings = msgspec.structs.replace(
                base, config=msgspec.structs.replace(base.config, containers=[replaced])
            )
            listeners = {p: await trio.open_tcp_listeners(0, host="127.0.0.1") for p in PORTS}
            real = {p: ls[0].socket.getsockname()[1] for p, ls in listeners.items()}
            engagement = Engagement(
                id="r1", container="echo", agent_port=PORTS[0], agent_ports=[PORTS[1]]
            )
            source = StaticEngagements([engagement], handlers={"r1": ("127.0.0.1", handler.port)})
            await nursery.start(partial(serve, listeners=listeners), settings, source)

            for port in PORTS:
                stream = await trio.open_tcp_stream("127.0.0.1", real[port])
                async with stream:
                    assert await stream.receive_some() == b"handler:"
            source.set([])
            stream = await trio.open_tcp_stream("127.0.0.1", real[PORTS[0]])
            async with stream:
                with pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some()
            nursery.cancel_scope.cancel()
    assert (handler.connections, app.connections) == (2, 0)
