"""``corral keys``: create, list and revoke the API keys of this box's Corral.

Keys live in the state directory of the box that runs ``corral serve`` (the
head), so these commands run there, as the user Corral runs as. The running
server sees a change on its next request; nothing restarts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cluster.cli_app import ConfigOption, app, console, fail, load
from deployments.keys import KeyFile, KeyFileError, keys_path
from nodes.models import check_name

keys_app = typer.Typer(
    help="API keys: once one exists, every request needs `Authorization: Bearer <key>`.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")

StateDirOption = Annotated[
    Path | None,
    typer.Option(help="Corral's state directory, where the keys are (default ~/.corral)."),
]


def _key_file(state_dir: Path | None, config: Path | None) -> KeyFile:
    settings = load(config, state_dir=state_dir)
    return KeyFile(keys_path(settings.state_path))


@keys_app.command("create")
def keys_create(
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="A name to recognise the key by.")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            "--models",
            help="Comma-separated models the key may use (default: every model, and changing "
            "the model library).",
        ),
    ] = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Make a new key and print it once: it is stored only as a hash."""
    allowed = None
    if models is not None:
        allowed = [m.strip() for m in models.split(",") if m.strip()]
        if not allowed:
            raise fail("--models lists no model; leave it out for a key that may use every model")
        for model in allowed:
            try:
                check_name(model)
            except ValueError as exc:
                raise fail(f"--models: {exc}") from None
    file = _key_file(state_dir, config)
    first = not _existing(file)
    try:
        record, secret = file.create(name or "", allowed)
    except (KeyFileError, OSError) as exc:
        raise fail(exc) from None
    scope = ", ".join(record.models) if record.models is not None else "every model"
    console.print(
        f"Created key [bold]{record.id}[/] ({record.name}) for {scope}. "
        "Copy it now: it is not shown again.",
        highlight=False,
        soft_wrap=True,
    )
    if first:
        console.print(
            "API keys are now required: requests without a key get 401 from now on.",
            highlight=False,
            soft_wrap=True,
        )
    print(secret)  # alone on stdout, so `KEY=$(corral keys create)` works


def _existing(file: KeyFile) -> bool:
    try:
        return bool(file.read())
    except KeyFileError:
        return True


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Every key: id, name, models, when created, and whether it was revoked."""
    file = _key_file(state_dir, config)
    try:
        keys = file.read()
    except KeyFileError as exc:
        raise fail(exc) from None
    if as_json:
        rows = [{k: v for k, v in key.to_json().items() if k != "hash"} for key in keys]
        print(json.dumps(rows, indent=2))
        return
    if not keys:
        Console(stderr=True).print(
            f"No API keys in {file.path}: the API is open to whoever can reach it. "
            "`corral keys create` makes one."
        )
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "MODELS", "CREATED", "STATE"):
        table.add_column(column)
    for key in keys:
        models = ", ".join(key.models) if key.models is not None else "all"
        state = f"revoked {key.revoked_at}" if key.revoked else "active"
        table.add_row(key.id, key.name, models, key.created_at, state)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id (from `corral keys list`) or name.")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Stop a key from working, from the next request on."""
    file = _key_file(state_dir, config)
    try:
        record = file.revoke(key)
    except KeyError:
        raise fail(f"no key has the id or name {key!r} (see `corral keys list`)") from None
    except (ValueError, KeyFileError, OSError) as exc:
        raise fail(exc) from None
    console.print(f"Revoked key {record.id} ({record.name}).", highlight=False, soft_wrap=True)
