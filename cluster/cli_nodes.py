"""``corral node start|stop`` (this box) and ``corral nodes`` (the whole cluster)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from cluster.cli_app import ConfigOption, app, console, fail, load
from cluster.settings import CorralSettings
from deployments.actors import CONTROLLER_ACTOR, NAMESPACE
from deployments.views import NodeStatus
from nodes.agent import (
    LABEL_CPU_KERNELS,
    NodePlan,
    NodeSettings,
    NodeStartError,
    plan_node,
    shell_line,
    start_node,
    stop_node,
)
from nodes.hardware import InventoryFileError
from nodes.rayenv import token_path

node_app = typer.Typer(
    help="Join this box to a Corral cluster, or take it out.", no_args_is_help=True
)
app.add_typer(node_app, name="node")

GIB = 1024**3


def _help(name: str) -> str:
    return NodeSettings.model_fields[name].description or ""


StateDirOption = Annotated[
    Path | None,
    typer.Option(help="Corral's state directory (token, node record); default ~/.corral."),
]


@node_app.command("start")
def node_start(
    head: Annotated[bool, typer.Option("--head", help="Start a new cluster on this box.")] = False,
    address: Annotated[
        str | None, typer.Option(help="Join the cluster whose head is at HOST:PORT.")
    ] = None,
    name: Annotated[str | None, typer.Option(help=_help("name"))] = None,
    reserve_ram: Annotated[str | None, typer.Option(help=_help("reserve_ram"))] = None,
    reserve_vram: Annotated[str | None, typer.Option(help=_help("reserve_vram"))] = None,
    max_ram: Annotated[str | None, typer.Option(help=_help("max_ram"))] = None,
    max_vram: Annotated[str | None, typer.Option(help=_help("max_vram"))] = None,
    port: Annotated[int | None, typer.Option(help=_help("port"))] = None,
    node_ip: Annotated[str | None, typer.Option(help=_help("node_ip"))] = None,
    inventory: Annotated[Path | None, typer.Option(help=_help("inventory_file"))] = None,
    temp_dir: Annotated[Path | None, typer.Option(help=_help("temp_dir"))] = None,
    agent_port: Annotated[int | None, typer.Option(help=_help("agent_port"))] = None,
    client_port: Annotated[int | None, typer.Option(help=_help("client_port"))] = None,
    dashboard_port: Annotated[int | None, typer.Option(help=_help("dashboard_port"))] = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    block: Annotated[
        bool, typer.Option("--block", help="Stay in the foreground (for systemd).")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the inventory and ray start command; start nothing."),
    ] = False,
) -> None:
    """Probe this box and start its Ray node with the RAM and VRAM it can offer."""
    if head == (address is not None):
        raise fail("say --head (this box starts the cluster) or --address HEAD:PORT (join one)")
    given = {
        "name": name,
        "reserve_ram": reserve_ram,
        "reserve_vram": reserve_vram,
        "max_ram": max_ram,
        "max_vram": max_vram,
        "port": port,
        "node_ip": node_ip,
        "inventory_file": inventory,
        "temp_dir": temp_dir,
        "agent_port": agent_port,
        "client_port": client_port,
        "dashboard_port": dashboard_port,
    }
    node_overrides = {k: v for k, v in given.items() if v is not None}
    settings = load(config, state_dir=state_dir, node=node_overrides or None)
    state = settings.state_path
    token = token_path(state)
    try:
        plan = plan_node(settings.node, address=address, token=token)
    except (NodeStartError, InventoryFileError) as exc:
        raise fail(exc) from None
    _print_plan(plan)
    if dry_run:
        # The inventory doubles as a declared-hardware file for --inventory.
        inventory = plan.inventory.model_dump(mode="json", exclude={"declared"})
        print("# This box, as probed (usable with --inventory):")
        print(yaml.safe_dump(inventory, sort_keys=False), end="")
        print("# The command that would start the node:")
        print(shell_line(plan.command))
        return
    try:
        with console.status(f"Starting node {plan.offer.name!r}..."):
            record = start_node(plan, settings.node, state, token, block=block)
    except NodeStartError as exc:
        raise fail(exc) from None
    if record.role == "head":
        say(
            f"Started head {record.name!r} at {record.address}. On each other box: copy {token} "
            f"there (mode 600), then run `corral node start --address {record.address}`."
        )
    else:
        say(f"Joined the cluster at {record.address} as {record.name!r}.")
    say(f"Log: {record.log}. Stop with `corral node stop`.")


def _print_plan(plan: NodePlan) -> None:
    inv, offer = plan.inventory, plan.offer
    gpus = ", ".join(f"{g.name} ({g.vram_total / GIB:.1f} GiB)" for g in inv.gpus)
    say(
        f"This box ({'declared' if inv.declared else 'probed'}): {inv.cpu_model}, "
        f"{inv.cpu_cores} cores, {inv.ram_total / GIB:.1f} GiB RAM, "
        + (gpus or f"no GPU ({inv.gpu_note})")
    )
    vram = f"{offer.vram_mib / 1024:.1f} GiB VRAM" if offer.num_gpus else "no VRAM"
    say(
        f"As {offer.role} {offer.name!r} it offers {offer.memory / GIB:.1f} GiB RAM and {vram} "
        f"for models."
    )
    if plan.kernels is not None:
        say(f"CPU kernels (llama.cpp): {plan.kernels.label}: {plan.kernels.reason}.")


def say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


@node_app.command("stop")
def node_stop(state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Take this box's node out of the cluster (only the node `corral node start` ran)."""
    settings = load(config, state_dir=state_dir)
    try:
        record = stop_node(settings.state_path)
    except NodeStartError as exc:
        raise fail(exc) from None
    if record is None:
        say(f"No node runs from {settings.state_path}.")
    else:
        say(f"Stopped node {record.name!r} ({record.role}).")


