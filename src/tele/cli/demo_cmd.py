"""`tele demo`: see what tele does on this machine, with no cluster of your own."""

from __future__ import annotations

import click


@click.command()
@click.option("--keep", is_flag=True, help="Leave the sandbox running to continue by hand.")
@click.option("--name", default=None, help="The sandbox's name (default: tele-demo-<random>).")
def demo(keep: bool, name: str | None) -> None:
    """Run the whole story: sandbox, traffic manager, connect, intercept, leave, tear down."""
    from tele.demo import run_demo

    run_demo(name, keep, click.echo)
