"""The sandbox's certificate authority and serving certificate.

The CA code is tele's own (`tele.certs`); this module adds what is the sandbox's: the names the
API server's certificate covers (127.0.0.1, localhost and the in-cluster names of the
`kubernetes` Service).
"""

from __future__ import annotations

from tele.certs import CertificateAuthority, KeyPair, client_context, server_context

__all__ = [
    "API_SERVER_HOSTS",
    "CertificateAuthority",
    "KeyPair",
    "client_context",
    "server_context",
]

API_SERVER_HOSTS = [
    "127.0.0.1",
    "localhost",
    "::1",
    "10.96.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]
