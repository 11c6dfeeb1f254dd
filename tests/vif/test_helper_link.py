"""The daemon's `HelperPrivileges` against the helper's request loop (`tele.vif.helper.Helper`)
over a SOCK_SEQPACKET pair: descriptors arrive and work, routes change, the resolver is
pointed and restored, and Finish or a closed connection undoes everything. The helper loop runs
in a thread of this (root) test process; every change happens in the test's namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tele.vif import helper_proto as proto
from tele.vif.errors import RouteConflict, VifError
from tele.vif.helper import Helper
from tele.vif.helper_link import HelperPrivileges
from tele.vif.privileges import ResolverChange
from tele.vif.routing import DeviceConfig, parse_networks

from .conftest import Namespaces


def _routes(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "route"], capture_output=True, text=True, check=True
    ).stdout
    return [r["dst"] for r in json.loads(out or "[]")]


def _links(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "link"], capture_output=True, text=True, check=True
    ).stdout
    return [link["ifname"] for link in json.loads(out)]


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, timeout=10)


def _tun_of(fd: int) -> str:
    """The TUN device a descriptor is attached to (its fdinfo says `iff:`)."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("iff:"):
            return line.split()[1]
    return ""


class Pair:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.helper = Helper(theirs)
        self.thread = threading.Thread(target=self.helper.serve, daemon=True)
        self.thread.start()
        self.privileges = HelperPrivileges(trio.socket.from_stdlib_socket(ours), os.getpid())
        self._theirs = theirs

    def close(self) -> None:
        self.privileges.hang_up()
        self.thread.join(10)
        self._theirs.close()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    pair = Pair()
    try:
        yield pair
    finally:
        pair.close()


def _config(subnets: list[str]) -> DeviceConfig:
    return DeviceConfig(
        "tele0", ipaddress.ip_address("198.18.0.53"), 1500, parse_networks(subnets), []
    )


async def test_descriptors_routes_resolver_and_finish(netns: Namespaces, pair: Pair) -> None:
    etc = Path("/etc/netns") / netns.laptop
    etc.mkdir(parents=True, exist_ok=True)
    resolv = etc / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\n")
    privileges = pair.privileges

    tun, routes = await privileges.open_device(
        netns.laptop, _config(["10.96.0.0/16"]), offload=True
    )
    assert tun.name == "tele0" and tun.vnet_header
    assert [str(n) for n in routes] == ["10.96.0.0/16"]
    assert "tele0" in _links(netns.laptop)
    assert _tun_of(tun.fd) == "tele0"  # the device itself, not some other descriptor

    added = await privileges.change_routes(
        netns.laptop,
        "tele0",
        parse_networks(["10.250.0.0/16"]),
        parse_networks(["10.96.0.0/16"]),
        [],
    )
    assert [str(n) for n in added] == ["10.250.0.0/16"]
    assert "10.250.0.0/16" in _routes(netns.laptop)
    assert "10.96.0.0/16" not in _routes(netns.laptop)

    udp, tcp, upstream = await privileges.bind_dns(netns.laptop, "198.18.0.53", 53)
    assert udp.getsockname() == ("198.18.0.53", 53)
    assert tcp.getsockname() == ("198.18.0.53", 53)
    for sock in (udp, tcp, upstream):
        sock.close()

    change = ResolverChange(
        resolved=False, device="tele0", server="198.18.0.53", search=["tel2-search"], domains=[]
    )
    await privileges.set_resolver(netns.laptop, change)
    assert "nameserver 198.18.0.53" in resolv.read_text()

    await privileges.aclose()  # Finish: the helper undoes everything before it answers
    assert resolv.read_text() == "nameserver 192.0.2.1\n"
    assert "tele0" not in _links(netns.laptop)
    assert "10.250.0.0/16" not in _routes(netns.laptop)
    pair.thread.join(10)
    assert not pair.thread.is_alive()
    with pytest.raises(VifError, match="gone"):
        await privileges.change_routes(netns.laptop, "tele0", [], [], [])
    os.close(tun.fd)


