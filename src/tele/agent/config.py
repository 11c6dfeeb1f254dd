"""The agent's view of its pod: the AgentConfig, its name and pod IP, and the apps' environment,
all read from the env variables the manager's webhook injects (tele.contracts.agentconfig)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import msgspec

from tele.agent.errors import AgentConfigError
from tele.contracts.agentconfig import AgentConfig, ContainerConfig, Intercept

CONFIG_ENV = "_TEL_AGENT_CONFIG"
NAME_ENV = "_TEL_AGENT_NAME"
POD_IP_ENV = "_TEL_AGENT_POD_IP"
APP_ENV_PREFIX = "_TEL_APP_"
TLS_CERT_ENV = "_TEL_AGENT_TLS_CERT"
TLS_KEY_ENV = "_TEL_AGENT_TLS_KEY"
APP_TLS_ENV = "_TEL_AGENT_APP_TLS"
APP_CA_ENV = "_TEL_AGENT_APP_CA"
"""TLS termination (the webhook sets these when the workload names a terminating secret): the
certificate and key files, whether the app itself speaks TLS behind the agent (default yes when
terminating), and an optional CA file to verify the app's certificate."""


class AgentSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the agent process starts from."""

    name: str
    pod_ip: str
    config: AgentConfig
    tls_cert: str = ""
    tls_key: str = ""
    app_tls: bool = True
    app_ca: str = ""

    def intercepts(self) -> list[tuple[str, Intercept]]:
        return self.config.intercepts()

    def app_environment(self, environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """Per app container, its env as the agent received it (`_TEL_APP_<prefix>` removed)."""
        return {c.name: _container_env(c, environ) for c in self.config.containers}


def _container_env(container: ContainerConfig, environ: Mapping[str, str]) -> dict[str, str]:
    prefix = APP_ENV_PREFIX + container.env_prefix
    return {k[len(prefix) :]: v for k, v in environ.items() if k.startswith(prefix)}


def load(environ: Mapping[str, str]) -> AgentSettings:
    """The settings in `environ`; AgentConfigError (one sentence) when they are unusable."""
    raw = environ.get(CONFIG_ENV, "")
    if not raw.strip():
        raise AgentConfigError(
            f"{CONFIG_ENV} is not set: the traffic agent runs only in a pod that the traffic "
            "manager injected it into."
        )
    try:
        config = msgspec.json.decode(raw, type=AgentConfig)
    except msgspec.DecodeError as exc:
        raise AgentConfigError(
            f"{CONFIG_ENV} is not a valid agent configuration ({_first_line(exc)}); "
            "re-create the pod so the traffic manager injects a current one."
        ) from None
    seen: dict[int, str] = {}
    for container, intercept in config.intercepts():
        port = intercept.agent_port
        if not 0 < port < 65536 or not 0 < intercept.container_port < 65536:
            raise AgentConfigError(
                f"{CONFIG_ENV} gives container {container!r} an out-of-range port "
                f"({intercept.container_port} -> {port})."
            )
        owner = f"{container}/{intercept.service_name}:{intercept.service_port}"
        if port in seen:
            raise AgentConfigError(
                f"{CONFIG_ENV} gives agent port {port} to both {seen[port]} and {owner}."
            )
        seen[port] = owner
    pod_ip = environ.get(POD_IP_ENV, "").strip()
    if pod_ip:
        try:
            ipaddress.ip_address(pod_ip)
        except ValueError:
            raise AgentConfigError(f"{POD_IP_ENV} is {pod_ip!r}, not an IP address.") from None
    name = environ.get(NAME_ENV, "").strip() or config.agent_name
    cert, key = environ.get(TLS_CERT_ENV, "").strip(), environ.get(TLS_KEY_ENV, "").strip()
    if bool(cert) != bool(key):
        raise AgentConfigError(f"{TLS_CERT_ENV} and {TLS_KEY_ENV} must be set together.")
    app_tls = environ.get(APP_TLS_ENV, "true").strip().lower()
    if app_tls not in ("true", "false"):
        raise AgentConfigError(f"{APP_TLS_ENV} is {app_tls!r}; use true or false.")
    return AgentSettings(
        name=name,
        pod_ip=pod_ip or "127.0.0.1",
        config=config,
        tls_cert=cert,
        tls_key=key,
        app_tls=app_tls == "true",
        app_ca=environ.get(APP_CA_ENV, "").strip(),
    )


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
