"""Pulling an image as a kubelet and its container runtime do: the registry chosen for the
reference, credentials from the pod's imagePullSecrets, an index resolved to linux/amd64, every
blob digest-checked by the registry client, each layer unpacked once into the node's store.

The sandbox registry acts as a mirror of Docker Hub (as containerd's `registry.mirrors`
configuration on a kind node does): `tele-sandbox/echo`, which a node reads as
`docker.io/tele-sandbox/echo:latest`, is fetched from it as repository `tele-sandbox/echo`, with
the node's own credentials. A reference naming the sandbox registry itself (`127.0.0.1:PORT/x`)
is fetched from it with the pod's pull secrets only, so wrong or missing credentials show as
they would on a real node. Registries elsewhere are not contacted: the sandbox's traffic stays
on this machine (loopback), and such a pull fails saying so.

A node without the sandbox registry (the test and benchmark clusters) has the sandbox's own
images preloaded, as `kind load` does: they come from tele's local image build cache.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tele.errors import TeleError
from tele.image.credentials import Credentials, credentials_from_docker_config
from tele.image.errors import InvalidDockerConfig, NotFound, RegistryError
from tele.image.reference import DOCKER_HUB, Reference
from tele.image.registry import RegistryClient, is_on_this_machine

from .imagestore import Image, ImageError, ImageStore

TELE_REPOSITORIES = ("tele/traffic-manager", "tele/traffic-agent")
"""tele's image under the chart's two default names (the sandbox registry holds both)."""

log = logging.getLogger(__name__)
Obj = dict[str, Any]


@dataclass(frozen=True)
class Mirror:
    """The sandbox registry as the node knows it: address, the node's credentials, its CA."""

    address: str
    credentials: Credentials | None
    ca_file: Path | None


def secret_credentials(secrets: list[Obj], registry: str) -> Credentials | None:
    """The first imagePullSecret (type kubernetes.io/dockerconfigjson) with an entry for
    `registry`; a malformed secret is skipped, as the kubelet does (with a log line)."""
    for secret in secrets:
        raw = (secret.get("data") or {}).get(".dockerconfigjson", "")
        try:
            creds = credentials_from_docker_config(base64.b64decode(raw, validate=True), registry)
        except (binascii.Error, ValueError, InvalidDockerConfig) as exc:
            log.info("pull secret %s skipped: %s", (secret.get("metadata") or {}).get("name"), exc)
            continue
        if creds is not None:
            return creds
    return None


def client_for(ref: Reference, secrets: list[Obj], mirror: Mirror | None) -> RegistryClient:
    if mirror is not None and ref.registry == DOCKER_HUB:
        return RegistryClient(
            mirror.address,
            credentials=mirror.credentials,
            ca_file=mirror.ca_file,
            mirror_of=DOCKER_HUB,
        )
    if not is_on_this_machine(ref.registry):
        where = f"the sandbox registry {mirror.address}" if mirror else "a registry on 127.0.0.1"
        raise ImageError(
            f"the sandbox pulls only from registries on this machine, not {ref.registry}: "
            f"push the image to {where}"
        )
    ca_file = mirror.ca_file if mirror is not None and ref.registry == mirror.address else None
    return RegistryClient(
        ref.registry, credentials=secret_credentials(secrets, ref.registry), ca_file=ca_file
    )


def present(store: ImageStore, ref: Reference) -> Image | None:
    """The image `ref` names when the node has it: by digest for a digest reference (whatever
    name it was pulled under, as a runtime's content store), else by its name."""
    if ref.digest is not None:
        return store.by_digest(store_name(ref), ref.digest)
    return store.lookup(store_name(ref))


def store_name(ref: Reference) -> str:
    """The name an image is kept under: normalized, `:latest` when neither tag nor digest."""
    if ref.tag is None and ref.digest is None:
        ref = ref.with_tag("latest")
    return str(ref)


def _preload_sandbox_image(store: ImageStore, ref: Reference) -> Image | None:
    """The sandbox's image `ref` (e.g. docker.io/tele-sandbox/echo:latest) from the local build
    cache into the store; None when `ref` is not one of them."""
    from tele.image.build import (
        SANDBOX_IMAGES,
        build_sandbox_images,
        build_tele_image,
        default_tag,
        sandbox_tags,
    )

    if ref.registry != DOCKER_HUB:
        return None
    tele_tag = default_tag().rsplit(":", 1)[1]
    try:
        if ref.repository in TELE_REPOSITORIES and (ref.tag == tele_tag or ref.digest):
            built = build_tele_image().image
        elif ref.repository in {spec.repository for spec in SANDBOX_IMAGES} and (
            ref.tag in (None, *sandbox_tags()) or ref.digest
        ):
            built = build_sandbox_images()[ref.repository].image
        else:
            return None
    except (TeleError, OSError) as exc:
        raise ImageError(f"the sandbox's image {ref.repository} cannot be built: {exc}") from exc
    if ref.digest is not None and ref.digest != built.digest:
        # As a registry answers a digest it does not hold.
        raise ImageError(
            f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": '
            f"{ref.digest}: not found"
        )
    for layer in built.layers:
        if not store.has_layer(layer.diff_id):
            store.add_layer(
                layer.path, "application/vnd.oci.image.layer.v1.tar+gzip", layer.diff_id
            )
    return store.record(store_name(ref), built.digest, built.config_bytes, built.size)


async def pull_image(
    store: ImageStore, ref: Reference, secrets: list[Obj], mirror: Mirror | None
) -> Image:
    """Resolve, fetch and unpack `ref`; raise ImageError saying why it failed (the text after
    `Failed to pull image "X": ` in the kubelet's event)."""
    name = store_name(ref)
    if mirror is None:
        preloaded = await trio.to_thread.run_sync(_preload_sandbox_image, store, ref)
        if preloaded is not None:
            return preloaded
    try:
        client = client_for(ref, secrets, mirror)
        try:
            resolved = await client.resolve(ref)
            diff_ids = resolved.config.rootfs.diff_ids
            size = sum(layer.size for layer in resolved.layers)
            present = await trio.to_thread.run_sync(store.by_digest, name, resolved.digest)
            if present is None:
                for desc, diff_id in zip(resolved.layers, diff_ids, strict=True):
                    if store.has_layer(diff_id):
                        continue
                    blob = store.tmp_path("blob")
                    try:
                        await client.fetch_blob(ref, desc.digest, desc.size, blob)
                        await trio.to_thread.run_sync(
                            store.add_layer, blob, desc.media_type, diff_id
                        )
                    finally:
                        blob.unlink(missing_ok=True)
            return await trio.to_thread.run_sync(
                store.record, name, resolved.digest, resolved.config_bytes, size
            )
        finally:
            # Also when the pod goes away mid-pull: no connection left for the GC to find.
            with trio.CancelScope(shield=True):
                await client.aclose()
    except RegistryError as exc:
        code = "NotFound" if isinstance(exc, NotFound) else "Unknown"
        raise ImageError(
            f'rpc error: code = {code} desc = failed to pull and unpack image "{name}": {exc}'
        ) from exc
    except ImageError as exc:
        raise ImageError(
            f'rpc error: code = Unknown desc = failed to pull and unpack image "{name}": {exc}'
        ) from exc
