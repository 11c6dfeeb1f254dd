"""Kubeconfig -> what tele needs to reach the API server: URL, TLS context, auth header.

The kubernetes package does the parsing and the credential work (CA data, tokens, client
certificates, exec plugins, token refresh); it is blocking and slow to import, so it is imported
lazily and only ever called in a worker thread.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tele.k8s.errors import KubeconfigError


@dataclass(frozen=True)
class ClusterConnection:
    """How to reach one cluster's API server as one user (one kubeconfig context)."""

    server: str
    """Base URL, `https://host:port` plus any path prefix (rancher-style proxies); no trailing /."""
    context: str
    namespace: str
    """The context's default namespace."""
    ssl_context: ssl.SSLContext | None
    """TLS settings (CA, client certificate, verification); None for an http:// server."""
    tls_server_name: str | None = None
    """SNI / certificate name to use instead of the URL's host (kubeconfig `tls-server-name`)."""
    _authorization: Callable[[], str | None] = field(default=lambda: None, repr=False)
    _ssl_factory: Callable[[], ssl.SSLContext] | None = field(default=None, repr=False)
    extension: dict[str, Any] = field(default_factory=dict)
    """The `telepresence.io` kubeconfig extension of the context's cluster, overridden key by
    key by the context's own (manager namespace, DNS and routing settings of this cluster)."""

    def new_ssl_context(self, alpn: list[str] | None = None) -> ssl.SSLContext | None:
        """A TLS context of its own for one user of this connection.

        Libraries set ALPN on the context they are given (httpx offers h2), and the
        port-forward's websocket must offer only HTTP/1.1: sharing one context would let the
        API server answer the upgrade in HTTP/2.
        """
        if self.ssl_context is None:
            return None
        context = self._ssl_factory() if self._ssl_factory is not None else self.ssl_context
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        return context

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.server).hostname or ""

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.server)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path_prefix(self) -> str:
        return urllib.parse.urlsplit(self.server).path.rstrip("/")

    async def auth_headers(self) -> list[tuple[bytes, bytes]]:
        """HTTP headers that authenticate a request (empty with client certificates only).

        Runs the kubernetes package's refresh hook in a thread: an expired exec-plugin token
        means running the plugin, which may take a while.
        """
        value = await trio.to_thread.run_sync(self._authorization)
        if not value:
            return []
        return [(b"Authorization", value.encode("latin-1"))]


def _check_paths(kubeconfig: str | None) -> None:
    """One sentence for the two common mistakes the kubernetes package words poorly: a path
    that is not there (named, with the OS's reason) and YAML text given where a path goes."""
    text = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    if "\n" in text.strip() or text.lstrip().startswith(("apiVersion:", "{", "clusters:")):
        raise KubeconfigError(
            "The kubeconfig (--kubeconfig or KUBECONFIG) is YAML text, not a path: "
            "save it to a file and give the file's path."
        )
    paths = [os.path.expanduser(p) for p in text.split(os.pathsep) if p]
    if paths and not any(os.path.exists(p) for p in paths):
        try:
            with open(paths[0], "rb"):
                pass
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise KubeconfigError(f"Cannot read the kubeconfig {paths[0]}: {reason}.") from None


def _load_blocking(kubeconfig: str | None, context: str | None) -> ClusterConnection:
    from kubernetes import client  # lazily: ~0.2 s import
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    _check_paths(kubeconfig)
    configuration: Any = client.Configuration()
    try:
        config: Any = kube_config  # partly annotated: treat as untyped
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
        name: str = context or (current or {}).get("name") or ""
        entry = next((c for c in contexts if c.get("name") == name), None)
        if entry is None:
            raise KubeconfigError(f"The kubeconfig has no context named {name!r}.")
        config.load_kube_config(
            config_file=kubeconfig,
            context=name,
            client_configuration=configuration,
            persist_config=False,
        )
    except ConfigException as exc:
        raise KubeconfigError(f"Cannot use the kubeconfig: {str(exc).rstrip('.')}.") from exc
    except OSError as exc:
        raise KubeconfigError(f"Cannot read the kubeconfig: {exc}.") from exc

    server: str = configuration.host.rstrip("/")
    scheme = urllib.parse.urlsplit(server).scheme
    if scheme not in ("https", "http"):
        raise KubeconfigError(f"Context {name!r} has server {server!r}, not an http(s) URL.")

    def make_ssl_context() -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        return context

    ssl_context: ssl.SSLContext | None = None
    if scheme == "https":
        try:
            ssl_context = make_ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise KubeconfigError(
                f"Context {name!r} has unusable TLS certificate data: {exc}."
            ) from exc

    def authorization() -> str | None:
        # BearerToken holds the whole header value ("Bearer …" or "Basic …"); the hook refreshes
        # expired exec-plugin and OIDC tokens before it is read.
        try:
            value: str | None = configuration.get_api_key_with_prefix("BearerToken")
        except ConfigException as exc:
            why = str(exc).rstrip(".")
            raise KubeconfigError(f"Cannot refresh the credentials of {name!r}: {why}.") from exc
        return value

    namespace = (entry.get("context") or {}).get("namespace") or "default"
    extension = _extension(kubeconfig, entry)
    return ClusterConnection(
        server=server,
        context=name,
        namespace=namespace,
        ssl_context=ssl_context,
        tls_server_name=configuration.tls_server_name or None,
        _authorization=authorization,
        _ssl_factory=make_ssl_context if ssl_context is not None else None,
        extension=extension,
    )


EXTENSION_NAME = "telepresence.io"


def _extension(kubeconfig: str | None, context_entry: dict[str, Any]) -> dict[str, Any]:
    """The `telepresence.io` extension of the context's cluster, then of the context itself
    (Telepresence keeps it on the cluster; a context's own wins). The first file that names
    the cluster is used, as kubectl merges files."""
    import yaml

    context = context_entry.get("context") or {}
    cluster_name = context.get("cluster")
    found: dict[str, Any] = {}
    text = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    for path in [os.path.expanduser(p) for p in text.split(os.pathsep) if p]:
        try:
            with open(path, encoding="utf-8") as file:
                document = yaml.safe_load(file)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        clusters = document.get("clusters") if isinstance(document, dict) else None
        for cluster in clusters if isinstance(clusters, list) else []:
            if isinstance(cluster, dict) and cluster.get("name") == cluster_name:
                found = _named_extension((cluster.get("cluster") or {}).get("extensions"))
                break
        else:
            continue
        break
    return {**found, **_named_extension(context.get("extensions"))}


def _named_extension(extensions: object) -> dict[str, Any]:
    for item in extensions if isinstance(extensions, list) else []:
        if isinstance(item, dict) and item.get("name") == EXTENSION_NAME:
            value = item.get("extension")
            if not isinstance(value, dict):
                raise KubeconfigError(
                    f"The kubeconfig's {EXTENSION_NAME} extension must be a mapping of keys."
                )
            return dict(value)
    return {}


async def load_connection(
    kubeconfig: str | None = None, context: str | None = None
) -> ClusterConnection:
    """Read the kubeconfig (`$KUBECONFIG` or ~/.kube/config when None) for `context` (its current
    context when None). Raises `KubeconfigError` with one readable sentence."""
    return await trio.to_thread.run_sync(_load_blocking, kubeconfig, context)
