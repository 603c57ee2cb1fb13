"""``corral ps``: what runs where, how busy it is, and when keep-alive unloads it.

It asks the API (``GET /api/cluster/placements``) like ``ollama ps`` asks
Ollama's, so it works from any box that can reach the API, without joining Ray.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

from cluster.api_client import NEED_KEY, api_headers, api_url
from cluster.cli_app import ConfigOption, HostOption, app, fail, load
from cluster.planner import human_bytes
from deployments.views import PlacementView
from nodes.durations import format_duration


@app.command("ps")
def ps(
    host: HostOption = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Loaded models: node, replicas, requests in flight, idle time, when they unload."""
    settings = load(config, host=host)
    url = api_url(settings.host)
    try:
        rows = fetch_placements(url)
    except OSError as exc:
        raise fail(f"cannot reach Corral at {url} ({exc}); is `corral serve` running?") from None
    if as_json:
        print(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    if not rows:
        Console(stderr=True).print("No model is loaded.")
        return
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(ps_table(rows, time.time()))
    for line in failure_lines(rows):
        console.print(line, highlight=False, markup=False)


def fetch_placements(url: str) -> list[PlacementView]:
    """The placement rows of ``GET /api/cluster/placements``; OSError saying why not."""
    try:
        r = httpx.get(f"{url}/api/cluster/placements", headers=api_headers(), timeout=10)
    except httpx.HTTPError as exc:
        raise OSError(str(exc) or type(exc).__name__) from None
    if r.status_code in (401, 403):
        raise OSError(f"HTTP {r.status_code}: {r.text[:200]}; {NEED_KEY}")
    if r.status_code != 200:
        raise OSError(f"HTTP {r.status_code}: {r.text[:200]}")
    return [PlacementView.model_validate(row) for row in r.json()["placements"]]


def ps_table(rows: list[PlacementView], now: float) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("MODEL", "NODE", "REPLICAS", "SLOTS USED", "IDLE FOR", "UNTIL", "PINNED"):
        table.add_column(column)
    table.add_column("MEMORY", justify="right")
    for row in rows:
        replicas = str(row.replicas)
        if row.status != "RUNNING":
            replicas += f" ({row.status.lower()})"
        memory = human_bytes(row.ram * row.replicas)
        if row.vram:
            memory += f" + {human_bytes(row.vram * row.replicas)} VRAM"
        node = row.node
        if row.parts:  # split: main 20 layers + nas 11
            node = f"{node} {row.layers} layers + " + " + ".join(
                f"{part.node} {part.layers}" for part in row.parts
            )
            memory = " + ".join(
                human_bytes(ram) + (f" + {human_bytes(vram)} VRAM" if vram else "")
                for ram, vram in [(row.ram, row.vram), *((p.ram, p.vram) for p in row.parts)]
            )
        table.add_row(
            row.model,
            node,
            replicas,
            _slots(row),
            "-" if row.idle_for is None else format_duration(row.idle_for),
            _until(row, now),
            "yes" if row.pinned else "no",
            memory,
        )
    return table


def failure_lines(rows: list[PlacementView]) -> list[str]:
    """Why each failed model was given up on (the table has no room for it)."""
    return [
        f"{row.model} on {row.node} FAILED: {row.failure.reason}" for row in rows if row.failure
    ]


def _until(row: PlacementView, now: float) -> str:
    """When keep-alive unloads it, as ``ollama ps`` says it; when a failed one is retried."""
    if row.failure:
        left = row.failure.retry_at - now
        return "retry now" if left <= 0 else f"retry in {format_duration(left)}"
    if row.idle_for is None:
        return "busy"
    if row.held:
        return "kept (replicas.min)"
    if row.expires_at is None:
        return "forever"
    left = row.expires_at - now
    return "now" if left <= 0 else f"in {format_duration(left)}"


def _slots(row: PlacementView) -> str:
    """Requests running of the slots there are, and those waiting: "4/4 +2 queued"."""
    if not row.slots:
        return str(row.in_flight)
    running = min(row.in_flight, row.slots)
    waiting = row.in_flight - running
    return f"{running}/{row.slots}" + (f" +{waiting} queued" if waiting else "")
