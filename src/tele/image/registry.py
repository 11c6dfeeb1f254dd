"""A client of the OCI distribution API: resolve and pull images, push them (httpx, trio).

Every answer is treated as hostile: manifests, configs, token and error bodies are read up to a
limit, JSON depth is bounded, blobs are streamed to disk and checked against their digest and
size without ever writing more than the size the manifest announced. Library and HTTP failures
become `RegistryError`s here (one sentence each); nothing above sees httpx.

Timeouts bound each connect and read; a caller bounds a whole pull (a registry trickling
bytes) with a cancel scope, and `fetch_blob` then removes its partial file.

Authentication follows the registry's `WWW-Authenticate` challenge: Basic with the credentials
given, or Bearer with a token from the realm it names (anonymous when there are no credentials,
Basic to the token service when there are, an identity token as an OAuth2 refresh token).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from ..jsonlimits import check_depth
from .credentials import Credentials
from .errors import DigestMismatch, NotFound, RegistryError, RegistryUnreachable, Unauthorized
from .oci import (
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    decode,
    sha256_digest,
    sniff_media_type,
)
from .reference import DOCKER_HUB, Reference

log = logging.getLogger(__name__)

MAX_TOKEN_BODY_BYTES = 256 * 1024
"""A token answer is a JWT of a few KiB; a token service sending more is broken or hostile."""
MAX_ERROR_BODY_BYTES = 64 * 1024
"""How much of an error answer is read to find its message."""
MAX_REDIRECTS = 5
MAX_LAYERS = 128
"""Docker's limit on an image's layers (overlayfs stacks a few hundred at most); a manifest
naming thousands would make a puller fetch and mount them all."""
_WRITE_BUFFER = 1024 * 1024
_UPLOAD_CHUNK = 1024 * 1024
_ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_USER_AGENT = "tele/0.1"
_NEEDS_CREDENTIALS = (
    "needs credentials; log in with `docker login {}` or give the pod an imagePullSecret"
)


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's image: its manifest, config and layer descriptors, all digest-verified."""

    reference: Reference
    digest: str
    """The digest of the platform manifest (what `repository@digest` pulls)."""
    index_digest: str | None
    """The digest of the index the manifest was chosen from, when the reference named one."""
    media_type: str
    manifest: Manifest
    manifest_bytes: bytes
    config_bytes: bytes
    config: ImageConfig

    @property
    def layers(self) -> list[Descriptor]:
        return self.manifest.layers

    @property
    def config_digest(self) -> str:
        """The image ID as a container runtime shows it."""
        return self.manifest.config.digest

    @property
    def repo_digest(self) -> str:
        """`registry/repository@sha256:…` of what the reference named (index or manifest)."""
        return f"{self.reference.name}@{self.index_digest or self.digest}"


