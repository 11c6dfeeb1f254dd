"""The client configuration in `~/.config/tele/config.yml`: its schema, defaults and loading.

Keys follow Telepresence's config.yml (camelCase; kebab-case and snake_case spellings are
accepted too). Durations are Go-style strings ("20s", "1m30s", "500ms") or plain seconds. Every
problem with the file becomes one UserError sentence naming the file, the key and the problem.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from tele import paths
from tele.errors import UserError

LOG_LEVELS = ("trace", "debug", "info", "warning", "error")


class Duration(float):
    """A number of seconds; written in the file as "20s", "1m30s", "500ms" or a plain number."""

    def __str__(self) -> str:
        return format_duration(self)


class LogLevel(str):
    """One of LOG_LEVELS ("warn" is accepted for "warning", as Telepresence does)."""

    __slots__ = ()


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str | float) -> Duration:
    """Parse "1h2m3.5s", "500ms", "0", "20" (seconds) or a number; raise ValueError if not one."""
    if isinstance(text, bool):  # bool is an int subclass; `true` is not a duration
        raise ValueError(f"expected a duration like '20s' or a number of seconds, got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        stripped = text.strip()
        try:
            seconds = float(stripped)
        except ValueError:
            pos = 0
            seconds = 0.0
            for match in _DURATION_PART.finditer(stripped):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
                pos = match.end()
            if pos != len(stripped) or not stripped:
                raise ValueError(
                    f"expected a duration like '20s', '1m30s' or '500ms', got {text!r}"
                ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration of zero or more seconds, got {text!r}")
    return Duration(seconds)


def format_duration(seconds: float) -> str:
    """The Go-style spelling of a duration: 90 -> "1m30s", 0.5 -> "500ms", 0 -> "0s"."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    if secs or not parts:
        parts.append(f"{secs:g}s")
    return "".join(parts)


def parse_log_level(text: object) -> LogLevel:
    """Validate a log level name (case-insensitive); raise ValueError naming the choices."""
    if isinstance(text, str):
        name = text.strip().lower()
        name = "warning" if name == "warn" else name
        if name in LOG_LEVELS:
            return LogLevel(name)
    raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Duration:
        return parse_duration(obj)
    if typ is LogLevel:
        return parse_log_level(obj)
    raise NotImplementedError(f"no decoder for {typ!r}")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Duration):
        return format_duration(obj)
    if isinstance(obj, LogLevel):
        return str.__str__(obj)
    raise NotImplementedError(f"no encoder for {type(obj)!r}")


class _Section(msgspec.Struct, forbid_unknown_fields=True, rename="camel", kw_only=True):
    pass


class Timeouts(_Section):
    """How long tele waits for each kind of operation (the README's table says where)."""

    daemon_start: Duration = Duration(10)
    """The CLI waits this long for a daemon it started to answer."""
    cluster_connect: Duration = Duration(20)
    """The first answer of the Kubernetes API server when connecting."""
    endpoint_dial: Duration = Duration(3)
    """Connecting to the local handler of an engagement (a caller's connection waits)."""
    intercept: Duration = Duration(30)
    """An intercept, replace or ingest waits this long for the workload's agent."""
    proxy_dial: Duration = Duration(5)
    """A connection from this machine to a cluster address waits this long for the tunnel."""
    traffic_manager_api: Duration = msgspec.field(default=Duration(15), name="trafficManagerAPI")
    """Each call to the traffic manager (arriving, listing, looking up)."""
    traffic_manager_connect: Duration = Duration(60)
    """Finding a ready traffic manager pod and opening the link to it."""


class LogLevels(_Section):
    """The log level each of tele's processes starts with (`tele loglevel` changes it later)."""

    user_daemon: LogLevel = LogLevel("info")
    root_daemon: LogLevel = LogLevel("info")
    """The privileged helper's (Telepresence's root daemon)."""


class Intercept(_Section):
    default_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8080
    """The local port of `tele intercept` without --port."""


class Cluster(_Section):
    default_manager_namespace: str = "ambassador"
    """The traffic manager's namespace when neither --manager-namespace nor the kubeconfig's
    telepresence.io extension names one."""
    mapped_namespaces: list[str] = msgspec.field(default_factory=list)
    """The namespaces `tele connect` maps without --mapped-namespaces (empty: all)."""
    virtual_ip_subnet: str = msgspec.field(default="246.246.0.0/16", name="virtualIPSubnet")


