"""`tele config view`: the effective client configuration (defaults merged with the file)."""

from __future__ import annotations

from typing import Any

import click

from tele.cli.output import emit, output_option


@click.group()
def config() -> None:
    """Show the client configuration (~/.config/tele/config.yml)."""


@config.command()
@output_option
def view(output: str) -> None:
    """Print the effective configuration: every key, with defaults for what the file omits."""
    from tele import config as client_config

    data = client_config.to_builtins(client_config.load())

    def text(d: dict[str, Any]) -> str:
        import yaml

        return yaml.safe_dump(d, sort_keys=False).rstrip()

    emit(data, output, text)