@app.command("nodes")
def nodes(
    address: Annotated[
        str | None, typer.Option(help="The cluster's head, HOST:PORT (default: this box's).")
    ] = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every node of the cluster: role, state, CPU and its llama.cpp kernels, RAM, GPU and
    VRAM, models."""
    # Imported here, not at the top: cluster.server brings Ray Serve and FastAPI (about
    # half a second), which only the commands that join the cluster should pay for.
    from cluster.server import StartupError

    settings = load(config, state_dir=state_dir, ray_address=address)
    try:
        statuses = fetch_nodes(settings)
    except StartupError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps([s.model_dump() for s in statuses], indent=2))
    else:
        # Piped output keeps whole rows (rich would wrap at 80 columns).
        Console(width=None if sys.stdout.isatty() else 200).print(nodes_table(statuses))


def fetch_nodes(settings: CorralSettings) -> list[NodeStatus]:
    """The cluster's nodes: from the controller if Corral serves, else probed now."""
    # Ray, Serve and FastAPI load here, for the commands that join the cluster: they add
    # about half a second to every `corral` start, `corral --help` and `corral pull` too.
    import ray

    from cluster.inventory import InventoryMonitor
    from cluster.server import StartupError, cluster_address, join_cluster

    address = cluster_address(settings)
    if address is None:
        raise StartupError(
            "no cluster to show: start one with `corral node start --head` or `corral serve`, "
            "or pass --address HOST:PORT"
        )
    join_cluster(address, settings, quiet=True)
    try:
        try:
            controller = ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)
        except ValueError:
            return asyncio.run(InventoryMonitor().settle(timeout=15))
        return ray.get(controller.nodes.remote())
    finally:
        ray.shutdown()


def nodes_table(statuses: list[NodeStatus]) -> Table:
    table = Table(title="Corral nodes", title_justify="left")
    for column in ("node", "role", "state", "CPU", "CPU kernels", "RAM used/total", "GPU"):
        table.add_column(column)
    table.add_column("VRAM used/total")
    table.add_column("models")
    for s in statuses:
        state = "[green]up[/]" if s.state == "up" else f"[red]down[/] ({s.note})"
        gpus = ", ".join(g.name for g in s.gpus) or "-"
        vram_total = sum(g.vram_total for g in s.gpus)
        vram_used = sum(g.vram_used for g in s.gpus)
        table.add_row(
            s.name,
            s.role,
            state,
            f"{s.cpu_cores} cores" if s.cpu_cores else "-",
            s.labels.get(LABEL_CPU_KERNELS, "-"),
            _used_total(s.ram_used, s.ram_total),
            gpus,
            _used_total(vram_used, vram_total) if s.gpus else "-",
            ", ".join(s.models) or "-",
        )
    return table


def _used_total(used: int | None, total: int | None) -> str:
    if not total:
        return "-"
    return f"{(used or 0) / GIB:.1f}/{total / GIB:.1f} GiB"