def _printable(text: str, limit: int = 200) -> str:
    """A registry's text made safe to show: no control characters (terminal escapes), bounded."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return cleaned[:limit] + ("…" if len(cleaned) > limit else "")


_CHALLENGE_PARAM = re.compile(
    r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?'
)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="…",service="…"` → ("bearer", {"realm": …, "service": …})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest) and len(params) < 16:
        m = _CHALLENGE_PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


class _Token(msgspec.Struct):
    token: str | None = None
    access_token: str | None = None


class _ErrorDetail(msgspec.Struct):
    code: str | None = None
    message: str | None = None


class _ErrorBody(msgspec.Struct):
    errors: list[_ErrorDetail] = []


def is_on_this_machine(registry: str) -> bool:
    """Whether a registry host (`host`, `host:port`, a bare IPv6 address, `[v6]` or `[v6]:port`)
    is this machine's loopback or `localhost`."""
    name: str | None = registry
    if registry.count(":") < 2 or registry.startswith("["):  # not a bare IPv6 address
        try:
            name = urllib.parse.urlsplit(f"//{registry}").hostname
        except ValueError:
            return False
    if name is None:
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RegistryClient:
    """One registry (host[:port]); pulls and pushes images of any repository on it.

    `mirror_of`: this registry also serves references to that registry (as a containerd mirror
    does: `docker.io/library/busybox` is fetched as `library/busybox` here).
    Use as `async with RegistryClient(...) as client:` or call `aclose()`.
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        ca_file: Path | None = None,
        insecure: bool = False,
        mirror_of: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self.mirror_of = mirror_of
        self.insecure = insecure
        host = "registry-1.docker.io" if registry == DOCKER_HUB else registry
        self._host = host
        self._scheme = "https"
        # Plain HTTP is allowed where docker allows it: registries marked insecure, loopback.
        self._http_allowed = insecure or is_on_this_machine(host)
        context = ssl.create_default_context()
        if ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(
                    registry, None, f"cannot use the CA file {ca_file} ({exc})"
                ) from None
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._client = httpx.AsyncClient(
            verify=context,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            follow_redirects=False,
            headers={"User-Agent": _USER_AGENT},
            # HTTPS_PROXY / NO_PROXY as docker honours them, except for a registry on this
            # machine (the sandbox's), which no proxy can reach.
            trust_env=not is_on_this_machine(host),
        )
        self._authorization: dict[str, str] = {}
        """scope → Authorization header value that the registry accepted (or we will try)."""

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # ---------------------------------------------------------------- public API

    async def resolve(self, ref: Reference, platform: str = "linux/amd64") -> ResolvedImage:
        """The manifest, config and layers of `ref` for `platform` (an index is followed)."""
        self._check_reference(ref)
        try:
            wanted = Platform.parse(platform)
        except ValueError as exc:
            raise RegistryError(self.registry, None, str(exc)) from None
        data, media_type = await self._get_manifest(ref, ref.reference)
        digest = sha256_digest(data)
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatch(
                self.registry, None, f"the manifest of {ref} has digest {digest}, not the one named"
            )
        index_digest: str | None = None
        if media_type in INDEX_TYPES:
            index = self._decode(data, Index, MAX_MANIFEST_BYTES, f"the image index of {ref}")
            chosen = _choose_platform(index.manifests, wanted)
            if chosen is None:
                offered = sorted(
                    {
                        "/".join(p for p in (d.platform.os, d.platform.architecture) if p)
                        for d in index.manifests
                        if d.platform is not None
                    }
                )
                raise NotFound(
                    self.registry,
                    None,
                    f"{ref.familiar} has no image for {platform} "
                    f"(it has {', '.join(offered) or 'none with a platform'})",
                )
            index_digest = digest
            data, media_type = await self._get_manifest(ref, chosen.digest)
            digest = sha256_digest(data)
            if digest != chosen.digest:
                raise DigestMismatch(
                    self.registry,
                    None,
                    f"the {platform} manifest of {ref} has digest {digest}, not {chosen.digest}",
                )
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(
                self.registry,
                None,
                f"{ref.familiar} is of media type {_printable(media_type, 100)!r}, "
                "which tele cannot pull (OCI or Docker v2 manifests only)",
            )
        manifest = self._decode(data, Manifest, MAX_MANIFEST_BYTES, f"the manifest of {ref}")
        if len(manifest.layers) > MAX_LAYERS:
            raise RegistryError(
                self.registry,
                None,
                f"{ref.familiar} has {len(manifest.layers)} layers, more than the "
                f"{MAX_LAYERS} a container can stack",
            )
        for layer in manifest.layers:
            if layer.media_type not in LAYER_TYPES:
                raise RegistryError(
                    self.registry,
                    None,
                    f"{ref.familiar} has a layer of media type "
                    f"{_printable(layer.media_type, 100)!r}, which tele cannot unpack",
                )
        if manifest.config.size > MAX_CONFIG_BYTES:
            raise RegistryError(
                self.registry,
                None,
                f"the config of {ref.familiar} is {manifest.config.size} bytes, more than "
                f"the {MAX_CONFIG_BYTES} allowed",
            )
        config_bytes = await self._get_blob_bytes(ref, manifest.config)
        config = self._decode(config_bytes, ImageConfig, MAX_CONFIG_BYTES, f"the config of {ref}")
        if len(config.rootfs.diff_ids) != len(manifest.layers):
            raise RegistryError(
                self.registry,
                None,
                f"the config of {ref.familiar} lists {len(config.rootfs.diff_ids)} layers, "
                f"its manifest {len(manifest.layers)}",
            )
        return ResolvedImage(
            ref, digest, index_digest, media_type, manifest, data, config_bytes, config
        )

    async def fetch_blob(self, ref: Reference, digest: str, size: int, dest: Path) -> None:
        """Stream a blob into `dest`, checking digest and size; `dest` is removed on failure."""
        self._check_reference(ref)
        if not _DIGEST.fullmatch(digest):
            raise DigestMismatch(self.registry, None, f"{digest[:80]!r} is not a sha256 digest")
        try:
            await self._fetch_blob(ref, digest, size, dest)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.Path(dest).unlink(missing_ok=True)
            raise

    async def manifest_digest(self, ref: Reference) -> str | None:
        """The digest of the manifest `ref` names, or None when the registry does not have it."""
        self._check_reference(ref)
        url = self._url(f"/v2/{ref.repository}/manifests/{ref.reference}")
        response = await self._send(
            "HEAD", url, scope=_scope(ref.repository), headers={"Accept": _ACCEPT_MANIFESTS}
        )
        await response.aclose()
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            await self._fail(response, f"checking for {ref.familiar}")
        digest: str = response.headers.get("Docker-Content-Digest", "")
        if not _DIGEST.fullmatch(digest):
            raise RegistryError(
                self.registry, 200, f"answered for {ref.familiar} without a valid digest header"
            )
        return digest

    async def blob_exists(self, ref: Reference, digest: str, *, push: bool = False) -> bool:
        self._check_reference(ref)
        url = self._url(f"/v2/{ref.repository}/blobs/{digest}")
        response = await self._send("HEAD", url, scope=_scope(ref.repository, push=push))
        await response.aclose()
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        await self._fail(response, f"checking blob {digest[:19]} of {ref.repository}")
        raise AssertionError("unreachable")

    async def push_image(
        self,
        ref: Reference,
        manifest_bytes: bytes,
        blobs: Mapping[str, Path],
        *,
        media_type: str | None = None,
        on_blob: Callable[[Descriptor, bool], None] | None = None,
        mount_from: Mapping[str, str] | None = None,
    ) -> str:
        """Push the blobs a manifest names (skipping those present) and then the manifest.

        `blobs` maps each digest to the file holding it. Returns the manifest's digest.
        `on_blob(descriptor, uploaded)` is called per blob (False: it was already there).
        `mount_from` maps digests to another repository of this registry that holds them: the
        registry is asked to mount the blob from there instead of receiving it again.
        """
        self._check_reference(ref)
        media_type = media_type or sniff_media_type(manifest_bytes) or ""
        if media_type not in MANIFEST_TYPES:
            raise ValueError(f"push_image pushes image manifests, not {media_type!r}")
        manifest = decode(manifest_bytes, Manifest, MAX_MANIFEST_BYTES)
        for descriptor in [manifest.config, *manifest.layers]:
            if await self.blob_exists(ref, descriptor.digest, push=True):
                uploaded = False
            else:
                source = (mount_from or {}).get(descriptor.digest)
                uploaded = await self._upload(ref, descriptor, blobs[descriptor.digest], source)
            if on_blob is not None:
                on_blob(descriptor, uploaded)
        return await self.push_manifest(ref, manifest_bytes, media_type)

    async def push_manifest(self, ref: Reference, data: bytes, media_type: str) -> str:
        """PUT a manifest or index (its blobs or manifests must be there) under the tag of
        `ref`, or under its own digest when `ref` has no tag. Returns its digest."""
        self._check_reference(ref)
        digest = sha256_digest(data)
        target = ref.tag or digest
        url = self._url(f"/v2/{ref.repository}/manifests/{target}")
        response = await self._send(
            "PUT",
            url,
            scope=_scope(ref.repository, push=True),
            headers={"Content-Type": media_type},
            content=lambda: data,
        )
        if response.status_code not in (200, 201):
            await self._fail(response, f"storing the manifest of {ref.familiar}")
        await response.aclose()
        return digest

    # ---------------------------------------------------------------- internals

    def _check_reference(self, ref: Reference) -> None:
        if ref.registry not in (self.registry, self.mirror_of):
            raise ValueError(f"{ref} is not served by the client of {self.registry}")

    def _url(self, path: str) -> str:
        return f"{self._scheme}://{self._host}{path}"

    def _decode(self, data: bytes, type_: type[Any], limit: int, what: str) -> Any:
        try:
            return decode(data, type_, limit)
        except ValueError as exc:
            raise RegistryError(
                self.registry, None, f"{what} is not valid: {_printable(str(exc))}"
            ) from None

    async def _get_manifest(self, ref: Reference, reference: str) -> tuple[bytes, str]:
        url = self._url(f"/v2/{ref.repository}/manifests/{reference}")
        response = await self._send(
            "GET", url, scope=_scope(ref.repository), headers={"Accept": _ACCEPT_MANIFESTS}
        )
        try:
            if response.status_code == 404:
                await response.aclose()
                raise NotFound(self.registry, 404, f"there is no image {_display(ref, reference)}")
            if response.status_code != 200:
                await self._fail(response, f"fetching the manifest of {ref.familiar}")
            data = await self._read_bounded(response, MAX_MANIFEST_BYTES, "a manifest")
        finally:
            await response.aclose()
        try:
            check_depth(data)
        except ValueError as exc:
            raise RegistryError(
                self.registry, 200, f"the manifest of {ref.familiar} is not valid: {exc}"
            ) from None
        media_type = sniff_media_type(data)
        if media_type is None:
            header = response.headers.get("Content-Type", "").split(";")[0].strip()
            media_type = header or None
        if media_type is None:
            raise RegistryError(
                self.registry,
                response.status_code,
                f"answered something that is not a manifest for {ref.familiar}",
            )
        return data, media_type

    async def _get_blob_bytes(self, ref: Reference, descriptor: Descriptor) -> bytes:
        url = self._url(f"/v2/{ref.repository}/blobs/{descriptor.digest}")
        response = await self._send("GET", url, scope=_scope(ref.repository), follow_redirects=True)
        try:
            if response.status_code == 404:
                raise NotFound(
                    self.registry, 404, f"blob {descriptor.digest} of {ref.familiar} is missing"
                )
            if response.status_code != 200:
                await self._fail(response, f"fetching blob {descriptor.digest[:19]}")
            data = await self._read_bounded(response, descriptor.size, "a blob")
        finally:
            await response.aclose()
        if len(data) != descriptor.size or sha256_digest(data) != descriptor.digest:
            raise DigestMismatch(
                self.registry,
                None,
                f"blob {descriptor.digest} of {ref.familiar} arrived with other content "
                f"({len(data)} bytes, {descriptor.size} expected)",
            )
        return data

    async def _fetch_blob(self, ref: Reference, digest: str, size: int, dest: Path) -> None:
        url = self._url(f"/v2/{ref.repository}/blobs/{digest}")
        response = await self._send("GET", url, scope=_scope(ref.repository), follow_redirects=True)
        try:
            if response.status_code == 404:
                raise NotFound(self.registry, 404, f"blob {digest} of {ref.familiar} is missing")
            if response.status_code != 200:
                await self._fail(response, f"fetching blob {digest[:19]} of {ref.familiar}")
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) != size:
                raise DigestMismatch(
                    self.registry,
                    200,
                    f"blob {digest} of {ref.familiar} is announced as {announced} bytes, "
                    f"the manifest says {size}",
                )
            hasher = hashlib.sha256()
            written = 0
            pending = bytearray()
            async with await trio.open_file(dest, "wb") as out:
                try:
                    async for chunk in response.aiter_raw():
                        if written + len(pending) + len(chunk) > size:
                            raise DigestMismatch(
                                self.registry,
                                200,
                                f"blob {digest} of {ref.familiar} is longer than the "
                                f"{size} bytes its manifest says",
                            )
                        hasher.update(chunk)
                        pending += chunk
                        if len(pending) >= _WRITE_BUFFER:
                            await out.write(bytes(pending))
                            written += len(pending)
                            pending.clear()
                except httpx.RemoteProtocolError:
                    received = written + len(pending)
                    raise DigestMismatch(
                        self.registry,
                        200,
                        f"blob {digest} of {ref.familiar} broke off after {received} of "
                        f"{size} bytes",
                    ) from None
                except httpx.TransportError as exc:
                    raise self._unreachable(exc) from None
                if pending:
                    await out.write(bytes(pending))
                    written += len(pending)
        finally:
            await response.aclose()
        if written != size:
            raise DigestMismatch(
                self.registry,
                200,
                f"blob {digest} of {ref.familiar} is truncated: {written} of {size} bytes",
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatch(
                self.registry,
                200,
                f"blob {digest} of {ref.familiar} arrived with digest {actual}",
            )

    async def _upload(
        self, ref: Reference, descriptor: Descriptor, path: Path, mount: str | None
    ) -> bool:
        """Upload one blob (True), or mount it from repository `mount` (False)."""
        scope = _scope(ref.repository, push=True)
        start = self._url(f"/v2/{ref.repository}/blobs/uploads/")
        if mount is not None and mount != ref.repository:
            start += f"?mount={descriptor.digest}&from={mount}"
            scope += f" repository:{mount}:pull"
        response = await self._send("POST", start, scope=scope)
        if response.status_code == 201 and mount is not None:
            await response.aclose()
            return False
        if response.status_code != 202:
            await self._fail(response, f"starting an upload to {ref.repository}")
        await response.aclose()
        location = response.headers.get("Location", "")
        try:
            url = httpx.URL(self._url("/")).join(location)
            if url.scheme not in ("http", "https"):
                raise ValueError(url.scheme)
            url = url.copy_merge_params({"digest": descriptor.digest})
        except (httpx.InvalidURL, ValueError):
            raise RegistryError(
                self.registry, 202, "answered an upload with an unusable Location"
            ) from None

        def body() -> AsyncIterator[bytes]:
            return _file_chunks(path)

        response = await self._send(
            "PUT",
            str(url),
            scope=scope,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(descriptor.size),
            },
            content=body,
        )
        if response.status_code not in (201, 204):
            await self._fail(response, f"uploading blob {descriptor.digest[:19]}")
        await response.aclose()
        return True

    async def _read_bounded(self, response: httpx.Response, limit: int, what: str) -> bytes:
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) > limit:
            raise RegistryError(
                self.registry,
                response.status_code,
                f"announced {what} of {announced} bytes, more than the {limit} allowed",
            )
        data = bytearray()
        try:
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > limit:
                    raise RegistryError(
                        self.registry,
                        response.status_code,
                        f"sent {what} longer than the {limit} bytes allowed",
                    )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        return bytes(data)

    async def _fail(self, response: httpx.Response, doing: str) -> None:
        """Raise the error for an unexpected answer, with the registry's own message if any."""
        status = response.status_code
        detail = ""
        try:
            body = (
                b""
                if response.is_closed
                else await self._read_bounded(response, MAX_ERROR_BODY_BYTES, "an error")
            )
            errors = msgspec.json.decode(body, type=_ErrorBody).errors if body else []
            if errors and (errors[0].message or errors[0].code):
                detail = f": {_printable(errors[0].message or errors[0].code or '')}"
        except (RegistryError, msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass
        finally:
            await response.aclose()
        if status in (401, 403):
            raise Unauthorized(self.registry, status, f"refused {doing}{detail}")
        if status == 404:
            raise NotFound(self.registry, status, f"has nothing for {doing}{detail}")
        raise RegistryError(self.registry, status, f"failed {doing}{detail}")

    def _unreachable(self, exc: Exception) -> RegistryUnreachable:
        if isinstance(exc, httpx.TimeoutException):
            reason = "it did not answer in time"
        else:
            reason = _printable(_root_cause(exc), 160)
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason:
            return RegistryUnreachable(
                self.registry,
                None,
                f"its TLS certificate is not trusted ({reason}); give its CA with --ca-file "
                "(or --insecure)",
            )
        return RegistryUnreachable(
            self.registry, None, f"cannot be reached ({reason}); check the address and that it runs"
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        content: Callable[[], bytes | AsyncIterator[bytes]] | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send a request, answering one authentication challenge; returns a streaming response.

        A 401 is answered once (Basic, or a Bearer token for `scope`) and the request repeated;
        the caller closes the response.
        """
        for attempt in range(2):
            response = await self._send_once(method, url, scope, headers, content, follow_redirects)
            if response.status_code != 401:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            await response.aclose()
            if attempt == 1:
                break
            await self._authenticate(challenge[:4096], scope)
        if self.credentials is None:
            raise Unauthorized(self.registry, 401, _NEEDS_CREDENTIALS.format(self.registry))
        raise Unauthorized(
            self.registry,
            401,
            f"refused the credentials of user {self.credentials.username!r}; check them in the "
            "docker config or the pull secret",
        )

    async def _send_once(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str] | None,
        content: Callable[[], bytes | AsyncIterator[bytes]] | None,
        follow_redirects: bool,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if self._scheme == "http" and url.startswith(f"https://{self._host}/"):
            url = "http://" + url.removeprefix("https://")
        if scope in self._authorization and httpx.URL(url).host == httpx.URL(self._url("/")).host:
            all_headers["Authorization"] = self._authorization[scope]
        for _ in range(2):
            try:
                request = self._client.build_request(
                    method,
                    url,
                    headers=all_headers,
                    content=content() if content is not None else None,
                    # As containerd tells a mirror which registry a pull is for; only on our own
                    # GET/HEAD URLs (merging into an upload Location would re-encode its state).
                    params={"ns": self.mirror_of}
                    if self.mirror_of and method in ("GET", "HEAD")
                    else None,
                )
                return await self._client.send(
                    request, stream=True, follow_redirects=follow_redirects
                )
            except httpx.ConnectError as exc:
                if self._scheme == "https" and self._http_allowed and _is_tls_failure(exc):
                    # A plain-HTTP registry where that is allowed (as docker does).
                    log.info("registry %s: TLS failed (%s); trying plain HTTP", self.registry, exc)
                    self._scheme = "http"
                    url = "http://" + url.removeprefix("https://")
                    continue
                raise self._unreachable(exc) from None
            except httpx.TooManyRedirects:
                raise RegistryError(self.registry, None, "redirected too many times") from None
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise RegistryError(
                    self.registry, None, f"sent an unusable address ({_printable(str(exc))})"
                ) from None
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
        raise AssertionError("unreachable")

    async def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise Unauthorized(self.registry, 401, _NEEDS_CREDENTIALS.format(self.registry))
            self._authorization[scope] = self.credentials.basic()
            return
        if scheme != "bearer" or "realm" not in params:
            raise Unauthorized(
                self.registry,
                401,
                f"asks for an authentication tele does not know ({_printable(challenge, 60)!r})",
            )
        self._authorization[scope] = "Bearer " + await self._fetch_token(params, scope)

    async def _fetch_token(self, params: dict[str, str], scope: str) -> str:
        try:
            realm = httpx.URL(params["realm"])
        except httpx.InvalidURL:
            raise RegistryError(self.registry, 401, "named an unusable token realm") from None
        if realm.scheme not in ("http", "https"):
            raise RegistryError(self.registry, 401, "named a token realm that is not HTTP(S)")
        creds = self.credentials
        if creds is not None and realm.scheme == "http" and not self._http_allowed:
            raise RegistryError(
                self.registry, 401, "wants the credentials sent to a plain-HTTP token service"
            )
        query = {"scope": scope, **({"service": params["service"]} if "service" in params else {})}
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "tele",
                    **query,
                }
                request = self._client.build_request("POST", realm, data=form)
            else:
                headers = {"Authorization": creds.basic()} if creds is not None else {}
                # One `scope` parameter per scope (a cross-repository mount asks for two).
                pairs: list[tuple[str, str | int | float | bool | None]] = [
                    ("scope", one) for one in scope.split()
                ]
                pairs += [(k, v) for k, v in query.items() if k != "scope"]
                request = self._client.build_request("GET", realm, params=pairs, headers=headers)
            response = await self._client.send(request, stream=True, follow_redirects=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        except httpx.InvalidURL:
            raise RegistryError(self.registry, 401, "named an unusable token realm") from None
        try:
            if response.status_code in (401, 403):
                who = f" of user {creds.username!r}" if creds else ""
                raise Unauthorized(
                    self.registry,
                    response.status_code,
                    f"its token service refused the credentials{who}",
                )
            if response.status_code != 200:
                await self._fail(response, "issuing a token")
            body = await self._read_bounded(response, MAX_TOKEN_BODY_BYTES, "a token")
        finally:
            await response.aclose()
        try:
            token = decode(body, _Token, MAX_TOKEN_BODY_BYTES)
        except ValueError:
            raise RegistryError(self.registry, 200, "its token service answered garbage") from None
        value = token.token or token.access_token or ""
        if not value or not all(33 <= ord(c) < 127 for c in value):
            raise RegistryError(self.registry, 200, "its token service answered no usable token")
        return value


def _scope(repository: str, *, push: bool = False) -> str:
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


def _display(ref: Reference, reference: str) -> str:
    base = ref.familiar.split("@")[0]
    if reference.startswith("sha256:"):
        return f"{base.rsplit(':', 1)[0] if ref.tag else base}@{reference}"
    return base if ref.tag else f"{base}:{reference}"


def _choose_platform(manifests: list[Descriptor], wanted: Platform) -> Descriptor | None:
    candidates = [
        d
        for d in manifests
        if d.platform is not None
        and d.platform.os == wanted.os
        and d.platform.architecture == wanted.architecture
        and d.media_type in MANIFEST_TYPES
    ]
    if wanted.variant is not None:
        candidates = [d for d in candidates if d.platform and d.platform.variant == wanted.variant]
    # Prefer the entry without a variant (amd64 "v1"), as containerd's default matcher does.
    candidates.sort(key=lambda d: d.platform is not None and d.platform.variant is not None)
    return candidates[0] if candidates else None


def _root_cause(exc: BaseException) -> str:
    """The most specific message in an exception's chain (httpx's own are often empty)."""
    seen: set[int] = set()
    best = type(exc).__name__
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
            continue
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message}"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        if str(current):
            best = str(current)
        current = current.__cause__ or current.__context__
    return best


def _is_tls_failure(exc: BaseException) -> bool:
    """Whether a connect error came from the TLS handshake (a plain-HTTP server, say)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(
            current
        ):
            return False  # it speaks TLS, with a certificate we do not trust
        if isinstance(current, ssl.SSLError) or "SSL" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as f:
        while chunk := await f.read(_UPLOAD_CHUNK):
            yield chunk
