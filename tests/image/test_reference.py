from __future__ import annotations

import pytest

from tele.image.errors import InvalidReference
from tele.image.reference import Reference, parse_reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", Reference("docker.io", "library/busybox", None, None)),
        ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36", None)),
        ("tele/traffic-manager", Reference("docker.io", "tele/traffic-manager", None, None)),
        ("docker.io/busybox", Reference("docker.io", "library/busybox", None, None)),
        ("index.docker.io/library/busybox", Reference("docker.io", "library/busybox")),
        ("localhost/app", Reference("localhost", "app")),
        ("localhost:5000/a/b:v1", Reference("localhost:5000", "a/b", "v1")),
        ("127.0.0.1:5000/tele-sandbox/echo", Reference("127.0.0.1:5000", "tele-sandbox/echo")),
        ("[::1]:5000/x", Reference("[::1]:5000", "x")),
        ("ghcr.io/o/r@" + DIGEST, Reference("ghcr.io", "o/r", None, DIGEST)),
        ("ghcr.io/o/r:t@" + DIGEST, Reference("ghcr.io", "o/r", "t", DIGEST)),
        ("my_reg/x", Reference("docker.io", "my_reg/x")),
        ("a__b/c-d.e", Reference("docker.io", "a__b/c-d.e")),
    ],
)
def test_names_are_normalised_as_docker_does(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Busybox",
        "busybox:",
        "busybox@sha256:abc",
        "busybox@md5:" + "a" * 32,
        "a//b",
        "-a/b",
        "reg.io/",
        "busybox:" + "x" * 129,
        "x/" * 200 + "y",
        "busy box",
        "bad_host.io:99999999/x",
    ],
)
def test_invalid_names_raise_one_sentence(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_familiar_form_and_manifest_reference() -> None:
    assert parse_reference("busybox").familiar == "busybox"
    assert parse_reference("busybox").reference == "latest"
    assert parse_reference("docker.io/tele/x:1").familiar == "tele/x:1"
    assert parse_reference("r.io/a:1@" + DIGEST).reference == DIGEST
