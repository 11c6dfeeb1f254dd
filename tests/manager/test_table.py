"""tele.manager.table.EngagementTable without I/O: the conflict rules of ENGAGE (a replace
takes a container, a tcp intercept a port, http intercepts share a port when their filters
differ, ingests never conflict), names, ids, and what a session's end leaves."""

from __future__ import annotations

import msgspec
import pytest

from tele.contracts.agentconfig import Intercept
from tele.manager.table import EngagementTable, choose_ports
from tele.rpc import agent_api as aapi
from tele.rpc.errors import Code, RpcError

KEY = ("Deployment", "default", "api")
HTTP = Intercept(
    service_name="api",
    service_uid="u1",
    service_port=80,
    service_port_name="http",
    target_port_numeric=True,
    container_port=8080,
    agent_port=9900,
)
GRPC = Intercept(
    service_name="api",
    service_uid="u1",
    service_port=9090,
    target_port_numeric=True,
    container_port=9090,
    agent_port=9901,
)


def _request(session: str, **fields: object) -> aapi.EngageRequest:
    return aapi.EngageRequest(session_id=session, namespace="default", workload="api", **fields)  # type: ignore[arg-type]


def _engage(
    table: EngagementTable,
    session: str,
    *,
    name: str = "api",
    container: str = "app",
    chosen: list[Intercept] | None = None,
    **fields: object,
) -> aapi.EngagementInfo:
    request = _request(session, name=name, **fields)
    ports = [HTTP] if chosen is None else chosen
    assert table.existing(request, name) is None
    table.check_conflicts(KEY, container, ports, request)
    return table.activate(request, f"{session}@host", KEY, name, container, ports, [])


def _refused(table: EngagementTable, session: str, **fields: object) -> str:
    with pytest.raises(RpcError) as refused:
        _engage(table, session, **fields)
    assert refused.value.code is Code.ALREADY_EXISTS
    return refused.value.message


def test_a_tcp_intercept_takes_its_port_from_everyone_else() -> None:
    table = EngagementTable()
    _engage(table, "s1")
    assert _refused(table, "s2", name="other") == (
        "Port 80 of api is already engaged by s1@host (api)."
    )
    _engage(table, "s2", name="grpc", chosen=[GRPC])  # another port of the container is free


def test_http_intercepts_share_a_port_only_with_different_filters() -> None:
    table = EngagementTable()
    _engage(table, "s1", mechanism="http", headers=[("x-dev", "alice")])
    _engage(table, "s2", name="bob", mechanism="http", headers=[("x-dev", "bob")])
    message = _refused(table, "s3", name="carol", mechanism="http", headers=[("x-dev", "bob")])
    assert message == "Port 80 of api is already engaged by s2@host (bob)."


def test_a_replace_takes_the_whole_container_and_ingests_never_conflict() -> None:
    table = EngagementTable()
    _engage(table, "s1", kind="replace", chosen=[HTTP, GRPC])
    assert table.replaced_containers(KEY) == frozenset({"app"})
    message = _refused(table, "s2", name="grpc", chosen=[GRPC])
    assert message == "Container app of api is already replaced by s1@host (api)."
    _engage(table, "s2", name="api/app", kind="ingest", chosen=[])


def test_a_replace_being_prepared_refuses_the_container_already() -> None:
    table = EngagementTable()
    table.replacing[(KEY, "app")] = "s1@host"
    assert table.replaced_containers(KEY) == frozenset({"app"})  # the webhook sees it now
    assert _refused(table, "s2") == "Container app of api is being replaced by s1@host."


def test_names_are_a_sessions_own_and_engaging_again_is_idempotent() -> None:
    table = EngagementTable()
    info = _engage(table, "s1")
    assert table.existing(_request("s1", name="api"), "api") == info
    with pytest.raises(RpcError, match="You already have an intercept named api"):
        table.existing(_request("s1", name="api", kind="replace"), "api")
    with pytest.raises(RpcError, match="api is already engaged by s1@host"):
        table.existing(_request("s2", name="api"), "api")
    assert table.existing(_request("s2", name="api", kind="ingest"), "api") is None


