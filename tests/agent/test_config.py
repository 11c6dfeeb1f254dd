"""The agent's configuration from the env the manager's webhook injects."""

from __future__ import annotations

import json

import msgspec
import pytest

from tele.agent.config import load
from tele.agent.errors import AgentConfigError
from tests.agent.servers import settings_for


def env_with(config: object, **extra: str) -> dict[str, str]:
    return {"_TEL_AGENT_CONFIG": json.dumps(config), **extra}


def good_config() -> dict[str, object]:
    return msgspec.to_builtins(settings_for(8080).config)  # type: ignore[no-any-return]


def test_load_reads_config_name_pod_ip_and_app_env() -> None:
    environ = env_with(
        good_config(),
        _TEL_AGENT_NAME="echo-7d9f",
        _TEL_AGENT_POD_IP="10.0.0.7",
        _TEL_APP_A_GREETING="hi",
        _TEL_APP_B_OTHER="not ours",
    )
    settings = load(environ)
    assert (settings.name, settings.pod_ip) == ("echo-7d9f", "10.0.0.7")
    [(container, intercept)] = settings.intercepts()
    assert (container, intercept.container_port, intercept.agent_port) == ("echo", 8080, 9900)
    assert settings.app_environment(environ) == {"echo": {"GREETING": "hi"}}


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({}, "_TEL_AGENT_CONFIG is not set"),
        ({"_TEL_AGENT_CONFIG": "{not json"}, "not a valid agent configuration"),
        ({"_TEL_AGENT_CONFIG": '{"agent_name": 3}'}, "not a valid agent configuration"),
        (env_with(good_config(), _TEL_AGENT_POD_IP="pod"), "not an IP address"),
        (env_with(good_config(), _TEL_AGENT_TLS_CERT="/c"), "must be set together"),
        (env_with(good_config(), _TEL_AGENT_APP_TLS="maybe"), "use true or false"),
    ],
)
def test_config_errors_are_one_sentence(environ: dict[str, str], words: str) -> None:
    with pytest.raises(AgentConfigError) as caught:
        load(environ)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message and message.endswith(".")


def test_two_intercepts_on_one_agent_port_are_refused() -> None:
    config = good_config()
    container = config["containers"][0]  # type: ignore[index]
    container["intercepts"].append(dict(container["intercepts"][0], service_port=81))
    with pytest.raises(AgentConfigError, match="agent port 9900 to both"):
        load(env_with(config))
