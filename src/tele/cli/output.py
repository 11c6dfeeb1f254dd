"""Rendering of command results: text for people, --output json|yaml for programs."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

OUTPUT_CHOICES = ("default", "json", "yaml")

GLOBAL_OUTPUT = "tele.output"
"""ctx.meta key of `tele --output X COMMAND` (the group's option, before the command)."""


def _or_global(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The command's own --output, else the one given before the command."""
    if value != "default":
        return value
    return str(ctx.meta.get(GLOBAL_OUTPUT, "default"))


output_option = click.option(
    "--output",
    "-o",
    "output",
    type=click.Choice(OUTPUT_CHOICES),
    default="default",
    show_default=True,
    callback=_or_global,
    help="Print as text for people or as json/yaml for programs (also before the command).",
)


def asked_output(argv: list[str]) -> str:
    """The --output/-o value in a command line (for the error envelope: the command may not
    have parsed it), "default" when none."""
    for index, arg in enumerate(argv):
        if arg == "--":
            break
        for flag in ("--output=", "-o"):
            if arg.startswith(flag) and arg[len(flag) :] in OUTPUT_CHOICES:
                return arg[len(flag) :]
        if arg in ("--output", "-o") and index + 1 < len(argv):
            return argv[index + 1] if argv[index + 1] in OUTPUT_CHOICES else "default"
    return "default"


def emit_error(message: str, exit_code: int, output: str) -> None:
    """An error as JSON or YAML on stdout, for a program that asked for that format."""
    envelope = {"error": message, "exit_code": exit_code}
    if output == "json":
        click.echo(json.dumps(envelope, indent=2))
    elif output == "yaml":
        import yaml

        click.echo(yaml.safe_dump(envelope, sort_keys=False).rstrip())


def to_builtins(data: Any) -> Any:
    """msgspec Structs, enums, datetimes -> plain JSON-able values."""
    import msgspec

    return msgspec.to_builtins(data)


def emit(data: Any, output: str, text: Callable[[Any], str]) -> None:
    """Print `data` as `output` asks; `text` renders the default, human form."""
    if output == "json":
        click.echo(json.dumps(to_builtins(data), indent=2, sort_keys=False))
    elif output == "yaml":
        import yaml

        click.echo(yaml.safe_dump(to_builtins(data), sort_keys=False).rstrip())
    else:
        click.echo(text(data))


def report_unexpected(exc: BaseException) -> None:
    """Log an unexpected exception's traceback to the CLI log and print one line about it."""
    from tele import paths

    log_path = paths.logs_dir() / "cli.log"
    try:
        paths.ensure_private_dir(log_path.parent)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger = logging.getLogger("tele.cli")
        logger.addHandler(handler)
        logger.error("unexpected error", exc_info=exc)
        handler.close()
        where = f"; details are in {log_path}"
    except OSError:
        where = ""
    print(f"tele: internal error: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