class DnsMapping(_Section):
    """`name` is answered as `aliasFor`: another name (looked up in the cluster) or an IP."""

    name: str
    alias_for: str


class Dns(_Section):
    """DNS rules (Telepresence's kubeconfig extension `dns`, Helm `client.dns`); an unset key
    is taken from the next source (README: Settings)."""

    include_suffixes: list[str] | None = None
    """Names ending in one of these are looked up in the cluster."""
    exclude_suffixes: list[str] | None = None
    """Names ending in one of these go to the system's resolver (default .com .io .net .org
    .ru) unless a longer include suffix matches."""
    excludes: list[str] | None = None
    """Names answered NXDOMAIN."""
    mappings: list[DnsMapping] | None = None
    lookup_timeout: Duration | None = None
    """How long a cluster lookup may take before the answer is SERVFAIL (default 8s)."""
    local_ip: str | None = msgspec.field(default=None, name="localIP")
    """The nameserver for names outside the cluster (default: the system's, from resolv.conf)."""


class Routing(_Section):
    """Subnets of the VIF (Telepresence's kubeconfig extension `also-proxy` etc., Helm
    `client.routing`)."""

    also_proxy_subnets: list[str] | None = None
    never_proxy_subnets: list[str] | None = None
    allow_conflicting_subnets: list[str] | None = None


class ClientNetwork(_Section):
    """The DNS and routing settings of one source (flags, kubeconfig, manager, config.yml)."""

    dns: Dns = msgspec.field(default_factory=Dns)
    routing: Routing = msgspec.field(default_factory=Routing)


class Rpc(_Section):
    max_message_size: Annotated[int, msgspec.Meta(ge=1024)] = 4 * 1024 * 1024


class Config(_Section):
    """The whole client configuration; every key is optional."""

    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    log_levels: LogLevels = msgspec.field(default_factory=LogLevels)
    intercept: Intercept = msgspec.field(default_factory=Intercept)
    cluster: Cluster = msgspec.field(default_factory=Cluster)
    rpc: Rpc = msgspec.field(default_factory=Rpc)
    dns: Dns = msgspec.field(default_factory=Dns)
    routing: Routing = msgspec.field(default_factory=Routing)

    def network(self) -> ClientNetwork:
        return ClientNetwork(dns=self.dns, routing=self.routing)


def _fold(key: str) -> str:
    return key.replace("-", "").replace("_", "").lower()


def _struct_field_types(struct_type: type[msgspec.Struct]) -> dict[str, Any]:
    """encoded key -> annotation, for the fields of one section."""
    return {f.encode_name: f.type for f in msgspec.structs.fields(struct_type)}


