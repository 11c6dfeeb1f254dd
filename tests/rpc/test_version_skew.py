"""Messages across neighbouring versions: fields are only added, with defaults, so that an older
peer's message decodes here and ours decodes there (msgspec ignores fields it does not know)."""

from __future__ import annotations

import msgspec

import tele
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api


class OldClientIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """ClientIdentity before capabilities."""

    user: str
    host: str
    client_version: str
    install_id: str = ""
    kube_context: str = ""
    mapped_namespaces: list[str] = []


class OldDialRequest(msgspec.Struct, frozen=True, kw_only=True):
    """DialRequest as a daemon from before wiretap copy channels reads it."""

    dial_id: str
    engagement_id: str
    original_host: str
    original_port: int
    protocol: str = "tcp"
    wiretap: bool = False
    response: bool = False


def test_an_old_clients_arrival_decodes_with_no_capabilities() -> None:
    old = msgspec.json.encode(OldClientIdentity(user="u", host="h", client_version="0.0.9"))
    identity = msgspec.json.decode(old, type=api.ClientIdentity)
    assert identity.capabilities == []
    assert api.WIRETAP_CHANNELS not in identity.capabilities


def test_an_old_manager_reads_a_new_clients_arrival() -> None:
    new = api.ClientIdentity(
        user="u", host="h", client_version=tele.__version__, capabilities=["wiretap-channels"]
    )
    old = msgspec.json.decode(msgspec.json.encode(new), type=OldClientIdentity)
    assert (old.user, old.host, old.client_version) == ("u", "h", tele.__version__)
    assert api.CLIENT_CAPABILITIES == (api.WIRETAP_CHANNELS,)


def test_an_old_daemon_cannot_tell_a_copy_channel_from_a_connection() -> None:
    """Why the manager must never send an old client a channel: the flag is silently lost."""
    channel = aapi.DialRequest(
        dial_id="d",
        engagement_id="e",
        original_host="10.0.0.1",
        original_port=80,
        wiretap=True,
        channel=True,
    )
    seen_by_old = msgspec.json.decode(msgspec.json.encode(channel), type=OldDialRequest)
    assert seen_by_old.wiretap and not hasattr(seen_by_old, "channel")
