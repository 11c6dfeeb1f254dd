"""The daemon's side of a replaced serving pod (tele.daemon.engagements): once the manager
names another pod, `--to-pod` connections dial that pod, the volumes are mounted again, and
`tele status` says so; what does not concern a current engagement changes nothing."""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec
import trio
import trio.testing

from tele.daemon.engagements import LocalEngagements
from tele.net.tunnel import Destination, Protocol
from tele.rpc import agent_api as aapi

INFO = aapi.EngagementInfo(
    id="e1",
    name="echo",
    namespace="default",
    workload="echo",
    workload_kind="Deployment",
    container="app",
    service="echo",
    service_port=80,
    container_port=8080,
    mechanism="tcp",
    client="me@here",
    pod_ips=["10.244.0.5"],
    pod_name="echo-a",
    sftp_port=2222,
    mount_point="/tel_app_mounts/app",
    local_mount="/tmp/telfs-x",
)


class FakeMounts:
    """Mounts as the engagements use them; `during_remount` runs while one is under way."""

    def __init__(self) -> None:
        self.remounted: list[aapi.EngagementInfo] = []
        self.detached: list[str] = []
        self.during_remount: Any = None
        self.refusals = 0
        """How many remounts fail first (the agent's file server not taking connections yet)."""

    def mounted(self, engagement_id: str) -> bool:
        return engagement_id == "e1" and "e1" not in self.detached

    async def remount(self, info: aapi.EngagementInfo) -> aapi.EngagementInfo:
        self.remounted.append(info)
        if self.during_remount is not None:
            await self.during_remount()
        if len(self.remounted) <= self.refusals:
            return msgspec.structs.replace(info, local_mount="", mount_error="refused")
        return msgspec.structs.replace(info, environment={"TELEPRESENCE_ROOT": info.local_mount})

    async def detach(self, engagement_id: str) -> None:
        self.detached.append(engagement_id)


def _engagements() -> tuple[LocalEngagements, FakeMounts, list[Destination]]:
    dialed: list[Destination] = []

    async def dial(destination: Destination) -> Any:
        dialed.append(destination)
        return None

    mounts = FakeMounts()
    engagements = LocalEngagements(
        object(),  # type: ignore[arg-type]  # the lease: not used by these steps
        mounts,  # type: ignore[arg-type]
        namespace="default",
        dial=dial,
        dial_back=dial,  # type: ignore[arg-type]
    )
    engagements.engaged["echo"] = INFO
    return engagements, mounts, dialed


def _serving(**change: Any) -> aapi.ServingPod:
    fields: dict[str, Any] = {
        "engagement_id": "e1",
        "name": "echo",
        "pod_name": "echo-b",
        "pod_ips": ["10.244.0.9"],
        "sftp_port": 2222,
        "mount_point": "/tel_app_mounts/app",
        **change,
    }
    return aapi.ServingPod(**fields)


async def test_to_pod_dials_the_new_pod_and_the_volumes_are_mounted_again() -> None:
    engagements, mounts, dialed = _engagements()
    wanted = Destination(Protocol.TCP, ipaddress.ip_address("10.244.0.5"), 8080)
    await engagements._dial_serving_pod("echo", wanted)

    await engagements._serving_pod(_serving())
    await engagements._dial_serving_pod("echo", wanted)
    assert [(str(d.ip), d.port) for d in dialed] == [("10.244.0.5", 8080), ("10.244.0.9", 8080)]
    [remounted] = mounts.remounted
    assert (remounted.pod_name, remounted.pod_ips, remounted.local_mount) == (
        "echo-b",
        ["10.244.0.9"],
        "/tmp/telfs-x",
    )
    sentence = (
        "echo is served by pod echo-b (10.244.0.9) now: pod echo-a was replaced; its volumes "
        "are mounted again at /tmp/telfs-x"
    )
    [status] = engagements.statuses()
    assert (status.pod_name, status.pod_ips, status.pod_change) == (
        "echo-b",
        ["10.244.0.9"],
        sentence,
    )
    assert engagements.lines()[0].endswith(", volumes at /tmp/telfs-x, pod echo-b")


