"""`tele completion bash|zsh|fish`: the shell's completion script (click's), as Telepresence's
`completion` prints one: `source <(tele completion bash)`."""

from __future__ import annotations

import click


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL; e.g. `source <(tele completion bash)`."""
    from click.shell_completion import get_completion_class

    from tele.cli.main import cli

    complete = get_completion_class(shell)
    assert complete is not None  # the three choices are click's own
    click.echo(complete(cli, {}, "tele", "_TELE_COMPLETE").source())
