"""``corral plan -f models.yaml`` (what would change) and ``corral apply -f models.yaml``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cluster.cli_app import ConfigOption, app, console, fail, load
from cluster.cli_nodes import StateDirOption
from cluster.plan_report import PlanReport, change_detail, counts, label
from cluster.settings import CorralSettings
from cluster.spec import ModelSpec, load_models
from cluster.yamlfile import ConfigError
from deployments.actors import CONTROLLER_ACTOR, NAMESPACE
from nodes.errors import CorralError

FileOption = Annotated[
    Path,
    typer.Option(
        "--file", "-f", help="The models file (see configs/models.yaml).", show_default=False
    ),
]
AddressOption = Annotated[
    str | None, typer.Option(help="The cluster's head, HOST:PORT (default: this box's).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
_OP_STYLE = {"+": "green", "-": "red", "~": "yellow"}


@app.command("plan")
def plan_command(
    file: FileOption,
    address: AddressOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show what `corral apply` would change (+ add, - remove, ~ change); change nothing."""
    specs = _load_specs(file)
    report = _ask(load(config, state_dir=state_dir, ray_address=address), "plan", specs)
    if as_json:
        print(json.dumps(_as_dict(report), indent=2))
        return
    out = _stdout()
    _print_plan(out, report, file)
    if not report.changes:
        out.print(f"No changes: the cluster already runs what {file} declares.")
    else:
        out.print(f"Plan: {counts(report)}. Run `corral apply -f {file}` to make it so.")


@app.command("apply")
def apply_command(
    file: FileOption,
    address: AddressOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make the cluster run what the models file declares, and say what happened.

    Exits 1 if a model could not be placed or a placement failed to load.
    """
    specs = _load_specs(file)
    settings = load(config, state_dir=state_dir, ray_address=address)
    with console.status(f"Applying {file} (loading models may take a while)..."):
        report = _ask(settings, "apply", specs)
    if as_json:
        print(json.dumps(_as_dict(report), indent=2))
    else:
        out = _stdout()
        _print_plan(out, report, file, applied=True)
        if not report.changes:
            out.print(f"No changes: the cluster already runs what {file} declares.")
        else:
            done = "Applied with failures" if report.failed else "Applied"
            out.print(f"{done}: {counts(report, past=True)}.")
    if report.failed or report.plan.unplaced:
        raise typer.Exit(1)


def _load_specs(file: Path) -> list[ModelSpec]:
    try:
        return load_models(file)
    except ConfigError as exc:
        raise fail(exc, 2) from None


def _ask(settings: CorralSettings, method: str, specs: list[ModelSpec]) -> PlanReport:
    """Call the controller's ``plan`` or ``apply`` with ``specs``; exit with the reason on error."""
    # Ray, Serve and FastAPI load here, not at the top: cluster.server and
    # deployments.backend add about half a second that only the commands which join the
    # cluster should pay (see cli_nodes.fetch_nodes).
    import ray

    from cluster.server import StartupError, cluster_address, join_cluster

    address = cluster_address(settings)
    try:
        if address is None:
            raise StartupError(
                "no cluster: start Corral with `corral serve` (or join one with --address)"
            )
        join_cluster(address, settings, quiet=True)
    except StartupError as exc:
        raise fail(exc) from None
    try:
        try:
            controller = ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)
        except ValueError:
            raise fail(
                f"Corral is not serving on the cluster at {address}: start it with "
                f"`corral serve --address {address}`"
            ) from None
        try:
            return ray.get(getattr(controller, method).remote(specs))
        except CorralError as exc:
            raise fail(f"{exc}", 2) from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, CorralError):
                raise fail(f"{cause}", 2) from None
            raise
    finally:
        ray.shutdown()


def _print_plan(out: Console, report: PlanReport, file: Path, *, applied: bool = False) -> None:
    for change in report.changes:
        style = _OP_STYLE[change.op]
        name = label(change.placement)
        if applied and name in report.failed:
            out.print(f"[red]✗ {escape(name)}[/]: failed: {escape(report.failed[name])}")
            continue
        detail = change_detail(change)
        out.print(f"[{style}]{change.op} {escape(name)}[/]: {escape(detail)}", highlight=False)
        if change.op == "+" and change.placement.reason:
            out.print(f"    [dim]{escape(change.placement.reason)}[/]", highlight=False)
    if report.unchanged:
        names = ", ".join(label(p) for p in report.unchanged)
        out.print(f"[dim]= unchanged: {escape(names)}[/]", highlight=False)
    for missing in report.plan.unplaced:
        out.print(
            f"[red]! {escape(missing.model)}[/]: {missing.placed} of {missing.wanted} "
            f"replica{'s' if missing.wanted != 1 else ''} placed: {escape(missing.reason)}",
            highlight=False,
        )
    for note in report.plan.notes:
        out.print(f"[yellow]note[/]: {escape(note)}", highlight=False)


def _as_dict(report: PlanReport) -> dict:
    plan = report.plan
    return {
        "changes": [
            {
                "op": c.op,
                "model": c.placement.model,
                "node": c.placement.node,
                "reload": c.reload,
                "before": dataclasses.asdict(c.before) if c.before else None,
                "after": dataclasses.asdict(c.after) if c.after else None,
            }
            for c in report.changes
        ],
        "placements": [dataclasses.asdict(p) for p in plan.placements],
        "unchanged": [f"{p.model} on {p.node}" for p in report.unchanged],
        "unplaced": [dataclasses.asdict(u) for u in plan.unplaced],
        "notes": list(plan.notes),
        "failed": report.failed,
    }


def _stdout() -> Console:
    # Piped output keeps whole lines (rich would wrap at 80 columns).
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)