async def test_a_conflict_is_refused_and_a_hang_up_undoes(netns: Namespaces, pair: Pair) -> None:
    _ip(netns.laptop, "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn1")
    _ip(netns.laptop, "link", "set", "vpn0", "up")
    _ip(netns.laptop, "route", "add", "10.0.0.0/8", "dev", "vpn0")
    privileges = pair.privileges
    with pytest.raises(RouteConflict, match="vpn0"):
        await privileges.open_device(netns.laptop, _config(["10.96.0.0/16"]), offload=True)
    assert "tele0" not in _links(netns.laptop)  # the failed request left nothing

    tun, _ = await privileges.open_device(netns.laptop, _config(["172.31.0.0/16"]), offload=False)
    with pytest.raises(RouteConflict):
        await privileges.change_routes(
            netns.laptop, "tele0", parse_networks(["10.1.0.0/16"]), [], []
        )
    assert "172.31.0.0/16" in _routes(netns.laptop)
    os.close(tun.fd)  # the daemon dies: its descriptors close, and so does its connection
    pair.privileges.hang_up()
    pair.thread.join(10)
    assert not pair.thread.is_alive()
    assert "tele0" not in _links(netns.laptop)
    assert "172.31.0.0/16" not in _routes(netns.laptop)


def test_messages_round_trip_and_garbage_is_refused() -> None:
    request = proto.OpenDevice(
        name="tele0", offload=True, address="198.18.0.53", address6="fd7e:1e00::53", mtu=1500,
        subnets=["10.96.0.0/16"], netns="tele-x",
    )  # fmt: skip
    assert proto.decode(proto.encode(request)) == request
    with pytest.raises(proto.ProtocolError):
        proto.decode(b'{"type": "Nonsense"}')
    with pytest.raises(proto.ProtocolError):
        proto.decode(b"\xff" * 10)
    read, write = os.pipe()
    try:
        assert proto.fds_received(proto.fds_ancillary([read, write])) == [read, write]
        assert proto.fds_ancillary([]) == []
    finally:
        os.close(read)
        os.close(write)


def test_the_helper_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tele.cli.vif_helper import helper_command

    monkeypatch.delenv("TELE_VIF_HELPER", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    quiet = helper_command(42, interactive=False)
    assert quiet[:2] == ["sudo", "-n"]  # never a password prompt nobody asked for
    assert quiet[-6:-3] == ["--daemon-pid", "42", "--socket"]
    assert quiet[-2:] == ["--log-level", "info"]
    # Config logLevels.rootDaemon is the helper's (Telepresence's root daemon's) level.
    (tmp_path / "tele").mkdir()
    (tmp_path / "tele" / "config.yml").write_text("logLevels:\n  rootDaemon: debug\n")
    assert helper_command(42, interactive=False)[-2:] == ["--log-level", "debug"]
    assert "--log-file" not in quiet  # the CLI passes the log it opened as the user
    assert quiet[quiet.index("-m") + 1] == "tele.vif.helper"
    assert helper_command(42, interactive=True)[:2] == ["sudo", sys.executable]
    monkeypatch.setenv("TELE_VIF_HELPER", "doas -u root")
    assert helper_command(42, interactive=False)[:3] == ["doas", "-u", "root"]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert helper_command(42, interactive=True)[0] == sys.executable  # root: no sudo at all


def test_the_helper_logs_only_to_a_file_of_the_user_it_was_handed(tmp_path: Path) -> None:
    from tele.vif.helper import _log_stream

    user = 65534
    theirs = tmp_path / "helper.log"
    theirs.touch()
    os.chown(theirs, user, user)
    roots = tmp_path / "precious"
    roots.write_text("root's\n")
    read, write = os.pipe()
    with theirs.open("a") as mine, roots.open("a") as precious:
        fd = _log_stream(mine.fileno(), user)
        assert fd is not None and fd != mine.fileno()  # a copy, kept past detaching
        os.close(fd)
        assert _log_stream(precious.fileno(), user) is None  # never someone else's file
    assert _log_stream(write, user) is None  # nor a pipe or terminal
    for end in (read, write):
        os.close(end)