async def test_what_is_not_a_current_engagements_new_pod_changes_nothing() -> None:
    engagements, mounts, _ = _engagements()
    for serving in (
        _serving(pod_name="echo-a", pod_ips=["10.244.0.5"]),  # the same pod
        _serving(engagement_id="e0"),  # an engagement of that name that was left
        _serving(name="other"),
        _serving(pod_name=""),
    ):
        await engagements._serving_pod(serving)
    assert engagements.engaged["echo"] == INFO
    assert mounts.remounted == [] and engagements.pod_changes == {}


async def test_an_engagement_left_while_its_volumes_are_mounted_again_is_unmounted() -> None:
    engagements, mounts, _ = _engagements()

    async def left() -> None:
        await trio.lowlevel.checkpoint()
        engagements.engaged.pop("echo")

    mounts.during_remount = left
    await engagements._serving_pod(_serving())
    assert mounts.detached == ["e1"]
    assert "echo" not in engagements.engaged and engagements.pod_changes == {}


async def test_the_agent_arriving_again_in_the_same_pod_mounts_the_volumes_again() -> None:
    """The serving pod's agent restarted (the pod is the same, the manager's `agent` tag is
    new): the mount, which ended with the old agent's connection, is made again."""
    engagements, mounts, _ = _engagements()
    same = {"pod_name": "echo-a", "pod_ips": ["10.244.0.5"]}
    await engagements._serving_pod(_serving(agent="t1", **same))  # the first word: known now
    await engagements._serving_pod(_serving(agent="", **same))  # no agent up for a while
    assert mounts.remounted == [] and engagements.pod_changes == {}

    await engagements._serving_pod(_serving(agent="t2", sftp_port=2223, **same))
    [remounted] = mounts.remounted  # from the new agent's file server
    assert (remounted.pod_name, remounted.sftp_port, remounted.local_mount) == (
        "echo-a",
        2223,
        "/tmp/telfs-x",
    )
    [status] = engagements.statuses()
    assert status.pod_change == (
        "the traffic agent of echo in pod echo-a arrived again; its volumes are mounted again "
        "at /tmp/telfs-x"
    )
    assert engagements.engaged["echo"].environment == {"TELEPRESENCE_ROOT": "/tmp/telfs-x"}
    await engagements._serving_pod(_serving(agent="t2", sftp_port=2223, **same))  # the same
    assert len(mounts.remounted) == 1


async def test_every_change_of_the_serving_pod_is_kept_for_a_follower_to_say() -> None:
    """The pod is replaced, then its agent restarts, before `tele intercept -- COMMAND` looks
    again: the status holds both sentences, in order, and how many there were."""
    engagements, _, _ = _engagements()
    await engagements._serving_pod(_serving(agent="t1"))  # replaced by echo-b
    moved = engagements.pod_changes["echo"][-1]
    await engagements._serving_pod(_serving(agent="t2"))  # echo-b's agent arrived again
    [status] = engagements.statuses()
    assert status.pod_change_count == 2
    assert status.pod_changes == [
        moved,
        "the traffic agent of echo in pod echo-b arrived again; its volumes are mounted again "
        "at /tmp/telfs-x",
    ]
    assert status.pod_change == status.pod_changes[-1]
    assert moved.startswith("echo is served by pod echo-b (10.244.0.9) now")


async def test_a_file_server_not_taking_connections_yet_is_tried_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client may hear of the new agent before the agent's file server takes connections:
    the remount is tried again a second later."""
    engagements, mounts, _ = _engagements()
    mounts.refusals = 1
    await engagements._serving_pod(_serving())
    assert len(mounts.remounted) == 2
    assert engagements.pod_changes["echo"][-1].endswith(
        "; its volumes are mounted again at /tmp/telfs-x"
    )
    assert engagements.engaged["echo"].mount_error == ""
