"""The client config file: defaults, accepted spellings, and one-sentence errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tele import config
from tele.errors import UserError


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return config.load(path)


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(UserError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "config.yml") in message
    return message


def test_missing_or_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert config.load(tmp_path / "absent.yml") == config.Config()
    assert load_text(tmp_path, "") == config.Config()
    defaults = config.Config()
    assert defaults.timeouts.cluster_connect == 20
    assert defaults.timeouts.traffic_manager_api == 15
    assert defaults.log_levels.user_daemon == "info"
    assert defaults.intercept.default_port == 8080
    assert defaults.cluster.default_manager_namespace == "ambassador"


def test_camel_kebab_and_snake_keys_and_durations(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
timeouts:
  clusterConnect: 1m30s
  traffic-manager-api: 500ms
  proxy_dial: 7
  intercept: "2.5"
logLevels:
  user-daemon: DEBUG
  rootDaemon: warn
intercept:
  defaultPort: 9090
cluster:
  mappedNamespaces: [a, b]
""",
    )
    assert cfg.timeouts.cluster_connect == 90
    assert cfg.timeouts.traffic_manager_api == 0.5
    assert cfg.timeouts.proxy_dial == 7
    assert cfg.timeouts.intercept == 2.5
    assert cfg.timeouts.endpoint_dial == 3  # untouched keys keep their defaults
    assert cfg.log_levels.user_daemon == "debug"
    assert cfg.log_levels.root_daemon == "warning"
    assert cfg.intercept.default_port == 9090
    assert cfg.cluster.mapped_namespaces == ["a", "b"]


def test_view_output_reads_back_as_the_same_config(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "timeouts: {clusterConnect: 1h2m3s, endpointDial: 250ms}\n")
    data = config.to_builtins(cfg)
    assert data["timeouts"]["clusterConnect"] == "1h2m3s"
    assert data["timeouts"]["endpointDial"] == "250ms"
    assert data["timeouts"]["trafficManagerAPI"] == "15s"
    assert data["logLevels"] == {"userDaemon": "info", "rootDaemon": "info"}
    assert load_text(tmp_path, yaml.safe_dump(data)) == cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "timeouts:\n  clusterConect: 3\n",
            "key `timeouts.clusterConect` is not a known key",
        ),
        ("colour: blue\n", "key `colour` is not a known key"),
        (
            "timeouts:\n  intercept: soon\n",
            "key `timeouts.intercept` is wrong: expected a duration like '20s'",
        ),
        (
            "timeouts:\n  intercept: -3\n",
            "key `timeouts.intercept` is wrong: expected a duration of zero",
        ),
        ("timeouts:\n  intercept: true\n", "key `timeouts.intercept` is wrong"),
        (
            "timeouts:\n  roundtrip-latency: 2s\n",
            "key `timeouts.roundtrip-latency` is a Telepresence setting that tele does not have "
            "(tele's tunnel has no latency hint): remove it",
        ),
        (
            "log-levels:\n  userDaemon: verbose\n",
            "key `log-levels.userDaemon` is wrong: expected one of trace, debug, info, warning, "
            "error, got 'verbose'",
        ),
        (
            "intercept:\n  default-port: 70000\n",
            "key `intercept.default-port` is wrong: expected int <= 65535",
        ),
        (
            "cluster:\n  mappedNamespaces: [a, 3]\n",
            "key `cluster.mappedNamespaces[1]` is wrong: expected str, got int",
        ),
        ("timeouts: 5\n", "key `timeouts` is wrong: expected a mapping, got int"),
        ("timeouts: [\n", "is not valid YAML at line 2, column 1"),
        ("- a\n- b\n", "must hold a mapping of keys, not a list"),
    ],
)
def test_bad_files_give_one_sentence_naming_file_key_and_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in error_for(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20s", 20), ("1m", 60), ("1h30m", 5400), ("500ms", 0.5), ("1.5s", 1.5), ("0", 0), (3, 3)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "1m 2s", "m5", "-1s", "nan", True])
def test_parse_duration_rejects(text: str | bool) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (0.5, "500ms"), (20, "20s"), (90, "1m30s"), (3600, "1h")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert config.format_duration(seconds) == text
    assert config.parse_duration(text) == seconds


def test_dns_and_routing_keys_read_back_and_unset_ones_are_left_out(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        "dns:\n  mappings:\n    - {name: db.local, alias-for: 10.1.2.3}\n  lookup-timeout: 2s\n"
        "routing:\n  never-proxy-subnets: [10.0.0.0/24]\n",
    )
    data = config.to_builtins(cfg)
    assert data["dns"] == {
        "mappings": [{"name": "db.local", "aliasFor": "10.1.2.3"}],
        "lookupTimeout": "2s",
    }
    assert data["routing"] == {"neverProxySubnets": ["10.0.0.0/24"]}
    assert config.to_builtins(config.Config())["dns"] == {}
    assert load_text(tmp_path, yaml.safe_dump(data)) == cfg


def test_the_kubeconfig_extensions_network_keys_are_read_and_checked() -> None:
    network = config.network_from_extension(
        {
            "manager": {"namespace": "tm"},  # not a network key: left to the session
            "dns": {"exclude-suffixes": [".com"], "mappings": [{"name": "a.b", "aliasFor": "c.d"}]},
            "never-proxy": ["10.0.0.0/24"],
        }
    )
    assert network.dns.exclude_suffixes == [".com"]
    assert network.routing.never_proxy_subnets == ["10.0.0.0/24"]
    with pytest.raises(UserError) as refused:
        config.network_from_extension({"dns": {"colour": "blue"}})
    assert str(refused.value) == (
        "In the kubeconfig's telepresence.io extension, key `dns.colour` is not a known key "
        "(the README's Settings lists them)."
    )
