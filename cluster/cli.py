"""The ``corral`` command: the app every command module registers on, what they share
(settings, the one-line error, the options, reaching the API), and ``corral serve``."""

from __future__ import annotations

import signal
import threading
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
from deployments.keys import KeyFile, KeyFileError, keys_path
from nodes.logs import setup_logging
from nodes.models import builtin_models

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


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help=describe("host"))] = None,
    address: Annotated[str | None, typer.Option(help=describe("ray_address"))] = None,
    config: ConfigOption = None,
    num_ctx: Annotated[int | None, typer.Option(help=describe("num_ctx"))] = None,
    num_threads: Annotated[int | None, typer.Option(help=describe("num_threads"))] = None,
    dashboard: Annotated[bool | None, typer.Option(help=describe("dashboard"))] = None,
) -> None:
    """Start Corral and serve until Ctrl-C.

    With no cluster address it starts a private one-box Ray cluster with the
    starter model smollm2:135m; nothing to configure, no network needed. On a
    cluster it joined, the models keep running when it stops, and the next
    start adopts them instead of loading them again.
    """
    from cluster.server import StartupError, corral_version, start_corral  # slow: see _version

    settings = load(
        config,
        host=host,
        ray_address=address,
        num_ctx=num_ctx,
        num_threads=num_threads,
        dashboard=dashboard,
    )
    setup_logging(settings.log_level)
    # Ctrl-C during startup raises KeyboardInterrupt, which start_corral cleans up after.
    with console.status("Starting Corral (Ray, Serve, controller)..."):
        try:
            running = start_corral(settings)
        except StartupError as exc:
            raise fail(exc) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    models = ", ".join(sorted(builtin_models()))
    console.print(
        f"Corral {corral_version()} is serving on [bold]{running.url}[/] "
        f"(OpenAI API at {running.url}/v1, dashboard at {running.url}/ui). Models: {models}. "
        f"Ctrl-C stops it.",
        highlight=False,
    )
    if warning := open_api_warning(settings):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        if running.owns_ray:
            console.print("Stopping Corral...")
        else:
            console.print(
                "Stopping Corral; the models keep running on the cluster for the next "
                "`corral serve` (`corral node stop` on the head ends them)..."
            )
        running.stop()


def open_api_warning(settings: CorralSettings) -> str | None:
    """A warning when the API faces the network and anyone there may use it."""
    host, _ = settings.listen
    if host in ("127.0.0.1", "::1", "localhost") or settings.auth.required:
        return None
    try:
        if KeyFile(keys_path(settings.state_path)).read():
            return None
    except KeyFileError:
        return None  # the server refuses every request and logs why
    return (
        f"the API listens on {settings.host} with no API key: anyone who can reach it may "
        "use and change the models. `corral keys create` makes one."
    )


def main() -> None:
    app()


# Modules that register their commands on `app`, in the order `corral --help` lists them:
# keys, the model commands (pull, list, show, rm, cp, create, stop), run, node start/stop
# and nodes, plan and apply, ps.
from cluster import cli_keys, cli_models  # noqa: E402,F401,I001 (order: see above)
from cluster import cli_chat  # noqa: E402,F401
from cluster import cli_nodes, cli_plan, cli_ps  # noqa: E402,F401

if __name__ == "__main__":
    main()