def test_an_engagement_keeps_the_id_it_asks_for_when_free() -> None:
    ids = iter(["ffffffffffffffff"])
    table = EngagementTable(new_id=lambda: next(ids))
    first = _engage(table, "s1", engagement_id="0123456789abcdef")
    assert first.id == "0123456789abcdef"
    taken = _engage(table, "s2", name="grpc", chosen=[GRPC], engagement_id="0123456789abcdef")
    assert taken.id == "ffffffffffffffff"
    assert table.by_engagement_id("ffffffffffffffff") is not None


def test_a_sessions_end_removes_only_its_engagements() -> None:
    table = EngagementTable()
    _engage(table, "s1", kind="replace")
    _engage(table, "s2", name="api/app", kind="ingest", chosen=[])
    ended = table.end_session("s1")
    assert [(a.info.name, a.info.kind) for a in ended] == [("api", "replace")]
    assert table.replaced_containers(KEY) == frozenset()
    assert [a.info.name for a in table.of_workload(KEY)] == ["api/app"]
    assert table.leave("s2", "api/app") is not None
    assert table.leave("s2", "api/app") is None


def test_engaging_again_differently_is_refused_naming_the_engagement() -> None:
    """Issue 18 item 1: the same name with another filter, mechanism or port is not the
    existing engagement returned as if it were what was asked."""
    table = EngagementTable()
    ports = [aapi.EngagedPort(container_port=8080, service="api", service_port=80)]
    _engage(table, "s1", mechanism="tcp")
    active = table.active[("s1", "api")]
    active.info = msgspec.structs.replace(active.info, ports=ports)
    again = _request("s1", name="api", mechanism="http", headers=[("x-dev", "me")])
    with pytest.raises(RpcError) as refused:
        table.existing(again, "api")
    assert refused.value.code is Code.ALREADY_EXISTS
    assert refused.value.message == (
        "You already have intercept api (tcp, service port api:80) with another mechanism or "
        "filter; to change it, leave it first (`tele leave api`)."
    )
    with pytest.raises(RpcError, match="with another port;"):
        table.existing(_request("s1", name="api", port="9090"), "api")
    assert table.existing(_request("s1", name="api", port="80"), "api") is not None
    assert table.existing(_request("s1", name="api"), "api") is not None


class _Config:
    """An agent configuration's port table (all choose_ports reads of one)."""

    def __init__(self, *intercepts: Intercept) -> None:
        self._intercepts = intercepts

    def intercepts(self) -> list[tuple[str, Intercept]]:
        return [("app", i) for i in self._intercepts]

    def replaced(self) -> list[str]:
        return []


def test_a_port_that_matches_nothing_lists_the_service_ports() -> None:
    with pytest.raises(RpcError) as refused:
        choose_ports(_Config(HTTP, GRPC), _request("s1", port="8081"))  # type: ignore[arg-type]
    assert refused.value.code is Code.NOT_FOUND
    assert refused.value.message == (
        "api has no service port matching port 8081 "
        "(its service ports: api:http 80\u21928080, api:9090 9090\u21929090)."
    )


def test_the_container_port_is_accepted_when_one_service_port_leads_there() -> None:
    config = _Config(HTTP, GRPC)
    assert choose_ports(config, _request("s1", port="8080")) == ("app", [HTTP])  # type: ignore[arg-type]
    assert choose_ports(config, _request("s1", port="80")) == ("app", [HTTP])  # type: ignore[arg-type]


def test_wiretaps_take_nothing_and_several_clients_may_tap_one_port() -> None:
    table = EngagementTable()
    _engage(table, "s1")  # a tcp intercept of the port
    first = _engage(table, "s2", name="tap", kind=aapi.WIRETAP)
    second = _engage(table, "s3", name="tap", kind=aapi.WIRETAP)  # the same name: no conflict
    assert first.id != second.id and first.kind == second.kind == aapi.WIRETAP
    # ... and an intercept after them still gets the port (a wiretap took nothing away).
    _engage(table, "s4", name="grpc", chosen=[GRPC])
    taps = [a.engagement for a in table.of_workload(KEY) if a.engagement.kind == aapi.WIRETAP]
    assert [t.agent_port for t in taps] == [9900, 9900]
