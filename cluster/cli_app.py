"""The Typer app every ``corral`` command registers on, and what the commands share:
settings and the one-line error, the ``--config`` and ``--host`` options, and reaching
the API. Command modules import from here; ``cluster/cli.py`` puts them together."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from cluster.api_client import ServerError, Unreachable, api_url, session
from cluster.settings import CorralSettings, load_settings
from cluster.yamlfile import ConfigError

app = typer.Typer(
    name="corral",
    help="Run local LLMs on every box of a homelab, behind one OpenAI- and Ollama-compatible API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def describe(name: str) -> str:
    """A setting's description, for the help of the flag that sets it."""
    return CorralSettings.model_fields[name].description or ""


def fail(message: object, code: int = 1) -> typer.Exit:
    """Print a one-line error; ``raise fail(...)`` exits with ``code``."""
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def load(config: Path | None, **overrides: object) -> CorralSettings:
    """Settings from the file, the environment and the given flags, or exit 2 saying why."""
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        raise fail(exc, 2) from None


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Settings file (default: $CORRAL_CONFIG if set)."),
]
HostOption = Annotated[
    str | None, typer.Option(help="The Corral API to ask, HOST:PORT (default: settings' host).")
]


@contextmanager
def corral(host: str | None, config: Path | None) -> Iterator[httpx.Client]:
    """A client for the API the settings name; its failures exit 1 saying what went wrong."""
    url = api_url(load(config, host=host).host)
    try:
        with session(url) as client:
            yield client
    except (Unreachable, ServerError) as exc:
        raise fail(exc) from None


def _version(value: bool) -> None:
    if value:
        # cluster.server brings Ray Serve and FastAPI (about half a second): only the
        # commands that start Corral pay for it, not `corral --help` or `corral pull`.
        from cluster.server import corral_version

        print(f"corral {corral_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Run local LLMs on every box of a homelab, behind one OpenAI- and Ollama-compatible API."""