def _struct_of(annotation: Any) -> type[msgspec.Struct] | None:
    """The Struct type of a field typed `S`, `S | None`, `list[S]` or `list[S] | None`."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    for arg in typing.get_args(annotation):
        found = _struct_of(arg)
        if found is not None:
            return found
    return None


def _normalize_keys(
    raw: Any, struct_type: type[msgspec.Struct], path: str, originals: dict[str, str]
) -> Any:
    """Rename kebab/snake/any-case keys to the schema's spelling, remembering what was written.

    `originals` maps each renamed key path (as msgspec reports it, e.g. "timeouts.helm") to the
    path the user wrote, so that error messages name the key as it appears in the file.
    """
    if not isinstance(raw, dict):
        return raw
    fields = _struct_field_types(struct_type)
    by_fold = {_fold(name): name for name in fields}
    result: dict[Any, Any] = {}
    for key, value in raw.items():
        name = by_fold.get(_fold(key), key) if isinstance(key, str) else key
        child_path = f"{path}.{name}" if path else str(name)
        originals[child_path] = f"{originals.get(path, path)}.{key}" if path else str(key)
        field_type = _struct_of(fields.get(name))
        if field_type is not None and isinstance(value, list):
            result[name] = [
                _normalize_keys(item, field_type, f"{child_path}[{i}]", originals)
                for i, item in enumerate(value)
            ]
        elif field_type is not None:
            result[name] = _normalize_keys(value, field_type, child_path, originals)
        else:
            result[name] = value
    return result


REMOVED_KEYS = {
    "timeouts.connectivityCheck": "tele always routes the cluster through its tunnel",
    "timeouts.roundtripLatency": "tele's tunnel has no latency hint",
    "timeouts.helm": "`tele helm uninstall --timeout` bounds the wait for removal",
    "dns.remoteIP": "tele looks cluster names up through the traffic manager",
}
"""Telepresence keys tele does not have, and why: a file that sets one is refused saying so
(a key that is accepted and does nothing is worse than none)."""

_MSGSPEC_ERROR = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")


def _describe(error: msgspec.ValidationError, originals: dict[str, str]) -> tuple[str, str]:
    """A msgspec validation error -> (key path as the user wrote it, the problem in words)."""
    match = _MSGSPEC_ERROR.match(str(error))
    assert match is not None  # the pattern matches any text
    problem = match.group("problem")
    path = (match.group("path") or "").lstrip(".")
    unknown = _UNKNOWN_FIELD.match(problem)
    if unknown:
        path = f"{path}.{unknown.group('field')}" if path else unknown.group("field")
        problem = "is not a known key (see `tele config view` for the known ones)"
        why = next((w for k, w in REMOVED_KEYS.items() if _fold(k) == _fold(path)), None)
        if why is not None:
            problem = f"is a Telepresence setting that tele does not have ({why}): remove it"
    else:
        problem = problem[:1].lower() + problem[1:]
        problem = problem.replace("`", "").replace("expected object", "expected a mapping")
    shown = originals.get(path.split("[", 1)[0], path)
    if "[" in path:
        shown += path[path.index("[") :]
    return shown or "(top level)", problem


def load(path: Path | None = None) -> Config:
    """Read the config file (defaults when it does not exist); raise UserError when it is bad."""
    import yaml

    path = path or paths.config_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"Cannot read the config file {path}: {reason}.") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "it is not valid YAML"
        raise UserError(f"The config file {path} is not valid YAML{where}: {problem}.") from exc
    if raw is None:
        return Config()
    if not isinstance(raw, dict):
        raise UserError(
            f"The config file {path} must hold a mapping of keys, not a {type(raw).__name__}."
        )
    config = _convert(raw, Config, f"the config file {path}")
    check_network(config.network(), f"the config file {path}")
    return config


_T = TypeVar("_T", bound=msgspec.Struct)


def _convert(raw: dict[str, Any], struct_type: type[_T], where: str) -> _T:
    """Keys in any spelling -> `struct_type`; UserError "In WHERE, key `k` …" when bad."""
    originals: dict[str, str] = {}
    normalized = _normalize_keys(raw, struct_type, "", originals)
    try:
        return msgspec.convert(normalized, struct_type, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        key, problem = _describe(exc, originals)
        if not where.startswith("the config file"):  # `tele config view` shows the file's keys
            problem = problem.replace(
                "see `tele config view` for the known ones", "the README's Settings lists them"
            )
        raise UserError(f"In {where}, key `{key}` {_verb(problem)}.") from exc


# --- the DNS and routing settings from their sources --------------------------------------------

KUBECONFIG_EXTENSION = "the kubeconfig's telepresence.io extension"
MANAGER_VALUES = "the traffic manager's Helm values (client.*)"
_EXTENSION_ROUTING = {
    "also-proxy": "alsoProxySubnets",
    "never-proxy": "neverProxySubnets",
    "allow-conflicting-subnets": "allowConflictingSubnets",
}


def network_from_extension(extension: dict[str, Any]) -> ClientNetwork:
    """The `dns`, `also-proxy`, `never-proxy` and `allow-conflicting-subnets` keys of the
    kubeconfig's telepresence.io extension (its other keys are not about the network)."""
    raw: dict[str, Any] = {}
    if "dns" in extension:
        raw["dns"] = extension["dns"]
    routing: dict[str, Any] = {}
    for theirs, ours in _EXTENSION_ROUTING.items():
        if theirs in extension:
            routing[ours] = extension[theirs]
    if routing:
        raw["routing"] = routing
    network = _convert(raw, ClientNetwork, KUBECONFIG_EXTENSION)
    check_network(network, KUBECONFIG_EXTENSION)
    return network


