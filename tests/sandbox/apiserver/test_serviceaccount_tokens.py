"""The service-account token issuer without a server: projected tokens are pod-bound and
rotated at 80 % of their life, verification refuses tampering, expiry and other audiences."""

from __future__ import annotations

import base64
import json

import pytest
import trio

from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.kinds import kind_of
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.apiserver.serviceaccount import InvalidToken

ADMIN = RequestContext(User("admin", ("system:masters",)))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _api() -> tuple[Api, Clock]:
    clock = Clock()
    api = Api(admin_token="t", clock=clock, signing_key=b"seed", ca_pem="CA")
    api.bootstrap()
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    trio.run(api.create, kind_of("", "Pod"), "default", pod, ADMIN)
    return api, clock


def _claims(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def test_projected_tokens_are_pod_bound_and_rotate_at_80_percent() -> None:
    api, clock = _api()
    tokens = api.authn.service_accounts
    pod = api.store.get("/pods", "default", "p")
    assert pod is not None
    source = {"path": "token", "audience": "tele", "expirationSeconds": 1000}
    first = tokens.projected_token(pod, source)
    claims = _claims(first)
    assert claims["aud"] == ["tele"] and claims["exp"] == int(clock.now) + 1000
    assert claims["kubernetes.io"]["pod"] == {"name": "p", "uid": pod["metadata"]["uid"]}  # type: ignore[index]
    assert tokens.next_rotation(pod) == int(clock.now) + 800
    clock.now += 799
    assert tokens.projected_token(pod, source) == first
    clock.now += 1
    second = tokens.projected_token(pod, source)
    assert second != first and _claims(second)["iat"] == int(clock.now)
    assert tokens.verify(second, ["tele"]).user.extra["authentication.kubernetes.io/pod-name"] == [
        "p"
    ]
    # A source below the minimum lives 10 minutes.
    short = tokens.projected_token(pod, {"path": "short", "expirationSeconds": 60})
    claims = _claims(short)
    assert claims["exp"] - claims["iat"] == 600  # type: ignore[operator]


def test_verification_refuses_tampering_expiry_and_other_audiences() -> None:
    api, clock = _api()
    tokens = api.authn.service_accounts
    account = api.store.get("/serviceaccounts", "default", "default")
    assert account is not None
    token, _ = tokens.issue(account, seconds=600, audiences=["a"])
    assert tokens.verify(token, ["a"]).audiences == ["a"]
    with pytest.raises(InvalidToken, match="audiences"):
        tokens.verify(token, ["b"])
    header, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = "system:serviceaccount:kube-system:admin"
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    with pytest.raises(InvalidToken):
        tokens.verify(f"{header}.{forged_payload}.{signature}", ["a"])
    with pytest.raises(InvalidToken):
        tokens.verify("a.b.c" * 10_000)
    clock.now += 601
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(token, ["a"])
    # The same seed signs with the same key: tokens survive a restart of the sandbox.
    other = Api(admin_token="t", clock=clock, signing_key=b"seed")
    assert other.authn.service_accounts.key_id == tokens.key_id


def test_the_kubelets_default_token_volume_holds_a_pod_bound_token() -> None:
    """What the kubelet writes into kube-api-access (volumes.volume_files, as for a pod)."""
    from tele.sandbox.kubelet.volumes import DEFAULT_SA_VOLUME, ConfigError, volume_files

    api, _ = _api()
    pod = api.store.get("/pods", "default", "p")
    assert pod is not None
    files = volume_files(api, pod, DEFAULT_SA_VOLUME)
    assert files is not None
    token = files["token"].decode()
    verified = api.authn.service_accounts.verify(token)
    assert verified.user.name == "system:serviceaccount:default:default"
    assert verified.user.extra["authentication.kubernetes.io/pod-uid"] == [pod["metadata"]["uid"]]
    trio.run(api.delete, kind_of("", "Pod"), "default", "p", {}, ADMIN)
    with pytest.raises(InvalidToken, match="pod"):
        api.authn.service_accounts.verify(token)
    orphan = {**pod, "spec": {**pod["spec"], "serviceAccountName": "absent"}}
    with pytest.raises(ConfigError, match="absent"):
        volume_files(api, orphan, DEFAULT_SA_VOLUME)
