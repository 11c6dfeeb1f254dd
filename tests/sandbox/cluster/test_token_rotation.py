"""The sandbox kubelet rotates the service-account tokens of a running pod as a real kubelet
does (re-minted at 80 % of their life): the default token in the pod's `serviceaccount`
directory (what the traffic manager authenticates with) and projected token volumes. In mock
time, no container: the pod worker's token upkeep against an in-process API server whose wall
clock follows trio's."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from tele.sandbox.apiserver.auth import User
from tele.sandbox.apiserver.context import RequestContext
from tele.sandbox.apiserver.kinds import kind_of
from tele.sandbox.apiserver.rest import Api
from tele.sandbox.kubelet import volumes
from tele.sandbox.kubelet.kubelet import PodWorker

ADMIN = RequestContext(User("admin", ("system:masters",)))


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def _review(api: Api, token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    """A TokenReview as the manager sends it, answered by the API server's authenticators."""
    from tele.sandbox.apiserver.reviews import token_review

    spec: dict[str, Any] = {"token": token}
    if audiences:
        spec["audiences"] = audiences
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
    return dict(token_review(api.authn, body)["status"])


async def test_a_running_pods_tokens_are_rotated_before_they_expire(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    api = Api(clock=lambda: 1.8e9 + trio.current_time(), signing_key=b"seed", ca_pem="CA")
    api.bootstrap()
    pod_body = {
        "metadata": {"name": "manager"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "i",
                    "volumeMounts": [{"name": "for-agents", "mountPath": "/var/run/agents"}],
                }
            ],
            "volumes": [
                {
                    "name": "for-agents",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "path": "token",
                                    "audience": "tele-test",
                                    "expirationSeconds": 600,
                                }
                            }
                        ]
                    },
                }
            ],
        },
    }
    await api.create(kind_of("", "Pod"), "default", pod_body, ADMIN)
    pod = api.store.get("/pods", "default", "manager")
    assert pod is not None
    kubelet = SimpleNamespace(api=api, state_dir=tmp_path)
    worker = PodWorker(kubelet, pod)  # type: ignore[arg-type]
    default_token = worker.dir / "serviceaccount" / "token"
    projected_token = worker.dir / "volumes" / "for-agents" / "token"
    async with trio.open_nursery() as nursery:
        volumes.write_volumes(api, pod, worker.dir / "volumes")
        worker.start_token_rotation(nursery)
        first = default_token.read_text()
        first_projected = projected_token.read_text()
        assert _claims(first)["exp"] - _claims(first)["iat"] == 3607
        assert (worker.dir / "serviceaccount" / "namespace").read_text() == "default"
        assert _review(api, first)["authenticated"] is True

        # 600 s tokens: a new one at 480 s, another at 960 s; the first has expired by then.
        await trio.sleep(601)
        assert _review(api, first_projected, ["tele-test"])["authenticated"] is False
        current = projected_token.read_text()
        assert current != first_projected
        assert _review(api, current, ["tele-test"])["authenticated"] is True

        # The default token (3607 s): re-minted at 80 %, still good after the first expired.
        await trio.sleep(3607 - 601 + 60)
        expired = _review(api, first)
        assert expired["authenticated"] is False and "expired" in expired["error"]
        rotated = default_token.read_text()
        assert rotated != first
        assert _review(api, rotated)["authenticated"] is True
        assert _claims(rotated)["iat"] - _claims(first)["iat"] <= 0.8 * 3607 + 1
        assert _review(api, projected_token.read_text(), ["tele-test"])["authenticated"] is True
        nursery.cancel_scope.cancel()


async def test_a_pod_without_automount_gets_no_default_token(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    api = Api(clock=lambda: 1.8e9 + trio.current_time(), signing_key=b"seed", ca_pem="CA")
    api.bootstrap()
    body = {
        "metadata": {"name": "quiet"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "i"}],
        },
    }
    await api.create(kind_of("", "Pod"), "default", body, ADMIN)
    pod = api.store.get("/pods", "default", "quiet")
    assert pod is not None
    worker = PodWorker(SimpleNamespace(api=api, state_dir=tmp_path), pod)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        worker.start_token_rotation(nursery)
        await trio.sleep(3 * 3600)
        assert not (worker.dir / "serviceaccount").exists()
        nursery.cancel_scope.cancel()
