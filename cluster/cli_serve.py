"""``corral serve``: start Corral on this box (or on the cluster it names) and serve
until Ctrl-C."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from cluster.cli_app import ConfigOption, app, console, describe, fail, load
from cluster.settings import CorralSettings
from deployments.keys import KeyFile, KeyFileError, keys_path
from nodes.logs import setup_logging
from nodes.models import builtin_models


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
    # Here, not at the top: cluster.server brings Ray Serve and FastAPI (about half a
    # second) that only `corral serve` needs.
    from cluster.server import StartupError, corral_version, start_corral

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