def network_from_manager(values: dict[str, Any]) -> ClientNetwork:
    """The Helm values `client.dns` and `client.routing` the manager delivers at connect."""
    raw: dict[str, Any] = {k: values[k] for k in ("dns", "routing") if k in values}
    network = _convert(raw, ClientNetwork, MANAGER_VALUES)
    check_network(network, MANAGER_VALUES)
    return network


def network_builtins(network: ClientNetwork) -> dict[str, Any]:
    """Plain data of the keys that are set, in config.yml's spelling (for `tele status`)."""
    data = msgspec.to_builtins(network, enc_hook=_enc_hook)
    assert isinstance(data, dict)
    return {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in data.items()
    }


def merge_networks(*layers: ClientNetwork) -> ClientNetwork:
    """Key by key, the first layer that sets it (layers from the highest precedence down)."""

    def first(section: str, key: str) -> Any:
        for layer in layers:
            value = getattr(getattr(layer, section), key)
            if value is not None:
                return value
        return None

    dns = Dns(**{f.name: first("dns", f.name) for f in msgspec.structs.fields(Dns)})
    routing = Routing(**{f.name: first("routing", f.name) for f in msgspec.structs.fields(Routing)})
    return ClientNetwork(dns=dns, routing=routing)


_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$", re.IGNORECASE)


def is_dns_name(text: str) -> bool:
    """A name DNS can carry: dot-separated labels of letters, digits, - and _ (at most 63
    bytes each, 253 in all); one trailing dot allowed."""
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def check_network(network: ClientNetwork, where: str) -> None:
    """UserError naming `where` and the key for a name that cannot be one, an alias that is
    neither a name nor an IP, or a subnet that is not a CIDR."""
    import ipaddress

    dns = network.dns
    for key, names in (
        ("dns.includeSuffixes", dns.include_suffixes),
        ("dns.excludeSuffixes", dns.exclude_suffixes),
        ("dns.excludes", dns.excludes),
    ):
        for name in names or ():
            if not is_dns_name(name.lstrip(".")):
                raise UserError(f"In {where}, {key} has {name!r}, which is not a DNS name.")
    if dns.local_ip is not None:
        try:
            ipaddress.IPv4Address(dns.local_ip)
        except ValueError:
            raise UserError(
                f"In {where}, dns.localIP is {dns.local_ip!r}, which is not an IPv4 address."
            ) from None
    for mapping in dns.mappings or ():
        if not is_dns_name(mapping.name):
            raise UserError(
                f"In {where}, the DNS mapping of {mapping.name!r} names no valid DNS name."
            )
        try:
            ipaddress.ip_address(mapping.alias_for)
        except ValueError:
            if not is_dns_name(mapping.alias_for):
                raise UserError(
                    f"In {where}, the DNS mapping of {mapping.name} is an alias for "
                    f"{mapping.alias_for!r}, which is neither a DNS name nor an IP address."
                ) from None
    routing = network.routing
    for key, subnets in (
        ("routing.alsoProxySubnets", routing.also_proxy_subnets),
        ("routing.neverProxySubnets", routing.never_proxy_subnets),
        ("routing.allowConflictingSubnets", routing.allow_conflicting_subnets),
    ):
        for subnet in subnets or ():
            try:
                ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                raise UserError(
                    f"In {where}, {key} has {subnet!r}, which is not a subnet (CIDR)."
                ) from None


def _verb(problem: str) -> str:
    """Join the key and the problem into one sentence: "key `x` is …" / "key `x`: expected …"."""
    return problem if problem.startswith("is ") else f"is wrong: {problem}"


def to_builtins(config: Config) -> dict[str, Any]:
    """The config as plain data with the file's spelling of keys and durations; unset `dns` and
    `routing` keys are left out (they come from the kubeconfig or the manager, else tele's
    defaults: README, Settings)."""
    data = msgspec.to_builtins(config, enc_hook=_enc_hook)
    assert isinstance(data, dict)
    for section in ("dns", "routing"):
        data[section] = {k: v for k, v in data[section].items() if v is not None}
    return data
